"""Train the camera BEV detector: ``python -m bevperc.train --config configs/X.yaml``.

    python -m bevperc.train --config configs/demo_cpu.yaml --work-dir outputs/demo/train
    python -m bevperc.train --config configs/demo_cpu.yaml --work-dir outputs/demo/train --resume
    python -m bevperc.train --config configs/demo_cpu.yaml train.epochs=2 loss.enabled=false
    torchrun --nproc_per_node 8 -m bevperc.train --config configs/bevdet_r50_256x704.yaml --work-dir runs/r50

Trailing ``section.field=value`` arguments override single config fields. The run writes
``config.yaml``, ``train.log``, ``tensorboard/``, ``checkpoints/`` and ``loss_engine.json``
(the task sets the loss engine found, and its weights over training) to the work dir, which it
locks (``train.lock``) against a second training. Bad input (config, data, checkpoint, a locked
work dir, a full disk) ends the command with exit code 2 and a message naming the file or field.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from bevperc.config import Config, load_run_config
from bevperc.data.dataset import NuScenesBEVDataset, collate_bev
from bevperc.data.infos import DataError
from bevperc.training.checkpoint import CheckpointError, WorkDirLocked, lock_work_dir
from bevperc.training.distributed import cleanup_distributed, dist_info
from bevperc.training.trainer import Trainer
from bevperc.inference import predict_dataset
from bevperc.losses.engine import LossEngine
from bevperc.models.detector import build_detector, default_task_weights, task_names
from bevperc.utils.config import ConfigError, save_config
from bevperc.utils.io import atomic_write_json


def build_loss_engine(cfg: Config) -> LossEngine:
    """The loss engine over the detector's tasks; CenterPoint weights are the first-weight priors.

    ``cfg.loss.fixed_weights`` overrides single tasks; with ``loss.enabled=false`` the engine
    returns exactly the fixed CenterPoint-style weighted sum.
    """
    weights = {**default_task_weights(cfg.model), **cfg.loss.fixed_weights}
    return LossEngine(task_names(cfg.model), dataclasses.replace(cfg.loss, fixed_weights=weights))


class FastValidation:
    """``validate(model, epoch)``: predict the val split, score it with the fast exact evaluator."""

    def __init__(self, cfg: Config, work_dir: Path) -> None:
        self.cfg = cfg
        self.work_dir = work_dir
        self.dataset = NuScenesBEVDataset(cfg.data, cfg.data.val_split, train=False)

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if not dist_info().is_main:
            return {}
        from bevperc.evaluation import evaluate_submission

        submission = predict_dataset(model, self.dataset, self.cfg.eval.batch_size, 0, progress=False)
        out_dir = self.work_dir / "val" / f"epoch_{epoch + 1:03d}"
        metrics = evaluate_submission(
            submission, self.cfg.data.dataroot, self.cfg.data.version, self.cfg.data.val_split,
            out_dir=out_dir, evaluator="fast",
        )
        return validation_scores(metrics)


def validation_scores(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalars a learning curve tracks from a ``metrics_summary.json`` dict: mAP, NDS, the
    mean true-positive errors (mATE, mASE, mAOE, mAVE, mAAE) and every class's AP (``AP/<class>``)."""
    errors = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE"}
    scores = {"mAP": float(metrics["mean_ap"]), "NDS": float(metrics["nd_score"])}
    scores |= {short: float(metrics["tp_errors"][name]) for name, short in errors.items()}
    return scores | {f"AP/{name}": float(ap) for name, ap in metrics["mean_dist_aps"].items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bevperc.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--work-dir", required=True, help="where logs, checkpoints and results go")
    parser.add_argument("--resume", action="store_true", help="continue from work-dir/checkpoints/latest.pth")
    parser.add_argument("--no-validate", action="store_true", help="skip in-training validation")
    parser.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    work_dir = Path(args.work_dir)
    try:
        with lock_work_dir(work_dir) if dist_info().is_main else contextlib.nullcontext():
            train(cfg, args, work_dir)
    except (ConfigError, DataError, CheckpointError, WorkDirLocked, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    return 0


def train(cfg: Config, args: argparse.Namespace, work_dir: Path) -> None:
    """Build the data, detector and loss engine of ``cfg``, then train in ``work_dir`` (config.yaml is written
    once training starts: a run that fails to start, or to resume, leaves the work dir as it was)."""
    train_set = NuScenesBEVDataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
    model = build_detector(cfg.model)
    engine = build_loss_engine(cfg)
    validate = None if args.no_validate or cfg.train.val_every == 0 else FastValidation(cfg, work_dir)
    # The detector's loss(outputs, batch) gives the task losses; the trainer feeds them to the
    # engine, checkpoints it and steps it after every optimizer step.
    trainer = Trainer(model, engine, train_set, cfg.train, work_dir, collate_fn=collate_bev,
                      on_start=[lambda: save_config(cfg, work_dir / "config.yaml")], validate=validate)
    trainer.fit(resume=args.resume)
    if trainer.dist.is_main:
        summary = engine.summary()
        atomic_write_json(work_dir / "loss_engine.json", summary)
        trainer.logger.info("loss engine task sets: %s", summary.get("task_sets", engine.task_sets))
        trainer.logger.info("loss engine second weights: %s", [round(float(w), 4) for w in engine.second_weights])


if __name__ == "__main__":
    sys.exit(main())
