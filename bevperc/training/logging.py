"""Run logging: console + ``work_dir/train.log`` with timestamps, ``run_info.json``, and the running
means of the trainer's log lines (:class:`LogWindow`)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bevperc.utils.io import atomic_write_json

if TYPE_CHECKING:
    from bevperc.training.trainer import StepResult

LOGGER_NAME = "bevperc"
_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
_HANDLER_TAG = "_bevperc_training_handler"


def setup_logger(work_dir: str | Path | None, rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Configure the ``bevperc`` logger and return it.

    Rank 0 logs ``level`` and above to the console and appends to ``work_dir/train.log``.
    Other ranks print only warnings and errors, prefixed with their rank, and write no file.
    Calling it again (e.g. a second run in one process) replaces the handlers it added.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level)
    logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(prefix + _FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    setattr(console, _HANDLER_TAG, True)
    logger.addHandler(console)
    if rank == 0 and work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(work_dir) / "train.log", mode="a", encoding="utf-8")
        file_handler.setLevel(level)
        file_handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        setattr(file_handler, _HANDLER_TAG, True)
        logger.addHandler(file_handler)
    return logger


def close_logger() -> None:
    """Close and remove the handlers :func:`setup_logger` added (releases train.log)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            logger.removeHandler(handler)
            handler.close()


def git_commit(repo_dir: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository holding bevperc."""
    repo_dir = Path(repo_dir) if repo_dir else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, Any]:
    import numpy
    import torch

    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                                "numpy": numpy.__version__, "cuda": torch.version.cuda,
                                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                                else None}
    try:
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError:
        versions["torchvision"] = None
    return versions


def write_run_info(work_dir: str | Path, config: Any, extra: dict[str, Any] | None = None) -> Path:
    """Atomically write ``work_dir/run_info.json``: config, git commit, versions, host, command.

    ``config`` may be a dataclass (saved via ``dataclasses.asdict``) or a JSON-able dict.
    """
    import torch

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    info = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "git": git_commit(),
        "versions": _versions(),
        "devices": {"cuda_available": torch.cuda.is_available(),
                    "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "config": config,
    }
    if extra:
        info.update(extra)
    # Paths, enums and other odd values become strings rather than failing the whole write.
    info = json.loads(json.dumps(info, default=str))
    return atomic_write_json(Path(work_dir) / "run_info.json", info)


class LogWindow:
    """Running means of the trainer's steps between two log lines (skipped steps count only in time)."""

    def __init__(self) -> None:
        self.steps = 0
        self.applied = 0
        self.loss_sum = 0.0
        self.grad_norm_sum = 0.0
        self.log_sums: dict[str, float] = {}
        self.seconds = 0.0
        self.samples = 0
        self.last_lr = float("nan")

    def add(self, result: StepResult, seconds: float, samples: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.samples += samples
        self.last_lr = result.lr
        if result.skipped:
            return
        self.applied += 1
        self.loss_sum += result.loss
        self.grad_norm_sum += result.grad_norm
        for name, value in result.logs.items():
            self.log_sums[name] = self.log_sums.get(name, 0.0) + value

    def mean_loss(self) -> float:
        return self.loss_sum / self.applied if self.applied else float("nan")

    def mean_grad_norm(self) -> float:
        return self.grad_norm_sum / self.applied if self.applied else float("nan")

    def mean_logs(self) -> dict[str, float]:
        return {name: total / self.applied for name, total in self.log_sums.items()} if self.applied else {}

    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else math.nan


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` of ``seconds`` (``?`` when it is not finite, e.g. an ETA before any step)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
