"""Depth: a camera's predicted depth distribution beside the LiDAR depth projected into it.

The lift step of an LSS detector predicts, for each feature cell of a camera, a softmax
over depth bins ``(D, h, w)``. Here we show its expected depth ``sum_d p_d * depth_d``,
the full distribution at a few pixels, and the LiDAR points projected into the same
image (the supervision signal when depth supervision is on).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bevperc.viz.cameras import as_numpy, effective_intrinsics, project_points, to_display_image

DEPTH_CMAP = "turbo_r"  # near = red, far = blue


def lidar_depth_map(
    points_ego: Any, intrinsics: Any, ego_from_camera: Any, image_size: tuple[int, int], min_depth: float = 0.1
) -> np.ndarray:
    """Sparse depth image ``(H, W)`` in metres from ego-frame points ``(P, >=3)``; 0 where no point.

    ``image_size`` is ``(width, height)``. Where several points hit one pixel the nearest wins
    (what the camera sees).
    """
    width, height = image_size
    pixels, depth = project_points(as_numpy(points_ego)[:, :3], intrinsics, ego_from_camera)
    valid = depth > min_depth
    u = np.floor(pixels[valid, 0]).astype(np.int64, copy=False) if valid.any() else np.zeros(0, np.int64)
    v = np.floor(pixels[valid, 1]).astype(np.int64, copy=False) if valid.any() else np.zeros(0, np.int64)
    d = depth[valid]
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    u, v, d = u[inside], v[inside], d[inside]
    depth_map = np.zeros((height, width), dtype=np.float32)
    order = np.argsort(-d)  # far first, so the nearest point is written last and wins
    depth_map[v[order], u[order]] = d[order]
    return depth_map


def expected_depth(depth_probs: Any, depth_bins: Any) -> np.ndarray:
    """Expected depth ``(h, w)`` of a distribution ``(D, h, w)`` over bin centres ``(D,)``."""
    probs = as_numpy(depth_probs)
    bins = as_numpy(depth_bins).reshape(-1)
    if probs.ndim != 3 or probs.shape[0] != len(bins):
        raise ValueError(f"depth_probs: expected (D={len(bins)}, h, w), got {probs.shape}")
    return np.tensordot(bins, probs, axes=(0, 0)) / np.maximum(probs.sum(0), 1e-12)


def pick_probe_pixels(depth_map: np.ndarray, count: int = 4) -> list[tuple[int, int]]:
    """``count`` pixels ``(u, v)`` with LiDAR depth, spread over the depth range (quantiles)."""
    v, u = np.nonzero(depth_map > 0)
    if len(u) == 0:
        height, width = depth_map.shape
        return [(int(width * (i + 1) / (count + 1)), int(height * 0.6)) for i in range(count)]
    order = np.argsort(depth_map[v, u])
    picks = order[(np.linspace(0.1, 0.9, count) * (len(order) - 1)).astype(int)]
    return [(int(u[i]), int(v[i])) for i in picks]


def plot_depth(
    image: Any,
    depth_probs: Any,
    depth_bins: Any,
    intrinsics: Any,
    ego_from_camera: Any,
    lidar_points: Any | None = None,
    probe_pixels: Sequence[tuple[int, int]] | None = None,
    image_aug: Any | None = None,
    camera_name: str = "",
    max_depth: float | None = None,
) -> Figure:
    """Figure for one camera: image + LiDAR depth, expected predicted depth, distributions at probe pixels.

    Args:
        image: the camera image as shown to the model, any layout :func:`to_display_image` accepts.
        depth_probs: ``(D, h, w)`` predicted depth distribution on the feature grid (h, w may be
            the image size divided by the stride); depth_bins: ``(D,)`` bin centres in metres.
        intrinsics / ego_from_camera / image_aug: as in :func:`bevperc.viz.cameras.plot_camera_views`.
        lidar_points: ``(P, >=3)`` ego-frame points, or None.
        probe_pixels: ``(u, v)`` image pixels whose distribution to plot; default: up to 4 LiDAR
            pixels spread over the depth range.
    """
    display = to_display_image(image)
    height, width = display.shape[:2]
    probs = as_numpy(depth_probs)
    bins = as_numpy(depth_bins).reshape(-1)
    expected = expected_depth(probs, bins)
    grid_h, grid_w = expected.shape
    k = effective_intrinsics(intrinsics, image_aug)
    lidar = (
        lidar_depth_map(lidar_points, k, ego_from_camera, (width, height))
        if lidar_points is not None
        else np.zeros((height, width), np.float32)
    )
    probes = list(probe_pixels) if probe_pixels is not None else pick_probe_pixels(lidar, 4)
    vmax = float(max_depth if max_depth is not None else bins.max())
    vmin = float(bins.min())

    fig = Figure(figsize=(15, 7.0), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1.0, 0.7])
    ax_image = fig.add_subplot(grid[0, 0])
    ax_expected = fig.add_subplot(grid[0, 1])
    ax_lidar = fig.add_subplot(grid[0, 2])
    ax_dist = fig.add_subplot(grid[1, :])

    ax_image.imshow(display)
    ax_image.set_title(f"{camera_name} image, probe pixels".strip(), fontsize=9)
    expected_im = ax_expected.imshow(
        expected, cmap=DEPTH_CMAP, vmin=vmin, vmax=vmax, extent=(0, width, height, 0), interpolation="nearest"
    )
    ax_expected.set_title(f"predicted expected depth ({grid_w}x{grid_h} cells)", fontsize=9)
    ax_lidar.imshow(display, alpha=0.45)
    lidar_v, lidar_u = np.nonzero(lidar > 0)
    ax_lidar.scatter(lidar_u, lidar_v, c=lidar[lidar_v, lidar_u], s=1.5, cmap=DEPTH_CMAP, vmin=vmin, vmax=vmax, linewidths=0)
    ax_lidar.set_title(f"LiDAR depth projected ({len(lidar_u)} px)", fontsize=9)
    fig.colorbar(expected_im, ax=ax_lidar, fraction=0.03, pad=0.01, label="depth (m)")
    for ax in (ax_image, ax_expected, ax_lidar):
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()

    _plot_probes(ax_dist, (ax_image, ax_expected, ax_lidar), probes, probs, bins, expected, lidar, vmin, vmax)
    return fig


def _plot_probes(ax_dist: Axes, image_axes: Sequence[Axes], probes: Sequence[tuple[int, int]], probs: np.ndarray,
                 bins: np.ndarray, expected: np.ndarray, lidar: np.ndarray, vmin: float, vmax: float) -> None:
    """Mark each probe pixel ``(u, v)`` on the image panels and draw its predicted distribution
    ``probs[:, cell]`` (``probs`` ``(D, h, w)``, ``bins`` ``(D,)``, ``expected`` ``(h, w)``) with the LiDAR
    depth ``lidar`` ``(H, W)`` near the pixel (dashed)."""
    import matplotlib

    grid_h, grid_w = expected.shape
    height, width = lidar.shape
    probe_colors = matplotlib.colormaps["tab10"]
    bar_width = float(np.median(np.diff(bins))) if len(bins) > 1 else 1.0
    for i, (u, v) in enumerate(probes):
        color = probe_colors(i % 10)
        cell_col = int(np.clip(u * grid_w / width, 0, grid_w - 1))
        cell_row = int(np.clip(v * grid_h / height, 0, grid_h - 1))
        for ax in image_axes:
            ax.plot(u, v, marker="o", markersize=7, markerfacecolor="none", markeredgecolor=color, markeredgewidth=2)
            ax.text(u + 8, v - 8, str(i), color=color, fontsize=9, fontweight="bold")
        distribution = probs[:, cell_row, cell_col]
        ax_dist.step(bins, distribution, where="mid", color=color, linewidth=1.4,
                     label=f"{i}: pixel ({u}, {v}), E[d]={expected[cell_row, cell_col]:.1f} m")  # fmt: skip
        lidar_d = _nearest_lidar_depth(lidar, u, v)
        if lidar_d is not None:
            ax_dist.axvline(lidar_d, color=color, linestyle="--", linewidth=1.0)
    ax_dist.set_xlabel("depth bin centre (m)   (dashed: LiDAR depth at the pixel)", fontsize=9)
    ax_dist.set_ylabel("probability", fontsize=9)
    ax_dist.set_xlim(vmin - bar_width, vmax + bar_width)
    ax_dist.legend(fontsize=8, loc="upper right")
    ax_dist.set_title("predicted depth distribution at the probe pixels", fontsize=9)


def _nearest_lidar_depth(depth_map: np.ndarray, u: int, v: int, radius: int = 4) -> float | None:
    """LiDAR depth at ``(u, v)`` or the nearest hit within ``radius`` pixels, else None."""
    height, width = depth_map.shape
    window = depth_map[max(v - radius, 0) : min(v + radius + 1, height), max(u - radius, 0) : min(u + radius + 1, width)]
    hits = window[window > 0]
    return float(hits.min()) if len(hits) else None
