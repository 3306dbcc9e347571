"""The LiDAR scene in 3D with open3d: point cloud plus boxes as line sets, saved as .ply and rendered to PNG.

Rendering uses ``open3d.visualization.rendering.OffscreenRenderer``, which needs an EGL
(or Vulkan) capable GPU driver. On a headless machine without one it fails, sometimes by
killing the process, so :func:`offscreen_renderer_available` first tries it in a
subprocess (once per process, cached). When it is not available :func:`render_scene_png`
draws the same scene with matplotlib's 3D axes and says so in the figure title and the
log; the returned :class:`RenderResult` records which backend drew the picture.

Set ``BEVPERC_O3D_RENDER=0`` to skip the probe (always fall back), ``=1`` to skip the
probe and try open3d directly.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bevperc.geometry import box_corners
from bevperc.viz.cameras import BOX_EDGES, as_boxes, as_numpy
from bevperc.viz.colors import class_colors

log = logging.getLogger(__name__)

_PROBE_SCRIPT = """
import open3d.visualization.rendering as rendering
renderer = rendering.OffscreenRenderer(32, 32)
renderer.render_to_image()
print("ok")
"""


@dataclass
class RenderResult:
    """What :func:`render_scene_png` wrote and how."""

    path: Path
    backend: str  # "open3d" or "matplotlib"
    note: str = ""


# --------------------------------------------------------------------------- geometry as arrays
def box_line_set_arrays(boxes: Any, labels: Any, heading: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes as a line set: vertices ``(V, 3)``, lines ``(L, 2)`` (vertex indices), colours ``(L, 3)``.

    Each box gives its 8 corners (devkit order) and 12 edges; with ``heading`` also the
    bottom centre and the front bottom centre joined by a heading line (13 edges).
    """
    boxes = as_boxes(boxes)
    labels = as_numpy(labels, np.int64).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f"labels: expected {len(boxes)} labels for {len(boxes)} boxes, got {len(labels)}")
    if len(boxes) == 0:
        return np.zeros((0, 3)), np.zeros((0, 2), np.int64), np.zeros((0, 3))
    corners = box_corners(boxes)  # (N, 8, 3)
    per_box_vertices = [corners]
    edges = list(BOX_EDGES)
    if heading:
        bottom_centre = corners[:, [2, 3, 6, 7]].mean(1, keepdims=True)
        front_bottom = corners[:, [2, 3]].mean(1, keepdims=True)
        per_box_vertices += [bottom_centre, front_bottom]
        edges.append((8, 9))
    vertices = np.concatenate(per_box_vertices, 1)  # (N, 8 or 10, 3)
    per_box = vertices.shape[1]
    edge_array = np.array(edges, dtype=np.int64)
    lines = (edge_array[None] + per_box * np.arange(len(boxes))[:, None, None]).reshape(-1, 2)
    colors = np.repeat(class_colors(labels), len(edges), axis=0)
    return vertices.reshape(-1, 3), lines, colors


def height_colors(points: np.ndarray, z_min: float = -2.0, z_max: float = 4.0) -> np.ndarray:
    """``(P, 3)`` RGB by point height (viridis), the colouring used for LiDAR everywhere in bevperc."""
    import matplotlib

    normalised = np.clip((points[:, 2] - z_min) / (z_max - z_min), 0, 1)
    return matplotlib.colormaps["viridis"](normalised)[:, :3]


# --------------------------------------------------------------------------- open3d objects and files
def make_point_cloud(points: Any):  # -> open3d.geometry.PointCloud
    """open3d point cloud of ``(P, >=3)`` points coloured by height."""
    import open3d as o3d

    xyz = as_numpy(points)[:, :3]
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    cloud.colors = o3d.utility.Vector3dVector(height_colors(xyz))
    return cloud


def make_line_set(boxes: Any, labels: Any):  # -> open3d.geometry.LineSet
    """open3d line set of boxes ``(N, 9)`` coloured by class."""
    import open3d as o3d

    vertices, lines, colors = box_line_set_arrays(boxes, labels)
    line_set = o3d.geometry.LineSet(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector2iVector(lines))
    line_set.colors = o3d.utility.Vector3dVector(colors)
    return line_set


def save_scene_ply(
    out_dir: str | Path,
    lidar_points: Any,
    gt_boxes: Any | None = None,
    gt_labels: Any | None = None,
    pred_boxes: Any | None = None,
    pred_labels: Any | None = None,
    stem: str = "scene",
) -> dict[str, Path]:
    """Write ``<stem>_points.ply`` (point cloud) and ``<stem>_gt_boxes.ply`` / ``<stem>_pred_boxes.ply`` (line sets).

    Open them together in any viewer (``open3d``'s ``draw_geometries``, MeshLab, CloudCompare).
    Returns the written paths by kind. Files are written to a temporary name and renamed.
    """
    import open3d as o3d

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def atomic(path: Path, write) -> None:
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # open3d picks the format from the suffix
        if not write(str(tmp)):
            raise OSError(f"{path}: open3d failed to write the file")
        os.replace(tmp, path)

    points_path = out_dir / f"{stem}_points.ply"
    atomic(points_path, lambda p: o3d.io.write_point_cloud(p, make_point_cloud(lidar_points)))
    written["points"] = points_path
    for kind, boxes, labels in (("gt_boxes", gt_boxes, gt_labels), ("pred_boxes", pred_boxes, pred_labels)):
        if boxes is None or len(as_boxes(boxes)) == 0:
            continue
        path = out_dir / f"{stem}_{kind}.ply"
        atomic(path, lambda p, b=boxes, l=labels: o3d.io.write_line_set(p, make_line_set(b, l)))
        written[kind] = path
    return written


# --------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=1)
def offscreen_renderer_available(timeout_s: float = 60.0) -> tuple[bool, str]:
    """Whether open3d's OffscreenRenderer works here, and why not. Probed in a subprocess (it can crash)."""
    setting = os.environ.get("BEVPERC_O3D_RENDER", "")
    if setting == "0":
        return False, "disabled by BEVPERC_O3D_RENDER=0"
    if setting == "1":
        return True, "forced by BEVPERC_O3D_RENDER=1"
    try:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return False, f"open3d OffscreenRenderer probe timed out after {timeout_s:.0f} s"
    if result.returncode == 0 and "ok" in result.stdout:
        return True, "open3d OffscreenRenderer works"
    lines = [line for line in (result.stderr or "").strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit code {result.returncode}"
    return False, f"open3d OffscreenRenderer unavailable ({reason[-160:]})"


def _render_open3d(path: Path, points: np.ndarray, line_sets: list, width: int, height: int, bev_range: float) -> None:
    import open3d as o3d
    import open3d.visualization.rendering as rendering

    renderer = rendering.OffscreenRenderer(width, height)
    renderer.scene.set_background([1.0, 1.0, 1.0, 1.0])
    point_material = rendering.MaterialRecord()
    point_material.shader = "defaultUnlit"
    point_material.point_size = 2.0
    renderer.scene.add_geometry("points", make_point_cloud(points), point_material)
    line_material = rendering.MaterialRecord()
    line_material.shader = "unlitLine"
    line_material.line_width = 2.0
    for i, line_set in enumerate(line_sets):
        renderer.scene.add_geometry(f"boxes{i}", line_set, line_material)
    # Chase camera: behind and above the ego, looking forward and down.
    renderer.setup_camera(60.0, [bev_range * 0.35, 0.0, 0.0], [-bev_range * 0.45, 0.0, bev_range * 0.45], [0.0, 0.0, 1.0])
    image = renderer.render_to_image()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    if not o3d.io.write_image(str(tmp), image):
        raise OSError(f"{path}: open3d failed to write the image")
    os.replace(tmp, path)


def _render_matplotlib(
    path: Path,
    points: np.ndarray,
    boxes_by_kind: list[tuple[np.ndarray, np.ndarray, bool]],
    note: str,
    bev_range: float,
    max_points: int = 30000,
) -> None:
    from matplotlib.figure import Figure

    from bevperc.viz.colors import GT_LINESTYLE

    fig = Figure(figsize=(9, 7))
    ax = fig.add_subplot(projection="3d")
    near = (np.abs(points[:, 0]) < bev_range) & (np.abs(points[:, 1]) < bev_range)
    shown = points[near]
    if len(shown) > max_points:
        shown = shown[:: int(np.ceil(len(shown) / max_points))]
    ax.scatter(shown[:, 0], shown[:, 1], shown[:, 2], c=height_colors(shown), s=0.4, linewidths=0, depthshade=False)
    for boxes, labels, dashed in boxes_by_kind:
        inside = (np.abs(boxes[:, 0]) < bev_range) & (np.abs(boxes[:, 1]) < bev_range)  # 3D axes do not clip
        vertices, lines, colors = box_line_set_arrays(boxes[inside], labels[inside])
        for (a, b), color in zip(lines, colors):
            ax.plot(*vertices[[a, b]].T, color=color, linewidth=1.0, linestyle=GT_LINESTYLE if dashed else "solid")
    ax.set_xlim(-bev_range, bev_range)
    ax.set_ylim(-bev_range, bev_range)
    ax.set_zlim(-bev_range / 4, bev_range / 4)
    ax.set_box_aspect((1, 1, 0.25))
    ax.view_init(elev=35, azim=-160)  # looking forward (+x) from behind-left of the ego
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(f"LiDAR scene, GT dashed / predictions solid\n[matplotlib fallback: {note}]", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def render_scene_png(
    path: str | Path,
    lidar_points: Any,
    gt_boxes: Any | None = None,
    gt_labels: Any | None = None,
    pred_boxes: Any | None = None,
    pred_labels: Any | None = None,
    width: int = 1024,
    height: int = 768,
    view_range_m: float = 40.0,
) -> RenderResult:
    """Render the LiDAR scene with boxes to a PNG: open3d offscreen when available, else matplotlib 3D.

    Args:
        lidar_points: ``(P, >=3)`` ego-frame points; boxes ``(N, 9)`` ego frame with labels ``(N,)``.
        view_range_m: half-size of the shown square around the ego.
    Returns:
        :class:`RenderResult` naming the backend; the fallback's reason is in ``note``, the log
        and the image title.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    points = as_numpy(lidar_points)[:, :3]
    kinds = []
    if gt_boxes is not None and len(as_boxes(gt_boxes)):
        kinds.append((as_boxes(gt_boxes), as_numpy(gt_labels, np.int64), True))
    if pred_boxes is not None and len(as_boxes(pred_boxes)):
        kinds.append((as_boxes(pred_boxes), as_numpy(pred_labels, np.int64), False))
    available, note = offscreen_renderer_available()
    if available:
        try:
            _render_open3d(path, points, [make_line_set(b, l) for b, l, _ in kinds], width, height, view_range_m)
            return RenderResult(path, "open3d", note)
        except Exception as error:  # the probe passed but this render did not: still give a picture
            note = f"open3d OffscreenRenderer failed ({type(error).__name__}: {error})"
    log.warning("%s; rendering %s with matplotlib 3D instead", note, path.name)
    _render_matplotlib(path, points, kinds, note, view_range_m)
    return RenderResult(path, "matplotlib", note)
