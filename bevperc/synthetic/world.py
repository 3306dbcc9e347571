"""The data model of one synthetic scene: the road, the motions, the instances, the clutter.

Each scene is a flat road (straight, or an arc of radius 250-1000 m) in the global frame
(z up, ground at z = 0): 1-2 driving lanes per direction (3.5 m), a bike lane (1.5 m), a
parking lane (2.5 m), a kerb and a 4 m sidewalk on each side; beyond the sidewalk the
road side is cut into 25-60 m segments (``SEGMENT_TYPES``). Positions on the road are
curvilinear: ``s`` along the centreline, ``lateral`` to its left. Every object moves along
the road with a smooth 1D :class:`SpeedProfile` (or stands still), so a :class:`World`
gives the boxes of all instances and the ego pose at any timestamp.

:func:`bevperc.synthetic.layout.build_world` makes a World; the sensors
(:mod:`~bevperc.synthetic.render`, :mod:`~bevperc.synthetic.lidar`) see it through
:meth:`World.sensor_boxes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from bevperc.geometry import make_transform, yaw_to_quaternion
from bevperc.synthetic.taxonomy import OBJECT_KINDS

SEGMENT_TYPES = ("lot", "park", "building", "worksite")
"""Kinds of road-side segments beyond the sidewalk (``World.side_segments`` holds their indices)."""
SUN_DIRECTION = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])
"""Default unit vector towards the sun (each scene draws its own, see ``World.sun_direction``)."""


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
class RenderBox:
    """A box to render/ray cast, in the global frame, with its appearance."""

    box: np.ndarray  # (7,) x, y, z, w, l, h, yaw
    colour: np.ndarray  # (3,)
    kind: str  # OBJECT_KINDS key, or "clutter"
    instance: int  # index into World.instances, -1 for clutter
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

    def sensor_boxes(self, instance_boxes: np.ndarray, ego_xy: np.ndarray) -> list[RenderBox]:
        """What the cameras and the LiDAR see near the ego: instances within 130 m, then clutter within 160 m.

        ``instance_boxes`` ``(N, >=7)`` are :meth:`instance_boxes` at the sensors' time,
        ``ego_xy`` ``(2,)`` the ego's global position. A bicycle rack's annotation box is not
        drawn (its bars are clutter).
        """
        out: list[RenderBox] = []
        for i, inst in enumerate(self.instances):
            near = math.hypot(instance_boxes[i, 0] - ego_xy[0], instance_boxes[i, 1] - ego_xy[1]) < 130.0
            if near and inst.kind != "bicycle_rack":
                out.append(RenderBox(instance_boxes[i, :7], inst.colour, inst.kind, i,
                                     OBJECT_KINDS[inst.kind].intensity))
        for c in self.clutter:
            if math.hypot(c.box[0] - ego_xy[0], c.box[1] - ego_xy[1]) < 160.0:
                out.append(RenderBox(c.box, c.colour, "clutter", -1, c.intensity))
        return out
