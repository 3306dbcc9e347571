"""COCO-style evaluation of a gesture detector (pycocotools): mAP@0.5 and mAP@[0.5:0.95].

Ground truth and detections are expressed in pixels of the square network input of the model
being evaluated (the boxes are resolution-free in the dataset, so every model is scored on the
same boxes).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bevperc.gesture.config import GestureDataConfig
from bevperc.gesture.data import GestureDataset, collate_gestures
from bevperc.models.centernet import CenterNet, decode_centernet


@torch.no_grad()
def predict_gestures(
    model: CenterNet,
    dataset: GestureDataset,
    image_index: int = 0,
    batch_size: int = 32,
    max_detections: int = 20,
    score_threshold: float = 0.01,
) -> list[dict[str, np.ndarray]]:
    """Decoded detections (input-pixel xyxy boxes, scores, labels) for every dataset item."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_gestures)
    results = []
    for batch in loader:
        out = model(batch["images"][image_index])
        for det in decode_centernet(out.heatmap, out.wh, out.offset, model.output_stride, max_detections, score_threshold):
            results.append({k: v.numpy() for k, v in det.items()})
    return results


def coco_map(
    gt_boxes: list[np.ndarray],
    gt_labels: list[np.ndarray],
    detections: list[dict[str, np.ndarray]],
    classes: list[str],
    image_size: int,
) -> dict[str, float]:
    """mAP@[.5:.95] ("mAP"), mAP@.5 ("mAP50") and mAP@.75 with pycocotools.

    gt_boxes: per image [M,4] xyxy in pixels; detections: per image dict of boxes/scores/labels.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    ann_id = 1
    for img_id, (boxes, labels, det) in enumerate(zip(gt_boxes, gt_labels, detections), start=1):
        images.append({"id": img_id, "width": image_size, "height": image_size})
        for box, label in zip(boxes.tolist(), labels.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": ann_id, "image_id": img_id, "category_id": int(label) + 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
            ann_id += 1
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": img_id, "category_id": int(label) + 1,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
    if not annotations:
        raise ValueError("no ground-truth boxes to evaluate against")
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(0.0, float(s)) for s in ev.stats]
    return {"mAP": stats[0], "mAP50": stats[1], "mAP75": stats[2]}


def evaluate_model(model: CenterNet, dataset: GestureDataset, image_index: int = 0) -> dict[str, float]:
    """mAP of ``model`` on ``dataset`` (input size = dataset.input_sizes[image_index])."""
    size = dataset.input_sizes[image_index]
    detections = predict_gestures(model, dataset, image_index)
    gt_boxes = [dataset[i]["boxes"].numpy() * size for i in range(len(dataset))]
    gt_labels = [r.labels for r in dataset.records]
    return coco_map(gt_boxes, gt_labels, detections, list(dataset.cfg.classes), size)


def evaluate_checkpoint(checkpoint: str | Path, data: GestureDataConfig) -> dict[str, Any]:
    """Load a checkpoint and score it on ``data`` at the checkpoint's own input size."""
    from bevperc.gesture.train import load_centernet

    model, payload = load_centernet(checkpoint)
    if list(payload["classes"]) != list(data.classes):
        raise ValueError(f"{checkpoint}: classes {payload['classes']} != data.classes {data.classes}")
    cfg = GestureDataConfig(**{**data.__dict__, "input_size": payload["input_size"]})
    dataset = GestureDataset(cfg, [payload["input_size"]])
    metrics = evaluate_model(model, dataset)
    return {**metrics, "checkpoint": str(checkpoint), "role": payload.get("role", ""),
            "input_size": payload["input_size"], "num_images": len(dataset)}
