"""The loss engine's statistics shared over ranks under torch.distributed, so that every rank holds
the same engine state (rank 0's checkpoint resumes every rank exactly) and makes the same grouping
and weight decisions (``LossEngineConfig.sync_distributed``)."""

from __future__ import annotations

import torch
from torch import Tensor


def is_distributed(enabled: bool) -> bool:
    """Whether to share: ``enabled`` and a process group of world size > 1."""
    return (enabled and torch.distributed.is_available()
            and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)


def all_reduce_mean(values: Tensor) -> Tensor:
    """Mean over ranks (NaN/inf propagate: a task non-finite on any rank is skipped everywhere)."""
    torch.distributed.all_reduce(values)
    return values / torch.distributed.get_world_size()


def all_reduce_sum(values: Tensor, device: torch.device) -> Tensor:
    """Sum over ranks of a CPU tensor, through the training ``device`` (which NCCL needs)."""
    values = values.to(device)
    torch.distributed.all_reduce(values)
    return values.cpu()


def gather_rows(rows: Tensor | None, num_tasks: int, device: torch.device) -> Tensor | None:
    """Every rank's per-sample losses [B_r, T] stacked in rank order [sum_r B_r, T] (None if none).

    The per-sample buffer then holds the global batch on every rank, as one process would, so the
    engine's state (and a checkpoint of rank 0's) is the same on every rank: exact DDP resume."""
    world = torch.distributed.get_world_size()
    count = torch.tensor([0 if rows is None else rows.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c) for c in counts]
    if max(counts) == 0:
        return None
    padded = torch.full((max(counts), num_tasks), float("nan"), device=device)
    if rows is not None:
        padded[:rows.shape[0]] = rows.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([part[:c] for part, c in zip(gathered, counts)]).cpu()
