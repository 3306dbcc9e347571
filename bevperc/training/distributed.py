"""DDP plumbing: process-group setup from torchrun's environment, the training device and the DDP
wrapper, collectives, the sampler.

torchrun (``python -m torch.distributed.run``) sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` for every process, on one node or many. Without them
(plain ``python -m bevperc.train``) everything here degrades to a single process and the
collectives become no-ops, so the trainer has one code path.

A distributed worker never outlives its job: a watchdog thread ends it when the torchrun
launcher that started it exits, or when rank 0 on the same machine does (a rank stuck in
``sleep`` or a long step would otherwise keep running, and rank 0 keep writing checkpoints).
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int          # global rank, 0 .. world_size-1
    local_rank: int    # rank on this node: picks the GPU
    world_size: int
    backend: str | None  # "nccl" / "gloo", None when not distributed

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer (set by torchrun)") from None


def dist_info() -> DistInfo:
    """Rank/world of this process: from the initialised process group, else the environment."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), _env_int("LOCAL_RANK", 0), dist.get_world_size(),
                        str(dist.get_backend()))
    return DistInfo(_env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1), None)


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise the default process group when launched by torchrun with WORLD_SIZE > 1.

    Idempotent. Backend: ``nccl`` when the job trains on CUDA, otherwise ``gloo``. On CUDA
    each process is pinned to GPU ``LOCAL_RANK`` (multi-node: ranks on each node count
    from 0 locally). ``MASTER_ADDR``/``MASTER_PORT`` are read by ``init_method="env://"``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist_info()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set: launch with torchrun "
                               f"(python -m torch.distributed.run --nproc_per_node N ...)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    local_rank = _env_int("LOCAL_RANK", 0)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    info = dist_info()
    start_exit_watchdog(info)
    return info


def training_device(requested: str, info: DistInfo) -> torch.device:
    """The device this process trains on: ``requested`` is ``"auto"``, ``"cpu"`` or ``"cuda"``
    (``TrainConfig.device``); on CUDA, GPU ``LOCAL_RANK``."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device='cuda' but torch.cuda.is_available() is False")
    return torch.device("cuda", info.local_rank)


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 (AVX512-BF16 or AMX tiles), so that bfloat16 autocast
    speeds training up; without them oneDNN emulates bfloat16, slower than float32."""
    cpu = torch.cpu
    checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def wrap_model(model: nn.Module, device: torch.device, info: DistInfo, *, sync_bn: bool,
               find_unused_parameters: bool) -> tuple[nn.Module, nn.Module]:
    """``(bare, train_model)``: ``model`` moved to ``device`` (BatchNorm made SyncBatchNorm with ``sync_bn``
    under DDP), and what the forward pass runs: the DDP wrapper of ``bare`` under DDP, else ``bare`` itself."""
    model.to(device)
    if sync_bn and info.is_distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not info.is_distributed:
        return model, model
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=find_unused_parameters)


def start_exit_watchdog(info: DistInfo, poll_seconds: float = 1.0) -> None:
    """End this worker (``os._exit(1)``) when its torchrun launcher or, on the same host, rank 0 exits.

    Collective (all ranks exchange host and PID once). The launcher is watched only under torchrun
    (``TORCHELASTIC_RUN_ID`` set; its workers are its children): a job started by another launcher
    keeps running when the shell that started it exits.
    """
    peers = all_gather_objects((socket.gethostname(), os.getpid()))
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
    rank0_host, rank0_pid = peers[0]
    watch_rank0 = info.rank != 0 and rank0_host == socket.gethostname()
    if launcher is None and not watch_rank0:
        return

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if launcher is not None and os.getppid() != launcher:
                reason = f"its launcher (PID {launcher}) exited"
            elif watch_rank0 and not process_alive(rank0_pid):
                reason = f"rank 0 (PID {rank0_pid}) exited"
            else:
                continue
            sys.stderr.write(f"[rank {info.rank}] {reason}: stopping this worker\n")
            sys.stderr.flush()
            os._exit(1)

    threading.Thread(target=watch, name="bevperc-exit-watchdog", daemon=True).start()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: os.kill said it exists
    return state not in ("Z", "X")


def cleanup_distributed() -> None:
    """Destroy the process group if one was initialised (call once at the end of train.py)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in a single process). Returns ``tensor``."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (identity in a single process). Returns ``tensor``."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if _active():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj from rank 0, obj from rank 1, ...]`` (a one-element list in a single process)."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for checkpoints on non-shared disks)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Average ``.grad`` of parameters that DDP does not manage (e.g. learned loss weights).

    A parameter without a gradient on some rank counts as a zero gradient there, so all
    ranks call the same collective and end with the same averaged gradient.
    """
    if not _active() or not parameters:
        return
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    all_reduce_mean(flat)
    offset = 0
    for param in parameters:
        count = param.grad.numel()
        param.grad.copy_(flat[offset:offset + count].view_as(param.grad))
        offset += count


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch order can be entered part-way through.

    The order of epoch ``e`` is ``torch.randperm(len(dataset))`` drawn from a generator
    seeded with ``seed + e`` (DistributedSampler's rule: a deterministic function of
    ``(seed, epoch)``), padded to a multiple of ``num_replicas``; rank ``r`` takes every
    ``num_replicas``-th index starting at ``r``. :meth:`set_start` skips the first
    ``n`` of this rank's indices so a resumed run continues with the next unseen batch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.start_index = 0

    def set_start(self, start_index: int) -> None:
        """Skip the first ``start_index`` indices of this rank's order (this epoch only)."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} outside [0, {self.num_samples}]")
        self.start_index = start_index

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def iterations_per_epoch(num_samples_per_rank: int, batch_size: int, drop_last: bool) -> int:
    """Batches one rank draws per epoch from ``num_samples_per_rank`` samples."""
    if drop_last:
        return num_samples_per_rank // batch_size
    return math.ceil(num_samples_per_rank / batch_size)
