"""Decoding CenterPoint outputs into ego-frame boxes, circle NMS, nuScenes submission entries."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bevperc.data.classes import CLASS_INDEX, DETECTION_CLASSES, attribute_for
from bevperc.geometry import transform_boxes, yaw_to_quaternion
from bevperc.models.centerpoint_head import REGRESSION_BRANCHES, decode_boxes
from bevperc.models.config import BEVGridConfig, DecodeConfig, HeadConfig

NUSCENES_MAX_DETECTIONS = 500


def circle_nms(centres: torch.Tensor, scores: torch.Tensor, radius: float) -> torch.Tensor:
    """Greedy NMS on centre distance: keep the best, drop everything within ``radius`` metres of it.

    Args:
        centres: ``[K, 2]`` x, y; scores: ``[K]``.
    Returns:
        int64 indices of kept boxes, best first.
    """
    order = torch.argsort(scores, descending=True)
    if radius <= 0 or order.numel() <= 1:
        return order
    xy = centres[order].detach().double().cpu().numpy()
    close = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1) <= radius * radius  # [K, K]
    suppressed = np.zeros(len(xy), dtype=bool)
    keep = []
    for i in range(len(xy)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= close[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def _decode_group(
    preds: dict[str, torch.Tensor], sample: int, group_name: str, group: list[str], grid: BEVGridConfig, cfg: DecodeConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K peaks of one group's heatmap for one sample -> (boxes [K, 9], scores [K], labels [K])."""
    heat = torch.sigmoid(preds[f"{group_name}.heatmap"][sample].float())  # [c, ny, nx]
    # max-pool NMS: a peak is a cell equal to the max of its 3x3 neighbourhood
    peaks = heat * (heat == F.max_pool2d(heat[None], 3, stride=1, padding=1)[0])
    cells_per_class = grid.num_y * grid.num_x
    scores, flat = peaks.flatten().topk(min(cfg.top_k, peaks.numel()))
    keep = scores > cfg.score_threshold
    scores, flat = scores[keep], flat[keep]
    class_in_group, cell = flat // cells_per_class, flat % cells_per_class
    iy, ix = cell // grid.num_x, cell % grid.num_x
    regressions = {
        name: preds[f"{group_name}.{name}"][sample].float().flatten(1)[:, cell].T for name in REGRESSION_BRANCHES
    }
    boxes = decode_boxes(ix, iy, regressions, grid)
    class_ids = torch.as_tensor([CLASS_INDEX[name] for name in group], device=boxes.device)
    return boxes, scores, class_ids[class_in_group]


def decode_detections(
    preds: dict[str, torch.Tensor], bev_aug: torch.Tensor, head: HeadConfig, grid: BEVGridConfig, cfg: DecodeConfig
) -> list[dict[str, torch.Tensor]]:
    """Head outputs -> per sample ``{"boxes": [K, 9] ego frame, "scores": [K], "labels": [K]}``.

    Per group: sigmoid, 3x3 max-pool peak selection, top-K, score threshold; then per class
    circle NMS with ``cfg.nms_radii`` (metres, applied in the augmented frame the grid lives
    in), best ``cfg.max_detections`` overall, and finally the inverse of ``bev_aug`` to
    return to the ego frame.

    Args:
        bev_aug: ``[B, 4, 4]`` ego -> augmented ego of each sample.
    """
    batch = bev_aug.shape[0]
    results = []
    for sample in range(batch):
        kept_boxes, kept_scores, kept_labels = [], [], []
        for group_name, group in zip(head.group_names, head.class_groups):
            boxes, scores, labels = _decode_group(preds, sample, group_name, group, grid, cfg)
            for class_id in labels.unique().tolist():
                of_class = torch.nonzero(labels == class_id).squeeze(1)
                radius = cfg.nms_radii.get(DETECTION_CLASSES[class_id], 0.0)
                keep = of_class[circle_nms(boxes[of_class, :2], scores[of_class], radius)]
                kept_boxes.append(boxes[keep])
                kept_scores.append(scores[keep])
                kept_labels.append(labels[keep])
        device = bev_aug.device
        boxes = torch.cat(kept_boxes) if kept_boxes else torch.zeros(0, 9, device=device)
        scores = torch.cat(kept_scores) if kept_scores else torch.zeros(0, device=device)
        labels = torch.cat(kept_labels) if kept_labels else torch.zeros(0, dtype=torch.long, device=device)
        order = torch.argsort(scores, descending=True)[: cfg.max_detections]
        ego_from_aug = torch.linalg.inv(bev_aug[sample].double()).float()
        results.append(
            {"boxes": transform_boxes(ego_from_aug, boxes[order]), "scores": scores[order], "labels": labels[order]}
        )
    return results


def to_nuscenes_detections(
    boxes_ego: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    global_from_ego: torch.Tensor | np.ndarray,
    sample_token: str | None = None,
    max_detections: int = NUSCENES_MAX_DETECTIONS,
) -> list[dict]:
    """Ego-frame detections of one sample -> nuScenes submission entries (global frame).

    Each entry has ``translation`` (box centre), ``size`` (w, l, h), ``rotation`` (yaw
    quaternion w, x, y, z), ``velocity`` (vx, vy), ``detection_name``, ``detection_score``,
    ``attribute_name`` (``attribute_for(name, speed)``) and ``sample_token`` when given.
    At most ``max_detections`` (500, the submission limit), best scores first.
    """
    boxes = np.asarray(boxes_ego.detach().cpu() if isinstance(boxes_ego, torch.Tensor) else boxes_ego, dtype=np.float64)
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    transform = np.asarray(
        global_from_ego.detach().cpu() if isinstance(global_from_ego, torch.Tensor) else global_from_ego, dtype=np.float64
    )
    if boxes.ndim != 2 or boxes.shape[1] != 9 or len(scores) != len(boxes) or len(labels) != len(boxes):
        raise ValueError(f"to_nuscenes_detections: expected boxes [K, 9], scores [K], labels [K]; got "
                         f"{boxes.shape}, {scores.shape}, {labels.shape}")
    order = np.argsort(-scores, kind="stable")[:max_detections]
    boxes_global = transform_boxes(transform, boxes[order])
    entries = []
    for box, score, label in zip(boxes_global, scores[order], labels[order]):
        name = DETECTION_CLASSES[int(label)]
        velocity = [float(box[7]), float(box[8])]
        entry = {
            "translation": [float(v) for v in box[0:3]],
            "size": [float(v) for v in box[3:6]],
            "rotation": [float(v) for v in yaw_to_quaternion(float(box[6]))],
            "velocity": velocity,
            "detection_name": name,
            "detection_score": float(score),
            "attribute_name": attribute_for(name, math.hypot(*velocity)),
        }
        if sample_token is not None:
            entry = {"sample_token": sample_token, **entry}
        entries.append(entry)
    return entries
