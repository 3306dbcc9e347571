"""Lay out a scene: the road, the ego motion, the annotated instances and the clutter.

Right-hand traffic in Boston, left-hand in Singapore. The ego vehicle drives in a lane at
0-12 m/s (a smooth speed profile). The placers, each one role of the road:

* driving lanes: moving/stopped vehicles, one speed profile per lane (so nothing collides),
  sometimes a truck towing a trailer;
* bike lanes: cyclists; sidewalks: walking pedestrians in two sub-lanes, and on the inner
  strip standing people, parked bicycles/motorcycles, cones and bicycle racks; poles at
  the outer edge;
* parking lanes: parked vehicles, or (work sites) closed with cones, barriers inside;
* road-side segments: parking lots (vehicles with random yaw, people), parks (trees,
  people, bicycles), building fronts (a building, people in front), work sites
  (construction vehicles, workers, barriers, cones).

Buildings, trees and poles are unannotated clutter (they occlude and are hit by the
LiDAR). Static placements keep apart through :class:`Placer`; finally every detection
class missing near the ego's start gets one instance, so every scene shows all 10.

All draws come from the scene's ``"world"`` generator in a fixed order (the lighting from
its own ``"light"`` stream), so a scene depends only on the seed and its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from bevperc.synthetic.config import SyntheticConfig, scene_rng
from bevperc.synthetic.taxonomy import (
    CLASS_COLOURS,
    CLUTTER_COLOURS,
    LOCATIONS,
    OBJECT_KINDS,
    TREE_CROWN_COLOUR,
    TREE_TRUNK_COLOUR,
)
from bevperc.synthetic.world import SEGMENT_TYPES, ClutterBox, Instance, Road, SpeedProfile, World

DENSITY_CALIBRATION = 0.38
"""Scales all object densities so that ``objects_per_sample=40`` gives ~40 annotations within 50 m."""


def _jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    """Per-instance colour jitter: hue +-8 deg, saturation x[0.8, 1], value x[0.85, 1.08]."""
    import colorsys

    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    h = (h + rng.uniform(-8, 8) / 360.0) % 1.0
    s = min(1.0, s * rng.uniform(0.8, 1.0))
    v = min(1.0, v * rng.uniform(0.85, 1.08))
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _sample_size(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A random size ``(3,)`` w, l, h of an ``OBJECT_KINDS`` kind (clipped to 0.6-1.5x its mean)."""
    spec = OBJECT_KINDS[kind]
    mean, std = np.array(spec.size_mean), np.array(spec.size_std)
    return np.clip(mean + std * rng.standard_normal(3), mean * 0.6, mean * 1.5)


class Placer:
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

    def claim(self, xy: np.ndarray, radius: float) -> bool:
        """Add the footprint if it is free; whether it was."""
        if not self.free(xy, radius):
            return False
        self.add(xy, radius)
        return True


@dataclass
class Layout:
    """A scene being laid out: what every placer reads (road, draws, extent) and fills in."""

    rng: np.random.Generator  # the scene's "world" stream: every draw of the layout, in order
    road: Road
    density: float  # object density factor (objects_per_sample / 40 * DENSITY_CALIBRATION)
    times: np.ndarray  # (64,) scene times (s) over the keyframes, to keep tracks near the ego
    s_lo: float  # the s range (m) that can come within the annotation radius (+30 m)
    s_hi: float
    bicycle_racks: bool
    placer: Placer = field(default_factory=Placer)
    instances: list[Instance] = field(default_factory=list)
    clutter: list[ClutterBox] = field(default_factory=list)

    def add_instance(self, kind: str, s0: float, lateral: float, yaw_offset: float,
                     profile: Optional[SpeedProfile], direction: float, attribute: str,
                     size: Optional[np.ndarray] = None, category: Optional[str] = None) -> Instance:
        """Append an instance; pedestrians without an explicit category are sometimes children or police."""
        rng = self.rng
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
        self.instances.append(inst)
        return inst

    def point(self, s: float, lateral: float) -> np.ndarray:
        """Global xy ``(2,)`` of a road position."""
        return self.road.point(np.array(s), np.array(lateral))


def build_world(cfg: SyntheticConfig, scene_name: str, scene_index: int, duration: float) -> World:
    """Lay out the road, the ego motion, the annotated instances and the clutter of a scene.

    ``duration`` is the time (s) from the first to the last keyframe.
    """
    rng = scene_rng(cfg.seed, scene_name)
    location = LOCATIONS[int(rng.integers(len(LOCATIONS)))]
    road = _draw_road(rng, forward_side=-1.0 if location.startswith("boston") else 1.0)
    ego_profile, ego_lane = _draw_ego(rng, road)
    ego_lateral = road.forward_side * road.lane_width * (ego_lane + 0.5)
    times = np.linspace(0.0, duration, 64)
    ego_s = ego_profile.position(times)
    radius = cfg.annotation_radius
    layout = Layout(rng, road, density=cfg.objects_per_sample / 40.0 * DENSITY_CALIBRATION, times=times,
                    s_lo=float(ego_s.min()) - radius - 30.0, s_hi=float(ego_s.max()) + radius + 30.0,
                    bicycle_racks=cfg.bicycle_racks)
    _place_lane_traffic(layout, ego_profile, ego_lane)
    side_segments = {side: _place_side(layout, side) for side in (1, -1)}
    _ensure_every_class(layout, ego_profile)
    speed = float(ego_profile.v0)
    description = (f"Synthetic {location}, {'straight road' if road.curvature == 0 else 'curve'}, "
                   f"{road.lanes_per_direction} lane(s) per direction, ego {'stopped' if speed == 0 else f'{speed:.1f} m/s'}")
    sun, exposure = _draw_lighting(cfg.seed, scene_name)
    return World(road, ego_lateral, ego_profile, layout.instances, layout.clutter, side_segments, location,
                 description, sun_direction=sun, exposure=exposure)


def _draw_road(rng: np.random.Generator, forward_side: float) -> Road:
    """A straight road or an arc (radius 250-1000 m) with 1-2 lanes per direction, somewhere in the map."""
    curvature = 0.0 if rng.random() < 0.5 else float(rng.choice([-1, 1]) * rng.uniform(1 / 1000, 1 / 250))
    return Road(
        origin=rng.uniform(300.0, 1800.0, 2),
        heading0=float(rng.uniform(-math.pi, math.pi)),
        curvature=curvature,
        lanes_per_direction=int(rng.integers(1, 3)),
        forward_side=forward_side,
    )


def _draw_ego(rng: np.random.Generator, road: Road) -> tuple[SpeedProfile, int]:
    """The ego's speed profile (mostly driving, sometimes stopped at a light) and its lane index."""
    if rng.random() < 0.12:
        ego_profile = SpeedProfile(0.0)
    else:
        v0 = float(rng.uniform(3.0, 11.0))
        ego_profile = SpeedProfile(v0, amp=float(rng.uniform(0, 0.25) * v0), omega=float(rng.uniform(0.15, 0.4)))
    return ego_profile, int(rng.integers(road.lanes_per_direction))


def _draw_lighting(seed: int, scene_name: str) -> tuple[np.ndarray, float]:
    """Sun direction ``(3,)`` and exposure, from the scene's own stream (so they never change the layout)."""
    light_rng = scene_rng(seed, scene_name, "light")
    sun_az, sun_el = light_rng.uniform(-math.pi, math.pi), math.radians(light_rng.uniform(35.0, 70.0))
    sun = np.array([math.cos(sun_el) * math.cos(sun_az), math.cos(sun_el) * math.sin(sun_az), math.sin(sun_el)])
    return sun, float(light_rng.uniform(0.88, 1.08))


def _track_start_range(layout: Layout, profile: SpeedProfile, direction: float) -> tuple[float, float]:
    """Range of ``s0`` over which a track moving along ``direction`` comes near the ego at some time."""
    travel = profile.position(layout.times) * direction
    return layout.s_lo - max(0.0, float(travel.max())), layout.s_hi - min(0.0, float(travel.min()))


# --------------------------------------------------------------------------- driving lanes
LANE_KINDS = ("car", "truck", "bus", "motorcycle", "construction_vehicle", "trailer")
LANE_KIND_PROBS = np.array([0.52, 0.17, 0.11, 0.07, 0.06, 0.07])


def _place_lane_traffic(layout: Layout, ego_profile: SpeedProfile, ego_lane: int) -> None:
    """Vehicles in every driving lane, one speed profile per lane, packed with gaps."""
    road, rng = layout.road, layout.rng
    for direction in (1.0, -1.0):
        for lane in range(road.lanes_per_direction):
            lateral = road.forward_side * direction * road.lane_width * (lane + 0.5)
            is_ego_lane = direction > 0 and lane == ego_lane
            if is_ego_lane:
                profile = ego_profile
            elif rng.random() < 0.15:
                profile = SpeedProfile(0.0)  # a stopped queue
            else:
                v0 = float(rng.uniform(4.0, 13.0))
                profile = SpeedProfile(v0, amp=float(rng.uniform(0, 0.2) * v0), omega=float(rng.uniform(0.15, 0.4)))
            _fill_lane(layout, lateral, direction, profile, is_ego_lane)


def _fill_lane(layout: Layout, lateral: float, direction: float, profile: SpeedProfile, is_ego_lane: bool) -> None:
    """One lane's vehicles (moving or a stopped queue); a moving truck sometimes tows a trailer."""
    rng = layout.rng
    # s0 range near the ego at some time (an oncoming lane's range is not widened by its travel)
    travel = profile.position(layout.times)
    lo = layout.s_lo - max(0.0, float(direction * travel.max()))
    hi = layout.s_hi - min(0.0, float(direction * travel.min()))
    s = lo + rng.uniform(0, 15)
    mean_gap = 8.0 / layout.density
    while s < hi:
        kind = str(rng.choice(LANE_KINDS, p=LANE_KIND_PROBS))
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
        layout.add_instance(kind, centre, lateral + rng.normal(0, 0.15), yaw_offset + rng.normal(0, 0.02),
                            None if not moving else profile, direction, attribute, size)
        if kind == "truck" and moving and rng.random() < 0.3:  # a towed trailer right behind
            trailer_size = _sample_size(rng, "trailer")
            trailer_centre = centre - direction * (half + 0.6 + trailer_size[1] / 2)
            layout.add_instance("trailer", trailer_centre, lateral, yaw_offset, profile, direction,
                                "vehicle.moving", trailer_size)
            s += trailer_size[1] + 0.6
        s += size[1] + max(2.5, rng.exponential(mean_gap))


# --------------------------------------------------------------------------- one side of the road
@dataclass(frozen=True)
class _Side:
    """One side of the road (+1 left of the centreline, -1 right) and the laterals of its strips."""

    side: float
    direction: float  # traffic direction next to this side (+1 / -1 along s)
    bike: float  # centre of the bike lane
    park: float  # centre of the parking lane
    walk_in: float  # the two walking sub-lanes of the sidewalk
    walk_out: float
    sidewalk_static: float  # the inner strip of the sidewalk (standing people, parked cycles)
    pole: float  # the outer edge of the sidewalk

    @classmethod
    def of(cls, road: Road, side: float) -> "_Side":
        walkway = road.kerb_offset + road.kerb_width
        return cls(side, 1.0 if side == road.forward_side else -1.0,
                   bike=side * (road.driving_half_width + road.bike_lane_width / 2),
                   park=side * (road.driving_half_width + road.bike_lane_width + road.parking_width / 2),
                   walk_in=side * (walkway + 1.2), walk_out=side * (walkway + 2.4),
                   sidewalk_static=side * (walkway + 0.55), pole=side * (road.sidewalk_end - 0.35))


def _place_side(layout: Layout, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut one side into segments and fill its bike lane, sidewalk, parking lane and road side.

    Returns the segments: starts ``(S,)`` (m along s) and type ids ``(S,)`` (``SEGMENT_TYPES``).
    """
    rng = layout.rng
    strips = _Side.of(layout.road, side)
    starts, types = [], []
    s = layout.s_lo - 40.0
    while s < layout.s_hi + 40.0:
        starts.append(s)
        types.append(int(rng.choice(4, p=[0.38, 0.2, 0.32, 0.1])))
        s += rng.uniform(25.0, 60.0)
    starts_arr, types_arr = np.array(starts), np.array(types)
    _place_cyclists(layout, strips)
    _place_walkers(layout, strips)
    seg_ends = np.append(starts_arr[1:], layout.s_hi + 80.0)
    for seg_start, seg_end, seg_type in zip(starts_arr, seg_ends, types_arr):
        _place_segment(layout, strips, seg_start, seg_end, SEGMENT_TYPES[seg_type])
    return starts_arr, types_arr


def _place_cyclists(layout: Layout, strips: _Side) -> None:
    """Cyclists in the bike lane: one speed profile for the lane."""
    rng = layout.rng
    bike_profile = SpeedProfile(float(rng.uniform(2.5, 6.0)))
    lo, hi = _track_start_range(layout, bike_profile, strips.direction)
    s = lo + rng.uniform(0, 20)
    while s < hi:
        kind = "bicycle" if rng.random() < 0.7 else "motorcycle"
        size = _sample_size(rng, kind)
        layout.add_instance(kind, s, strips.bike + rng.normal(0, 0.1), 0.0 if strips.direction > 0 else math.pi,
                            bike_profile, strips.direction, "cycle.with_rider", size)
        s += size[1] + max(3.0, rng.exponential(45.0 / layout.density))


def _place_walkers(layout: Layout, strips: _Side) -> None:
    """Walking pedestrians: two sidewalk sub-lanes in opposite directions, one speed each."""
    rng = layout.rng
    for walk_lateral, walk_dir in ((strips.walk_in, strips.direction), (strips.walk_out, -strips.direction)):
        walk_profile = SpeedProfile(float(rng.uniform(1.0, 1.6)))
        lo, hi = _track_start_range(layout, walk_profile, walk_dir)
        s = lo + rng.uniform(0, 8)
        while s < hi:
            layout.add_instance("pedestrian", s, walk_lateral + rng.normal(0, 0.15),
                                0.0 if walk_dir > 0 else math.pi, walk_profile, walk_dir, "pedestrian.moving")
            s += 1.0 + rng.exponential(26.0 / layout.density)


def _place_segment(layout: Layout, strips: _Side, seg_start: float, seg_end: float, name: str) -> None:
    """One segment: its parking lane, sidewalk statics (maybe a rack), poles, and the road side beyond."""
    _place_parking_lane(layout, strips, seg_start, seg_end, worksite=name == "worksite")
    _place_sidewalk_statics(layout, strips, seg_start, seg_end)
    if layout.bicycle_racks and name in ("building", "park") and layout.rng.random() < 0.15:
        _place_bicycle_rack(layout, strips, seg_start, seg_end)
    _place_poles(layout, strips, seg_start, seg_end)
    if name == "building":
        _place_building(layout, strips.side, seg_start, seg_end)
    elif name in ("lot", "worksite"):
        _place_lot(layout, strips.side, seg_start, seg_end, worksite=name == "worksite")
    else:
        _place_park(layout, strips.side, seg_start, seg_end)


# --------------------------------------------------------------------------- parking lane and sidewalk
PARKED_KINDS = ("car", "truck", "trailer", "construction_vehicle", "bus", "motorcycle")
PARKED_KIND_PROBS = (0.52, 0.14, 0.09, 0.08, 0.09, 0.08)


def _place_parking_lane(layout: Layout, strips: _Side, seg_start: float, seg_end: float, worksite: bool) -> None:
    """Parked vehicles along the kerb; a work site closes the lane with cones and puts barriers inside."""
    rng, placer, side = layout.rng, layout.placer, strips.side
    s = seg_start + rng.uniform(0.5, 4.0)
    if worksite:
        cone_lateral = side * (layout.road.driving_half_width + layout.road.bike_lane_width + 0.4)
        for cs in np.arange(seg_start + 1.0, seg_end - 1.0, rng.uniform(4.5, 7.0)):
            if placer.claim(layout.point(cs, cone_lateral), 0.35):
                layout.add_instance("traffic_cone", float(cs), cone_lateral, rng.uniform(-math.pi, math.pi),
                                    None, 1.0, "")
        for bs in np.arange(seg_start + 2.0, seg_end - 2.0, rng.uniform(2.8, 3.5)):
            size = _sample_size(rng, "barrier")
            lat = strips.park + side * 0.3
            xy = layout.point(bs, lat)
            if rng.random() < 0.6 and placer.free(xy, 0.3 + size[0] / 2 * 0.5):
                placer.add(xy, size[0] / 2 * 0.5)
                layout.add_instance("barrier", float(bs), lat, math.pi / 2 + rng.normal(0, 0.05), None, 1.0, "",
                                    size)
        return
    while s < seg_end - 3.0:
        roll = rng.random()
        if roll > 0.7 * min(layout.density, 1.3):
            s += rng.uniform(3.0, 9.0)
            continue
        kind = str(rng.choice(PARKED_KINDS, p=PARKED_KIND_PROBS))
        size = _sample_size(rng, kind)
        centre = s + size[1] / 2
        if centre + size[1] / 2 > seg_end:
            break
        if placer.claim(layout.point(centre, strips.park), size[1] / 2 * 0.95):
            yaw_offset = (0.0 if strips.direction > 0 else math.pi) + rng.normal(0, 0.04)
            attribute = ("cycle.without_rider" if kind == "motorcycle" else
                         "vehicle.stopped" if kind == "bus" else "vehicle.parked")
            layout.add_instance(kind, centre, strips.park + rng.normal(0, 0.1), yaw_offset, None, strips.direction,
                                attribute, size)
        s += size[1] + rng.uniform(1.0, 3.0)


def _place_sidewalk_statics(layout: Layout, strips: _Side, seg_start: float, seg_end: float) -> None:
    """The sidewalk's inner strip: standing people, parked bicycles / motorcycles, cones."""
    rng, side = layout.rng, strips.side
    n_static = rng.poisson((seg_end - seg_start) / 14.0 * layout.density)
    for _ in range(n_static):
        cs = float(rng.uniform(seg_start + 1.0, seg_end - 1.0))
        roll = rng.random()
        if roll < 0.4:
            kind, yaw_offset, attribute = "pedestrian", rng.uniform(-math.pi, math.pi), "pedestrian.standing"
        elif roll < 0.7:
            kind, yaw_offset, attribute = "bicycle", side * math.pi / 2 + rng.normal(0, 0.2), "cycle.without_rider"
        elif roll < 0.88:
            kind, yaw_offset, attribute = "motorcycle", side * math.pi / 2 + rng.normal(0, 0.2), "cycle.without_rider"
        else:
            kind, yaw_offset, attribute = "traffic_cone", rng.uniform(-math.pi, math.pi), ""
        size = _sample_size(rng, kind)
        lat = strips.sidewalk_static + side * (size[1] / 2 - 0.4 if kind in ("bicycle", "motorcycle") else 0.0)
        if layout.placer.claim(layout.point(cs, lat), 0.5 * max(size[0], size[1])):
            layout.add_instance(kind, cs, lat, yaw_offset, None, 1.0, attribute, size)


def _place_bicycle_rack(layout: Layout, strips: _Side, seg_start: float, seg_end: float) -> None:
    """A bicycle rack on the sidewalk (annotated as static_object.bicycle_rack), bars as clutter, bikes in it."""
    rng, road, side = layout.rng, layout.road, strips.side
    length = float(rng.uniform(3.0, 6.0))
    cs = float(rng.uniform(seg_start + length, max(seg_start + length + 0.1, seg_end - length)))
    lat = strips.sidewalk_static + side * 0.5
    if not layout.placer.claim(layout.point(cs, lat), length / 2):
        return
    heading = float(road.heading(cs))
    size = np.array([2.0, length, 1.2])
    layout.add_instance("bicycle_rack", cs, lat, 0.0, None, 1.0, "", size)
    # two low metal bars along the rack (clutter, so bikes inside stay visible)
    for off in (-0.7, 0.7):
        bxy = layout.point(cs, lat + off)
        layout.clutter.append(ClutterBox(np.array([bxy[0], bxy[1], 0.35, 0.08, length, 0.7, heading]),
                                         np.array(CLASS_COLOURS["bicycle_rack"], dtype=np.float64), 80.0))
    for bs in np.arange(cs - length / 2 + 0.5, cs + length / 2 - 0.3, 0.9):
        if rng.random() < 0.6:
            bike = _sample_size(rng, "bicycle")
            bike[1] = min(bike[1], 1.8)
            layout.add_instance("bicycle", float(bs), lat, side * math.pi / 2 + rng.normal(0, 0.05), None, 1.0,
                                "cycle.without_rider", bike)


def _place_poles(layout: Layout, strips: _Side, seg_start: float, seg_end: float) -> None:
    """Poles (clutter) every 15-30 m at the outer edge of the sidewalk."""
    rng, road = layout.rng, layout.road
    for ps in np.arange(seg_start + rng.uniform(0, 10), seg_end, rng.uniform(15.0, 30.0)):
        xy = layout.point(ps, strips.pole)
        if layout.placer.claim(xy, 0.2):
            layout.clutter.append(ClutterBox(np.array([xy[0], xy[1], 3.0, 0.25, 0.25, 6.0, float(road.heading(ps))]),
                                             np.array([130.0, 130, 135]), 70.0))


# --------------------------------------------------------------------------- the road side beyond the sidewalk
def _place_building(layout: Layout, side: float, seg_start: float, seg_end: float) -> None:
    """A building set back 1.5-6 m from the sidewalk, and a few people standing in front of it."""
    rng, road = layout.rng, layout.road
    seg_len = seg_end - seg_start
    side_start = road.sidewalk_end
    heading_mid = float(road.heading((seg_start + seg_end) / 2))
    setback = rng.uniform(1.5, 6.0)
    gap = 2.0
    depth = rng.uniform(10.0, 25.0)
    lat = side * (side_start + setback + depth / 2)
    xy = layout.point((seg_start + seg_end) / 2, lat)
    length = max(5.0, seg_len - 2 * gap) * float(road.speed_factor(lat))
    height = rng.uniform(5.0, 22.0)
    colour = np.array(CLUTTER_COLOURS[int(rng.integers(len(CLUTTER_COLOURS)))], dtype=np.float64)
    layout.clutter.append(ClutterBox(np.array([xy[0], xy[1], height / 2, depth, length, height, heading_mid]),
                                     colour * rng.uniform(0.9, 1.1), 50.0))
    for _ in range(rng.poisson(seg_len / 25.0 * layout.density)):
        cs = float(rng.uniform(seg_start + 1, seg_end - 1))
        lat_p = side * (side_start + rng.uniform(0.5, max(0.6, setback - 0.5)))
        if layout.placer.claim(layout.point(cs, lat_p), 0.45):
            layout.add_instance("pedestrian", cs, lat_p, rng.uniform(-math.pi, math.pi), None, 1.0,
                                "pedestrian.standing")


LOT_KINDS = ("car", "truck", "trailer", "pedestrian", "bus", "construction_vehicle")
LOT_KIND_PROBS = (0.5, 0.14, 0.12, 0.1, 0.08, 0.06)
WORKSITE_KINDS = ("construction_vehicle", "truck", "pedestrian", "barrier", "traffic_cone")
WORKSITE_KIND_PROBS = (0.3, 0.12, 0.22, 0.18, 0.18)


def _place_lot(layout: Layout, side: float, seg_start: float, seg_end: float, worksite: bool) -> None:
    """A 30 m deep parking lot (vehicles with random yaw, people) or work site (machines, workers, barriers)."""
    rng, road = layout.rng, layout.road
    depth = 30.0
    n_obj = rng.poisson((seg_end - seg_start) * depth / 220.0 * layout.density)
    for _ in range(n_obj):
        lat = side * (road.sidewalk_end + rng.uniform(2.5, depth))
        kinds, probs = (WORKSITE_KINDS, WORKSITE_KIND_PROBS) if worksite else (LOT_KINDS, LOT_KIND_PROBS)
        kind = str(rng.choice(kinds, p=probs))
        size = _sample_size(rng, kind)
        rad = 0.5 * math.hypot(size[0], size[1])
        if seg_end - seg_start < 2 * rad + 2.0:
            continue
        # stay inside the segment: a neighbouring segment may be a building
        cs = float(rng.uniform(seg_start + rad + 1.0, seg_end - rad - 1.0))
        if not layout.placer.claim(layout.point(cs, lat), rad):
            continue
        if kind == "pedestrian":
            category = "human.pedestrian.construction_worker" if worksite else None
            layout.add_instance(kind, cs, lat, rng.uniform(-math.pi, math.pi), None, 1.0, "pedestrian.standing",
                                size, category)
        elif kind in ("barrier", "traffic_cone"):
            layout.add_instance(kind, cs, lat, rng.uniform(-math.pi, math.pi), None, 1.0, "", size)
        else:
            yaw = rng.uniform(-math.pi, math.pi) if rng.random() < 0.5 else \
                rng.choice([0.0, math.pi / 2, math.pi, -math.pi / 2]) + rng.normal(0, 0.1)
            layout.add_instance(kind, cs, lat, float(yaw), None, 1.0, "vehicle.parked", size)


def _place_park(layout: Layout, side: float, seg_start: float, seg_end: float) -> None:
    """A park: trees (trunk and crown, clutter), and some people / parked bicycles."""
    rng, side_start = layout.rng, layout.road.sidewalk_end
    seg_len = seg_end - seg_start
    for _ in range(rng.poisson(seg_len / 9.0)):
        cs = float(rng.uniform(seg_start + 1, seg_end - 1))
        lat = side * (side_start + rng.uniform(2.0, 25.0))
        xy = layout.point(cs, lat)
        if not layout.placer.claim(xy, 1.8):
            continue
        trunk_h = rng.uniform(1.8, 3.0)
        crown = rng.uniform(2.5, 3.6)
        yaw = float(rng.uniform(-math.pi, math.pi))
        layout.clutter.append(ClutterBox(np.array([xy[0], xy[1], trunk_h / 2, 0.35, 0.35, trunk_h, yaw]),
                                         np.array(TREE_TRUNK_COLOUR, dtype=np.float64), 30.0))
        layout.clutter.append(ClutterBox(np.array([xy[0], xy[1], trunk_h + crown / 2, crown, crown, crown, yaw]),
                                         np.array(TREE_CROWN_COLOUR, dtype=np.float64) * rng.uniform(0.85, 1.15),
                                         20.0))
    for _ in range(rng.poisson(seg_len / 18.0 * layout.density)):
        cs = float(rng.uniform(seg_start + 1, seg_end - 1))
        lat = side * (side_start + rng.uniform(1.0, 20.0))
        kind = "pedestrian" if rng.random() < 0.75 else "bicycle"
        size = _sample_size(rng, kind)
        if layout.placer.claim(layout.point(cs, lat), 0.5 * max(size[0], size[1])):
            attribute = "pedestrian.standing" if kind == "pedestrian" else "cycle.without_rider"
            layout.add_instance(kind, cs, lat, rng.uniform(-math.pi, math.pi), None, 1.0, attribute, size)


# --------------------------------------------------------------------------- every class near the start
SMALL_KINDS = frozenset({"pedestrian", "bicycle", "motorcycle", "traffic_cone", "barrier"})


def _ensure_every_class(layout: Layout, ego_profile: SpeedProfile) -> None:
    """Add one static instance of each detection class missing near the ego's start.

    Every scene then shows every class within ~30 m at its first keyframes (rare classes
    get seen in every scene; the GT-as-submission check covers all 10 classes).
    """
    rng = layout.rng
    s_start = float(ego_profile.position(0.0))
    start_xy = layout.point(s_start, 0.0)
    present = set()
    for inst in layout.instances:
        xy = layout.point(inst.s_at(0.0), inst.lateral)
        if inst.kind != "bicycle_rack" and math.hypot(*(xy - start_xy)) < 30.0:
            present.add(inst.kind)
    for kind in OBJECT_KINDS:
        if kind in present or kind == "bicycle_rack":
            continue
        size = _sample_size(rng, kind)
        for _ in range(40):
            strips = _Side.of(layout.road, float(rng.choice([-1.0, 1.0])))
            cs = s_start + float(rng.uniform(-25.0, 25.0))
            if kind in SMALL_KINDS:  # inner sidewalk strip
                lat = strips.sidewalk_static
                yaw_offset = float(rng.uniform(-math.pi, math.pi))
                attribute = {"pedestrian": "pedestrian.standing", "bicycle": "cycle.without_rider",
                             "motorcycle": "cycle.without_rider"}.get(kind, "")
                radius = 0.5 * max(size[0], size[1])
            else:  # parking lane
                lat = strips.park
                yaw_offset = 0.0 if strips.direction > 0 else math.pi
                attribute = "vehicle.stopped" if kind == "bus" else "vehicle.parked"
                radius = 0.5 * size[1]
            if layout.placer.claim(layout.point(cs, lat), radius):
                layout.add_instance(kind, cs, lat, yaw_offset, None, strips.direction, attribute, size)
                break
