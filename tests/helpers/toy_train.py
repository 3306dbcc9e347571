"""A small real training run through bevperc.training.Trainer, used by the engine tests.

Model: a few conv layers (BatchNorm or GroupNorm, dropout) with a regression head and a
classification head. Data: synthetic 3x16x16 images whose four quadrants have random
brightness; targets are the quadrant means (regression) and the brightest quadrant
(classification). Augmentation (horizontal flip + noise) is drawn from
``sample_rng(seed, epoch, index)``. The loss goes through two loss-engine-like objects:
``LearnedTaskWeights`` (an nn.Module with learned log-variances: extra parameters) and
``RunningMeanNormaliser`` (a plain object whose state changes every step).

    python tests/helpers/toy_train.py --work-dir /tmp/toy                      # single process
    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/helpers/toy_train.py --work-dir /tmp/toy_ddp --batch-size 4      # DDP (gloo on CPU)

``--loss-engine`` replaces both with the real ``LossEngine`` over three tasks (left and right
quadrant means, brightest quadrant) fed per-sample losses, grouping them after 12 steps.

Test-only switches: ``--stall-after-step N`` (write work_dir/stalled, then hang so a test can
SIGKILL the run), ``--fail-writes-after-step N`` (cap the file size with RLIMIT_FSIZE so
the next checkpoint write fails), ``--nan-at-step N --nan-ranks 1`` (a NaN loss on those
ranks at that step), ``--dump DIR`` (each rank saves its final state to DIR/rank<r>.pt).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from bevperc.training import TrainConfig, Trainer, sample_rng, seed_process  # noqa: E402
from bevperc.training.distributed import all_reduce_mean, dist_info  # noqa: E402
from bevperc.losses.engine import LossEngine, LossEngineConfig  # noqa: E402

IMAGE_SIZE = 16


class ToyQuadrants(Dataset):
    """``n`` synthetic images [3, 16, 16]; item -> (image, quadrant_means [4], brightest [])."""

    def __init__(self, n: int, data_seed: int = 1234, aug_seed: int = 0, augment: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        generator = torch.Generator().manual_seed(data_seed)
        half = IMAGE_SIZE // 2
        brightness = torch.rand(n, 4, generator=generator)
        images = 0.2 * torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            images[:, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += brightness[:, q, None, None, None]
        self.images = images.to(dtype)
        self.aug_seed = aug_seed
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.images[index].clone()
        if self.augment:
            rng = sample_rng(self.aug_seed, self.epoch, index)
            if rng.random() < 0.5:
                image = image.flip(-1)
            image += torch.from_numpy(rng.normal(0.0, 0.05, size=image.shape)).to(image.dtype)
        half = IMAGE_SIZE // 2
        means = torch.stack([image[:, r * half:(r + 1) * half, c * half:(c + 1) * half].mean()
                             for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]])
        return image, means, means.argmax()


class ToyNet(nn.Module):
    """Three conv layers -> pooled features [B, 128] -> (quadrant means [B, 4], logits [B, 4])."""

    def __init__(self, norm: str = "batch", dropout: float = 0.1) -> None:
        super().__init__()

        def norm_layer(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(4, channels)

        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), norm_layer(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), norm_layer(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.regression = nn.Linear(128, 4)
        self.classification = nn.Linear(128, 4)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.dropout(self.features(images))
        return self.regression(features), self.classification(features)


class LearnedTaskWeights(nn.Module):
    """Kendall-style weighting ``sum_i exp(-s_i) * L_i + s_i`` with learned ``s`` [n_tasks]."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(n_tasks))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return (torch.exp(-self.log_vars) * losses + self.log_vars).sum()


class RunningMeanNormaliser:
    """Divides each task loss by a running mean of its past values (state changes every step).

    ``observe`` records this step's task losses; ``step`` (after the optimizer step) folds
    them, averaged over DDP ranks, into the running mean.
    """

    def __init__(self, n_tasks: int, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.mean = torch.ones(n_tasks, dtype=torch.float64)
        self.count = 0
        self.pending: torch.Tensor | None = None

    def normalise(self, losses: torch.Tensor) -> torch.Tensor:
        return losses / self.mean.to(losses.device, losses.dtype)

    def observe(self, losses: torch.Tensor) -> None:
        self.pending = losses.detach().to(torch.float64).cpu()

    def step(self) -> None:
        if self.pending is None:
            return
        observed = all_reduce_mean(self.pending.clone())
        self.mean = self.momentum * self.mean + (1 - self.momentum) * observed
        self.count += 1
        self.pending = None

    def log_scalars(self, writer, step: int) -> None:
        for i, value in enumerate(self.mean.tolist()):
            writer.add_scalar(f"normaliser/mean_{i}", value, step)

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "count": self.count, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"].clone()
        self.count = int(state["count"])
        self.momentum = float(state["momentum"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--warmup-iters", type=int, default=3)
    parser.add_argument("--grad-clip", type=float, default=5.0)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--amp-dtype", default="float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--float64", action="store_true", help="model and data in float64 (tight comparisons)")
    parser.add_argument("--norm", choices=["batch", "group"], default="batch")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--validate", action="store_true", help="validate on a held-out toy set each epoch")
    parser.add_argument("--loss-engine", action="store_true", help="the real LossEngine instead of the toy weighting")
    parser.add_argument("--no-tensorboard", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stall-after-step", type=int, default=0)
    parser.add_argument("--fail-writes-after-step", type=int, default=0)
    parser.add_argument("--nan-at-step", type=int, default=0)
    parser.add_argument("--nan-ranks", default="0", help="comma-separated ranks that produce the NaN loss")
    parser.add_argument("--dump", default="")
    return parser.parse_args(argv)


def build_trainer(args: argparse.Namespace) -> tuple[Trainer, RunningMeanNormaliser, LearnedTaskWeights]:
    """The toy Trainer; the model is initialised from ``seed_process(args.seed)`` (rank 0 stream)."""
    seed_process(args.seed)  # same initial weights on every rank (DDP would broadcast them anyway)
    model = ToyNet(norm=args.norm, dropout=args.dropout)
    dtype = torch.float64 if args.float64 else torch.float32
    model.to(dtype)
    task_weights = LearnedTaskWeights(2).to(dtype)
    normaliser = RunningMeanNormaliser(2)
    dataset = ToyQuadrants(args.samples, aug_seed=args.seed, dtype=dtype)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, num_workers=args.num_workers, lr=args.lr,
                      weight_decay=1e-2, schedule=args.schedule, warmup_iters=args.warmup_iters,
                      grad_clip=args.grad_clip, amp=args.amp, amp_dtype=args.amp_dtype, ema=args.ema,
                      ema_decay=0.99, seed=args.seed, device=args.device, log_every=2,
                      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep,
                      tensorboard=not args.no_tensorboard, progress_bar=False)
    nan_ranks = {int(r) for r in args.nan_ranks.split(",") if r}
    trainer: Trainer | None = None
    engine = LossEngine(["mean_left", "mean_right", "brightest"], LossEngineConfig(
        warmup_steps=12, affinity_steps=8, regroup_every=4, condition_every=2, scale_warmup_steps=2,
        min_sets=2, max_sets=2)) if args.loss_engine else None

    def compute_loss(net: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, quadrant_means, brightest = batch
        predicted_means, logits = net(images)
        # Losses in the data's precision (float32 under AMP autocast too).
        task_losses = torch.stack([F.mse_loss(predicted_means.to(quadrant_means.dtype), quadrant_means),
                                   F.cross_entropy(logits.to(quadrant_means.dtype), brightest)])
        if engine is not None:
            squared = (predicted_means.to(quadrant_means.dtype) - quadrant_means) ** 2         # [B, 4]
            per_sample = {"mean_left": squared[:, [0, 2]].mean(1), "mean_right": squared[:, [1, 3]].mean(1),
                          "brightest": F.cross_entropy(logits.to(quadrant_means.dtype), brightest, reduction="none")}
            total = engine({name: value.mean() for name, value in per_sample.items()}, per_sample)
        else:
            normaliser.observe(task_losses)
            total = task_weights(normaliser.normalise(task_losses))
        assert trainer is not None
        if trainer.global_step + 1 == args.nan_at_step and trainer.dist.rank in nan_ranks:
            total = total * float("nan")
        # One log as a device tensor, one as a float: the trainer takes both.
        return total, {"mse": task_losses[0].detach(), "ce": task_losses[1].item()}

    after_step = [lambda step: (engine or normaliser).step()]
    if args.stall_after_step:
        after_step.append(lambda step: _stall(args.work_dir) if step == args.stall_after_step else None)
    if args.fail_writes_after_step:
        after_step.append(lambda step: _limit_file_size() if step == args.fail_writes_after_step else None)

    validate = make_validate(dtype) if args.validate else None
    extra_state = {"loss_engine": engine} if engine is not None else {"task_weights": task_weights,
                                                                      "normaliser": normaliser}
    trainer = Trainer(model, compute_loss, dataset, cfg, args.work_dir, extra_state=extra_state,
                      extra_parameters=task_weights.parameters() if engine is None else None,
                      after_step=after_step, validate=validate)
    return trainer, normaliser, task_weights


def make_validate(dtype: torch.dtype):
    """``validate(model, epoch)`` on 16 held-out toy images: mse and brightest-quadrant accuracy."""
    held_out = ToyQuadrants(16, data_seed=99, augment=False, dtype=dtype)
    targets = torch.stack([held_out[i][1] for i in range(len(held_out))])

    @torch.no_grad()
    def validate(net: nn.Module, epoch: int) -> dict[str, float]:
        net.eval()
        device = next(net.parameters()).device
        predicted, logits = net(held_out.images.to(device))
        # Consumes the global RNG on purpose: the trainer must shield training from it.
        torch.rand(3)
        return {"mse": F.mse_loss(predicted, targets.to(device)).item(),
                "accuracy": (logits.argmax(1) == targets.to(device).argmax(1)).float().mean().item()}

    return validate


# Checkpoint fields that time the run (``progress`` and each validation record): wall-clock times
# differ between runs with the same result.
WALL_CLOCK_FIELDS = frozenset({"train_seconds"})


def assert_same(a, b, path: str = "checkpoint") -> None:
    """Recursive bitwise equality of checkpoint-like trees (NaN equals NaN); a field of
    :data:`WALL_CLOCK_FIELDS` need only be a non-negative number in both."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(
            a.nan_to_num(), b.nan_to_num()), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            if key in WALL_CLOCK_FIELDS:
                assert a[key] >= 0 and b[key] >= 0, f"{path}.{key}: {a[key]!r}, {b[key]!r}"
            else:
                assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def child_pids(pid: int) -> list[int]:
    """PIDs of the processes whose parent is ``pid`` (from /proc; e.g. the workers torchrun started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def _stall(work_dir: str) -> None:
    Path(work_dir, "stalled").write_text(str(os.getpid()))
    time.sleep(3600)  # the test SIGKILLs us here


def _limit_file_size() -> None:
    # Any later write past 64 KiB fails with EFBIG (an OSError) instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # bit-identical CPU reductions between runs; kind to a shared CPU
    trainer, normaliser, task_weights = build_trainer(args)
    history = trainer.fit(resume=args.resume)
    if args.dump:
        rank = dist_info().rank
        Path(args.dump).mkdir(parents=True, exist_ok=True)
        torch.save({"model": trainer.model.state_dict(), "task_weights": task_weights.state_dict(),
                    "normaliser": normaliser.state_dict(),
                    "ema": trainer.ema.state_dict() if trainer.ema else None,
                    "history": {k: v for k, v in history.items() if k != "val"}, "val": history["val"],
                    "skipped_steps": trainer.skipped_steps},
                   Path(args.dump) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
