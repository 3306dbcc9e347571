"""A synthetic nuScenes world, written in the exact nuScenes format the real devkit loads.

No real nuScenes can be downloaded here, so bevperc makes its own: ``generate(out_dir)``
writes ``<out_dir>/<version>/*.json`` (the 13 nuScenes tables), ``samples/CAM_*/*.jpg``
(1600x900), ``samples/LIDAR_TOP/*.pcd.bin`` (float32 x, y, z, intensity, ring) and
``maps/*.png``; ``nuscenes.nuscenes.NuScenes(version, out_dir)`` loads it unpatched and
``nuscenes.eval.detection.evaluate.DetectionEval`` evaluates against it.

The world
---------
Each scene is a flat road (straight, or an arc of radius 250-1000 m) in the global frame
(z up, ground at z = 0): 1-2 driving lanes per direction (3.5 m), a bike lane (1.5 m), a
parking lane (2.5 m), a kerb and a 4 m sidewalk on each side; beyond the sidewalk the
road side is cut into 25-60 m segments that are parking lots, parks, building fronts or
work sites. Right-hand traffic in Boston, left-hand in Singapore. The ego vehicle drives
in a lane at 0-12 m/s (a smooth speed profile); keyframes are at 2 Hz.

Objects are tracked instances of all 10 detection classes with real nuScenes category
names and sizes: moving/stopped vehicles in the lanes (one speed profile per lane, so
nothing collides), parked vehicles in the parking lane and (with random yaw) in lots,
cyclists in the bike lanes, walking/standing pedestrians on the sidewalks and in lots,
barriers and cones at work sites, parked bicycles/motorcycles and bicycle racks on the
sidewalks. Buildings, trees and poles are unannotated clutter (they occlude and are hit
by the LiDAR). Attributes follow the motion: ``vehicle.moving/stopped/parked``,
``cycle.with_rider/without_rider``, ``pedestrian.moving/standing``.

Rendering (NumPy ray casting, no photo-realism): every pixel's ray is intersected with
the ground (textured road, lane markings, sidewalk tiles, grass, lot lines; distance
haze) and with every box (slab test), nearest hit wins (an exact z-buffer). Each class
has a strongly distinct colour (``CLASS_COLOURS``, per-instance jitter of hue/saturation/
value); faces are Lambert-shaded by a per-scene sun, the front face (+l/2) is lightened
and the rear face darkened so heading is visible, vehicles get a dark wheel band (cars
and buses a window band), cones a white band, barriers white diagonal stripes; every box
casts a ground shadow away from the sun; each scene has its own exposure (x0.88-1.08).
Box faces are rasterised as near-clipped polygons whose per-pixel depth comes from the
face plane, against the per-pixel ground depth: an exact z-buffer.
Images are rendered at ``render_scale`` of 1600x900 and resized (bilinear). The LiDAR is
a 32-ring HDL-32E-like scanner (elevations -30.67..+10.67 deg, 1084 azimuth steps, 70 m)
ray cast against the same ground and boxes, in the real LIDAR_TOP frame.

Annotation fields
-----------------
* ``num_lidar_pts``: with LiDAR, ``bevperc.geometry.points_in_boxes`` on the written
  point cloud (hits are placed 3 cm inside the surface, as a real surface return
  scatters around it). Without LiDAR (``lidar=False``) it is estimated analytically:
  ``visible_fraction * (projected area of the lidar-facing faces / (r^2 * d_az * d_el))``
  with the scanner's angular steps, 0 beyond 70 m or outside the vertical field of view,
  and at least 1 for any box with a visible fraction > 0 within range.
* ``visibility_token``: the visible fraction of the box over all six cameras (pixels the
  box owns in the z-buffer / pixels its ray hits would cover unoccluded), binned into the
  nuScenes levels 0-40, 40-60, 60-80, 80-100 %. Without images it is estimated in bird's
  eye view: 10 azimuth rays across the box from the ego (eye 1.6 m up), each 2D-ray-cast
  against all other boxes and the clutter; a box hit before the target hides the part of
  the target's elevation span below the occluder's top. On the same worlds the estimate
  is within one visibility level of the rendered one for ~90 % of the annotations, and
  the estimated ``num_lidar_pts`` rank-correlate with the ray-cast ones (Spearman ~0.9).
* ``num_radar_pts`` is 0 (there are no radars).

Everything is deterministic per seed (tokens are MD5 hashes of seed/version/names, all
random draws come from per-scene generators), independent of the number of workers.

Cost (this 2-core CPU): the demo set (10 mini scenes x 40 keyframes, images + LiDAR)
takes ~330 CPU-seconds (~3 min on 2 idle cores); the tables-only trainval set (150 val
scenes x 40 = 6000 samples, 308k annotations) ~72 CPU-seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bevperc.geometry import (
    box_corners,
    make_transform,
    matrix_to_quaternion,
    points_in_boxes,
    project_to_image,
    yaw_to_quaternion,
)

GENERATOR_VERSION = "1.1.0"

# --------------------------------------------------------------------------- the rig
IMAGE_WIDTH, IMAGE_HEIGHT = 1600, 900

# Real nuScenes calibration (log n015-2018-07-24-11-22-45+0800, v1.0-mini), written here
# once as numbers: camera -> ego translation (m), rotation quaternion (w, x, y, z), and
# intrinsics (f, cx, cy) with fx = fy = f.
CAMERA_CALIBRATION: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple[float, float, float]]] = {
    "CAM_FRONT": ((1.700791, 0.015946, 1.510958), (0.49980154, -0.50303162, 0.49977981, -0.49737084),
                  (1266.417203, 816.267020, 491.507066)),
    "CAM_FRONT_RIGHT": ((1.550848, -0.493405, 1.495748), (0.20603479, -0.20269405, 0.68245078, -0.67136109),
                        (1260.847445, 807.968245, 495.334427)),
    "CAM_FRONT_LEFT": ((1.523878, 0.494631, 1.509328), (0.6757265, -0.67362665, 0.21214015, -0.21122827),
                       (1272.597947, 826.615493, 479.751654)),
    "CAM_BACK": ((0.028326, 0.003451, 1.579103), (0.50378727, -0.4974025, -0.49418502, 0.50454961),
                 (809.220991, 829.219600, 481.778424)),
    "CAM_BACK_LEFT": ((1.035691, 0.484795, 1.59097), (0.69241856, -0.70316194, -0.11648343, 0.11203318),
                      (1256.741481, 792.112574, 492.775747)),
    "CAM_BACK_RIGHT": ((1.014878, -0.480568, 1.562395), (0.1228098, -0.13240084, -0.70043058, 0.69049603),
                       (1259.513741, 807.252905, 501.195799)),
}
CAMERA_NAMES: tuple[str, ...] = tuple(CAMERA_CALIBRATION)
LIDAR_CALIBRATION = ((0.943713, 0.0, 1.84023), (0.70779551, -0.00649224, 0.01064621, -0.70630731))

# Camera trigger times relative to the LiDAR keyframe (us). The real rig fires the cameras
# as the LiDAR sweeps past them (up to ~45 ms apart); a tenth of that keeps every timestamp
# distinct and realistic in order while the ego moves < 5 cm between them.
CAMERA_TIME_OFFSETS_US = {
    "CAM_FRONT_LEFT": -4300, "CAM_FRONT": -3500, "CAM_FRONT_RIGHT": -2800,
    "CAM_BACK_RIGHT": -2000, "CAM_BACK": -1000, "CAM_BACK_LEFT": -50,
}
KEYFRAME_INTERVAL_US = 500_000  # 2 Hz

LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
LIDAR_AZIMUTH_STEPS = 1084
LIDAR_MAX_RANGE = 70.0
LIDAR_MIN_RANGE = 1.0


def rigid_inverse(transform: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform (rotation transposed; no general matrix inverse)."""
    out = np.eye(4)
    rot = np.asarray(transform, dtype=np.float64)[:3, :3]
    out[:3, :3] = rot.T
    out[:3, 3] = -rot.T @ np.asarray(transform, dtype=np.float64)[:3, 3]
    return out


def camera_intrinsics(camera: str) -> np.ndarray:
    """3x3 intrinsics of a camera of the rig."""
    f, cx, cy = CAMERA_CALIBRATION[camera][2]
    return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])


def ego_from_camera(camera: str) -> np.ndarray:
    """4x4 camera -> ego transform of the rig."""
    translation, rotation, _ = CAMERA_CALIBRATION[camera]
    return make_transform(np.array(rotation), np.array(translation))


def ego_from_lidar() -> np.ndarray:
    """4x4 LIDAR_TOP -> ego transform of the rig."""
    return make_transform(np.array(LIDAR_CALIBRATION[1]), np.array(LIDAR_CALIBRATION[0]))


# --------------------------------------------------------------------------- taxonomy
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

# Kinds of objects the world places: detection class (or "bicycle_rack"), general
# category, mean size (w, l, h), size std, LiDAR intensity.
@dataclass(frozen=True)
class ObjectKind:
    """One kind of annotated object: its classes, size distribution and appearance."""

    detection_class: str  # detection class name, or "" for non-detection annotations
    category: str
    size_mean: tuple[float, float, float]  # w, l, h (m)
    size_std: tuple[float, float, float]
    intensity: float  # LiDAR intensity 0..255


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
SKY_ZENITH = np.array([110.0, 150.0, 210.0])
SKY_HORIZON = np.array([200.0, 212.0, 228.0])
HAZE_DISTANCE = 350.0  # m: ground colour fades to the horizon colour with exp(-d / HAZE_DISTANCE)
SUN_DIRECTION = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])


# --------------------------------------------------------------------------- options
@dataclass
class SyntheticConfig:
    """Options of the synthetic world (all have CLI flags in data_tools/synthetic_nuscenes.py)."""

    version: str = "v1.0-mini"  # "v1.0-mini" (the 10 mini scenes) or "v1.0-trainval" (the 150 val scenes [+700 train])
    seed: int = 0
    samples_per_scene: int = 40  # keyframes per scene (2 Hz)
    num_scenes: Optional[int] = None  # keep only the first N scenes of the version (None: all)
    include_train: bool = False  # trainval: also generate the 700 train scenes
    train_scenes: Optional[int] = None  # trainval: only the first N train scenes (implies include_train)
    val_scenes: Optional[int] = None  # trainval: only the first N val scenes
    split: Optional[str] = None  # keep only the scenes of this devkit split (e.g. "mini_val": a held-out world)
    objects_per_sample: float = 40.0  # target mean number of annotations within 50 m of the ego per sample
    images: bool = True  # render and write the camera JPEGs
    lidar: bool = True  # ray cast and write the LIDAR_TOP point clouds
    render_scale: float = 0.5  # render at this fraction of 1600x900, then resize (bilinear)
    jpeg_quality: int = 90
    annotation_radius: float = 60.0  # m (xy, from the ego): instances within it are annotated
    bicycle_racks: bool = True  # add a few static_object.bicycle_rack annotations
    workers: int = 2  # processes (one scene per task)
    overwrite: bool = False

    def validate(self) -> None:
        """Clear errors for bad option values."""
        if self.version not in ("v1.0-mini", "v1.0-trainval"):
            raise ValueError(f"version must be 'v1.0-mini' or 'v1.0-trainval', got {self.version!r}")
        if self.samples_per_scene < 2:
            raise ValueError(f"samples_per_scene must be >= 2, got {self.samples_per_scene}")
        if self.num_scenes is not None and self.num_scenes < 1:
            raise ValueError(f"num_scenes must be >= 1 or None, got {self.num_scenes}")
        allowed = {"v1.0-mini": ("mini_train", "mini_val"), "v1.0-trainval": ("train", "val")}[self.version]
        if self.split is not None and self.split not in allowed:
            raise ValueError(f"split must be one of {allowed} for {self.version}, got {self.split!r}")
        for name in ("train_scenes", "val_scenes"):
            count = getattr(self, name)
            if count is not None and (self.version != "v1.0-trainval" or count < 0):
                raise ValueError(f"{name} is a count >= 0 of v1.0-trainval scenes, got {count} for {self.version}")
        if self.split == "train" and not self.has_train_scenes:
            raise ValueError("split='train' of v1.0-trainval needs include_train=True or train_scenes")

    @property
    def has_train_scenes(self) -> bool:
        return self.include_train or self.train_scenes is not None
        if not 0.05 <= self.render_scale <= 1.0:
            raise ValueError(f"render_scale must be in [0.05, 1], got {self.render_scale}")
        if self.objects_per_sample < 0:
            raise ValueError(f"objects_per_sample must be >= 0, got {self.objects_per_sample}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


def devkit_splits() -> dict[str, list[str]]:
    """Scene-name lists of the installed devkit (see :mod:`bevperc.data.splits`)."""
    from bevperc.data.splits import scene_splits

    return {name: list(scene_splits()[name]) for name in ("train", "val", "mini_train", "mini_val")}


def scene_names_for(cfg: SyntheticConfig) -> list[str]:
    """The real scene names of the version (devkit splits), in generation order."""
    splits = devkit_splits()
    if cfg.version == "v1.0-mini":
        names = splits["mini_train"] + splits["mini_val"]
    else:
        names = splits["val"][: cfg.val_scenes] + (splits["train"][: cfg.train_scenes] if cfg.has_train_scenes else [])
    if cfg.split is not None:
        names = [name for name in names if name in set(splits[cfg.split])]
    if cfg.num_scenes is not None:
        names = names[: cfg.num_scenes]
    return names


def make_token(*parts: Any) -> str:
    """Deterministic 32-hex-digit token (the nuScenes token format) from its parts."""
    return hashlib.md5("|".join(str(p) for p in parts).encode()).hexdigest()


def scene_rng(seed: int, scene_name: str, stream: str = "world") -> np.random.Generator:
    """Independent generator per (seed, scene, stream): results do not depend on workers."""
    digest = hashlib.md5(f"{seed}|{scene_name}|{stream}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------- the road
@dataclass
class Road:
    """A road centreline (straight or a circular arc) with a cross-section layout.

    Curvilinear coordinates: ``s`` (m along the centreline from the origin) and
    ``lateral`` (m to the left of the centreline direction).
    """

    origin: np.ndarray  # (2,) global xy of s = 0
    heading0: float  # centreline heading at s = 0 (rad)
    curvature: float  # 1/m, signed (positive turns left); 0 = straight
    lanes_per_direction: int
    forward_side: float  # -1: traffic in +s drives on the right (lateral < 0); +1: on the left
    lane_width: float = 3.5
    bike_lane_width: float = 1.5
    parking_width: float = 2.5
    kerb_width: float = 0.25
    sidewalk_width: float = 4.0

    @property
    def driving_half_width(self) -> float:
        return self.lanes_per_direction * self.lane_width

    @property
    def kerb_offset(self) -> float:
        """|lateral| where the parking lane ends and the kerb starts."""
        return self.driving_half_width + self.bike_lane_width + self.parking_width

    @property
    def sidewalk_end(self) -> float:
        """|lateral| where the sidewalk ends and the road side begins."""
        return self.kerb_offset + self.kerb_width + self.sidewalk_width

    def heading(self, s: np.ndarray) -> np.ndarray:
        return self.heading0 + self.curvature * np.asarray(s, dtype=np.float64)

    def point(self, s: np.ndarray, lateral: np.ndarray) -> np.ndarray:
        """Global xy ``(..., 2)`` of curvilinear coordinates."""
        s = np.asarray(s, dtype=np.float64)
        lateral = np.asarray(lateral, dtype=np.float64)
        theta = self.heading(s)
        normal = np.stack([-np.sin(theta), np.cos(theta)], -1)
        if abs(self.curvature) < 1e-9:
            tangent0 = np.array([math.cos(self.heading0), math.sin(self.heading0)])
            centre = self.origin + s[..., None] * tangent0
        else:
            k = self.curvature
            centre = self.origin + np.stack(
                [(np.sin(theta) - math.sin(self.heading0)) / k, -(np.cos(theta) - math.cos(self.heading0)) / k], -1
            )
        return centre + lateral[..., None] * normal

    def speed_factor(self, lateral: np.ndarray) -> np.ndarray:
        """d(arc length at ``lateral``) / ds: 1 - curvature * lateral."""
        return 1.0 - self.curvature * np.asarray(lateral, dtype=np.float64)

    def curvilinear(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global xy ``(..., 2)`` -> ``(s, lateral)``."""
        xy = np.asarray(xy)
        if abs(self.curvature) < 1e-9:
            c, s_ = math.cos(self.heading0), math.sin(self.heading0)
            d = xy - self.origin.astype(xy.dtype)
            return d[..., 0] * c + d[..., 1] * s_, -d[..., 0] * s_ + d[..., 1] * c
        k = self.curvature
        centre = self.origin + np.array([-math.sin(self.heading0), math.cos(self.heading0)]) / k
        d = xy - centre.astype(xy.dtype)
        dist = np.hypot(d[..., 0], d[..., 1])
        if k > 0:
            lateral = 1.0 / k - dist
            normal_angle = np.arctan2(-d[..., 1], -d[..., 0])
        else:
            lateral = dist + 1.0 / k
            normal_angle = np.arctan2(d[..., 1], d[..., 0])
        theta = normal_angle - math.pi / 2
        dtheta = (theta - self.heading0 + math.pi) % (2 * math.pi) - math.pi
        return dtheta / k, lateral


@dataclass
class SpeedProfile:
    """Smooth 1D motion ``s(t) = s0 + v0 t + amp/omega (1 - cos(omega t))`` (speed ``v0 + amp sin``)."""

    v0: float
    amp: float = 0.0
    omega: float = 0.3
    phase: float = 0.0

    def position(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if self.amp == 0.0:
            return self.v0 * t
        return self.v0 * t + self.amp / self.omega * (np.cos(self.phase) - np.cos(self.omega * t + self.phase))

    def speed(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return self.v0 + self.amp * np.sin(self.omega * t + self.phase)


@dataclass
class Instance:
    """One annotated object: curvilinear track ``s(t) = s0 + direction * profile.position(t)``."""

    kind: str  # key of OBJECT_KINDS
    category: str
    size: np.ndarray  # (3,) w, l, h
    s0: float
    lateral: float
    yaw_offset: float  # relative to the road heading at s
    profile: Optional[SpeedProfile]  # None: static
    direction: float  # +1 / -1 along s
    attribute: str  # attribute name or ""
    colour: np.ndarray  # (3,) RGB 0..255 after jitter

    def s_at(self, t: np.ndarray) -> np.ndarray:
        if self.profile is None:
            return np.full(np.shape(t), self.s0)
        return self.s0 + self.direction * self.profile.position(t)


@dataclass
class ClutterBox:
    """Unannotated static geometry: buildings, trees, poles, rack bars (global frame)."""

    box: np.ndarray  # (7,) x, y, z(centre), w, l, h, yaw
    colour: np.ndarray
    intensity: float


@dataclass
class World:
    """Everything about one scene needed to render and annotate any timestamp."""

    road: Road
    ego_lateral: float
    ego_profile: SpeedProfile
    instances: list[Instance]
    clutter: list[ClutterBox]
    side_segments: dict[int, tuple[np.ndarray, np.ndarray]]  # side (+1/-1) -> (segment starts, type ids)
    location: str
    description: str
    sun_direction: np.ndarray = field(default_factory=lambda: SUN_DIRECTION.copy())  # unit, towards the sun
    exposure: float = 1.0  # global brightness factor of the scene's images
    _tracks: Optional[dict] = field(default=None, repr=False)

    def ego_pose(self, t: float) -> np.ndarray:
        """4x4 global_from_ego at scene time ``t`` (s); ego z = 0 like real nuScenes."""
        s = float(self.ego_profile.position(t))
        xy = self.road.point(np.array(s), np.array(self.ego_lateral))
        yaw = float(self.road.heading(s))
        return make_transform(yaw_to_quaternion(yaw), np.array([xy[0], xy[1], 0.0]))

    def _track_arrays(self) -> dict[str, np.ndarray]:
        """Per-instance track parameters as arrays (built once; instances never change)."""
        if getattr(self, "_tracks", None) is None or len(self._tracks["s0"]) != len(self.instances):
            insts = self.instances
            prof = [inst.profile or SpeedProfile(0.0) for inst in insts]
            self._tracks = {
                "s0": np.array([inst.s0 for inst in insts], dtype=np.float64),
                "lateral": np.array([inst.lateral for inst in insts], dtype=np.float64),
                "yaw_offset": np.array([inst.yaw_offset for inst in insts], dtype=np.float64),
                "direction": np.array([inst.direction for inst in insts], dtype=np.float64),
                "size": np.array([inst.size for inst in insts], dtype=np.float64).reshape(-1, 3),
                "v0": np.array([p.v0 for p in prof]), "amp": np.array([p.amp for p in prof]),
                "omega": np.array([p.omega for p in prof]), "phase": np.array([p.phase for p in prof]),
                "moving": np.array([inst.profile is not None for inst in insts], dtype=bool),
            }
        return self._tracks

    def instance_boxes(self, t: float) -> np.ndarray:
        """Global boxes ``(N, 9)`` [x, y, z, w, l, h, yaw, vx, vy] of all instances at time ``t`` (s)."""
        a = self._track_arrays()
        if len(a["s0"]) == 0:
            return np.zeros((0, 9))
        omega = a["omega"]
        travel = a["v0"] * t + a["amp"] / omega * (np.cos(a["phase"]) - np.cos(omega * t + a["phase"]))
        speed = a["v0"] + a["amp"] * np.sin(omega * t + a["phase"])
        travel = np.where(a["moving"], travel, 0.0)
        speed = np.where(a["moving"], speed, 0.0)
        s = a["s0"] + a["direction"] * travel
        xy = self.road.point(s, a["lateral"])
        heading = self.road.heading(s)
        ds_dt = a["direction"] * speed * self.road.speed_factor(a["lateral"])
        yaw = heading + a["yaw_offset"]
        yaw = np.arctan2(np.sin(yaw), np.cos(yaw))
        size = a["size"]
        return np.stack([xy[:, 0], xy[:, 1], size[:, 2] / 2, size[:, 0], size[:, 1], size[:, 2], yaw,
                         ds_dt * np.cos(heading), ds_dt * np.sin(heading)], 1)


SEGMENT_TYPES = ("lot", "park", "building", "worksite")
DENSITY_CALIBRATION = 0.38
"""Scales all object densities so that ``objects_per_sample=40`` gives ~40 annotations within 50 m."""


# --------------------------------------------------------------------------- world building
def _jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    """Per-instance colour jitter: hue +-8 deg, saturation x[0.8, 1], value x[0.85, 1.08]."""
    import colorsys

    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    h = (h + rng.uniform(-8, 8) / 360.0) % 1.0
    s = min(1.0, s * rng.uniform(0.8, 1.0))
    v = min(1.0, v * rng.uniform(0.85, 1.08))
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _sample_size(rng: np.random.Generator, kind: str) -> np.ndarray:
    spec = OBJECT_KINDS[kind]
    mean, std = np.array(spec.size_mean), np.array(spec.size_std)
    return np.clip(mean + std * rng.standard_normal(3), mean * 0.6, mean * 1.5)


class _Placer:
    """Keeps static footprints (circles) to reject overlapping placements."""

    def __init__(self) -> None:
        self.centres: list[np.ndarray] = []
        self.radii: list[float] = []

    def free(self, xy: np.ndarray, radius: float) -> bool:
        if not self.centres:
            return True
        centres = np.array(self.centres)
        dist = np.hypot(centres[:, 0] - xy[0], centres[:, 1] - xy[1])
        return bool(np.all(dist > np.array(self.radii) + radius))

    def add(self, xy: np.ndarray, radius: float) -> None:
        self.centres.append(np.asarray(xy, dtype=np.float64))
        self.radii.append(radius)


def build_world(cfg: SyntheticConfig, scene_name: str, scene_index: int, duration: float) -> World:
    """Lay out the road, the ego motion, the annotated instances and the clutter of a scene.

    ``duration`` is the time (s) from the first to the last keyframe.
    """
    rng = scene_rng(cfg.seed, scene_name)
    location = LOCATIONS[int(rng.integers(len(LOCATIONS)))]
    forward_side = -1.0 if location.startswith("boston") else 1.0
    curvature = 0.0 if rng.random() < 0.5 else float(rng.choice([-1, 1]) * rng.uniform(1 / 1000, 1 / 250))
    road = Road(
        origin=rng.uniform(300.0, 1800.0, 2),
        heading0=float(rng.uniform(-math.pi, math.pi)),
        curvature=curvature,
        lanes_per_direction=int(rng.integers(1, 3)),
        forward_side=forward_side,
    )
    lane_w = road.lane_width
    # Ego motion: mostly driving, sometimes stopped (traffic light), smooth speed changes.
    if rng.random() < 0.12:
        ego_profile = SpeedProfile(0.0)
    else:
        v0 = float(rng.uniform(3.0, 11.0))
        ego_profile = SpeedProfile(v0, amp=float(rng.uniform(0, 0.25) * v0), omega=float(rng.uniform(0.15, 0.4)))
    ego_lane = int(rng.integers(road.lanes_per_direction))
    ego_lateral = forward_side * lane_w * (ego_lane + 0.5)
    times = np.linspace(0.0, duration, 64)
    ego_s = ego_profile.position(times)
    radius = cfg.annotation_radius
    s_lo, s_hi = float(ego_s.min()) - radius - 30.0, float(ego_s.max()) + radius + 30.0
    density = cfg.objects_per_sample / 40.0 * DENSITY_CALIBRATION

    instances: list[Instance] = []
    clutter: list[ClutterBox] = []
    placer = _Placer()

    def add_instance(kind: str, s0: float, lateral: float, yaw_offset: float, profile: Optional[SpeedProfile],
                     direction: float, attribute: str, size: Optional[np.ndarray] = None,
                     category: Optional[str] = None) -> Instance:
        size = _sample_size(rng, kind) if size is None else size
        explicit_category = category is not None
        category = category or OBJECT_KINDS[kind].category
        if kind == "pedestrian" and not explicit_category:
            roll = rng.random()
            category = ("human.pedestrian.child" if roll < 0.08 else "human.pedestrian.police_officer"
                        if roll < 0.11 else category)
            if category == "human.pedestrian.child":
                size = size * np.array([0.8, 0.8, 0.72])
        inst = Instance(kind, category, size, s0, lateral, yaw_offset, profile, direction, attribute,
                        _jitter_colour(rng, CLASS_COLOURS[kind]))
        instances.append(inst)
        return inst

    # ---- driving lanes: one speed profile per lane, vehicles packed with gaps
    lane_kinds = ["car", "truck", "bus", "motorcycle", "construction_vehicle", "trailer"]
    lane_probs = np.array([0.52, 0.17, 0.11, 0.07, 0.06, 0.07])
    for direction in (1.0, -1.0):
        for lane in range(road.lanes_per_direction):
            lateral = forward_side * direction * lane_w * (lane + 0.5)
            is_ego_lane = direction > 0 and lane == ego_lane
            if is_ego_lane:
                profile = ego_profile
            elif rng.random() < 0.15:
                profile = SpeedProfile(0.0)  # a stopped queue
            else:
                v0 = float(rng.uniform(4.0, 13.0))
                profile = SpeedProfile(v0, amp=float(rng.uniform(0, 0.2) * v0), omega=float(rng.uniform(0.15, 0.4)))
            travel = profile.position(times)
            # range of s0 so that the vehicle is near the ego at some time
            lo = s_lo - max(0.0, float(direction * travel.max()))
            hi = s_hi - min(0.0, float(direction * travel.min()))
            s = lo + rng.uniform(0, 15)
            mean_gap = 8.0 / density
            while s < hi:
                kind = str(rng.choice(lane_kinds, p=lane_probs))
                size = _sample_size(rng, kind)
                half = size[1] / 2
                centre = s + half
                if is_ego_lane and abs(centre) < half + 8.0:  # keep clear of the ego itself
                    s = half + 8.0 + 1.0
                    continue
                moving = profile.v0 > 0
                attribute = ("cycle.with_rider" if kind == "motorcycle" else
                             "vehicle.moving" if moving else "vehicle.stopped")
                yaw_offset = 0.0 if direction > 0 else math.pi
                add_instance(kind, centre, lateral + rng.normal(0, 0.15), yaw_offset + rng.normal(0, 0.02),
                             None if not moving else profile, direction, attribute, size)
                if kind == "truck" and moving and rng.random() < 0.3:  # a towed trailer right behind
                    trailer_size = _sample_size(rng, "trailer")
                    trailer_centre = centre - direction * (half + 0.6 + trailer_size[1] / 2)
                    add_instance("trailer", trailer_centre, lateral, yaw_offset, profile, direction,
                                 "vehicle.moving", trailer_size)
                    s += trailer_size[1] + 0.6
                s += size[1] + max(2.5, rng.exponential(mean_gap))

    # ---- road sides
    side_segments: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for side in (1, -1):
        direction = 1.0 if side == forward_side else -1.0  # traffic direction next to this side
        starts, types = [], []
        s = s_lo - 40.0
        while s < s_hi + 40.0:
            starts.append(s)
            types.append(int(rng.choice(4, p=[0.38, 0.2, 0.32, 0.1])))
            s += rng.uniform(25.0, 60.0)
        starts_arr, types_arr = np.array(starts), np.array(types)
        side_segments[side] = (starts_arr, types_arr)
        bike_lateral = side * (road.driving_half_width + road.bike_lane_width / 2)
        park_lateral = side * (road.driving_half_width + road.bike_lane_width + road.parking_width / 2)
        walk_in = side * (road.kerb_offset + road.kerb_width + 1.2)
        walk_out = side * (road.kerb_offset + road.kerb_width + 2.4)
        sidewalk_static = side * (road.kerb_offset + road.kerb_width + 0.55)
        pole_lateral = side * (road.sidewalk_end - 0.35)

        # cyclists in the bike lane: one profile for the lane
        bike_profile = SpeedProfile(float(rng.uniform(2.5, 6.0)))
        travel = bike_profile.position(times) * direction
        s = s_lo - max(0.0, float(travel.max())) + rng.uniform(0, 20)
        hi = s_hi - min(0.0, float(travel.min()))
        while s < hi:
            kind = "bicycle" if rng.random() < 0.7 else "motorcycle"
            size = _sample_size(rng, kind)
            add_instance(kind, s, bike_lateral + rng.normal(0, 0.1), 0.0 if direction > 0 else math.pi,
                         bike_profile, direction, "cycle.with_rider", size)
            s += size[1] + max(3.0, rng.exponential(45.0 / density))

        # walking pedestrians: two sidewalk sub-lanes, one speed each
        for walk_lateral, walk_dir in ((walk_in, direction), (walk_out, -direction)):
            walk_profile = SpeedProfile(float(rng.uniform(1.0, 1.6)))
            travel = walk_profile.position(times) * walk_dir
            s = s_lo - max(0.0, float(travel.max())) + rng.uniform(0, 8)
            hi = s_hi - min(0.0, float(travel.min()))
            while s < hi:
                add_instance("pedestrian", s, walk_lateral + rng.normal(0, 0.15), 0.0 if walk_dir > 0 else math.pi,
                             walk_profile, walk_dir, "pedestrian.moving")
                s += 1.0 + rng.exponential(26.0 / density)

        # parking lane, sidewalk statics and the road side, segment by segment
        seg_ends = np.append(starts_arr[1:], s_hi + 80.0)
        for seg_start, seg_end, seg_type in zip(starts_arr, seg_ends, types_arr):
            name = SEGMENT_TYPES[seg_type]
            seg_len = seg_end - seg_start
            # parking lane: parked vehicles (work sites: closed with cones, barriers inside)
            s = seg_start + rng.uniform(0.5, 4.0)
            if name == "worksite":
                cone_lateral = side * (road.driving_half_width + road.bike_lane_width + 0.4)
                for cs in np.arange(seg_start + 1.0, seg_end - 1.0, rng.uniform(4.5, 7.0)):
                    xy = road.point(np.array(cs), np.array(cone_lateral))
                    if placer.free(xy, 0.35):
                        placer.add(xy, 0.35)
                        add_instance("traffic_cone", float(cs), cone_lateral, rng.uniform(-math.pi, math.pi),
                                     None, 1.0, "")
                for bs in np.arange(seg_start + 2.0, seg_end - 2.0, rng.uniform(2.8, 3.5)):
                    size = _sample_size(rng, "barrier")
                    lat = park_lateral + side * 0.3
                    xy = road.point(np.array(bs), np.array(lat))
                    if rng.random() < 0.6 and placer.free(xy, 0.3 + size[0] / 2 * 0.5):
                        placer.add(xy, size[0] / 2 * 0.5)
                        add_instance("barrier", float(bs), lat, math.pi / 2 + rng.normal(0, 0.05), None, 1.0, "", size)
            else:
                while s < seg_end - 3.0:
                    roll = rng.random()
                    if roll > 0.7 * min(density, 1.3):
                        s += rng.uniform(3.0, 9.0)
                        continue
                    kind = str(rng.choice(["car", "truck", "trailer", "construction_vehicle", "bus", "motorcycle"],
                                          p=[0.52, 0.14, 0.09, 0.08, 0.09, 0.08]))
                    size = _sample_size(rng, kind)
                    centre = s + size[1] / 2
                    if centre + size[1] / 2 > seg_end:
                        break
                    xy = road.point(np.array(centre), np.array(park_lateral))
                    rad = size[1] / 2
                    if placer.free(xy, rad * 0.95):
                        placer.add(xy, rad * 0.95)
                        yaw_offset = (0.0 if direction > 0 else math.pi) + rng.normal(0, 0.04)
                        attribute = ("cycle.without_rider" if kind == "motorcycle" else
                                     "vehicle.stopped" if kind == "bus" else "vehicle.parked")
                        add_instance(kind, centre, park_lateral + rng.normal(0, 0.1), yaw_offset, None, direction,
                                     attribute, size)
                    s += size[1] + rng.uniform(1.0, 3.0)

            # sidewalk inner strip: standing people, parked bicycles / motorcycles, cones, racks
            n_static = rng.poisson(seg_len / 14.0 * density)
            for _ in range(n_static):
                cs = float(rng.uniform(seg_start + 1.0, seg_end - 1.0))
                roll = rng.random()
                if roll < 0.4:
                    kind, yaw_offset, attribute = "pedestrian", rng.uniform(-math.pi, math.pi), "pedestrian.standing"
                elif roll < 0.7:
                    kind, yaw_offset, attribute = "bicycle", side * math.pi / 2 + rng.normal(0, 0.2), \
                        "cycle.without_rider"
                elif roll < 0.88:
                    kind, yaw_offset, attribute = "motorcycle", side * math.pi / 2 + rng.normal(0, 0.2), \
                        "cycle.without_rider"
                else:
                    kind, yaw_offset, attribute = "traffic_cone", rng.uniform(-math.pi, math.pi), ""
                size = _sample_size(rng, kind)
                lat = sidewalk_static + side * (size[1] / 2 - 0.4 if kind in ("bicycle", "motorcycle") else 0.0)
                xy = road.point(np.array(cs), np.array(lat))
                rad = 0.5 * max(size[0], size[1])
                if placer.free(xy, rad):
                    placer.add(xy, rad)
                    add_instance(kind, cs, lat, yaw_offset, None, 1.0, attribute, size)
            if cfg.bicycle_racks and name in ("building", "park") and rng.random() < 0.15:
                _add_bicycle_rack(rng, road, side, seg_start, seg_end, sidewalk_static, placer, add_instance, clutter)

            # poles at the outer edge of the sidewalk
            for ps in np.arange(seg_start + rng.uniform(0, 10), seg_end, rng.uniform(15.0, 30.0)):
                xy = road.point(np.array(ps), np.array(pole_lateral))
                if placer.free(xy, 0.2):
                    placer.add(xy, 0.2)
                    clutter.append(ClutterBox(np.array([xy[0], xy[1], 3.0, 0.25, 0.25, 6.0,
                                                        float(road.heading(ps))]), np.array([130.0, 130, 135]), 70.0))

            # the road side beyond the sidewalk
            side_start = road.sidewalk_end
            heading_mid = float(road.heading((seg_start + seg_end) / 2))
            if name == "building":
                setback = rng.uniform(1.5, 6.0)
                gap = 2.0
                depth = rng.uniform(10.0, 25.0)
                lat = side * (side_start + setback + depth / 2)
                mid = (seg_start + seg_end) / 2
                xy = road.point(np.array(mid), np.array(lat))
                length = max(5.0, seg_len - 2 * gap) * float(road.speed_factor(lat))
                height = rng.uniform(5.0, 22.0)
                colour = np.array(CLUTTER_COLOURS[int(rng.integers(len(CLUTTER_COLOURS)))], dtype=np.float64)
                clutter.append(ClutterBox(np.array([xy[0], xy[1], height / 2, depth, length, height, heading_mid]),
                                          colour * rng.uniform(0.9, 1.1), 50.0))
                # a few people in front of the building
                for _ in range(rng.poisson(seg_len / 25.0 * density)):
                    cs = float(rng.uniform(seg_start + 1, seg_end - 1))
                    lat_p = side * (side_start + rng.uniform(0.5, max(0.6, setback - 0.5)))
                    xy = road.point(np.array(cs), np.array(lat_p))
                    if placer.free(xy, 0.45):
                        placer.add(xy, 0.45)
                        add_instance("pedestrian", cs, lat_p, rng.uniform(-math.pi, math.pi), None, 1.0,
                                     "pedestrian.standing")
            elif name in ("lot", "worksite"):
                # parked vehicles with random yaw (lots) or construction vehicles (work sites)
                depth = 30.0
                n_obj = rng.poisson(seg_len * depth / 220.0 * density)
                for _ in range(n_obj):
                    lat = side * (side_start + rng.uniform(2.5, depth))
                    if name == "lot":
                        kind = str(rng.choice(["car", "truck", "trailer", "pedestrian", "bus", "construction_vehicle"],
                                              p=[0.5, 0.14, 0.12, 0.1, 0.08, 0.06]))
                    else:
                        kind = str(rng.choice(["construction_vehicle", "truck", "pedestrian", "barrier",
                                               "traffic_cone"], p=[0.3, 0.12, 0.22, 0.18, 0.18]))
                    size = _sample_size(rng, kind)
                    rad = 0.5 * math.hypot(size[0], size[1])
                    if seg_end - seg_start < 2 * rad + 2.0:
                        continue
                    # stay inside the segment: a neighbouring segment may be a building
                    cs = float(rng.uniform(seg_start + rad + 1.0, seg_end - rad - 1.0))
                    xy = road.point(np.array(cs), np.array(lat))
                    if not placer.free(xy, rad):
                        continue
                    placer.add(xy, rad)
                    if kind == "pedestrian":
                        category = "human.pedestrian.construction_worker" if name == "worksite" else None
                        add_instance(kind, cs, lat, rng.uniform(-math.pi, math.pi), None, 1.0, "pedestrian.standing",
                                     size, category)
                    elif kind in ("barrier", "traffic_cone"):
                        add_instance(kind, cs, lat, rng.uniform(-math.pi, math.pi), None, 1.0, "", size)
                    else:
                        yaw = rng.uniform(-math.pi, math.pi) if rng.random() < 0.5 else \
                            rng.choice([0.0, math.pi / 2, math.pi, -math.pi / 2]) + rng.normal(0, 0.1)
                        add_instance(kind, cs, lat, float(yaw), None, 1.0, "vehicle.parked", size)
            else:  # park: trees and some people / bicycles
                for _ in range(rng.poisson(seg_len / 9.0)):
                    cs = float(rng.uniform(seg_start + 1, seg_end - 1))
                    lat = side * (side_start + rng.uniform(2.0, 25.0))
                    xy = road.point(np.array(cs), np.array(lat))
                    if not placer.free(xy, 1.8):
                        continue
                    placer.add(xy, 1.8)
                    trunk_h = rng.uniform(1.8, 3.0)
                    crown = rng.uniform(2.5, 3.6)
                    yaw = float(rng.uniform(-math.pi, math.pi))
                    clutter.append(ClutterBox(np.array([xy[0], xy[1], trunk_h / 2, 0.35, 0.35, trunk_h, yaw]),
                                              np.array(TREE_TRUNK_COLOUR, dtype=np.float64), 30.0))
                    clutter.append(ClutterBox(np.array([xy[0], xy[1], trunk_h + crown / 2, crown, crown, crown, yaw]),
                                              np.array(TREE_CROWN_COLOUR, dtype=np.float64) * rng.uniform(0.85, 1.15),
                                              20.0))
                for _ in range(rng.poisson(seg_len / 18.0 * density)):
                    cs = float(rng.uniform(seg_start + 1, seg_end - 1))
                    lat = side * (side_start + rng.uniform(1.0, 20.0))
                    kind = "pedestrian" if rng.random() < 0.75 else "bicycle"
                    size = _sample_size(rng, kind)
                    xy = road.point(np.array(cs), np.array(lat))
                    rad = 0.5 * max(size[0], size[1])
                    if placer.free(xy, rad):
                        placer.add(xy, rad)
                        attribute = "pedestrian.standing" if kind == "pedestrian" else "cycle.without_rider"
                        add_instance(kind, cs, lat, rng.uniform(-math.pi, math.pi), None, 1.0, attribute, size)

    _ensure_every_class(rng, road, ego_profile, forward_side, placer, instances, add_instance)
    speed = float(ego_profile.v0)
    description = (f"Synthetic {location}, {'straight road' if curvature == 0 else 'curve'}, "
                   f"{road.lanes_per_direction} lane(s) per direction, ego {'stopped' if speed == 0 else f'{speed:.1f} m/s'}")
    # lighting from its own stream, so it never changes the layout: sun azimuth/elevation, exposure
    light_rng = scene_rng(cfg.seed, scene_name, "light")
    sun_az, sun_el = light_rng.uniform(-math.pi, math.pi), math.radians(light_rng.uniform(35.0, 70.0))
    sun = np.array([math.cos(sun_el) * math.cos(sun_az), math.cos(sun_el) * math.sin(sun_az), math.sin(sun_el)])
    exposure = float(light_rng.uniform(0.88, 1.08))
    return World(road, ego_lateral, ego_profile, instances, clutter, side_segments, location, description,
                 sun_direction=sun, exposure=exposure)


def _ensure_every_class(rng, road, ego_profile, forward_side, placer, instances, add_instance) -> None:
    """Add one static instance of each detection class missing near the ego's start.

    Every scene then shows every class within ~30 m at its first keyframes (rare classes
    get seen in every scene; the GT-as-submission check covers all 10 classes).
    """
    s_start = float(ego_profile.position(0.0))
    start_xy = road.point(np.array(s_start), np.array(0.0))
    present = set()
    for inst in instances:
        xy = road.point(np.array(inst.s_at(0.0)), np.array(inst.lateral))
        if inst.kind != "bicycle_rack" and math.hypot(*(xy - start_xy)) < 30.0:
            present.add(inst.kind)
    small = {"pedestrian", "bicycle", "motorcycle", "traffic_cone", "barrier"}
    for kind in OBJECT_KINDS:
        if kind in present or kind == "bicycle_rack":
            continue
        size = _sample_size(rng, kind)
        for _ in range(40):
            side = float(rng.choice([-1.0, 1.0]))
            direction = 1.0 if side == forward_side else -1.0
            cs = s_start + float(rng.uniform(-25.0, 25.0))
            if kind in small:  # inner sidewalk strip
                lat = side * (road.kerb_offset + road.kerb_width + 0.55)
                yaw_offset = float(rng.uniform(-math.pi, math.pi))
                attribute = {"pedestrian": "pedestrian.standing", "bicycle": "cycle.without_rider",
                             "motorcycle": "cycle.without_rider"}.get(kind, "")
                radius = 0.5 * max(size[0], size[1])
            else:  # parking lane
                lat = side * (road.driving_half_width + road.bike_lane_width + road.parking_width / 2)
                yaw_offset = 0.0 if direction > 0 else math.pi
                attribute = "vehicle.stopped" if kind == "bus" else "vehicle.parked"
                radius = 0.5 * size[1]
            xy = road.point(np.array(cs), np.array(lat))
            if placer.free(xy, radius):
                placer.add(xy, radius)
                add_instance(kind, cs, lat, yaw_offset, None, direction, attribute, size)
                break


def _add_bicycle_rack(rng, road, side, seg_start, seg_end, sidewalk_static, placer, add_instance, clutter) -> None:
    """A bicycle rack on the sidewalk (annotated as static_object.bicycle_rack), bars as clutter, bikes in it."""
    length = float(rng.uniform(3.0, 6.0))
    cs = float(rng.uniform(seg_start + length, max(seg_start + length + 0.1, seg_end - length)))
    lat = sidewalk_static + side * 0.5
    xy = road.point(np.array(cs), np.array(lat))
    if not placer.free(xy, length / 2):
        return
    placer.add(xy, length / 2)
    heading = float(road.heading(cs))
    size = np.array([2.0, length, 1.2])
    add_instance("bicycle_rack", cs, lat, 0.0, None, 1.0, "", size)
    # two low metal bars along the rack (clutter, so bikes inside stay visible)
    for off in (-0.7, 0.7):
        bxy = road.point(np.array(cs), np.array(lat + off))
        clutter.append(ClutterBox(np.array([bxy[0], bxy[1], 0.35, 0.08, length, 0.7, heading]),
                                  np.array(CLASS_COLOURS["bicycle_rack"], dtype=np.float64), 80.0))
    for bs in np.arange(cs - length / 2 + 0.5, cs + length / 2 - 0.3, 0.9):
        if rng.random() < 0.6:
            bike = _sample_size(rng, "bicycle")
            bike[1] = min(bike[1], 1.8)
            add_instance("bicycle", float(bs), lat, side * math.pi / 2 + rng.normal(0, 0.05), None, 1.0,
                         "cycle.without_rider", bike)


# --------------------------------------------------------------------------- ground shading
def _hash_noise(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic per-cell noise in [0, 1) from integer cell coordinates."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663) ^ (salt * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).astype(np.float32) / 65536.0


def shade_ground(world: World, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground colour ``(P, 3)`` float32 (0..255) and LiDAR intensity ``(P,)`` at global xy ``(P, 2)``."""
    road = world.road
    s, lateral = road.curvilinear(xy)
    s = s.astype(np.float32)
    lateral = lateral.astype(np.float32)
    abs_lat = np.abs(lateral)
    n = len(xy)
    colour = np.empty((n, 3), np.float32)
    intensity = np.empty(n, np.float32)
    D = road.driving_half_width
    bike_end = D + road.bike_lane_width
    kerb = road.kerb_offset
    side_start = road.sidewalk_end

    def put(mask: np.ndarray, rgb: tuple[float, float, float], value: float) -> None:
        colour[mask] = rgb
        intensity[mask] = value

    # road side beyond the sidewalk: by segment type
    beyond = abs_lat >= side_start
    seg_colour = {0: (108.0, 108.0, 112.0), 1: (92.0, 122.0, 72.0), 2: (152.0, 147.0, 140.0), 3: (140.0, 122.0, 98.0)}
    seg_intensity = {0: 10.0, 1: 15.0, 2: 20.0, 3: 12.0}
    for side, (starts, types) in world.side_segments.items():
        on_side = beyond & (np.sign(lateral) == side)
        if not on_side.any():
            continue
        idx = np.clip(np.searchsorted(starts, s[on_side], side="right") - 1, 0, len(types) - 1)
        seg = types[idx]
        sub_colour = np.empty((len(idx), 3), np.float32)
        sub_int = np.empty(len(idx), np.float32)
        for t, rgb in seg_colour.items():
            sub_colour[seg == t] = rgb
            sub_int[seg == t] = seg_intensity[t]
        # parking-lot lines: perpendicular stripes every 2.8 m
        lot_line = (seg == 0) & ((s[on_side] % 2.8) < 0.12) & ((abs_lat[on_side] - side_start) % 12.0 < 5.0)
        sub_colour[lot_line] = (220.0, 220.0, 215.0)
        sub_int[lot_line] = 70.0
        colour[on_side] = sub_colour
        intensity[on_side] = sub_int
    put(beyond & (np.sign(lateral) == 0), (108.0, 108.0, 112.0), 10.0)
    # sidewalk tiles with grout lines every metre
    sidewalk = (abs_lat >= kerb + road.kerb_width) & ~beyond
    put(sidewalk, (168.0, 162.0, 150.0), 22.0)
    grout = sidewalk & (((s % 1.0) < 0.05) | (((abs_lat - kerb) % 1.0) < 0.05))
    put(grout, (140.0, 135.0, 126.0), 18.0)
    put((abs_lat >= kerb) & (abs_lat < kerb + road.kerb_width), (205.0, 205.0, 200.0), 35.0)
    # parking lane, bike lane, driving lanes
    put((abs_lat >= bike_end) & (abs_lat < kerb), (100.0, 100.0, 103.0), 9.0)
    slot_mark = (abs_lat >= bike_end) & (abs_lat < kerb) & ((s % 6.0) < 0.12)
    put(slot_mark, (215.0, 215.0, 210.0), 60.0)
    put((abs_lat >= D) & (abs_lat < bike_end), (96.0, 104.0, 96.0), 9.0)
    put(abs_lat < D, (84.0, 84.0, 89.0), 7.0)
    # markings: centre line (solid), dashed lane lines, solid edge lines
    put(abs_lat < 0.08, (230.0, 215.0, 150.0), 80.0)
    for k in range(1, road.lanes_per_direction):
        put((np.abs(abs_lat - k * road.lane_width) < 0.07) & ((s % 9.0) < 3.0), (235.0, 235.0, 230.0), 80.0)
    put(np.abs(abs_lat - D) < 0.08, (235.0, 235.0, 230.0), 80.0)
    put(np.abs(abs_lat - bike_end) < 0.06, (235.0, 235.0, 230.0), 80.0)
    # texture: fine and coarse value noise in world cells (gives parallax / depth cues)
    gx, gy = xy[:, 0], xy[:, 1]
    fine = _hash_noise(np.floor(gx / 0.4), np.floor(gy / 0.4), 1)
    coarse = _hash_noise(np.floor(gx / 3.0), np.floor(gy / 3.0), 2)
    colour *= (0.9 + 0.12 * fine + 0.08 * coarse)[:, None]
    return colour, intensity


# --------------------------------------------------------------------------- ray casting
def ray_box_hits(origins: np.ndarray, dirs: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slab test of rays against one oriented box.

    ``origins`` ``(3,)`` (shared) or ``(R, 3)``, ``dirs`` ``(R, 3)``, ``box`` ``(>=7,)``
    [x, y, z, w, l, h, yaw] in the same frame. Returns ``t_hit (R,)`` (ray parameter of
    the entry point, ``inf`` where missed or where the origin is inside), ``face (R,)``
    (0 front +l, 1 rear -l, 2 left +w, 3 right -w, 4 top, 5 bottom) and ``local (R, 3)``
    (hit point in box coordinates: along l, along w, up).
    """
    cos, sin = math.cos(box[6]), math.sin(box[6])
    rot_t = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]], dtype=dirs.dtype)
    o_local = (np.asarray(origins, dtype=dirs.dtype) - np.asarray(box[:3], dtype=dirs.dtype)) @ rot_t.T
    d_local = dirs @ rot_t.T
    half = np.array([box[4] / 2, box[3] / 2, box[5] / 2], dtype=dirs.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d_local
        t1 = (-half - o_local) * inv
        t2 = (half - o_local) * inv
    t_near = np.minimum(t1, t2)
    t_far = np.maximum(t1, t2)
    t_near = np.where(np.isnan(t_near), -np.inf, t_near)
    t_far = np.where(np.isnan(t_far), np.inf, t_far)
    axis = np.argmax(t_near, axis=-1)
    t_enter = np.take_along_axis(t_near, axis[:, None], -1)[:, 0]
    t_exit = t_far.min(-1)
    hit = (t_enter <= t_exit) & (t_enter > 1e-4)
    t_hit = np.where(hit, t_enter, np.inf)
    d_axis = np.take_along_axis(d_local, axis[:, None], -1)[:, 0]
    face = axis * 2 + (d_axis > 0)  # entering through the +face when moving in -direction
    local = o_local + t_enter[:, None] * d_local
    return t_hit, face, local


@dataclass
class RenderBox:
    """A box to render/ray cast, in the global frame, with its appearance."""

    box: np.ndarray  # (7,) x, y, z, w, l, h, yaw
    colour: np.ndarray  # (3,)
    kind: str  # OBJECT_KINDS key, or "clutter"
    instance: int  # index into World.instances, -1 for clutter
    intensity: float


FACE_NORMALS_LOCAL = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
VEHICLE_KINDS = ("car", "truck", "bus", "construction_vehicle", "trailer")


def face_colours(rb: RenderBox, sun_direction: np.ndarray = SUN_DIRECTION) -> np.ndarray:
    """Per-face colour ``(6, 3)``: Lambert shading, front face lightened, rear face darkened."""
    cos, sin = math.cos(rb.box[6]), math.sin(rb.box[6])
    rot = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1.0]])
    normals = FACE_NORMALS_LOCAL @ rot.T
    shade = 0.62 + 0.38 * np.clip(normals @ sun_direction, 0.0, 1.0)
    colours = rb.colour[None, :] * shade[:, None]
    if rb.kind != "clutter":
        colours[0] = colours[0] * 0.55 + 255.0 * 0.45  # front: light (headlights / face)
        colours[1] = colours[1] * 0.62  # rear: dark
    return colours


def shade_box_pixels(rb: RenderBox, face: np.ndarray, local: np.ndarray, colours6: np.ndarray) -> np.ndarray:
    """Colour of the hit pixels of one box ``(P, 3)``, with per-class texture bands."""
    rgb = colours6[face]
    if rb.kind == "clutter":
        return rgb
    h = rb.box[5]
    z_rel = local[:, 2] / h + 0.5
    if rb.kind in VEHICLE_KINDS:
        wheels = (z_rel < 0.16) & (face < 4)
        rgb = np.where(wheels[:, None], rgb * 0.3, rgb)
        if rb.kind in ("car", "bus"):
            windows = (z_rel > 0.66) & (z_rel < 0.88) & (face >= 2) & (face < 4)
            rgb = np.where(windows[:, None], rgb * 0.5 + 25.0, rgb)
    elif rb.kind == "traffic_cone":
        band = (z_rel > 0.62) & (z_rel < 0.8) & (face < 4)
        rgb = np.where(band[:, None], np.float32(240.0), rgb)
    elif rb.kind == "barrier":
        # diagonal white stripes along the barrier's long (w) side
        stripes = (((local[:, 1] + local[:, 2]) % 0.8) < 0.25) & (face < 2)
        rgb = np.where(stripes[:, None], np.float32(235.0), rgb)
    return rgb


class CameraRays:
    """Per-pixel rays of a camera at the render resolution, with what a flat world fixes.

    The ego pose has only a yaw (flat ground at z = 0), so each pixel's ground hit in the
    ego frame, the sky colour and the haze are the same at every timestamp: they are
    computed once here.
    """

    def __init__(self, camera: str, scale: float) -> None:
        self.camera = camera
        self.width = max(1, int(round(IMAGE_WIDTH * scale)))
        self.height = max(1, int(round(IMAGE_HEIGHT * scale)))
        self.intrinsics = camera_intrinsics(camera)
        # pixel centres of the render grid, in full-resolution pixel coordinates
        u = (np.arange(self.width) + 0.5) * (IMAGE_WIDTH / self.width) - 0.5
        v = (np.arange(self.height) + 0.5) * (IMAGE_HEIGHT / self.height) - 0.5
        uu, vv = np.meshgrid(u, v)
        k_inv = np.linalg.inv(self.intrinsics)
        pix = np.stack([uu, vv, np.ones_like(uu)], -1)
        self.dirs = (pix @ k_inv.T).astype(np.float32)  # (H, W, 3), z = 1: ray parameter = depth
        ego_cam = ego_from_camera(camera)
        dirs_ego = self.dirs.reshape(-1, 3).astype(np.float64) @ ego_cam[:3, :3].T
        origin = ego_cam[:3, 3]
        dz = dirs_ego[:, 2]
        elev = np.clip(dz / np.linalg.norm(dirs_ego, axis=1), 0.0, 1.0)
        sky_w = np.sqrt(elev)[:, None]
        self.sky = (SKY_HORIZON * (1 - sky_w) + SKY_ZENITH * sky_w).astype(np.float32)  # (P, 3)
        t_ground = np.where(dz < -1e-6, -origin[2] / np.where(dz < -1e-6, dz, -1.0), np.inf)
        ground = t_ground < 3000.0
        self.ground_index = np.nonzero(ground)[0]
        self.ground_depth = t_ground[self.ground_index].astype(np.float32)
        self.ground_xy_ego = origin[None, :2] + t_ground[self.ground_index, None] * dirs_ego[self.ground_index, :2]
        dist = np.hypot(*(self.ground_xy_ego - origin[None, :2]).T)
        self.fog = np.exp(-dist / HAZE_DISTANCE).astype(np.float32)[:, None]


_CAMERA_RAYS_CACHE: dict[tuple[str, float], CameraRays] = {}


def _camera_rays(camera: str, scale: float) -> CameraRays:
    """CameraRays per process, built once (they depend only on the rig and the scale)."""
    key = (camera, float(scale))
    if key not in _CAMERA_RAYS_CACHE:
        _CAMERA_RAYS_CACHE[key] = CameraRays(camera, scale)
    return _CAMERA_RAYS_CACHE[key]


BOX_FACES = ((0, 1, 2, 3), (4, 5, 6, 7), (0, 3, 7, 4), (1, 2, 6, 5), (0, 1, 5, 4), (3, 2, 6, 7))
"""Corner indices (devkit ``Box.corners()`` order) of the faces front, rear, left, right, top, bottom."""
NEAR_PLANE = 0.05  # m, camera z below which polygons are clipped


def _clip_polygon_near(poly: np.ndarray, near: float = NEAR_PLANE) -> np.ndarray:
    """Sutherland-Hodgman clip of a camera-frame polygon ``(K, 3)`` to ``z >= near``."""
    out = []
    k = len(poly)
    for i in range(k):
        a, b = poly[i], poly[(i + 1) % k]
        a_in, b_in = a[2] >= near, b[2] >= near
        if a_in:
            out.append(a)
        if a_in != b_in:
            f = (near - a[2]) / (b[2] - a[2])
            out.append(a + f * (b - a))
    return np.array(out).reshape(-1, 3)


SHADOW_DARKENING = 0.6
SHADOW_RANGE = 80.0  # m: boxes farther from the camera cast no drawn shadow


def _fill_polygon_pixels(poly_cam: np.ndarray, K: np.ndarray, sx: float, sy: float, W: int, H: int) -> np.ndarray:
    """Flat render-grid indices covered by a camera-frame polygon ``(k, 3)`` (near-clipped first)."""
    import cv2

    if (poly_cam[:, 2] < NEAR_PLANE).any():
        poly_cam = _clip_polygon_near(poly_cam)
        if len(poly_cam) < 3:
            return np.zeros(0, dtype=np.int64)
    pix, _ = project_to_image(poly_cam, K)
    ru = (pix[:, 0] + 0.5) * sx - 0.5
    rv = (pix[:, 1] + 0.5) * sy - 0.5
    u0, u1 = max(0, int(math.floor(ru.min()))), min(W - 1, int(math.ceil(ru.max())))
    v0, v1 = max(0, int(math.floor(rv.min()))), min(H - 1, int(math.ceil(rv.max())))
    if u0 > u1 or v0 > v1:
        return np.zeros(0, dtype=np.int64)
    mask = np.zeros((v1 - v0 + 1, u1 - u0 + 1), np.uint8)
    pts = np.round(np.stack([ru - u0, rv - v0], -1) * 16).astype(np.int32)
    cv2.fillConvexPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=4)
    vv, uu = np.nonzero(mask)
    return (vv + v0) * W + (uu + u0)


def _draw_shadows(world: World, boxes: list[RenderBox], candidates: np.ndarray, cam_from_global: np.ndarray,
                  K: np.ndarray, sx: float, sy: float, W: int, H: int, depth: np.ndarray, image: np.ndarray) -> None:
    """Darken the ground under and behind (away from the sun) each box: contact shadows ground objects."""
    import cv2

    sun = world.sun_direction
    cast = -sun[:2] / max(sun[2], 0.2)  # ground offset per metre of height
    cam_xy = rigid_inverse(cam_from_global)[:2, 3]
    in_shadow = np.zeros(len(depth), dtype=bool)  # overlapping shadows darken once
    for bi in candidates:
        rb = boxes[bi]
        if math.hypot(rb.box[0] - cam_xy[0], rb.box[1] - cam_xy[1]) > SHADOW_RANGE:
            continue
        foot = box_corners(rb.box[None, :7])[0][[3, 2, 6, 7], :2]  # bottom face, xy
        # the shadow of a box on the ground: hull of its footprint and the footprint moved by h * cast
        hull = cv2.convexHull(np.concatenate([foot, foot + rb.box[5] * cast], 0).astype(np.float32))[:, 0, :]
        poly = np.concatenate([hull.astype(np.float64), np.full((len(hull), 1), 0.01)], 1)
        flat = _fill_polygon_pixels(poly @ cam_from_global[:3, :3].T + cam_from_global[:3, 3], K, sx, sy, W, H)
        if len(flat) == 0:
            continue
        in_shadow[flat] = True
    in_shadow &= np.isfinite(depth)  # ground pixels only
    image[in_shadow] *= SHADOW_DARKENING


def render_camera(world: World, rays: CameraRays, global_from_ego: np.ndarray, boxes: list[RenderBox],
                  with_image: bool = True) -> tuple[Optional[np.ndarray], dict[int, int], dict[int, int]]:
    """Render one camera image with an exact per-pixel depth buffer.

    Ground and sky are ray cast per pixel; each camera-facing box face is rasterised as
    a polygon (near-plane clipped) and its per-pixel depth comes from the face plane
    (``t = (n . p0) / (n . ray)``), so occlusion is exact. Returns the RGB image
    ``(H, W, 3)`` uint8 at render resolution (None when ``with_image`` is False), and
    per annotated instance the number of pixels it owns (visible) and the number its
    faces cover ignoring other boxes (unoccluded).
    """
    import cv2

    cam_pose = global_from_ego @ ego_from_camera(rays.camera)  # global_from_camera
    cam_from_global = rigid_inverse(cam_pose)
    rot_cg = cam_from_global[:3, :3]
    origin = cam_pose[:3, 3]
    H, W = rays.height, rays.width
    depth = np.full(H * W, np.inf, np.float32)
    owner = np.full(H * W, -1, np.int32)
    image = None
    dirs_flat = rays.dirs.reshape(-1, 3)
    if with_image:
        image = rays.sky.copy()
        gidx = rays.ground_index
        gpts = rays.ground_xy_ego @ global_from_ego[:2, :2].T + global_from_ego[:2, 3]
        gcol, _ = shade_ground(world, gpts)
        image[gidx] = gcol * rays.fog + SKY_HORIZON.astype(np.float32) * (1 - rays.fog)
        depth[gidx] = rays.ground_depth
    K = rays.intrinsics
    sx, sy = W / IMAGE_WIDTH, H / IMAGE_HEIGHT
    up_cam = rot_cg[:, 2]  # global +z in the camera frame
    unoccluded: dict[int, int] = {}
    if not boxes:
        candidates = np.zeros(0, dtype=np.int64)
        all_corners_cam = np.zeros((0, 8, 3))
    else:
        # vectorised culling: keep boxes with a corner in front and a projected extent in the image
        all_corners_cam = box_corners(np.stack([rb.box[:7] for rb in boxes])) @ rot_cg.T + cam_from_global[:3, 3]
        z = all_corners_cam[..., 2]
        in_front = (z > NEAR_PLANE).any(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            pix = all_corners_cam @ K.T
            u = pix[..., 0] / pix[..., 2]
            v = pix[..., 1] / pix[..., 2]
        straddles = (z <= NEAR_PLANE).any(1)
        overlaps = ((u.min(1) < IMAGE_WIDTH) & (u.max(1) >= 0) & (v.min(1) < IMAGE_HEIGHT) & (v.max(1) >= 0))
        candidates = np.nonzero(in_front & (straddles | overlaps))[0]
    if with_image:
        _draw_shadows(world, boxes, candidates, cam_from_global, K, sx, sy, W, H, depth, image)
    for bi in candidates:
        rb = boxes[bi]
        corners_cam = all_corners_cam[bi]
        cos, sin = math.cos(rb.box[6]), math.sin(rb.box[6])
        rot_cb = rot_cg @ np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
        centre_cam = rot_cg @ rb.box[:3] + cam_from_global[:3, 3]
        colours6 = face_colours(rb, world.sun_direction).astype(np.float32) if with_image else None
        for f in range(5):  # the bottom face is never seen from above the ground
            normal = rot_cb @ FACE_NORMALS_LOCAL[f]
            plane_c = float(normal @ corners_cam[BOX_FACES[f][0]])
            if plane_c >= -1e-9:  # back face (camera behind the face plane)
                continue
            poly = corners_cam[list(BOX_FACES[f])]
            if (poly[:, 2] < NEAR_PLANE).any():
                poly = _clip_polygon_near(poly)
                if len(poly) < 3:
                    continue
            pix, _ = project_to_image(poly, K)
            ru = (pix[:, 0] + 0.5) * sx - 0.5  # render-grid coordinates (pixel centres at integers)
            rv = (pix[:, 1] + 0.5) * sy - 0.5
            u0, u1 = max(0, int(math.floor(ru.min()))), min(W - 1, int(math.ceil(ru.max())))
            v0, v1 = max(0, int(math.floor(rv.min()))), min(H - 1, int(math.ceil(rv.max())))
            if u0 > u1 or v0 > v1:
                continue
            mask = np.zeros((v1 - v0 + 1, u1 - u0 + 1), np.uint8)
            pts = np.round(np.stack([ru - u0, rv - v0], -1) * 16).astype(np.int32)
            cv2.fillConvexPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=4)
            vv, uu = np.nonzero(mask)
            if len(vv) == 0:
                continue
            flat = (vv + v0) * W + (uu + u0)
            d = dirs_flat[flat]
            denom = d @ normal.astype(np.float32)
            t = np.where(denom < -1e-9, plane_c / np.minimum(denom, -1e-9), np.inf).astype(np.float32)
            t = np.maximum(t, NEAR_PLANE)
            if rb.instance >= 0:
                unoccluded[rb.instance] = unoccluded.get(rb.instance, 0) + len(flat)
            closer = t < depth[flat]
            if not closer.any():
                continue
            flat, t, d = flat[closer], t[closer], d[closer]
            depth[flat] = t
            owner[flat] = bi
            if with_image:
                hit = t[:, None] * d
                local = np.stack([
                    hit @ rot_cb[:, 0].astype(np.float32) - float(centre_cam @ rot_cb[:, 0]),
                    hit @ rot_cb[:, 1].astype(np.float32) - float(centre_cam @ rot_cb[:, 1]),
                    hit @ up_cam.astype(np.float32) - float(centre_cam @ up_cam),
                ], -1)
                image[flat] = shade_box_pixels(rb, np.full(len(flat), f), local, colours6)
    visible: dict[int, int] = {}
    owned = owner[owner >= 0]
    if len(owned):
        counts = np.bincount(owned, minlength=len(boxes))
        for bi in np.nonzero(counts)[0]:
            inst = boxes[bi].instance
            if inst >= 0:
                visible[inst] = visible.get(inst, 0) + int(counts[bi])
    out = None
    if with_image:
        out = np.clip(image * world.exposure, 0, 255).reshape(H, W, 3).astype(np.uint8)
    return out, visible, unoccluded


def lidar_rays() -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions ``(32 * 1084, 3)`` in the LIDAR_TOP frame and their ring index."""
    elev = np.radians(LIDAR_ELEVATIONS_DEG)
    az = np.arange(LIDAR_AZIMUTH_STEPS) * (2 * math.pi / LIDAR_AZIMUTH_STEPS)
    ee, aa = np.meshgrid(elev, az, indexing="ij")
    dirs = np.stack([np.cos(ee) * np.cos(aa), np.cos(ee) * np.sin(aa), np.sin(ee)], -1).reshape(-1, 3)
    rings = np.repeat(np.arange(len(elev)), LIDAR_AZIMUTH_STEPS)
    return dirs, rings


def cast_lidar(world: World, global_from_ego: np.ndarray, boxes: list[RenderBox], rng: np.random.Generator) -> np.ndarray:
    """Ray cast one LIDAR_TOP sweep. Returns ``(P, 5)`` float32 x, y, z, intensity, ring in the lidar frame."""
    dirs_lidar, rings = lidar_rays()
    global_from_lidar = global_from_ego @ ego_from_lidar()
    rot = global_from_lidar[:3, :3]
    origin = global_from_lidar[:3, 3]
    dirs = dirs_lidar @ rot.T
    n = len(dirs)
    t_best = np.full(n, np.inf)
    intensity = np.zeros(n)
    dz = dirs[:, 2]
    ground = dz < -1e-6
    t_ground = np.where(ground, -origin[2] / np.where(ground, dz, -1.0), np.inf)
    gidx = np.nonzero(ground & (t_ground < LIDAR_MAX_RANGE + 1))[0]
    if len(gidx):
        gpts = origin[None, :2] + t_ground[gidx, None] * dirs[gidx, :2]
        _, gint = shade_ground(world, gpts)
        t_best[gidx] = t_ground[gidx]
        intensity[gidx] = gint
    az_rays = np.arctan2(dirs[:, 1], dirs[:, 0])
    for rb in boxes:
        centre = rb.box[:2] - origin[:2]
        dist = math.hypot(*centre)
        reach = 0.5 * math.hypot(rb.box[3], rb.box[4])
        if dist - reach > LIDAR_MAX_RANGE:
            continue
        if dist > reach + 0.1:  # azimuth culling
            half_angle = math.asin(min(1.0, reach / dist)) + 0.01
            diff = np.abs((az_rays - math.atan2(centre[1], centre[0]) + math.pi) % (2 * math.pi) - math.pi)
            cand = np.nonzero(diff <= half_angle)[0]
        else:
            cand = np.arange(n)
        if len(cand) == 0:
            continue
        t_hit, _, _ = ray_box_hits(origin, dirs[cand], rb.box)
        # a surface return lands slightly inside the object (3 cm), as real returns scatter
        closer = t_hit < t_best[cand]
        sel = cand[closer]
        t_best[sel] = t_hit[closer] + 0.03
        intensity[sel] = rb.intensity
    ok = (t_best >= LIDAR_MIN_RANGE) & (t_best <= LIDAR_MAX_RANGE)
    t = t_best[ok] + rng.normal(0.0, 0.01, int(ok.sum()))
    points_global = origin + t[:, None] * dirs[ok]
    lidar_from_global = rigid_inverse(global_from_lidar)
    points_lidar = points_global @ lidar_from_global[:3, :3].T + lidar_from_global[:3, 3]
    inten = np.clip(intensity[ok] + rng.normal(0.0, 2.0, int(ok.sum())), 0, 255)
    return np.concatenate([points_lidar, inten[:, None], rings[ok, None]], 1).astype(np.float32)


# --------------------------------------------------------------------------- approximations (no sensors)
def _angular_extent(boxes_ego: np.ndarray) -> tuple[np.ndarray, ...]:
    """Azimuth extent (centre, lo, hi), nearest/farthest corner distance and top height of boxes."""
    corners = box_corners(np.asarray(boxes_ego[:, :7], dtype=np.float64))[:, :4, :2]  # (N, 4, 2) top face xy
    corner_az = np.arctan2(corners[..., 1], corners[..., 0])
    centre_az = np.arctan2(boxes_ego[:, 1], boxes_ego[:, 0])
    rel = (corner_az - centre_az[:, None] + math.pi) % (2 * math.pi) - math.pi
    corner_dist = np.linalg.norm(corners, axis=-1)
    top = boxes_ego[:, 2] + boxes_ego[:, 5] / 2
    return centre_az, centre_az + rel.min(1), centre_az + rel.max(1), corner_dist.min(1), corner_dist.max(1), top


def approx_visible_fraction(boxes_ego: np.ndarray, occluders_ego: Optional[np.ndarray] = None,
                            eye_height: float = 1.6, n_rays: int = 10) -> np.ndarray:
    """Bird's-eye estimate of each box's visible fraction ``(N,)`` from the ego origin.

    ``boxes_ego`` ``(N, >=7)`` and the extra (unannotated) ``occluders_ego`` ``(M, >=7)``
    in the ego frame. For each box, ``n_rays`` azimuths across its angular extent; along
    each, nearer boxes that the ray crosses hide the part of the box's elevation span
    (seen from ``eye_height``) below their own top; the fraction is the mean over rays.
    """
    n = len(boxes_ego)
    if n == 0:
        return np.zeros(0)
    others = np.zeros((0, 7)) if occluders_ego is None else np.asarray(occluders_ego)[:, :7]
    if len(others):  # only boxes nearer than the farthest target can hide anything
        reach = np.hypot(boxes_ego[:, 0], boxes_ego[:, 1]).max()
        others = others[np.hypot(others[:, 0], others[:, 1]) - 0.5 * np.hypot(others[:, 3], others[:, 4]) < reach]
    all_boxes = np.concatenate([np.asarray(boxes_ego)[:, :7], others], 0)
    _, t_lo, t_hi, _, _, _ = _angular_extent(all_boxes[:n])
    frac = np.linspace(0.03, 0.97, n_rays)
    ray_az = t_lo[:, None] + (t_hi - t_lo)[:, None] * frac[None, :]  # (N, R)
    dirs = np.stack([np.cos(ray_az), np.sin(ray_az)], -1)  # (N, R, 2)
    # 2D slab test of every ray against every box: entry distance (inf where missed)
    cos, sin = np.cos(all_boxes[:, 6]), np.sin(all_boxes[:, 6])
    origin_local = np.stack([-(all_boxes[:, 0] * cos + all_boxes[:, 1] * sin),
                             all_boxes[:, 0] * sin - all_boxes[:, 1] * cos], -1)  # (K, 2)
    dir_local = np.stack([dirs[..., 0, None] * cos + dirs[..., 1, None] * sin,
                          -dirs[..., 0, None] * sin + dirs[..., 1, None] * cos], -1)  # (N, R, K, 2)
    half = np.stack([all_boxes[:, 4] / 2, all_boxes[:, 3] / 2], -1)  # (K, 2)
    dir_local = np.where(np.abs(dir_local) < 1e-12, 1e-12, dir_local)  # no 0/0 for axis-parallel rays
    inv = 1.0 / dir_local
    t1 = (-half - origin_local) * inv
    t2 = (half - origin_local) * inv
    t_enter = np.minimum(t1, t2).max(-1)
    t_exit = np.maximum(t1, t2).min(-1)
    hit = (t_enter <= t_exit) & (t_exit > 0)
    dist = np.where(hit, np.maximum(t_enter, 0.1), np.inf)  # (N, R, K)
    own = dist[np.arange(n), :, np.arange(n)]  # (N, R): distance to the target itself
    own = np.where(np.isfinite(own), own, np.hypot(all_boxes[:n, 0], all_boxes[:n, 1])[:, None])
    top = all_boxes[:, 2] + all_boxes[:, 5] / 2
    elev_top = np.arctan2(top[:n, None] - eye_height, own)  # (N, R) target's span on this ray
    elev_bottom = np.arctan2(-eye_height, own)
    occ_top = np.arctan2(top[None, None, :] - eye_height, dist)  # (N, R, K) occluder's top on this ray
    hidden = np.clip((occ_top - elev_bottom[..., None]) / np.maximum(elev_top - elev_bottom, 1e-6)[..., None],
                     0.0, 1.0)
    blocks = dist < own[..., None] - 0.05
    blocks[np.arange(n), :, np.arange(n)] = False
    visible = np.where(blocks, 1.0 - hidden, 1.0).min(-1)  # (N, R)
    return visible.mean(1)


def approx_lidar_points(boxes_ego: np.ndarray, visible_fraction: np.ndarray) -> np.ndarray:
    """Analytic estimate of LiDAR returns per box ``(N,)`` int (see the module docstring)."""
    origin = np.array(LIDAR_CALIBRATION[0])
    d_az = 2 * math.pi / LIDAR_AZIMUTH_STEPS
    d_el = math.radians(LIDAR_ELEVATIONS_DEG[1] - LIDAR_ELEVATIONS_DEG[0])
    out = np.zeros(len(boxes_ego), dtype=np.int64)
    for i, box in enumerate(np.asarray(boxes_ego, dtype=np.float64)):
        rel = box[:3] - origin
        r = float(np.linalg.norm(rel[:2]))
        if r > LIDAR_MAX_RANGE or visible_fraction[i] <= 0:
            continue
        w, l, h, yaw = box[3], box[4], box[5], box[6]
        view = -rel[:2] / max(r, 1e-6)  # from the box towards the sensor
        facing_len = abs(math.cos(yaw) * view[0] + math.sin(yaw) * view[1]) * w  # front/back faces (area w*h)
        facing_wid = abs(-math.sin(yaw) * view[0] + math.cos(yaw) * view[1]) * l  # side faces (area l*h)
        projected_width = facing_len + facing_wid
        # vertical extent clipped to the scanner's field of view
        el_lo = math.atan2(box[2] - h / 2 - origin[2], max(r, 0.1))
        el_hi = math.atan2(box[2] + h / 2 - origin[2], max(r, 0.1))
        fov_lo, fov_hi = math.radians(LIDAR_ELEVATIONS_DEG[0]), math.radians(LIDAR_ELEVATIONS_DEG[-1])
        el_span = max(0.0, min(el_hi, fov_hi) - max(el_lo, fov_lo))
        if el_span <= 0:
            continue
        rings = max(1.0, el_span / d_el)
        columns = max(1.0, projected_width / max(r, 0.1) / d_az)
        out[i] = max(1, int(round(rings * columns * visible_fraction[i])))
    return out


# --------------------------------------------------------------------------- scene generation
@dataclass
class SceneResult:
    """Table records produced for one scene (merged in scene order by the parent)."""

    tables: dict[str, list[dict]]
    num_samples: int
    num_annotations: int


def _visibility_token(fraction: float) -> str:
    if fraction < 0.4:
        return "1"
    if fraction < 0.6:
        return "2"
    if fraction < 0.8:
        return "3"
    return "4"


def _pose_record(token: str, timestamp: int, pose: np.ndarray) -> dict:
    return {
        "token": token,
        "timestamp": int(timestamp),
        "rotation": [float(v) for v in matrix_to_quaternion(pose[:3, :3])],
        "translation": [float(v) for v in pose[:3, 3]],
    }


def _encode_jpeg(image_rgb: np.ndarray, quality: int) -> bytes:
    import cv2

    full = cv2.resize(image_rgb, (IMAGE_WIDTH, IMAGE_HEIGHT), interpolation=cv2.INTER_LINEAR) \
        if image_rgb.shape[:2] != (IMAGE_HEIGHT, IMAGE_WIDTH) else image_rgb
    ok, buf = cv2.imencode(".jpg", full[:, :, ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def generate_scene(cfg: SyntheticConfig, out_dir: str, scene_name: str, scene_index: int,
                   sensor_tokens: dict[str, str], category_tokens: dict[str, str],
                   attribute_tokens: dict[str, str]) -> SceneResult:
    """Build one scene's world, write its sensor files, and return its table records."""
    n_samples = cfg.samples_per_scene
    duration = (n_samples - 1) * KEYFRAME_INTERVAL_US / 1e6
    world = build_world(cfg, scene_name, scene_index, duration)
    sensor_rng = scene_rng(cfg.seed, scene_name, "sensors")
    key = (cfg.seed, cfg.version, scene_name)
    tables: dict[str, list[dict]] = {name: [] for name in
                                     ("log", "scene", "sample", "sample_data", "ego_pose", "calibrated_sensor",
                                      "instance", "sample_annotation")}
    # log: one per scene (real logs hold several scenes; one each keeps scenes independent)
    # capture time: one scene per hour from 2018-07-01 (UTC), deterministic per scene index
    t0_s = 1530403200 + scene_index * 3600
    date = time.gmtime(t0_s)
    vehicle = "n008" if world.location.startswith("boston") else "n015"
    logfile = f"{vehicle}-{time.strftime('%Y-%m-%d-%H-%M-%S', date)}{'-0400' if vehicle == 'n008' else '+0800'}"
    log_token = make_token(*key, "log")
    tables["log"].append({"token": log_token, "logfile": logfile, "vehicle": vehicle,
                          "date_captured": time.strftime("%Y-%m-%d", date), "location": world.location})
    # calibrated sensors: one record per sensor per scene (as in real nuScenes, per log)
    calib_tokens = {}
    for channel in CAMERA_NAMES + ("LIDAR_TOP",):
        token = make_token(*key, "calibrated_sensor", channel)
        calib_tokens[channel] = token
        if channel == "LIDAR_TOP":
            translation, rotation = LIDAR_CALIBRATION
            intrinsic: list = []
        else:
            translation, rotation, _ = CAMERA_CALIBRATION[channel]
            intrinsic = camera_intrinsics(channel).tolist()
        tables["calibrated_sensor"].append({"token": token, "sensor_token": sensor_tokens[channel],
                                            "translation": list(translation), "rotation": list(rotation),
                                            "camera_intrinsic": intrinsic})
    scene_token = make_token(*key, "scene")
    t0_us = t0_s * 1_000_000
    sample_tokens = [make_token(*key, "sample", k) for k in range(n_samples)]
    sample_times = [t0_us + k * KEYFRAME_INTERVAL_US for k in range(n_samples)]
    for k, token in enumerate(sample_tokens):
        tables["sample"].append({"token": token, "timestamp": sample_times[k],
                                 "prev": sample_tokens[k - 1] if k > 0 else "",
                                 "next": sample_tokens[k + 1] if k + 1 < n_samples else "",
                                 "scene_token": scene_token})
    tables["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": n_samples,
                            "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                            "name": scene_name, "description": world.description})

    # which instances are annotated at which sample: contiguous span within the radius
    ego_poses = [world.ego_pose((t - t0_us) / 1e6) for t in sample_times]
    n_inst = len(world.instances)
    in_range = np.zeros((n_samples, n_inst), dtype=bool)
    boxes_per_sample = []
    for k in range(n_samples):
        boxes = world.instance_boxes((sample_times[k] - t0_us) / 1e6)
        boxes_per_sample.append(boxes)
        if n_inst:
            dist = np.hypot(boxes[:, 0] - ego_poses[k][0, 3], boxes[:, 1] - ego_poses[k][1, 3])
            in_range[k] = dist <= cfg.annotation_radius
    annotated = np.zeros_like(in_range)
    for i in range(n_inst):
        ks = np.nonzero(in_range[:, i])[0]
        if len(ks):
            annotated[ks[0]: ks[-1] + 1, i] = True
    inst_ids = [i for i in range(n_inst) if annotated[:, i].any()]

    camera_rays = {cam: _camera_rays(cam, cfg.render_scale) for cam in CAMERA_NAMES} if cfg.images else {}
    # visibility/lidar counts per (sample, instance)
    visible_fraction = np.zeros((n_samples, n_inst))
    lidar_counts = np.zeros((n_samples, n_inst), dtype=np.int64)
    clutter_global = np.array([c.box for c in world.clutter]).reshape(-1, 7)

    def clutter_ego(ego_from_global: np.ndarray) -> np.ndarray:
        """Clutter boxes within 80 m, in the ego frame (occluders for the visibility estimate)."""
        boxes = clutter_global.copy()
        boxes[:, :3] = boxes[:, :3] @ ego_from_global[:3, :3].T + ego_from_global[:3, 3]
        boxes[:, 6] += math.atan2(ego_from_global[1, 0], ego_from_global[0, 0])
        return boxes[np.hypot(boxes[:, 0], boxes[:, 1]) < 80.0]


    sd_records: dict[str, list[dict]] = {ch: [] for ch in CAMERA_NAMES + ("LIDAR_TOP",)}
    for k in range(n_samples):
        t_rel = (sample_times[k] - t0_us) / 1e6
        boxes = boxes_per_sample[k]
        ego_pose_k = ego_poses[k]
        ego_xy = ego_pose_k[:2, 3]
        # render list: instances near enough to matter, plus clutter
        render_boxes: list[RenderBox] = []
        for i, inst in enumerate(world.instances if (cfg.images or cfg.lidar) else []):
            if math.hypot(boxes[i, 0] - ego_xy[0], boxes[i, 1] - ego_xy[1]) < 130.0:
                render_boxes.append(RenderBox(boxes[i, :7], inst.colour,
                                              inst.kind if inst.kind != "bicycle_rack" else "rack", i,
                                              OBJECT_KINDS[inst.kind].intensity))
        # a rack's annotation box is not drawn (its bars are clutter)
        render_boxes = [rb for rb in render_boxes if rb.kind != "rack"]
        for c in world.clutter if (cfg.images or cfg.lidar) else []:
            if math.hypot(c.box[0] - ego_xy[0], c.box[1] - ego_xy[1]) < 160.0:
                render_boxes.append(RenderBox(c.box, c.colour, "clutter", -1, c.intensity))

        ego_from_global = rigid_inverse(ego_pose_k)
        boxes_ego = boxes.copy()
        if n_inst:
            boxes_ego[:, :3] = boxes[:, :3] @ ego_from_global[:3, :3].T + ego_from_global[:3, 3]
            yaw_ego = math.atan2(ego_pose_k[1, 0], ego_pose_k[0, 0])
            boxes_ego[:, 6] = boxes[:, 6] - yaw_ego
        # cameras
        vis_count = np.zeros(n_inst)
        tot_count = np.zeros(n_inst)
        for cam in CAMERA_NAMES:
            ts = sample_times[k] + CAMERA_TIME_OFFSETS_US[cam]
            pose = world.ego_pose((ts - t0_us) / 1e6)
            sd_token = make_token(*key, "sample_data", cam, k)
            filename = f"samples/{cam}/{logfile}__{cam}__{ts}.jpg"
            if cfg.images:
                image, visible, total = render_camera(world, camera_rays[cam], pose, render_boxes)
                for i, c in visible.items():
                    vis_count[i] += c
                for i, c in total.items():
                    tot_count[i] += c
                path = os.path.join(out_dir, filename)
                with open(path, "wb") as handle:
                    handle.write(_encode_jpeg(image, cfg.jpeg_quality))
            tables["ego_pose"].append(_pose_record(sd_token, ts, pose))
            sd_records[cam].append({
                "token": sd_token, "sample_token": sample_tokens[k], "ego_pose_token": sd_token,
                "calibrated_sensor_token": calib_tokens[cam], "timestamp": ts, "fileformat": "jpg",
                "is_key_frame": True, "height": IMAGE_HEIGHT, "width": IMAGE_WIDTH, "filename": filename,
                "prev": "", "next": "",
            })
        if cfg.images:
            frac = np.where(tot_count > 0, vis_count / np.maximum(tot_count, 1), 0.0)
        else:
            frac = np.zeros(n_inst)
            ann_idx = np.nonzero(annotated[k])[0]
            if len(ann_idx):
                frac[ann_idx] = approx_visible_fraction(boxes_ego[ann_idx], clutter_ego(ego_from_global))
        visible_fraction[k] = frac
        # lidar
        ts = sample_times[k]
        sd_token = make_token(*key, "sample_data", "LIDAR_TOP", k)
        filename = f"samples/LIDAR_TOP/{logfile}__LIDAR_TOP__{ts}.pcd.bin"
        if cfg.lidar:
            points = cast_lidar(world, ego_pose_k, render_boxes, sensor_rng)
            points.tofile(os.path.join(out_dir, filename))
            ann_idx = np.nonzero(annotated[k])[0]
            if len(ann_idx):
                pts_ego = points[:, :3].astype(np.float64) @ ego_from_lidar()[:3, :3].T + ego_from_lidar()[:3, 3]
                near = np.hypot(boxes_ego[ann_idx, 0], boxes_ego[ann_idx, 1]) < LIDAR_MAX_RANGE + 10
                sel = ann_idx[near]
                if len(sel):
                    lidar_counts[k, sel] = points_in_boxes(pts_ego, boxes_ego[sel, :7]).sum(1)
        else:
            ann_idx = np.nonzero(annotated[k])[0]
            if len(ann_idx):
                lidar_counts[k, ann_idx] = approx_lidar_points(boxes_ego[ann_idx], frac[ann_idx])
        tables["ego_pose"].append(_pose_record(sd_token, ts, ego_pose_k))
        sd_records["LIDAR_TOP"].append({
            "token": sd_token, "sample_token": sample_tokens[k], "ego_pose_token": sd_token,
            "calibrated_sensor_token": calib_tokens["LIDAR_TOP"], "timestamp": ts, "fileformat": "pcd",
            "is_key_frame": True, "height": 0, "width": 0, "filename": filename, "prev": "", "next": "",
        })
    for channel, records in sd_records.items():
        for j, rec in enumerate(records):
            rec["prev"] = records[j - 1]["token"] if j > 0 else ""
            rec["next"] = records[j + 1]["token"] if j + 1 < len(records) else ""
        tables["sample_data"].extend(records)

    # instances and annotations
    ann_token = {}
    for i in inst_ids:
        for k in np.nonzero(annotated[:, i])[0]:
            ann_token[(k, i)] = make_token(*key, "sample_annotation", i, k)
    n_ann = 0
    for k in range(n_samples):
        for i in inst_ids:
            if not annotated[k, i]:
                continue
            inst = world.instances[i]
            box = boxes_per_sample[k][i]
            attr = [attribute_tokens[inst.attribute]] if inst.attribute else []
            tables["sample_annotation"].append({
                "token": ann_token[(k, i)], "sample_token": sample_tokens[k],
                "instance_token": make_token(*key, "instance", i),
                "visibility_token": _visibility_token(float(visible_fraction[k, i])),
                "attribute_tokens": attr,
                "translation": [float(box[0]), float(box[1]), float(box[2])],
                "size": [float(box[3]), float(box[4]), float(box[5])],
                "rotation": [float(v) for v in yaw_to_quaternion(float(box[6]))],
                "prev": ann_token.get((k - 1, i), ""), "next": ann_token.get((k + 1, i), ""),
                "num_lidar_pts": int(lidar_counts[k, i]), "num_radar_pts": 0,
            })
            n_ann += 1
    for i in inst_ids:
        ks = np.nonzero(annotated[:, i])[0]
        tables["instance"].append({
            "token": make_token(*key, "instance", i), "category_token": category_tokens[world.instances[i].category],
            "nbr_annotations": int(len(ks)), "first_annotation_token": ann_token[(ks[0], i)],
            "last_annotation_token": ann_token[(ks[-1], i)],
        })
    return SceneResult(tables, n_samples, n_ann)


def _scene_job(args: tuple) -> SceneResult:
    """One scene in a worker; BLAS limited to one thread (tiny matrices, and the processes already fill the cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return generate_scene(*args)
    with threadpool_limits(limits=1):
        return generate_scene(*args)


# --------------------------------------------------------------------------- top level
def _static_tables(cfg: SyntheticConfig) -> tuple[dict[str, list[dict]], dict[str, str], dict[str, str], dict[str, str]]:
    """category, attribute, visibility and sensor tables (tokens independent of the seed)."""
    category = [{"token": make_token("category", name), "name": name, "description": desc, "index": idx}
                for idx, (name, desc) in enumerate(CATEGORIES)]
    attribute = [{"token": make_token("attribute", name), "name": name, "description": desc} for name, desc in ATTRIBUTES]
    visibility = [{"token": tok, "level": level, "description": desc} for tok, level, desc in VISIBILITY_LEVELS]
    sensor = [{"token": make_token("sensor", ch), "channel": ch, "modality": "camera"} for ch in CAMERA_NAMES]
    sensor.append({"token": make_token("sensor", "LIDAR_TOP"), "channel": "LIDAR_TOP", "modality": "lidar"})
    return (
        {"category": category, "attribute": attribute, "visibility": visibility, "sensor": sensor},
        {r["channel"]: r["token"] for r in sensor},
        {r["name"]: r["token"] for r in category},
        {r["name"]: r["token"] for r in attribute},
    )


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output folder {out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
        for name in ("v1.0-mini", "v1.0-trainval", "samples", "sweeps", "maps", "dataset_info.json"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_map_png(path: Path) -> None:
    """A small semantic-prior mask (the devkit only checks it exists unless map APIs are used)."""
    import cv2

    mask = np.full((64, 64), 255, np.uint8)
    cv2.imwrite(str(path), mask)


def generate(out_dir: str | os.PathLike, version: str = "v1.0-mini", seed: int = 0, progress: bool = True,
             **options: Any) -> Path:
    """Generate a synthetic nuScenes dataset at ``out_dir``; returns the dataset root.

    ``options`` are the fields of :class:`SyntheticConfig` (``samples_per_scene``,
    ``num_scenes``, ``split``, ``include_train``, ``train_scenes``, ``val_scenes``, ``objects_per_sample``, ``images``, ``lidar``,
    ``render_scale``, ``jpeg_quality``, ``annotation_radius``, ``bicycle_racks``,
    ``workers``, ``overwrite``). Raises ``FileExistsError`` when ``out_dir`` is a
    non-empty folder and ``overwrite`` is False.
    """
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; expected some of {sorted(known - {'version', 'seed'})}")
    cfg = SyntheticConfig(version=version, seed=seed, **options)
    cfg.validate()
    out = Path(out_dir)
    _prepare_out_dir(out, cfg.overwrite)
    start = time.time()
    names = scene_names_for(cfg)
    static, sensor_tokens, category_tokens, attribute_tokens = _static_tables(cfg)
    if cfg.images:
        for cam in CAMERA_NAMES:
            (out / "samples" / cam).mkdir(parents=True, exist_ok=True)
    if cfg.lidar:
        (out / "samples" / "LIDAR_TOP").mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, str(out), name, idx, sensor_tokens, category_tokens, attribute_tokens)
            for idx, name in enumerate(names)]
    tables: dict[str, list[dict]] = {name: [] for name in
                                     ("log", "scene", "sample", "sample_data", "ego_pose", "calibrated_sensor",
                                      "instance", "sample_annotation")}
    workers = max(1, min(cfg.workers, len(jobs)))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(jobs), desc=f"synthetic {cfg.version} scenes", unit="scene",
               disable=not progress) if tqdm else None
    if workers == 1:
        results = (_scene_job(j) for j in jobs)
        pool = None
    else:
        ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        pool = ctx.Pool(workers)
        results = pool.imap(_scene_job, jobs)  # ordered: tables are independent of scheduling
    n_samples = n_anns = 0
    try:
        for result in results:
            for name, records in result.tables.items():
                tables[name].extend(records)
            n_samples += result.num_samples
            n_anns += result.num_annotations
            if bar:
                bar.update(1)
                bar.set_postfix(samples=n_samples, anns=n_anns)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar:
            bar.close()
    # maps: one per location used
    (out / "maps").mkdir(exist_ok=True)
    map_records = []
    for location in LOCATIONS:
        logs = [r["token"] for r in tables["log"] if r["location"] == location]
        if not logs:
            continue
        token = make_token("map", location)
        filename = f"maps/{token}.png"
        _write_map_png(out / filename)
        map_records.append({"category": "semantic_prior", "token": token, "filename": filename, "log_tokens": logs})
    tables.update(static)
    tables["map"] = map_records
    table_dir = out / cfg.version
    table_dir.mkdir(exist_ok=True)
    for name, records in tables.items():
        _write_json(table_dir / f"{name}.json", records)
    info = {
        "generator": "bevperc.data.synthetic_nuscenes",
        "generator_version": GENERATOR_VERSION,
        "version": cfg.version,
        "seed": cfg.seed,
        "options": {k: v for k, v in asdict(cfg).items() if k not in ("version", "seed", "workers", "overwrite")},
        "num_scenes": len(names),
        "num_samples": n_samples,
        "num_annotations": n_anns,
        "class_colours": {k: list(v) for k, v in CLASS_COLOURS.items()},
    }
    _write_json(out / "dataset_info.json", info, indent=2)
    if progress:
        print(f"synthetic nuScenes {cfg.version}: {len(names)} scenes, {n_samples} samples, {n_anns} annotations "
              f"in {time.time() - start:.1f} s -> {out}")
    return out


def _write_json(path: Path, obj: Any, indent: Optional[int] = None) -> None:
    """Atomic JSON write (compact by default: the tables are large)."""
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(obj, indent=indent)  # dumps (not dump) uses the C encoder: 5-10x faster on big tables
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
