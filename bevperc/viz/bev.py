"""Bird's-eye view: LiDAR points, ego, boxes with heading and velocity, range rings; BEV features and heatmaps.

Plot orientation: "driver's view" -- ego +x (forward) points UP the page and ego +y (left)
points LEFT, so the front cameras of the camera grid are at the top here too. Internally
an ego point ``(x, y)`` is drawn at plot coordinates ``(-y, x)`` (:func:`ego_to_plot`).

BEV grids (features ``(C, H, W)``, heatmaps ``(K, H, W)``) follow the LSS/BEVDet layout:
row index along ego y (from ``y_min``), column index along ego x (from ``x_min``), with
the grid covering ``bev_range = (x_min, x_max, y_min, y_max)``. :func:`grid_to_plot_image`
re-orients such a grid into the same driver's view so it lines up with the box plot.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Polygon, Rectangle

from bevperc.data.classes import DETECTION_CLASSES
from bevperc.geometry import box_corners
from bevperc.viz.cameras import as_boxes, as_numpy, legend_handles, scored_predictions
from bevperc.viz.colors import EGO_COLOR, GT_LINESTYLE, class_color

DEFAULT_BEV_RANGE = (-51.2, 51.2, -51.2, 51.2)
EGO_LENGTH_M, EGO_WIDTH_M, EGO_REAR_OVERHANG_M = 4.8, 1.9, 1.0  # a nuScenes Renault Zoe-sized footprint


def ego_to_plot(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ego ``(x, y)`` -> plot ``(horizontal, vertical) = (-y, x)`` (forward up, left left)."""
    return -np.asarray(y), np.asarray(x)


def plot_extent(bev_range: Sequence[float]) -> tuple[float, float, float, float]:
    """matplotlib ``extent`` (left, right, bottom, top) of a BEV range in plot coordinates."""
    x_min, x_max, y_min, y_max = bev_range
    return (-y_max, -y_min, x_min, x_max)


def grid_to_plot_image(grid: np.ndarray) -> np.ndarray:
    """BEV grid ``(..., H=ny, W=nx)`` -> image ``(nx, ny, ...)`` for ``imshow(origin="lower", extent=plot_extent(...))``.

    Row ``r`` of the result is ego x index ``r`` (forward up with ``origin="lower"``);
    column ``c`` is ego y index ``ny-1-c`` (left on the left).
    """
    grid = np.asarray(grid)
    moved = np.moveaxis(grid, (-2, -1), (1, 0))  # (nx, ny, ...)
    return moved[:, ::-1]


# --------------------------------------------------------------------------- boxes
def draw_bev_boxes(
    ax: Axes,
    boxes: Any,
    labels: Any,
    scores: Any | None = None,
    dashed: bool = False,
    linewidth: float = 1.2,
    velocity_scale_s: float = 1.0,
    show_text: bool = False,
) -> int:
    """Box footprints with a heading line (centre -> front) and a velocity arrow (``velocity_scale_s`` seconds long).

    Args:
        boxes: ``(N, 9)`` ego-frame boxes; labels ``(N,)``; scores ``(N,)`` (only for text).
    Returns:
        Number of boxes drawn.
    """
    boxes = as_boxes(boxes)
    if len(boxes) == 0:
        return 0
    labels = as_numpy(labels, np.int64).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f"labels: expected {len(boxes)} labels for {len(boxes)} boxes, got {len(labels)}")
    footprints = box_corners(boxes)[:, [0, 1, 5, 4], :2]  # top face corners in drawing order
    linestyle = GT_LINESTYLE if dashed else "solid"
    for i, footprint in enumerate(footprints):
        color = class_color(int(labels[i]))
        u, v = ego_to_plot(footprint[:, 0], footprint[:, 1])
        ax.add_patch(Polygon(np.stack([u, v], 1), closed=True, fill=False, edgecolor=color, linewidth=linewidth, linestyle=linestyle))
        x, y, yaw = boxes[i, 0], boxes[i, 1], boxes[i, 6]
        front = np.array([x + np.cos(yaw) * boxes[i, 4] / 2, y + np.sin(yaw) * boxes[i, 4] / 2])
        (u0, u1), (v0, v1) = ego_to_plot(np.array([x, front[0]]), np.array([y, front[1]]))
        ax.plot([u0, u1], [v0, v1], color=color, linewidth=linewidth)
        velocity = boxes[i, 7:9] * velocity_scale_s
        if np.hypot(*velocity) > 0.2 * velocity_scale_s:  # skip parked objects' arrow
            du, dv = -velocity[1], velocity[0]
            ax.arrow(u0, v0, du, dv, color=color, width=0.08, head_width=0.8, length_includes_head=True, linestyle=linestyle)
        if show_text and scores is not None:
            ax.text(u0, v0, f"{as_numpy(scores).reshape(-1)[i]:.2f}", fontsize=5, color=color, clip_on=True)
    return len(boxes)


def draw_ego(ax: Axes) -> None:
    """The ego vehicle footprint (origin at the rear axle) with a forward tick."""
    u, v = ego_to_plot(np.array([-EGO_REAR_OVERHANG_M]), np.array([EGO_WIDTH_M / 2]))
    ax.add_patch(Rectangle((u[0], v[0]), EGO_WIDTH_M, EGO_LENGTH_M, facecolor=EGO_COLOR, edgecolor="white", linewidth=0.8, zorder=5))
    ax.plot([0, 0], [0, EGO_LENGTH_M - EGO_REAR_OVERHANG_M + 1.5], color="white", linewidth=1.0, zorder=6)


def draw_range_rings(ax: Axes, max_range: float, step: float = 10.0, color: str = "0.6") -> None:
    """Dotted circles every ``step`` metres around the ego with their radius written on them."""
    for radius in np.arange(step, max_range + 1e-6, step):
        ax.add_patch(Circle((0, 0), radius, fill=False, edgecolor=color, linewidth=0.6, linestyle=":"))
        ax.text(radius * 0.7071, radius * 0.7071, f"{radius:.0f} m", fontsize=6, color=color, clip_on=True)


def plot_bev_scene(
    ax: Axes,
    lidar_points: Any | None = None,
    gt_boxes: Any | None = None,
    gt_labels: Any | None = None,
    pred_boxes: Any | None = None,
    pred_scores: Any | None = None,
    pred_labels: Any | None = None,
    bev_range: Sequence[float] = DEFAULT_BEV_RANGE,
    score_threshold: float = 0.3,
    ring_step_m: float = 10.0,
    max_points: int = 60000,
    title: str | None = "BEV",
) -> None:
    """LiDAR points (coloured by height), ego, range rings, GT (dashed) and predicted (solid) boxes on ``ax``.

    Args:
        lidar_points: ``(P, >=3)`` ego-frame points or None.
        bev_range: ``(x_min, x_max, y_min, y_max)`` in metres.
    """
    ax.set_facecolor("white")
    if lidar_points is not None:
        points = as_numpy(lidar_points)
        if points.ndim != 2 or points.shape[1] < 3:
            raise ValueError(f"lidar_points: expected (P, >=3), got {points.shape}")
        if len(points) > max_points:  # deterministic thinning keeps big sweeps quick
            points = points[:: int(np.ceil(len(points) / max_points))]
        u, v = ego_to_plot(points[:, 0], points[:, 1])
        ax.scatter(u, v, c=np.clip(points[:, 2], -2.0, 4.0), s=0.3, cmap="viridis", linewidths=0, rasterized=True)
    max_range = max(abs(b) for b in bev_range)
    draw_range_rings(ax, max_range, ring_step_m)
    draw_ego(ax)
    gt_boxes_arr = as_boxes(gt_boxes, "gt_boxes")
    draw_bev_boxes(ax, gt_boxes_arr, [] if gt_labels is None else gt_labels, dashed=True)
    draw_bev_boxes(ax, *scored_predictions(pred_boxes, pred_scores, pred_labels, score_threshold))
    left, right, bottom, top = plot_extent(bev_range)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_aspect("equal")
    ax.set_xlabel("-y (m, left ←)", fontsize=8)
    ax.set_ylabel("x (m, forward ↑)", fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)


# --------------------------------------------------------------------------- feature maps
def bev_features_to_rgb(features: Any, method: str = "pca") -> np.ndarray:
    """BEV features ``(C, H, W)`` -> ``(H, W, 3)`` float RGB in [0, 1].

    ``method="pca"``: the first three principal components over all cells, each scaled to
    its 1st-99th percentile range (structure shows up as colour). ``method="mean"``: the
    channel mean of ``|features|`` through the ``magma`` colour map.
    """
    import matplotlib

    array = as_numpy(features, np.float64)
    if array.ndim != 3:
        raise ValueError(f"features: expected (C, H, W), got {array.shape}")
    channels, height, width = array.shape
    if method == "mean" or channels < 3:
        energy = np.abs(array).mean(0)
        lo, hi = np.percentile(energy, [1, 99])
        normalised = np.clip((energy - lo) / max(hi - lo, 1e-12), 0, 1)
        return matplotlib.colormaps["magma"](normalised)[..., :3]
    if method != "pca":
        raise ValueError(f"method: expected 'pca' or 'mean', got {method!r}")
    flat = array.reshape(channels, -1).T
    flat = flat - flat.mean(0)
    # SVD of the (cells x channels) matrix; components are right singular vectors.
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    projected = flat @ vt[:3].T
    lo, hi = np.percentile(projected, [1, 99], axis=0)
    rgb = np.clip((projected - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return rgb.reshape(height, width, 3)


def heatmap_max_rgb(heatmaps: Any, class_names: Sequence[str] | None = None) -> np.ndarray:
    """Heatmaps ``(K, H, W)`` in [0, 1] -> ``(H, W, 3)``: each cell the colour of its strongest class, scaled by its peak."""
    maps = as_numpy(heatmaps, np.float64)
    if maps.ndim != 3:
        raise ValueError(f"heatmaps: expected (K, H, W), got {maps.shape}")
    names = list(class_names) if class_names is not None else list(DETECTION_CLASSES[: len(maps)])
    colors = np.array([class_color(name) for name in names] + [(1.0, 1.0, 1.0)] * (len(maps) - len(names)))[: len(maps)]
    peak = maps.max(0)
    strongest = maps.argmax(0)
    return np.clip(colors[strongest] * np.clip(peak, 0, 1)[..., None], 0, 1)


def plot_bev_overview(
    lidar_points: Any | None = None,
    gt_boxes: Any | None = None,
    gt_labels: Any | None = None,
    pred_boxes: Any | None = None,
    pred_scores: Any | None = None,
    pred_labels: Any | None = None,
    bev_features: Any | None = None,
    heatmaps: Any | None = None,
    heatmap_class_names: Sequence[str] | None = None,
    bev_range: Sequence[float] = DEFAULT_BEV_RANGE,
    feature_method: str = "pca",
    score_threshold: float = 0.3,
    title: str | None = None,
) -> Figure:
    """Figure: the BEV scene, and beside it the BEV feature map (PCA to RGB) and the predicted heatmaps.

    Args:
        bev_features: ``(C, H, W)`` BEV features (grid layout as in the module docstring) or None.
        heatmaps: ``(K, H, W)`` sigmoid class heatmaps or None; ``heatmap_class_names`` names
            the K channels (default: the first K detection classes).
    """
    panels = 1 + (bev_features is not None) + (heatmaps is not None)
    labels_present = np.concatenate(
        [np.zeros(0, np.int64) if gt_labels is None else as_numpy(gt_labels, np.int64).reshape(-1),
         np.zeros(0, np.int64) if pred_labels is None else as_numpy(pred_labels, np.int64).reshape(-1)]
    )  # fmt: skip
    handles = legend_handles(labels_present, with_gt=len(as_boxes(gt_boxes)) > 0, with_pred=pred_boxes is not None)
    legend_columns = max(1, min(len(handles), 4 * panels))
    legend_rows = int(np.ceil(len(handles) / legend_columns))
    top_in, bottom_in = (0.75 if title else 0.45), 0.55 + 0.25 * legend_rows  # title; x label + legend
    fig_height = 5.8 + top_in + bottom_in
    fig = Figure(figsize=(6.2 * panels, fig_height))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    scene_title = "LiDAR, GT (dashed)" + (", predictions (solid)" if pred_boxes is not None else "")
    plot_bev_scene(
        axes[0], lidar_points, gt_boxes, gt_labels, pred_boxes, pred_scores, pred_labels,
        bev_range=bev_range, score_threshold=score_threshold, title=scene_title,
    )  # fmt: skip
    extent = plot_extent(bev_range)
    panel = 1
    overlay_boxes = as_boxes(gt_boxes, "gt_boxes")
    overlay_labels = [] if gt_labels is None else gt_labels
    if bev_features is not None:
        ax = axes[panel]
        ax.imshow(grid_to_plot_image(bev_features_to_rgb(np.asarray(as_numpy(bev_features)), feature_method).transpose(2, 0, 1)), origin="lower", extent=extent, interpolation="nearest")
        draw_bev_boxes(ax, overlay_boxes, overlay_labels, dashed=True, linewidth=0.8)
        draw_ego(ax)
        ax.set_title(f"BEV features ({'PCA -> RGB' if feature_method == 'pca' else 'channel mean'}), GT dashed", fontsize=9)
        panel += 1
    if heatmaps is not None:
        ax = axes[panel]
        rgb = heatmap_max_rgb(heatmaps, heatmap_class_names)
        ax.imshow(grid_to_plot_image(rgb.transpose(2, 0, 1)), origin="lower", extent=extent, interpolation="nearest")
        draw_bev_boxes(ax, overlay_boxes, overlay_labels, dashed=True, linewidth=0.8)
        draw_ego(ax)
        ax.set_facecolor("black")
        ax.set_title("predicted heatmaps (max over classes, class colour), GT dashed", fontsize=9)
    for ax in axes[1:]:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=legend_columns, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.08 / panels + 0.02, right=0.99, top=1 - top_in / fig_height, bottom=bottom_in / fig_height,
                        wspace=0.18)
    return fig


def plot_heatmap_grid(heatmaps: Any, class_names: Sequence[str] | None = None, bev_range: Sequence[float] = DEFAULT_BEV_RANGE, title: str | None = None) -> Figure:
    """One panel per heatmap channel ``(K, H, W)``, in the driver's view."""
    maps = as_numpy(heatmaps, np.float64)
    names = list(class_names) if class_names is not None else [DETECTION_CLASSES[i] if i < 10 else str(i) for i in range(len(maps))]
    cols = min(5, len(maps))
    rows = int(np.ceil(len(maps) / cols))
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, heatmap in enumerate(maps):
        ax = axes.ravel()[i]
        ax.imshow(grid_to_plot_image(heatmap), origin="lower", extent=plot_extent(bev_range), vmin=0, vmax=1, cmap="inferno")
        ax.set_title(f"{names[i]} (max {heatmap.max():.2f})", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


__all__ = [
    "DEFAULT_BEV_RANGE",
    "bev_features_to_rgb",
    "draw_bev_boxes",
    "draw_ego",
    "draw_range_rings",
    "ego_to_plot",
    "grid_to_plot_image",
    "heatmap_max_rgb",
    "plot_bev_overview",
    "plot_bev_scene",
    "plot_extent",
    "plot_heatmap_grid",
]
