"""The ground of the synthetic world: its colour (for the cameras) and LiDAR intensity at any point.

A flat z = 0 plane shaded by the road's cross-section: textured driving lanes with a solid
centre line, dashed lane lines and solid edge lines, a bike lane, a parking lane with slot
marks, a kerb, sidewalk tiles with grout lines, and beyond the sidewalk the road-side
segments (asphalt lots with parking lines, grass, paving, dirt). Fine and coarse value
noise in world cells gives texture (parallax and depth cues).
"""

from __future__ import annotations

import numpy as np

from bevperc.synthetic.world import World

# Road-side segment type id (``SEGMENT_TYPES`` order: lot, park, building, worksite) -> colour, intensity.
SEGMENT_COLOURS = {0: (108.0, 108.0, 112.0), 1: (92.0, 122.0, 72.0), 2: (152.0, 147.0, 140.0), 3: (140.0, 122.0, 98.0)}
SEGMENT_INTENSITIES = {0: 10.0, 1: 15.0, 2: 20.0, 3: 12.0}


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

    def put(mask: np.ndarray, rgb: tuple[float, float, float], value: float) -> None:
        colour[mask] = rgb
        intensity[mask] = value

    beyond = abs_lat >= road.sidewalk_end
    _shade_road_side(world, s, lateral, beyond, colour, intensity)
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


def _shade_road_side(world: World, s: np.ndarray, lateral: np.ndarray, beyond: np.ndarray, colour: np.ndarray,
                     intensity: np.ndarray) -> None:
    """Fill ``colour`` ``(P, 3)`` and ``intensity`` ``(P,)`` where ``beyond`` the sidewalk, by segment type.

    ``s``, ``lateral`` ``(P,)`` float32 are the points' curvilinear coordinates. Parking lots
    get perpendicular lines every 2.8 m.
    """
    side_start = world.road.sidewalk_end
    for side, (starts, types) in world.side_segments.items():
        on_side = beyond & (np.sign(lateral) == side)
        if not on_side.any():
            continue
        idx = np.clip(np.searchsorted(starts, s[on_side], side="right") - 1, 0, len(types) - 1)
        seg = types[idx]
        sub_colour = np.empty((len(idx), 3), np.float32)
        sub_int = np.empty(len(idx), np.float32)
        for t, rgb in SEGMENT_COLOURS.items():
            sub_colour[seg == t] = rgb
            sub_int[seg == t] = SEGMENT_INTENSITIES[t]
        lot_line = (seg == 0) & ((s[on_side] % 2.8) < 0.12) & ((np.abs(lateral[on_side]) - side_start) % 12.0 < 5.0)
        sub_colour[lot_line] = (220.0, 220.0, 215.0)
        sub_int[lot_line] = 70.0
        colour[on_side] = sub_colour
        intensity[on_side] = sub_int
