"""Training of one CenterNet gesture detector on labels, through :class:`bevperc.training.Trainer`.

``train_detector`` trains a student or a teacher; ``distill.distill_student`` trains a student
the same way with frozen teachers beside it. Both hand the Trainer a :class:`GestureTask` (the
Trainer's task-model contract: ``forward(batch)`` and ``loss(outputs, batch) -> (task_losses,
per_sample)``) and a loss engine (``bevperc.losses.engine``) over its tasks, so gestures get the
Trainer's schedule, clipping, NaN-safe steps, checkpoints and exact resume, DDP and TensorBoard.
The detection losses (CenterNet focal heatmap loss, L1 on size and offset at the centres) are
three engine tasks; with the engine disabled (the default for plain training) the total is the
fixed-weight sum ``1*heatmap + 0.1*wh + 1*offset``. A GestureTask without teachers *is* plain
training, which is what makes zero-weight distillation equal plain training bit for bit.

A run directory holds ``model.pt`` (the detector, ``save_centernet``), ``history.json``,
``engine_summary.json``, ``config.yaml`` and the Trainer's ``train.log``, ``run_info.json``,
``tensorboard/`` and ``checkpoints/`` (what ``resume=True`` continues from).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn

from bevperc.training import TrainConfig, Trainer
from bevperc.training.checkpoint import load_checkpoint, load_weights
from bevperc.training.distributed import dist_info, iterations_per_epoch
from bevperc.gesture.config import GestureTrainConfig, OptimConfig
from bevperc.gesture.data import GestureDataset, build_targets, collate_gestures
from bevperc.losses.engine import LossEngine
from bevperc.models.centernet import CenterNet, DetectorConfig, FeatureSet
from bevperc.models.heatmap import gaussian_focal_loss_sums
from bevperc.utils.config import from_dict, save_config, to_dict
from bevperc.utils.io import atomic_torch_save, atomic_write_json

if TYPE_CHECKING:
    from bevperc.gesture.distill import TeacherLink

Batch = dict[str, Any]  # collate_gestures: "images" list of [B,3,S_k,S_k], "boxes"/"labels" lists of [M,4]/[M]


# ----------------------------------------------------------------------------- losses


def focal_heatmap_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CenterNet penalty-reduced focal loss per sample [B] (alpha 2, beta 4, / number of centres).

    logits, target: [B,C,h,w]; target is 1 at centres, Gaussian-decayed around them. Unlike the BEV
    head's, the probabilities are not clamped (``logsigmoid`` instead; ``models.heatmap``).
    """
    sums, positives = gaussian_focal_loss_sums(logits, target, clamp=False)
    return sums / positives.clamp(min=1)


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L1 at centre cells per sample [B]; pred/target [B,2,h,w], mask [B,h,w]."""
    per_cell = (pred - target).abs().sum(1) * mask
    return per_cell.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


def detection_losses(out: FeatureSet, targets: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The ordinary detection loss as three engine tasks: (batch scalars, per-sample [B])."""
    per_sample = {
        "det_heatmap": focal_heatmap_loss(out.heatmap, targets["heatmap"]),
        "det_wh": masked_l1(out.wh, targets["wh"], targets["mask"]),
        "det_offset": masked_l1(out.offset, targets["offset"], targets["mask"]),
    }
    return {k: v.mean() for k, v in per_sample.items()}, per_sample


def det_task_weights(optim: OptimConfig) -> dict[str, float]:
    """The detection tasks (``detection_losses``'s names) and their first weights."""
    return {"det_heatmap": optim.det_heatmap_weight, "det_wh": optim.det_wh_weight, "det_offset": optim.det_offset_weight}


# ----------------------------------------------------------------------------- what the Trainer trains


def gesture_loss_engine(task_weights: dict[str, float], optim: OptimConfig) -> LossEngine:
    """The project's LossEngine over the tasks of ``task_weights`` (in that order), which are its
    first weights, with the settings ``optim.loss_engine``."""
    weights = {name: float(weight) for name, weight in task_weights.items()}
    return LossEngine(list(task_weights), dataclasses.replace(optim.loss_engine, fixed_weights=weights))


def engine_summary(engine: LossEngine) -> dict:
    summary = engine.summary()
    return summary if isinstance(summary, dict) else {"summary": summary}


class GestureTask(nn.Module):
    """A CenterNet ``detector`` and, for distillation, frozen teachers with the student's adapters.

    ``teachers``: the links' frozen CenterNets (kept in eval mode whatever ``train()`` says; inputs
    of the run, read from their checkpoint files, so left out of ``state_dict``); ``adapters``: per
    link the trainable 1x1 convs from student stages to teacher channels. Parameters in order:
    detector, adapters (the teachers' do not train). ``grid``: the detector's output grid (h, w)
    at ``input_size``.
    """

    def __init__(self, detector: CenterNet, num_classes: int, input_size: int,
                 links: Sequence[TeacherLink] = ()) -> None:
        super().__init__()
        self.detector = detector
        self.adapters = nn.ModuleDict({link.name: link.adapters for link in links})
        self.teachers = nn.ModuleDict({link.name: link.model for link in links})
        self.links = list(links)
        self.num_classes = num_classes
        self.grid = grid_of(detector, input_size)
        self.register_state_dict_post_hook(_without_teachers)
        self.register_load_state_dict_post_hook(_teachers_not_expected)

    def train(self, mode: bool = True) -> GestureTask:
        super().train(mode)
        self.teachers.eval()
        return self

    def forward(self, batch: Batch) -> tuple[FeatureSet, dict[str, FeatureSet]]:
        """(the detector's FeatureSet on ``images[0]``, {link name: the teacher's FeatureSet on its image})."""
        student = self.detector(batch["images"][0])
        teachers = {}
        with torch.no_grad():
            for link in self.links:
                teachers[link.name] = link.model(batch["images"][link.image_index])
        return student, teachers

    def loss(self, outputs: tuple[FeatureSet, dict[str, FeatureSet]], batch: Batch,
             ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(task losses {name: scalar}, per sample {name: [B]}): the detection tasks on the labels,
        then each link's distillation tasks (``TeacherLink.losses``)."""
        student, teachers = outputs
        targets = build_targets(batch["boxes"], batch["labels"], self.num_classes, self.grid)
        targets = {name: value.to(student.heatmap.device) for name, value in targets.items()}
        losses, per_sample = detection_losses(student, targets)
        for link in self.links:
            per_sample.update(link.losses(student, teachers[link.name]))
        for name, values in per_sample.items():
            if name not in losses:
                losses[name] = values.mean()
        return losses, per_sample


def _without_teachers(task: GestureTask, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    for key in [key for key in state if key.startswith(prefix + "teachers.")]:
        del state[key]


def _teachers_not_expected(task: GestureTask, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if not key.startswith("teachers.")]


def trainer_config(optim: OptimConfig, dataset_len: int) -> TrainConfig:
    """The Trainer's settings for ``optim``: every sample every epoch (no dropped batch), the cosine
    schedule to ``lr * min_lr_ratio`` at the last step after ``warmup_epochs`` of linear warm-up
    rising as ``(step + 1) / (warmup + 1)``; the rest are the Trainer's defaults (AdamW betas,
    epoch-end and every-1000-step checkpoints, TensorBoard; no EMA, no AMP)."""
    per_rank = math.ceil(dataset_len / dist_info().world_size)
    warmup = max(0, int(round(optim.warmup_epochs * iterations_per_epoch(per_rank, optim.batch_size, False))))
    return TrainConfig(epochs=optim.epochs, batch_size=optim.batch_size, num_workers=optim.num_workers,
                       drop_last=False, lr=optim.lr, weight_decay=optim.weight_decay, schedule="cosine",
                       warmup_iters=warmup, warmup_ratio=1.0 / (warmup + 1), grad_clip=optim.grad_clip,
                       seed=optim.seed, device=optim.device, progress_bar=optim.progress)


def fit(task: GestureTask, engine: LossEngine, dataset: GestureDataset, optim: OptimConfig, out: Path,
        resume: bool, on_start: Sequence[Callable[[], None]] = ()) -> Trainer:
    """Train ``task`` with ``engine`` on ``dataset`` in the run directory ``out``; the finished Trainer."""
    if optim.num_threads > 0:
        torch.set_num_threads(optim.num_threads)
    trainer = Trainer(task, engine, dataset, trainer_config(optim, len(dataset)), out,
                      collate_fn=collate_gestures, on_start=on_start)
    trainer.fit(resume=resume)
    return trainer


def save_run(trainer: Trainer, out: Path, classes: list[str], input_size: int, role: str, extra: dict,
             history_extra: dict | None = None) -> Path:
    """Write ``model.pt`` (the detector), ``history.json`` and ``engine_summary.json`` (rank 0)."""
    task, engine = trainer.model, trainer.loss_engine
    assert isinstance(task, GestureTask) and engine is not None
    path = out / "model.pt"
    if not trainer.dist.is_main:
        return path
    save_centernet(path, task.detector, classes, input_size, role, extra)
    losses, per_epoch = trainer.history["loss"], trainer.iters_per_epoch
    epoch_loss = [_finite_mean(losses[i:i + per_epoch]) for i in range(0, len(losses), per_epoch)]
    atomic_write_json(out / "history.json", {"history": trainer.history, "epoch_loss": epoch_loss,
                                             "train_seconds": trainer.train_seconds, **(history_extra or {})})
    atomic_write_json(out / "engine_summary.json", engine_summary(engine))
    return path


def _finite_mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


# ----------------------------------------------------------------------------- checkpoints


def save_centernet(path: str | Path, model: CenterNet, classes: list[str], input_size: int, role: str, extra: dict | None = None) -> Path:
    """Checkpoint = weights + everything needed to rebuild the model (plain types only)."""
    payload = {
        "model": model.state_dict(),
        "detector": to_dict(model.cfg),
        "classes": list(classes),
        "input_size": int(input_size),
        "role": role,
        "extra": extra or {},
    }
    return atomic_torch_save(payload, path)


def load_centernet(path: str | Path) -> tuple[CenterNet, dict]:
    """Rebuild a detector from ``save_centernet`` output (``weights_only=True``); eval mode."""
    payload = load_checkpoint(path)  # weights_only=True; errors name the file
    for key in ("model", "detector", "classes", "input_size"):
        if key not in payload:
            raise ValueError(f"{path}: not a gesture detector checkpoint (missing {key!r})")
    det_cfg = from_dict(DetectorConfig, payload["detector"], source=f"{path}:detector")
    model = CenterNet(det_cfg, len(payload["classes"]))
    load_weights(model, payload["model"], path)
    return model.eval(), payload


def grid_of(model: CenterNet, input_size: int) -> tuple[int, int]:
    cells = input_size / model.output_stride
    if cells != int(cells):
        raise ValueError(f"input size {input_size} is not a multiple of the output stride {model.output_stride}")
    return int(cells), int(cells)


# ----------------------------------------------------------------------------- train one model


def train_detector(cfg: GestureTrainConfig, out_dir: str | Path, dataset: GestureDataset | None = None,
                   resume: bool = False) -> Path:
    """Train one detector on labels in the run directory ``out_dir``; returns its model.pt.

    ``resume=True`` continues from ``out_dir/checkpoints`` (a finished run just rewrites its outputs).
    """
    out = Path(out_dir)
    torch.manual_seed(cfg.optim.seed)  # the initial weights; distill_student builds its student alike
    model = CenterNet(cfg.model, len(cfg.data.classes))
    if dataset is None:
        dataset = GestureDataset(cfg.data, [cfg.data.input_size], seed=cfg.optim.seed)
    task = GestureTask(model, len(cfg.data.classes), cfg.data.input_size)
    engine = gesture_loss_engine(det_task_weights(cfg.optim), cfg.optim)
    trainer = fit(task, engine, dataset, cfg.optim, out, resume, on_start=[lambda: save_config(cfg, out / "config.yaml")])
    return save_run(trainer, out, cfg.data.classes, cfg.data.input_size, cfg.role, {"train_config": to_dict(cfg)})
