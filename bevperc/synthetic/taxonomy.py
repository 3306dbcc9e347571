"""What the synthetic world names and how it colours it: nuScenes categories, attributes,
visibility levels and locations, the kinds of objects it places, and their colours.

Objects are tracked instances of all 10 detection classes with real nuScenes category
names and sizes; attributes follow the motion (``vehicle.moving/stopped/parked``,
``cycle.with_rider/without_rider``, ``pedestrian.moving/standing``). Each class has a
strongly distinct colour (``CLASS_COLOURS``; per-instance jitter of hue/saturation/value),
so that a colour identifies its class in the rendered images.
"""

from __future__ import annotations

from dataclasses import dataclass

# All nuScenes categories (lidarseg indices as in the real category.json).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("noise", "Any lidar return that does not correspond to a physical object."),
    ("animal", "All animals, e.g. cats, rats, dogs, deer, birds."),
    ("human.pedestrian.adult", "Adult subcategory."),
    ("human.pedestrian.child", "Child subcategory."),
    ("human.pedestrian.construction_worker", "Construction worker"),
    ("human.pedestrian.personal_mobility", "A small electric or self-propelled vehicle."),
    ("human.pedestrian.police_officer", "Police officer."),
    ("human.pedestrian.stroller", "Strollers."),
    ("human.pedestrian.wheelchair", "Wheelchairs."),
    ("movable_object.barrier", "Temporary road barrier placed in the scene in order to redirect traffic."),
    ("movable_object.debris", "Movable object that is left on the driveable surface."),
    ("movable_object.pushable_pullable", "Objects that a pedestrian may push or pull."),
    ("movable_object.trafficcone", "All types of traffic cone."),
    ("static_object.bicycle_rack", "Area or device intended to park or secure the bicycles in a row."),
    ("vehicle.bicycle", "Human or electric powered 2-wheeled vehicle designed to travel at lower speeds."),
    ("vehicle.bus.bendy", "Bendy bus subcategory."),
    ("vehicle.bus.rigid", "Rigid bus subcategory."),
    ("vehicle.car", "Vehicle designed primarily for personal use, e.g. sedans, hatch-backs, wagons, vans."),
    ("vehicle.construction", "Vehicles primarily designed for construction. Typically very slow moving or stationary."),
    ("vehicle.emergency.ambulance", "All types of ambulances."),
    ("vehicle.emergency.police", "All types of police vehicles."),
    ("vehicle.motorcycle", "Gasoline or electric powered 2-wheeled vehicle designed to move rapidly."),
    ("vehicle.trailer", "Any vehicle trailer, both for trucks, cars and bikes."),
    ("vehicle.truck", "Vehicles primarily designed to haul cargo including pick-ups, lorrys, trucks and semi-tractors."),
    ("flat.driveable_surface", "All paved or unpaved surfaces that a car can drive on with no concern of traffic rules."),
    ("flat.other", "All other forms of horizontal ground-level structures that do not belong to other classes."),
    ("flat.sidewalk", "Sidewalk, pedestrian walkways, bike paths, etc."),
    ("flat.terrain", "Natural horizontal surfaces such as ground level horizontal vegetation."),
    ("static.manmade", "Includes man-made structures but not limited to: buildings, walls, guard rails, poles."),
    ("static.other", "Points in the background that are not distinguishable."),
    ("static.vegetation", "Any vegetation in the frame that is higher than the ground, including bushes, plants."),
    ("vehicle.ego", "The vehicle on which the sensors are mounted."),
)
ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move."),
    ("vehicle.parked", "Vehicle is stationary (usually for longer duration) with no immediate intent to move."),
    ("cycle.with_rider", "There is a rider on the bicycle or motorcycle."),
    ("cycle.without_rider", "There is NO rider on the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The human is sitting or lying down."),
    ("pedestrian.standing", "The human is standing."),
    ("pedestrian.moving", "The human is moving."),
)
VISIBILITY_LEVELS: tuple[tuple[str, str, str], ...] = (
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
)
LOCATIONS = ("singapore-onenorth", "boston-seaport", "singapore-queenstown", "singapore-hollandvillage")


@dataclass(frozen=True)
class ObjectKind:
    """One kind of annotated object: its classes, size distribution and appearance."""

    detection_class: str  # detection class name, or "" for non-detection annotations
    category: str
    size_mean: tuple[float, float, float]  # w, l, h (m)
    size_std: tuple[float, float, float]
    intensity: float  # LiDAR intensity 0..255


# Kinds of objects the world places (keys: detection class, or "bicycle_rack").
OBJECT_KINDS: dict[str, ObjectKind] = {
    "car": ObjectKind("car", "vehicle.car", (1.95, 4.6, 1.72), (0.12, 0.35, 0.15), 40.0),
    "truck": ObjectKind("truck", "vehicle.truck", (2.5, 7.0, 3.0), (0.2, 1.2, 0.35), 45.0),
    "construction_vehicle": ObjectKind("construction_vehicle", "vehicle.construction", (2.8, 6.4, 3.2),
                                       (0.25, 1.0, 0.35), 50.0),
    "bus": ObjectKind("bus", "vehicle.bus.rigid", (2.95, 11.2, 3.45), (0.08, 0.9, 0.15), 45.0),
    "trailer": ObjectKind("trailer", "vehicle.trailer", (2.6, 9.5, 3.6), (0.15, 2.0, 0.35), 40.0),
    "barrier": ObjectKind("barrier", "movable_object.barrier", (2.4, 0.55, 1.0), (0.25, 0.08, 0.08), 90.0),
    "motorcycle": ObjectKind("motorcycle", "vehicle.motorcycle", (0.8, 2.1, 1.45), (0.08, 0.15, 0.1), 35.0),
    "bicycle": ObjectKind("bicycle", "vehicle.bicycle", (0.62, 1.75, 1.35), (0.06, 0.12, 0.1), 30.0),
    "pedestrian": ObjectKind("pedestrian", "human.pedestrian.adult", (0.68, 0.72, 1.76), (0.07, 0.09, 0.1), 25.0),
    "traffic_cone": ObjectKind("traffic_cone", "movable_object.trafficcone", (0.45, 0.45, 1.0), (0.04, 0.04, 0.08),
                               120.0),
    "bicycle_rack": ObjectKind("", "static_object.bicycle_rack", (2.0, 5.0, 1.2), (0.2, 1.0, 0.05), 60.0),
}

# Class colours (RGB): ten hues ~35 degrees apart at high saturation, so a colour
# identifies its class after shading (which only changes value) and jitter (+-8 deg hue).
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "bus": (215, 30, 30),  # red, hue 0
    "pedestrian": (255, 135, 0),  # orange, hue 32
    "construction_vehicle": (240, 210, 20),  # yellow, hue 52
    "bicycle": (150, 235, 30),  # lime, hue 85
    "truck": (30, 170, 70),  # green, hue 137
    "barrier": (0, 200, 220),  # cyan, hue 185
    "car": (30, 80, 230),  # blue, hue 225
    "trailer": (120, 50, 220),  # violet, hue 265
    "motorcycle": (220, 40, 210),  # magenta, hue 303
    "traffic_cone": (255, 60, 130),  # rose, hue 340 (with a white band)
    "bicycle_rack": (120, 120, 125),  # grey metal (not a detection class)
}
CLUTTER_COLOURS: tuple[tuple[int, int, int], ...] = (
    (150, 150, 150), (120, 118, 115), (175, 168, 150), (140, 115, 105), (105, 110, 118), (190, 185, 175),
)
TREE_TRUNK_COLOUR = (95, 80, 70)
TREE_CROWN_COLOUR = (80, 102, 62)
