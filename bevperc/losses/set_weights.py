"""Set weighting of the loss engine: which set each task is in, the first weights inside the sets and
the second weights of the sets (docs/methods.md, part A, steps 2-5).

First loss of set j: ``F_j = sum_{i in j} a_i * L_i / s_i``; second loss ``sum_j w_j F_j``. The
loss scales ``s_i`` come from :mod:`bevperc.losses.statistics`, the second weights' proposals from
an optimisation condition (:mod:`bevperc.losses.conditions`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from bevperc.losses.conditions import ProgressGate, to_numpy, window_statistics
from bevperc.losses.config import LossEngineConfig


class SetWeights:
    """Set labels [T], first weights ``first`` [N, T] (a_i in the row of its set, 0 elsewhere) and
    second weights ``second`` [N] (positive, summing to N).

    ``prior`` [T] (CPU): the user's fixed weights, the first weights' starting point; with
    ``first_weighting='normalise'`` they are scaled to mean 1 inside every set, so that grouping by
    itself does not reweight tasks by the size of their set. ``progress`` is the learnability gate
    of the first-weight lag rule; ``history`` records the second weights (and the gates) at every condition call.
    """

    def __init__(self, prior: Tensor, labels: np.ndarray, cfg: LossEngineConfig):
        """``prior`` [T] and the first set labels [T] (CPU); the second weights start at 1."""
        self.cfg = cfg
        self.prior = prior
        self.progress = ProgressGate(cfg.progress_windows, cfg.progress_threshold)
        self.history: list[dict[str, Any]] = []
        self.install(labels, torch.ones(int(labels.max()) + 1), prior.device)

    def install(self, labels: np.ndarray, second: Tensor, device: torch.device) -> None:
        """Install set labels [T] (CPU) and second weights [N] on ``device``; first weights from the priors."""
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        num_tasks = len(self.prior)
        onehot = torch.zeros(int(self.labels.max()) + 1, num_tasks)
        onehot[self.labels, torch.arange(num_tasks)] = 1.0
        prior = onehot * self.prior.cpu()
        if self.cfg.first_weighting == "normalise":
            prior = prior * onehot.sum(1, keepdim=True) / prior.sum(1, keepdim=True).clamp(min=1e-30)
        self.first = prior.to(device)
        self.second = second.to(device, torch.float32)

    def regroup(self, labels: np.ndarray) -> None:
        """Install new set labels [T]: a new set's second weight is the mean of its members' old ones."""
        per_task = self.second.cpu()[self.labels.cpu()]
        num_sets = int(labels.max()) + 1
        second = torch.stack([per_task[torch.as_tensor(labels == j)].mean() for j in range(num_sets)])
        self.install(labels, second * (num_sets / second.sum()), self.second.device)

    def coefficients(self, scale: Tensor) -> Tensor:
        """Per-task coefficient [T] of the second loss, ``w_set(i) * a_i / s_i``, for scales ``scale`` [T]."""
        per_set = self.second[self.labels.to(self.second.device)]
        return per_set * self.first.sum(0) / scale

    def aggregate(self, task_values: Tensor) -> Tensor:
        """Task values [..., T] (NaN = not observed) -> first-weighted set values [..., N].

        A set whose members were only partly observed is rescaled by the first weight of its
        observed members (a missing task does not look like progress); a set with none observed is NaN.
        """
        observed = torch.isfinite(task_values)
        numerator = torch.where(observed, task_values, torch.zeros_like(task_values)) @ self.first.T
        coverage = observed.float() @ self.first.T
        full = self.first.sum(1)
        return torch.where(coverage > 0, numerator / coverage.clamp(min=1e-30) * full,
                           torch.full_like(numerator, float("nan")))

    def set_second(self, proposed: Any) -> None:
        """Take a condition's proposal [N]: positive, finite, >= weight_floor * mean, summing to N;
        non-finite or non-positive entries keep their weight, an unusable total keeps them all."""
        current = self.second
        proposed = torch.as_tensor(proposed, dtype=current.dtype, device=current.device)
        if proposed.shape != current.shape:
            raise ValueError(f"LossEngine: condition returned weights of shape {tuple(proposed.shape)}, "
                             f"expected {tuple(current.shape)} (one per task set)")
        proposed = torch.where(torch.isfinite(proposed) & (proposed > 0), proposed, current)
        total = proposed.sum()
        if not bool(torch.isfinite(total)) or float(total) <= 0:
            return
        floor = self.cfg.weight_floor
        self.second = (floor + (1.0 - floor) * current.numel() * (proposed / total)).float()

    def adapt_first(self, ordered: Tensor, start: Tensor, initial_count: Tensor) -> None:
        """Gated lag rule inside each set: first weights follow ``prior * exp(l_i / T)`` (smoothed,
        floored; mean 1 per set with 'normalise', the set's total prior with 'fixed_lag') with
        ``l_i = g_i log r_i + (1 - g_i) * mean of l over the set``.

        ``r_i`` is the task's mean loss over the last window (of ``ordered`` [H, T]) over its start
        loss [T] (``initial_count`` [T] values seen); ``g_i`` is its learnability (``ProgressGate``
        over its recent log-loss records), so an unlearnable task grouped with learnable ones counts
        as neutral and cannot take its set's first weight. A task without data in the window gets its
        set's mean (no push either way). NumPy: a few numbers per task, where torch's per-op
        dispatch would dominate the cost.
        """
        mean, variance = window_statistics(to_numpy(ordered), self.cfg.lag_window_steps)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_ratio = np.log(np.maximum(mean / to_numpy(start), 1e-30))
        valid = np.isfinite(mean) & (initial_count.cpu().numpy() > 0) & np.isfinite(log_ratio)
        log_ratio = np.where(valid, log_ratio, np.nan)
        self.progress.update(log_ratio, variance)
        lag = self._gated_lag(log_ratio, valid, self.progress.gate(log_ratio.size))
        self.first = torch.from_numpy(self._first_target_mix(lag)).to(self.first.device, torch.float32)

    def _gated_lag(self, log_ratio: np.ndarray, valid: np.ndarray, gate: np.ndarray) -> np.ndarray:
        """Lag l [T] from log-ratios [T] (NaN where not ``valid``) and gates [T]: without evidence
        of learning a task counts as neutral (its set's mean log-ratio); no data: the set's mean lag."""
        membership = to_numpy(self.first) > 0                                 # [N, T]
        labels = self.labels.numpy()
        member_valid = membership & valid
        per_set_valid = np.maximum(member_valid.sum(1), 1)
        filled = np.where(valid, log_ratio, 0.0)
        neutral = (member_valid * filled).sum(1) / per_set_valid
        lag = np.where(valid, gate * filled + (1.0 - gate) * neutral[labels], 0.0)
        set_mean = (member_valid * lag).sum(1) / per_set_valid
        return np.where(valid, lag, set_mean[labels])

    def _first_target_mix(self, lag: np.ndarray) -> np.ndarray:
        """New first weights [N, T]: the current ones mixed (``lag_smoothing``) with the floored
        per-set softmax of ``log prior + lag / first_weight_temperature``: mean 1 inside each set
        ('normalise', floor ``lag_floor``), or the set's total prior ('fixed_lag', floor
        ``lag_floor * prior``: a task with a small tuned weight is not lifted by the floor)."""
        cfg = self.cfg
        membership = to_numpy(self.first) > 0                                 # [N, T]
        labels = self.labels.numpy()
        prior = self.prior.to(torch.float64).numpy()
        logits = np.log(np.maximum(prior, 1e-30)) + lag / cfg.first_weight_temperature
        logits = logits - np.where(membership, logits, -np.inf).max(1)[labels]     # stable per-set softmax
        exp = np.exp(logits)
        share = exp / (membership * exp).sum(1)[labels]
        if cfg.first_weighting == "normalise":
            set_size = membership.sum(1)[labels]
            target = cfg.lag_floor + (1.0 - cfg.lag_floor) * set_size * share      # mean 1 inside the set
        else:
            total = (membership * prior).sum(1)[labels]
            target = cfg.lag_floor * prior + (1.0 - cfg.lag_floor) * total * share  # the set's total prior
        current = to_numpy(self.first).sum(0)
        updated = (1.0 - cfg.lag_smoothing) * current + cfg.lag_smoothing * target
        return membership * updated

    def record(self, iteration: int, set_gates: np.ndarray | None = None, task_gates: np.ndarray | None = None) -> None:
        """Append the second weights to ``history``, with the learnability gates of the sets [N] and of
        the tasks [T] where the lag rules used them; beyond ``max_weight_history`` keep every other entry."""
        entry: dict[str, Any] = {"step": iteration, "weights": self.second.tolist()}
        if set_gates is not None:
            entry["set_gates"] = [float(g) for g in set_gates]
        if task_gates is not None:
            entry["task_gates"] = [float(g) for g in task_gates]
        self.history.append(entry)
        if len(self.history) > self.cfg.max_weight_history:
            self.history = self.history[::2]

    def to(self, device: torch.device) -> None:
        """Move the weights (the labels and priors stay on the CPU)."""
        self.first = self.first.to(device)
        self.second = self.second.to(device)

    def state_dict(self) -> dict[str, Any]:
        """The weights as CPU tensors (checkpoint keys of the engine's extra state)."""
        return {
            "labels": self.labels.cpu().clone(),
            "second_weights": self.second.cpu().clone(),
            "first_weights": self.first.cpu().clone(),
            "task_progress": self.progress.state_dict(),
            "weight_history": [dict(e) for e in self.history],
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.install(state["labels"].numpy(), state["second_weights"].clone(), device)
        self.first = state["first_weights"].clone().to(device)
        if "task_progress" in state:  # absent in checkpoints written before the gate existed
            self.progress.load_state_dict(state["task_progress"])
        self.history = [dict(e) for e in state["weight_history"]]
