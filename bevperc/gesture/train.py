"""Training of one CenterNet gesture detector on labels, and the loop shared with distillation.

``train_detector`` trains a student or a teacher. Its losses (CenterNet focal heatmap loss, L1 on
size and offset at the centres) are tasks of the loss engine (``bevperc.losses.engine``); with the
engine disabled (the default for plain training) the total is the fixed-weight sum
``1*heatmap + 0.1*wh + 1*offset``. ``run_training`` is the loop that ``distill.distill_student``
reuses unchanged, which is what makes zero-weight distillation equal plain training bit for bit.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bevperc.engine.checkpoint import load_checkpoint, load_weights
from bevperc.gesture.config import GestureTrainConfig, OptimConfig
from bevperc.gesture.data import GestureDataset, build_targets, collate_gestures
from bevperc.losses.engine import LossEngine, LossEngineConfig
from bevperc.models.centernet import CenterNet, DetectorConfig, FeatureSet
from bevperc.utils.config import from_dict, to_dict
from bevperc.utils.io import atomic_torch_save, atomic_write_json

DET_TASKS = ("det_heatmap", "det_wh", "det_offset")
LossFn = Callable[[dict[str, Any]], tuple[dict[str, Tensor], dict[str, Tensor]]]


# ----------------------------------------------------------------------------- losses


def focal_heatmap_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CenterNet penalty-reduced focal loss per sample [B] (alpha 2, beta 4, / number of centres).

    logits, target: [B,C,h,w]; target is 1 at centres, Gaussian-decayed around them. Unlike the BEV
    head's ``gaussian_focal_loss_sums`` the probabilities are not clamped (``logsigmoid`` instead).
    """
    prob = torch.sigmoid(logits)
    pos = target.eq(1).to(logits.dtype)
    pos_term = -F.logsigmoid(logits) * (1 - prob) ** 2 * pos
    neg_term = -F.logsigmoid(-logits) * prob**2 * (1 - target) ** 4 * (1 - pos)
    num_pos = pos.flatten(1).sum(1).clamp(min=1)
    return (pos_term + neg_term).flatten(1).sum(1) / num_pos


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
    return {"det_heatmap": optim.det_heatmap_weight, "det_wh": optim.det_wh_weight, "det_offset": optim.det_offset_weight}


# ----------------------------------------------------------------------------- loss engine


def build_loss_engine(task_names: list[str], fixed_weights: dict[str, float], optim: OptimConfig) -> nn.Module:
    """The project's LossEngine over ``task_names`` with first weights ``fixed_weights``."""
    cfg = from_dict(LossEngineConfig, {**optim.engine, "fixed_weights": dict(fixed_weights)}, source="optim.engine")
    return LossEngine(list(task_names), cfg)


def engine_summary(engine: nn.Module) -> dict:
    summary = engine.summary()
    return summary if isinstance(summary, dict) else {"summary": summary}


# ----------------------------------------------------------------------------- shared loop


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def make_loader(dataset: GestureDataset, optim: OptimConfig, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(optim.seed)
    return DataLoader(
        dataset,
        batch_size=optim.batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate_gestures,
        num_workers=optim.num_workers,
        drop_last=False,
    )


def warmup_steps(optim: OptimConfig, steps_per_epoch: int) -> int:
    """Linear warm-up length in steps (``optim.warmup_epochs`` x steps per epoch, rounded)."""
    return max(0, int(round(optim.warmup_epochs * steps_per_epoch)))


def lr_factor_schedule(total_steps: int, warmup: int = 0) -> Callable[[int], float]:
    """LR factor per step: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total_steps``.

    With ``warmup=0`` it is exactly the plain cosine ``0.5 * (1 + cos(pi * step / total))``.
    """
    warmup = min(warmup, total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if warmup <= 0:
            return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = total_steps - warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))

    return factor


def run_training(
    model: nn.Module,
    extra_modules: list[nn.Module],
    loader: DataLoader,
    compute_losses: LossFn,
    engine: nn.Module,
    optim: OptimConfig,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Optimise ``model`` (+ ``extra_modules``, e.g. adapters, + engine parameters) with the engine.

    Per step: losses -> ``engine(losses, per_sample)`` -> backward -> clip -> AdamW step ->
    ``engine.step()`` (the engine's second process) -> LR schedule (optional linear warm-up, then
    cosine; ``lr_factor_schedule``). Returns per-epoch
    mean task losses.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for module in extra_modules:
        params += [p for p in module.parameters() if p.requires_grad]
    engine_params = [p for p in engine.parameters() if p.requires_grad]
    groups = [{"params": params}]
    if engine_params:
        groups.append({"params": engine_params, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    total_steps = max(1, optim.epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_schedule(total_steps, warmup_steps(optim, len(loader))))
    history = []
    model.train()
    bar = None
    if optim.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc=desc, leave=False)
    for epoch in range(optim.epochs):
        sums: dict[str, float] = {}
        steps = 0
        for batch in loader:
            losses, per_sample = compute_losses(batch)
            total = engine(losses, per_sample)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            optimizer.step()
            engine.step()
            scheduler.step()
            steps += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            sums["total"] = sums.get("total", 0.0) + float(total.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(total.detach()):.3f}")
        history.append({"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()}})
    if bar is not None:
        bar.close()
    model.eval()
    return history


# ----------------------------------------------------------------------------- checkpoints


def build_detector(cfg: DetectorConfig, num_classes: int) -> CenterNet:
    return CenterNet(cfg, num_classes)


def save_detector(path: str | Path, model: CenterNet, classes: list[str], input_size: int, role: str, extra: dict | None = None) -> Path:
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


def load_detector(path: str | Path) -> tuple[CenterNet, dict]:
    """Rebuild a detector from ``save_detector`` output (``weights_only=True``); eval mode."""
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


def train_detector(cfg: GestureTrainConfig, out_dir: str | Path, dataset: GestureDataset | None = None) -> Path:
    """Train one detector on labels; writes model.pt, history.json, engine_summary.json. Returns model.pt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.optim.num_threads > 0:
        torch.set_num_threads(cfg.optim.num_threads)
    seed_everything(cfg.optim.seed)
    num_classes = len(cfg.data.classes)
    model = build_detector(cfg.model, num_classes)
    if dataset is None:
        dataset = GestureDataset(cfg.data, [cfg.data.input_size])
    grid = grid_of(model, cfg.data.input_size)
    engine = build_loss_engine(list(DET_TASKS), det_task_weights(cfg.optim), cfg.optim)

    def compute_losses(batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        targets = build_targets(batch["boxes"], batch["labels"], num_classes, grid)
        return detection_losses(model(batch["images"][0]), targets)

    start = time.perf_counter()
    history = run_training(model, [], make_loader(dataset, cfg.optim), compute_losses, engine, cfg.optim, desc=cfg.role)
    seconds = time.perf_counter() - start
    path = save_detector(out / "model.pt", model, cfg.data.classes, cfg.data.input_size, cfg.role,
                         {"train_config": to_dict(cfg)})
    atomic_write_json(out / "history.json", {"history": history, "train_seconds": seconds})
    atomic_write_json(out / "engine_summary.json", engine_summary(engine))
    from bevperc.utils.config import save_config

    save_config(cfg, out / "config.yaml")
    return path
