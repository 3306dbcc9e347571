"""Run a trained detector over a split and write a nuScenes submission."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from bevperc.config import Config
from bevperc.data.dataset import NuScenesBEVDataset, collate_bev
from bevperc.engine.checkpoint import load_checkpoint, load_weights
from bevperc.models.detector import BEVDetector, build_detector
from bevperc.models.postprocess import to_nuscenes_detections
from bevperc.utils.io import atomic_write_json

log = logging.getLogger(__name__)

SUBMISSION_META = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}


def load_detector(cfg: Config, checkpoint: str | Path, device: torch.device | str = "cpu") -> BEVDetector:
    """Build the detector of ``cfg`` and load weights from a training checkpoint.

    Uses the EMA weights when the checkpoint has them and ``cfg.eval.use_ema`` is set.
    """
    state = load_checkpoint(checkpoint)  # torch.load(weights_only=True) with clear errors
    weights = state.get("model") if isinstance(state, dict) else None
    if cfg.eval.use_ema and isinstance(state.get("ema"), dict) and state["ema"].get("module") is not None:
        weights = state["ema"]["module"]
    if weights is None:
        raise ValueError(f"{checkpoint}: no 'model' weights in checkpoint (keys: {sorted(state)})")
    model = build_detector(cfg.model)
    load_weights(model, weights, checkpoint)  # an error naming the checkpoint when it does not fit
    return model.to(device).eval()


@torch.no_grad()
def iterate_predictions(
    model: BEVDetector, dataset: NuScenesBEVDataset, batch_size: int = 2, num_workers: int = 0, progress: bool = True,
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]]:
    """Yield ``(batch_item, outputs_item, detections)`` per sample.

    ``detections`` holds ego-frame ``boxes [K, 9]``, ``scores [K]``, ``labels [K]``.
    """
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_bev)
    model.eval()
    for batch in tqdm(loader, desc="inference", disable=not progress, leave=False):
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        outputs = model(moved)
        detections = model.decode(outputs, moved)
        for i, det in enumerate(detections):
            item = {k: (v[i] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
            yield item, {k: v[i] for k, v in outputs.items()}, det


def predict_dataset(model: BEVDetector, dataset: NuScenesBEVDataset, batch_size: int = 2, num_workers: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Run ``model`` on every sample; return a nuScenes submission dict (global-frame boxes)."""
    results: dict[str, list[dict]] = {}
    for item, _, det in iterate_predictions(model, dataset, batch_size, num_workers, progress):
        token = item["sample_token"]
        results[token] = to_nuscenes_detections(
            det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu(), item["global_from_ego"], sample_token=token
        )
    return {"meta": dict(SUBMISSION_META), "results": results}


def predict_split(cfg: Config, checkpoint: str | Path, split: str, out_json: str | Path,
                  device: str | None = None, progress: bool = True) -> Path:
    """Load ``checkpoint``, predict every sample of ``split``, write the submission JSON atomically."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_detector(cfg, checkpoint, device)
    dataset = NuScenesBEVDataset(cfg.data, split, train=False)
    submission = predict_dataset(model, dataset, cfg.eval.batch_size, cfg.eval.num_workers, progress)
    path = atomic_write_json(out_json, submission, indent=None)
    log.info("wrote %d samples of predictions to %s", len(submission["results"]), path)
    return path


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model
