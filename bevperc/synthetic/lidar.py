"""The LIDAR_TOP of the synthetic world: a 32-ring scanner ray cast against the ground and the boxes.

Rays at the rig's 32 elevations x 1084 azimuths (:mod:`bevperc.synthetic.rig`) from the
real LIDAR_TOP pose hit the ground plane (intensity from
:func:`~bevperc.synthetic.ground.shade_ground`) and every box (slab test); the nearest
hit within 1-70 m is a return. A surface return is placed 3 cm inside the surface (real
returns scatter around it), so ``bevperc.geometry.points_in_boxes`` on the written cloud
counts it as the box's: that is ``num_lidar_pts``. Range noise 1 cm, intensity noise 2.
Points are written as float32 x, y, z, intensity, ring in the LIDAR_TOP frame.
"""

from __future__ import annotations

import math

import numpy as np

from bevperc.geometry import invert_transform
from bevperc.synthetic.ground import shade_ground
from bevperc.synthetic.rig import (
    LIDAR_AZIMUTH_STEPS,
    LIDAR_ELEVATIONS_DEG,
    LIDAR_MAX_RANGE,
    LIDAR_MIN_RANGE,
    ego_from_lidar,
)
from bevperc.synthetic.world import RenderBox, World


def lidar_rays() -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions ``(32 * 1084, 3)`` in the LIDAR_TOP frame and their ring index."""
    elev = np.radians(LIDAR_ELEVATIONS_DEG)
    az = np.arange(LIDAR_AZIMUTH_STEPS) * (2 * math.pi / LIDAR_AZIMUTH_STEPS)
    ee, aa = np.meshgrid(elev, az, indexing="ij")
    dirs = np.stack([np.cos(ee) * np.cos(aa), np.cos(ee) * np.sin(aa), np.sin(ee)], -1).reshape(-1, 3)
    rings = np.repeat(np.arange(len(elev)), LIDAR_AZIMUTH_STEPS)
    return dirs, rings


def ray_box_hits(origins: np.ndarray, dirs: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Slab test of rays against one oriented box.

    ``origins`` ``(3,)`` (shared) or ``(R, 3)``, ``dirs`` ``(R, 3)``, ``box`` ``(>=7,)``
    [x, y, z, w, l, h, yaw] in the same frame. Returns ``t_hit (R,)``: the ray parameter of
    the entry point, ``inf`` where missed or where the origin is inside.
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
    t_enter = t_near.max(-1)
    t_exit = t_far.min(-1)
    hit = (t_enter <= t_exit) & (t_enter > 1e-4)
    return np.where(hit, t_enter, np.inf)


def cast_lidar(world: World, global_from_ego: np.ndarray, boxes: list[RenderBox], rng: np.random.Generator) -> np.ndarray:
    """Ray cast one LIDAR_TOP sweep. Returns ``(P, 5)`` float32 x, y, z, intensity, ring in the lidar frame."""
    dirs_lidar, rings = lidar_rays()
    global_from_lidar = global_from_ego @ ego_from_lidar()
    origin = global_from_lidar[:3, 3]
    dirs = dirs_lidar @ global_from_lidar[:3, :3].T
    t_best = np.full(len(dirs), np.inf)  # (R,) ray parameter of the nearest hit
    intensity = np.zeros(len(dirs))
    dz = dirs[:, 2]
    ground = dz < -1e-6
    t_ground = np.where(ground, -origin[2] / np.where(ground, dz, -1.0), np.inf)
    gidx = np.nonzero(ground & (t_ground < LIDAR_MAX_RANGE + 1))[0]
    if len(gidx):
        gpts = origin[None, :2] + t_ground[gidx, None] * dirs[gidx, :2]
        _, gint = shade_ground(world, gpts)
        t_best[gidx] = t_ground[gidx]
        intensity[gidx] = gint
    _cast_boxes(origin, dirs, boxes, t_best, intensity)
    ok = (t_best >= LIDAR_MIN_RANGE) & (t_best <= LIDAR_MAX_RANGE)
    t = t_best[ok] + rng.normal(0.0, 0.01, int(ok.sum()))
    points_global = origin + t[:, None] * dirs[ok]
    lidar_from_global = invert_transform(global_from_lidar, rigid=True)
    points_lidar = points_global @ lidar_from_global[:3, :3].T + lidar_from_global[:3, 3]
    inten = np.clip(intensity[ok] + rng.normal(0.0, 2.0, int(ok.sum())), 0, 255)
    return np.concatenate([points_lidar, inten[:, None], rings[ok, None]], 1).astype(np.float32)


def _cast_boxes(origin: np.ndarray, dirs: np.ndarray, boxes: list[RenderBox], t_best: np.ndarray,
                intensity: np.ndarray) -> None:
    """Lower ``t_best`` ``(R,)`` (and set ``intensity`` ``(R,)``) where a box is hit first.

    The rays run from ``origin`` ``(3,)`` along ``dirs`` ``(R, 3)`` (global frame); only rays
    within a box's azimuth sector are tested.
    """
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
            cand = np.arange(len(dirs))
        if len(cand) == 0:
            continue
        t_hit = ray_box_hits(origin, dirs[cand], rb.box)
        # a surface return lands slightly inside the object (3 cm), as real returns scatter
        closer = t_hit < t_best[cand]
        sel = cand[closer]
        t_best[sel] = t_hit[closer] + 0.03
        intensity[sel] = rb.intensity
