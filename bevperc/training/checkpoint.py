"""Checkpoint files: atomic writes, rotation, ``latest.pth``, RNG state as plain tensors.

Layout under ``work_dir/checkpoints``::

    iter_00001200.pth   numbered checkpoints, the newest ``keep`` are kept
    latest.pth          hard link to (or copy of) the newest one, replaced atomically

Every file is written to a temporary name in the same folder and renamed over the final
name, so a crash or a failed write (disk full, killed process) never leaves a truncated
``latest.pth``: the previous one stays intact. Contents are restricted to tensors and
python primitives so they load with ``torch.load(weights_only=True)``. A resume takes the
newest checkpoint that loads (:func:`load_newest_intact`), and a training holds
:func:`lock_work_dir` so that two runs never write into one work dir.

A :class:`~bevperc.training.trainer.Trainer`'s checkpoint (format :data:`CHECKPOINT_FORMAT`) holds the
model, optimizer, scheduler, scaler, EMA and extra states, one RNG state per rank, the data position
and history: :func:`checkpoint_from_trainer` writes that dict, :func:`load_trainer_state` restores it,
:func:`save_trainer_checkpoint` and :func:`resume_trainer` do so collectively over the ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import torch

from bevperc.training.distributed import all_gather_objects, all_reduce_sum, broadcast_object
from bevperc.training.ema import ModelEMA
from bevperc.training.seeding import seed_process
from bevperc.utils.io import atomic_torch_save

if TYPE_CHECKING:
    import logging

    from bevperc.training.trainer import Trainer

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LATEST_NAME = "latest.pth"
LOCK_NAME = "train.lock"
_NUMBERED = re.compile(r"^iter_(\d+)\.pth$")
_PLAIN_SCALARS = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint cannot be read, or does not fit the run; the message names the file.

    A ``ValueError`` like the project's other bad-input errors (``DataError``, ``ConfigError``...),
    so the commands report it in one line; a ``RuntimeError`` as before."""


class WorkDirLocked(RuntimeError):
    """Another training holds the work dir; the message names its PID."""


def checkpoint_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / CHECKPOINT_DIR


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the key path if ``obj`` holds anything but tensors/primitives.

    Catches e.g. a numpy array or a dataclass in a loss engine's ``state_dict`` at save time,
    instead of a ``weights_only`` unpickling error when someone resumes days later.
    """
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise TypeError(f"{where}: tensor subclass {type(obj).__name__} is not allowed in a checkpoint")
        return
    if isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: dict key {key!r} has type {type(key).__name__}; "
                                f"checkpoints allow str or int keys")
            check_plain(value, f"{where}.{key}")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__name__} is not allowed in a checkpoint "
                    f"(use tensors, numbers, strings, lists and dicts so it loads with weights_only=True)")


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """python/numpy/torch CPU/CUDA generator states of this process, as tensors and primitives."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()),
                     python["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            cuda_states = cuda_states[:torch.cuda.device_count()]
        for index, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


# ----------------------------------------------------------------------------- files

def numbered_checkpoints(work_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of numbered checkpoints, oldest first."""
    folder = checkpoint_dir(work_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NUMBERED.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_newest_intact(work_dir: str | Path) -> tuple[Path, dict, list[str]] | None:
    """``(path, state, skipped)`` of the newest checkpoint that loads: ``latest.pth``, else the
    numbered ones newest first; ``skipped`` says why each newer file was passed over. None when
    there is no checkpoint; :class:`CheckpointError` naming every file when none loads."""
    folder = checkpoint_dir(work_dir)
    candidates = [folder / LATEST_NAME] if (folder / LATEST_NAME).is_file() else []
    candidates += [path for _, path in reversed(numbered_checkpoints(work_dir))]
    skipped = []
    for path in candidates:
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointError as err:
            skipped.append(str(err))
    if skipped:
        raise CheckpointError(f"{folder}: no checkpoint can be loaded: " + "; ".join(skipped))
    return None


_HELD_LOCKS: dict[str, list] = {}  # lock path -> [open file holding the lock, nesting depth]


@contextlib.contextmanager
def lock_work_dir(work_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``work_dir/train.lock`` while the block runs (re-entrant in a process).

    A second training on the same work dir raises :class:`WorkDirLocked` naming the holder's PID and
    host instead of overwriting its checkpoints. The kernel releases the lock when the holder exits,
    however it exits, so a killed run leaves no stale lock. A POSIX record lock (``lockf``), not a
    ``flock``: forked children (DataLoader workers) do not inherit it, so workers that outlive a
    killed trainer for a few seconds do not block its resume. Never open the lock file elsewhere in
    the holding process: closing any descriptor of it releases a POSIX lock.
    """
    path = Path(work_dir) / LOCK_NAME
    key = os.path.abspath(path)
    held = _HELD_LOCKS.get(key)
    if held is None:
        held = _HELD_LOCKS[key] = [_acquire_lock(path), 0]
    held[1] += 1
    try:
        yield path
    finally:
        held[1] -= 1
        if held[1] == 0:
            del _HELD_LOCKS[key]
            held[0].close()  # releases the lock


def _acquire_lock(path: Path) -> Any:
    """The open lock file, locked and holding this process's PID and host; WorkDirLocked if taken."""
    import errno
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the whole file, from byte 0
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            handle.close()
            raise
        handle.seek(0)
        holder = handle.read().strip() or "PID unknown"
        handle.close()
        raise WorkDirLocked(f"{path.parent} is in use by another training run ({holder}, lock {path}); wait for "
                            f"it to finish, stop it, or train in another work dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def remove_stale_temporaries(work_dir: str | Path) -> list[Path]:
    """Delete ``.*.tmp`` files a killed writer left behind; returns what was removed."""
    folder = checkpoint_dir(work_dir)
    removed = []
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _point_latest_at(target: Path) -> Path:
    """Atomically make ``latest.pth`` the same file as ``target`` (hard link, else a copy)."""
    latest = target.parent / LATEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{LATEST_NAME}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(target, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(target, tmp)
        os.replace(tmp, latest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return latest


def save_checkpoint(state: dict, work_dir: str | Path, step: int, keep: int) -> Path:
    """Write ``state`` as ``iter_<step>.pth`` + ``latest.pth``; keep the newest ``keep`` numbered files.

    With ``keep == 0`` only ``latest.pth`` is written. Call on rank 0 only.
    Returns the path of ``latest.pth``.
    """
    check_plain(state)
    folder = checkpoint_dir(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if keep == 0:
        return atomic_torch_save(state, folder / LATEST_NAME)
    numbered = atomic_torch_save(state, folder / f"iter_{step:08d}.pth")
    latest = _point_latest_at(numbered)
    for _, old in numbered_checkpoints(work_dir)[:-keep]:
        old.unlink(missing_ok=True)  # latest.pth is a separate link, so it survives
    return latest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(path, weights_only=True)``; a :class:`CheckpointError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load checkpoint {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a bevperc checkpoint (expected a dict with a 'model' entry)")
    return state


def load_weights(module: torch.nn.Module, weights: Any, source: str | Path) -> None:
    """``module.load_state_dict(weights)`` (strict) with an error that names the checkpoint ``source``."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        detail = " ".join(str(err).split())[:400]
        raise CheckpointError(f"{source}: the weights do not fit the configured model ({detail}); "
                              f"was it written with another config?") from None


# ----------------------------------------------------------------------------- a Trainer's checkpoint

def checkpoint_from_trainer(trainer: Trainer, rng_states: list[dict]) -> dict:
    """Everything a resume of ``trainer`` needs, as tensors and primitives (loads with weights_only=True);
    ``rng_states``: one :func:`capture_rng_state` per rank."""
    history = trainer.history
    return {
        "format": CHECKPOINT_FORMAT,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "extra": {name: obj.state_dict() for name, obj in trainer.extra_state.items()},
        "rng": rng_states,  # one entry per rank
        "progress": {"epoch": trainer.epoch, "iteration_in_epoch": trainer.iteration_in_epoch,
                     "global_step": trainer.global_step, "skipped_steps": trainer.skipped_steps,
                     "amp_overflow_steps": trainer.amp_overflow_steps, "train_seconds": trainer.train_seconds},
        "data": {"world_size": trainer.dist.world_size, "batch_size": trainer.cfg.batch_size,
                 "iters_per_epoch": trainer.iters_per_epoch, "dataset_len": trainer.dataset_len,
                 "seed": trainer.cfg.seed},
        "config": dataclasses.asdict(trainer.cfg),
        "history": {"loss": torch.tensor(history["loss"], dtype=torch.float64),
                    "lr": torch.tensor(history["lr"], dtype=torch.float64),
                    "grad_norm": torch.tensor(history["grad_norm"], dtype=torch.float64),
                    "skipped_steps": torch.tensor(history["skipped_steps"], dtype=torch.int64),
                    "val": history["val"]},
    }


def save_trainer_checkpoint(trainer: Trainer) -> Path | None:
    """Write a checkpoint of ``trainer``'s current position (collective; rank 0 writes); the path of
    ``latest.pth`` on rank 0, None on the others.

    The RNG gather is the barrier before writing; the all-reduced success flag is the
    barrier after it, and makes every rank raise if rank 0's write failed.
    """
    rng_states = all_gather_objects(capture_rng_state())
    path, error = None, None
    if trainer.dist.is_main:
        try:
            path = save_checkpoint(trainer.state_dict(rng_states), trainer.work_dir, trainer.global_step,
                                   trainer.cfg.keep_checkpoints)
        except Exception as err:  # re-raised below, after telling the other ranks
            error = err
    failed = torch.tensor([1.0 if error is not None else 0.0], device=trainer.device)
    all_reduce_sum(failed)
    if error is not None:
        trainer.logger.error("writing the checkpoint at step %d failed: %s (previous latest.pth kept)",
                             trainer.global_step, error)
        raise error
    if failed.item() > 0:
        raise RuntimeError(f"rank 0 failed to write the checkpoint at step {trainer.global_step}")
    if path is not None:
        where = (f"end of epoch {trainer.epoch}" if trainer.iteration_in_epoch == 0 else
                 f"epoch {trainer.epoch + 1}, iteration {trainer.iteration_in_epoch}/{trainer.iters_per_epoch}")
        numbered = checkpoint_dir(trainer.work_dir) / f"iter_{trainer.global_step:08d}.pth"
        trainer.logger.info("saved checkpoint at step %d (%s): %s", trainer.global_step, where,
                            numbered if trainer.cfg.keep_checkpoints else path)
    return path


def resume_trainer(trainer: Trainer) -> Path | None:
    """Load the newest intact checkpoint of ``trainer``'s work dir into it (read by rank 0, broadcast
    to the others); its path, or None (with a warning) when the work dir has no checkpoint.

    ``latest.pth``, else the newest ``iter_*.pth`` that loads, with a warning naming what was
    skipped and what is used; a :class:`CheckpointError` when none loads.
    """
    found, error = None, None
    if trainer.dist.is_main:
        try:
            found = load_newest_intact(trainer.work_dir)
        except CheckpointError as err:
            error = str(err)
    found, error = broadcast_object((found, error))
    if error is not None:
        raise CheckpointError(error)
    if found is None:
        trainer.logger.warning("resume requested but %s has no checkpoint: starting from scratch",
                               checkpoint_dir(trainer.work_dir))
        return None
    path, state, skipped = found
    for problem in skipped:
        trainer.logger.warning("skipping a damaged checkpoint: %s", problem)
    if skipped:
        trainer.logger.warning("resuming from %s, the newest intact checkpoint", path)
    trainer.load_state_dict(state, source=path)
    return Path(path)


def load_trainer_state(trainer: Trainer, state: dict, source: str | Path) -> None:
    """Restore a :func:`checkpoint_from_trainer` into ``trainer`` (same model, data and global batch
    size); a :class:`CheckpointError` naming ``source`` when it does not fit."""
    _check_resumable(trainer, state, source)
    load_weights(trainer.model, state["model"], source)
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:
        raise CheckpointError(f"{source}: the optimizer state does not fit ({err})") from None
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler.is_enabled() and state["scaler"]:
        trainer.scaler.load_state_dict(state["scaler"])
    if trainer.ema is not None:
        if state["ema"] is None:
            trainer.logger.warning("%s: no EMA state saved; EMA restarts from the loaded weights", source)
            trainer.ema = ModelEMA(trainer.model, trainer.cfg.ema_decay)
        else:
            trainer.ema.load_state_dict(state["ema"])
    _load_extra_state(trainer.extra_state, state["extra"], source, trainer.logger)
    _load_progress(trainer, state["progress"], state["history"])
    rng_states = state["rng"]
    if len(rng_states) == trainer.dist.world_size:
        restore_rng_state(rng_states[trainer.dist.rank])
    else:  # different process count: fresh, still seed-determined streams
        seed_process(trainer.cfg.seed + trainer.global_step, trainer.dist.rank)


def _check_resumable(trainer: Trainer, state: dict, source: str | Path) -> None:
    """A CheckpointError unless ``state`` has this format and ``trainer``'s dataset length and global batch;
    warnings when the process count or the config differ."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    data, cfg, world_size = state["data"], trainer.cfg, trainer.dist.world_size
    if data["dataset_len"] != trainer.dataset_len or \
            data["batch_size"] * data["world_size"] != trainer.global_batch_size:
        raise CheckpointError(
            f"{source}: saved with {data['dataset_len']} samples and global batch "
            f"{data['batch_size']}x{data['world_size']}; this run has {trainer.dataset_len} samples and "
            f"{cfg.batch_size}x{world_size}: the schedule and data position would not match")
    if data["world_size"] != world_size:
        trainer.logger.warning("%s: saved with %d processes, resuming with %d: training continues but is not "
                               "bit-identical to an uninterrupted run", source, data["world_size"], world_size)
    changed = {k: (v, getattr(cfg, k, None)) for k, v in state["config"].items()
               if k in dataclasses.asdict(cfg) and _plain(v) != _plain(getattr(cfg, k))}
    if changed:
        trainer.logger.warning("%s: config differs from the checkpoint's (saved -> now): %s", source,
                               {k: f"{a} -> {b}" for k, (a, b) in changed.items()})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _load_extra_state(extra_state: Mapping[str, Any], saved: Mapping[str, Any], source: str | Path,
                      logger: logging.Logger) -> None:
    """Each of ``extra_state`` loads its ``saved`` entry (a CheckpointError when one is missing or does
    not fit); saved entries nobody asks for are ignored with a warning."""
    for name, obj in extra_state.items():
        if name not in saved:
            raise CheckpointError(f"{source}: no state for extra_state[{name!r}] (saved: {sorted(saved)})")
        try:
            obj.load_state_dict(saved[name])
        except (ValueError, RuntimeError, KeyError) as err:
            raise CheckpointError(f"{source}: extra_state[{name!r}] does not fit ({err})") from None
    for name in set(saved) - set(extra_state):
        logger.warning("%s: ignoring saved extra state %r (not passed to this Trainer)", source, name)


def _load_progress(trainer: Trainer, progress: dict, history: dict) -> None:
    """``trainer``'s position, counters and history from a checkpoint's ``progress`` and ``history``;
    a position at the end of an epoch becomes the start of the next."""
    trainer.epoch = int(progress["epoch"])
    trainer.iteration_in_epoch = int(progress["iteration_in_epoch"])
    trainer.global_step = int(progress["global_step"])
    trainer.skipped_steps = int(progress["skipped_steps"])
    trainer.amp_overflow_steps = int(progress["amp_overflow_steps"])
    trainer.train_seconds = float(progress.get("train_seconds", 0.0))
    if trainer.iteration_in_epoch >= trainer.iters_per_epoch:
        trainer.epoch, trainer.iteration_in_epoch = trainer.epoch + 1, 0
    trainer.history = {"loss": history["loss"].tolist(), "lr": history["lr"].tolist(),
                       "grad_norm": history["grad_norm"].tolist(),
                       "skipped_steps": history["skipped_steps"].tolist(), "val": list(history["val"])}
