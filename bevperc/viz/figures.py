"""Write the standard figures of one sample to a folder (used by ``python -m bevperc.viz`` and the eval CLI).

:func:`write_sample_figures` takes plain arrays only, so an evaluation loop can call it for
its best and worst samples without building anything else::

    from bevperc.viz import write_sample_figures
    paths = write_sample_figures(out_dir / f"worst_{rank}", images, intrinsics, ego_from_camera,
                                 gt_boxes, gt_labels, pred_boxes, pred_scores, pred_labels,
                                 lidar_points=points, image_aug=image_aug, title=token)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from bevperc.data.infos import CAMERA_NAMES
from bevperc.viz.bev import DEFAULT_BEV_RANGE, plot_bev_overview
from bevperc.viz.cameras import as_boxes, as_numpy, plot_camera_views, scored_predictions
from bevperc.viz.depth import plot_depth

log = logging.getLogger(__name__)


def save_figure(fig: Figure, path: str | Path, dpi: int = 100, palette: bool = False) -> Path:
    """Save a Figure as PNG through a temporary file renamed over ``path`` (never a half-written PNG).

    ``palette=True`` stores a 256-colour palette PNG (octree quantisation keeps the class
    colours of thin box lines), about 4x smaller: for figures that go into the docs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        if palette:
            from PIL import Image

            with Image.open(tmp) as image:
                quantized = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
            quantized.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_sample_figures(
    out_dir: str | Path,
    images: Any,
    intrinsics: Any,
    ego_from_camera: Any,
    gt_boxes: Any,
    gt_labels: Any,
    pred_boxes: Any,
    pred_scores: Any,
    pred_labels: Any,
    lidar_points: Any | None = None,
    *,
    camera_names: Sequence[str] = CAMERA_NAMES,
    image_aug: Any | None = None,
    bev_features: Any | None = None,
    heatmaps: Any | None = None,
    heatmap_class_names: Sequence[str] | None = None,
    depth_probs: Any | None = None,
    depth_bins: Any | None = None,
    depth_cameras: Sequence[int] = (1,),
    bev_range: Sequence[float] = DEFAULT_BEV_RANGE,
    score_threshold: float = 0.3,
    title: str | None = None,
    prefix: str = "",
    with_3d: bool = False,
    dpi: int = 90,
) -> dict[str, Path]:
    """Write camera, BEV (and depth, 3D LiDAR) figures for one sample; return ``{figure name: path}``.

    Args:
        out_dir: folder, created if missing.
        images: ``(N_cam, H, W, 3)`` uint8 or ``(N_cam, 3, H, W)`` normalised batch images.
        intrinsics ``(N_cam, 3, 3)``, ego_from_camera ``(N_cam, 4, 4)``, image_aug ``(N_cam, 3, 3)`` or None.
        gt_boxes ``(M, 9)`` / gt_labels ``(M,)``; pred_boxes ``(K, 9)`` / pred_scores ``(K,)`` /
            pred_labels ``(K,)``; all in the ego frame of ``ego_from_camera``.
        lidar_points: ``(P, >=3)`` ego-frame points or None.
        bev_features ``(C, ny, nx)``, heatmaps ``(K, ny, nx)`` probabilities: shown beside the BEV.
        depth_probs ``(N_cam, D, h, w)`` and depth_bins ``(D,)``: a depth figure per camera in ``depth_cameras``.
        with_3d: also save the LiDAR scene as .ply and a 3D PNG (open3d, matplotlib fallback).
        prefix: prepended to every file name (e.g. ``"worst_01_"``).
    """
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    cameras = plot_camera_views(
        images, intrinsics, ego_from_camera, gt_boxes, gt_labels, pred_boxes, pred_scores, pred_labels,
        camera_names=camera_names, image_aug=image_aug, score_threshold=score_threshold, title=title,
    )  # fmt: skip
    written["cameras"] = save_figure(cameras, out_dir / f"{prefix}cameras.png", dpi)
    bev = plot_bev_overview(
        lidar_points, gt_boxes, gt_labels, pred_boxes, pred_scores, pred_labels,
        bev_features=bev_features, heatmaps=heatmaps, heatmap_class_names=heatmap_class_names,
        bev_range=bev_range, score_threshold=score_threshold, title=title,
    )  # fmt: skip
    written["bev"] = save_figure(bev, out_dir / f"{prefix}bev.png", dpi)
    if depth_probs is not None:
        if depth_bins is None:
            raise ValueError("write_sample_figures: depth_probs given without depth_bins (D,) bin centres")
        probs = as_numpy(depth_probs)
        aug = None if image_aug is None else as_numpy(image_aug)
        for cam in depth_cameras:
            name = camera_names[cam] if cam < len(camera_names) else f"camera{cam}"
            fig = plot_depth(
                images[cam], probs[cam], depth_bins, as_numpy(intrinsics)[cam], as_numpy(ego_from_camera)[cam],
                lidar_points=lidar_points, image_aug=None if aug is None else aug[cam], camera_name=name,
            )  # fmt: skip
            written[f"depth_{name}"] = save_figure(fig, out_dir / f"{prefix}depth_{name}.png", dpi)
    if with_3d and lidar_points is not None:
        written.update(_write_lidar3d(out_dir, f"{prefix}scene", f"{prefix}lidar3d.png", lidar_points, gt_boxes,
                                      gt_labels, pred_boxes, pred_scores, pred_labels, score_threshold))
    log.info("wrote %d figures to %s", len(written), out_dir)
    return written


def _write_lidar3d(out_dir: Path, stem: str, png_name: str, lidar_points: Any, gt_boxes: Any, gt_labels: Any,
                   pred_boxes: Any, pred_scores: Any, pred_labels: Any, score_threshold: float) -> dict[str, Path]:
    """The LiDAR scene ``(P, >=3)`` with GT and scored predictions as .ply files and a 3D PNG."""
    from bevperc.viz.lidar3d import render_scene_png, save_scene_ply

    ply = save_scene_ply(out_dir, lidar_points, gt_boxes, gt_labels, pred_boxes, pred_labels, stem=stem)
    written = {f"ply_{kind}": path for kind, path in ply.items()}
    boxes, labels, _ = scored_predictions(pred_boxes, pred_scores, pred_labels, score_threshold)
    written["lidar3d"] = render_scene_png(out_dir / png_name, lidar_points, gt_boxes, gt_labels, boxes, labels).path
    return written


def sample_quality(
    gt_boxes: Any,
    gt_labels: Any,
    pred_boxes: Any,
    pred_scores: Any,
    pred_labels: Any,
    match_distance: float = 2.0,
    score_threshold: float = 0.3,
) -> float:
    """F1 of one sample's detections: greedy same-class centre matching within ``match_distance`` metres.

    A cheap per-sample score to pick the best and worst samples for :func:`write_sample_figures`
    (the nuScenes metrics are per dataset, not per sample). Predictions below
    ``score_threshold`` are ignored; a sample with no GT and no prediction scores 1.
    """
    gt = as_boxes(gt_boxes, "gt_boxes")
    pred = as_boxes(pred_boxes, "pred_boxes")
    gt_cls = np.zeros(0, np.int64) if gt_labels is None else as_numpy(gt_labels, np.int64).reshape(-1)
    scores = np.ones(len(pred)) if pred_scores is None else as_numpy(pred_scores).reshape(-1)
    pred_cls = np.zeros(0, np.int64) if pred_labels is None else as_numpy(pred_labels, np.int64).reshape(-1)
    keep = scores >= score_threshold
    pred, scores, pred_cls = pred[keep], scores[keep], pred_cls[keep]
    if len(gt) == 0 and len(pred) == 0:
        return 1.0
    matched_gt = np.zeros(len(gt), dtype=bool)
    true_positives = 0
    for p in np.argsort(-scores, kind="stable"):  # best predictions claim their GT first (as nuScenes does)
        candidates = np.flatnonzero((gt_cls == pred_cls[p]) & ~matched_gt)
        if len(candidates) == 0:
            continue
        distances = np.hypot(*(gt[candidates, :2] - pred[p, :2]).T)
        best = int(np.argmin(distances))
        if distances[best] <= match_distance:
            matched_gt[candidates[best]] = True
            true_positives += 1
    return 2.0 * true_positives / (len(gt) + len(pred))
