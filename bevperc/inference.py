"""Run a trained detector -- a PyTorch checkpoint or an exported ONNX model -- over a split, write a nuScenes submission."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from bevperc.config import Config
from bevperc.data.dataset import NuScenesBEVDataset, collate_bev
from bevperc.training.checkpoint import load_checkpoint, load_weights
from bevperc.models.config import ModelConfig
from bevperc.models.detector import BEVDetector, build_detector
from bevperc.models.image_head import orient_by_image
from bevperc.models.postprocess import decode_detections, to_nuscenes_detections
from bevperc.utils.config import to_dict
from bevperc.utils.io import atomic_write_json
from bevperc.utils.threads import init_data_worker

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


class Predictor(Protocol):
    """What inference needs of a model: ``BEVDetector`` or ``OnnxBEVDetector``."""

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]: ...

    def decode(self, outputs: dict[str, torch.Tensor], batch: dict) -> list[dict[str, torch.Tensor]]: ...


# --------------------------------------------------------------------------- ONNX models
ONNX_METADATA_PREFIX = "bevperc."
"""``python -m bevperc.export`` writes ``bevperc.calibration`` ("fixed-rig" or "inputs"),
``bevperc.model_config`` (JSON of the ModelConfig) and, for a fixed rig, ``bevperc.rig``
(JSON ``{key: [N, ...] nested lists}``) into the ONNX file's metadata_props."""
CONFIG_FIELDS_FREE_AT_EXPORT = ("decode", "backbone.pretrained")
"""Model config fields an exported graph does not depend on: they may differ at inference."""


def config_differences(stored: dict, given: dict, prefix: str = "") -> list[str]:
    """Dotted fields whose values differ between two nested config dicts, ignoring ``CONFIG_FIELDS_FREE_AT_EXPORT``."""
    differences = []
    for key in sorted(set(stored) | set(given)):
        name = f"{prefix}{key}"
        if name in CONFIG_FIELDS_FREE_AT_EXPORT:
            continue
        a, b = stored.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, f"{name}.")
        elif json.loads(json.dumps(a)) != json.loads(json.dumps(b)):  # tuples and lists compare equal
            differences.append(f"{name}: {a!r} in the ONNX file, {b!r} in the config")
    return differences


class OnnxBEVDetector:
    """An exported detector run by onnxruntime; a ``Predictor`` like ``BEVDetector``.

    ``runner(batch)`` feeds ``batch["images"]`` (and, for a calibration-as-inputs model,
    ``intrinsics``, ``ego_from_camera``, ``image_aug``) and returns the same
    ``{"group.branch": [B, c, ny, nx], "depth": [B, N, D, h, w]}`` dict as ``BEVDetector.forward``;
    ``decode`` is ``decode_detections`` as for PyTorch, so submissions go through one code path.
    A fixed-rig model ignores the batch's calibration: ``max_rig_deviation`` records how far
    (max abs matrix entry) the batches were from the baked rig, with a warning above 1e-3.
    """

    def __init__(self, path: str | Path, model_cfg: ModelConfig, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=providers or ["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if f"{ONNX_METADATA_PREFIX}model_config" not in meta:
            raise ValueError(f"{self.path}: no {ONNX_METADATA_PREFIX}model_config metadata "
                             "(not written by python -m bevperc.export)")
        differences = config_differences(json.loads(meta[f"{ONNX_METADATA_PREFIX}model_config"]), to_dict(model_cfg))
        if differences:
            raise ValueError(f"{self.path}: exported from another model config: " + "; ".join(differences[:5]))
        self.model_cfg = model_cfg
        self.calibration = meta[f"{ONNX_METADATA_PREFIX}calibration"]
        rig = json.loads(meta.get(f"{ONNX_METADATA_PREFIX}rig", "null")) or {}
        self.rig = {key: torch.tensor(value, dtype=torch.float32) for key, value in rig.items()}
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.output_names = [item.name for item in self.session.get_outputs()]
        self.max_rig_deviation = 0.0

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        if not torch.equal(batch["bev_aug"].cpu(), torch.eye(4).expand_as(batch["bev_aug"])):
            raise ValueError("batch['bev_aug']: an exported model expects the identity (no BEV augmentation)")
        if self.rig:
            self._note_rig_deviation(batch)
        feeds = {name: batch[name].detach().cpu().float().numpy() for name in self.input_names}
        outputs = self.session.run(self.output_names, feeds)
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}

    def _note_rig_deviation(self, batch: dict) -> None:
        deviation = max(float((batch[key].cpu().float() - rig).abs().max()) for key, rig in self.rig.items())
        if deviation > 1e-3 and self.max_rig_deviation <= 1e-3:
            log.warning("%s: fixed-rig model, but this batch's calibration differs from the baked rig by up to %.3g "
                        "(max abs matrix entry); it is ignored. Export with --calibration inputs to use it.",
                        self.path, deviation)
        self.max_rig_deviation = max(self.max_rig_deviation, deviation)

    def decode(self, outputs: dict[str, torch.Tensor], batch: dict) -> list[dict[str, torch.Tensor]]:
        """Per sample ``{"boxes": [K, 9] ego frame, "scores": [K], "labels": [K]}`` (``decode_detections``)."""
        cfg = self.model_cfg
        detections = decode_detections(outputs, batch["bev_aug"].cpu(), cfg.head, cfg.grid, cfg.decode)
        if cfg.decode.direction_from_image:
            if "image_heatmap" not in outputs:
                raise ValueError(f"{self.path}: decode.direction_from_image needs the image head's output "
                                 "'image_heatmap', which this ONNX file does not have (export it again)")
            detections = orient_by_image(detections, outputs["image_heatmap"], batch, cfg.view)
        return detections


def load_predictor(cfg: Config, checkpoint: str | Path | None = None, onnx: str | Path | None = None,
                   device: torch.device | str = "cpu") -> Predictor:
    """``load_detector(cfg, checkpoint, device)``, or an ``OnnxBEVDetector`` for ``onnx`` (exactly one of them)."""
    if (checkpoint is None) == (onnx is None):
        raise ValueError("load_predictor: give a checkpoint or an ONNX model, not both or neither")
    if onnx is not None:
        return OnnxBEVDetector(onnx, cfg.model)
    return load_detector(cfg, checkpoint, device)


# --------------------------------------------------------------------------- inference
@torch.no_grad()
def iterate_predictions(
    model: Predictor, dataset: NuScenesBEVDataset, batch_size: int = 2, num_workers: int = 0, progress: bool = True,
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]]:
    """Yield ``(batch_item, outputs_item, detections)`` per sample.

    ``detections`` holds ego-frame ``boxes [K, 9]``, ``scores [K]``, ``labels [K]``.
    """
    device = next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_bev,
                        worker_init_fn=init_data_worker)
    if isinstance(model, nn.Module):
        model.eval()
    for batch in tqdm(loader, desc="inference", disable=not progress, leave=False):
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        outputs = model(moved)
        detections = model.decode(outputs, moved)
        for i, det in enumerate(detections):
            item = {k: (v[i] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
            yield item, {k: v[i] for k, v in outputs.items()}, det


def predict_dataset(model: Predictor, dataset: NuScenesBEVDataset, batch_size: int = 2, num_workers: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Run ``model`` on every sample; return a nuScenes submission dict (global-frame boxes)."""
    results: dict[str, list[dict]] = {}
    for item, _, det in iterate_predictions(model, dataset, batch_size, num_workers, progress):
        token = item["sample_token"]
        results[token] = to_nuscenes_detections(
            det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu(), item["global_from_ego"], sample_token=token
        )
    return {"meta": dict(SUBMISSION_META), "results": results}


def predict_split(cfg: Config, checkpoint: str | Path | None, split: str, out_json: str | Path,
                  device: str | None = None, progress: bool = True, onnx: str | Path | None = None) -> Path:
    """Load ``checkpoint`` (or the ONNX model ``onnx``), predict every sample of ``split``, write the submission atomically."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_predictor(cfg, checkpoint, onnx, device)
    dataset = NuScenesBEVDataset(cfg.data, split, train=False)
    submission = predict_dataset(model, dataset, cfg.eval.batch_size, cfg.eval.num_workers, progress)
    path = atomic_write_json(out_json, submission, indent=None)
    log.info("wrote %d samples of predictions to %s", len(submission["results"]), path)
    return path


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model
