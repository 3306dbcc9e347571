"""Loss engine: task-set balanced multi-task training (docs/methods.md, part A).

Tasks are named losses (per class group: heatmap, offset, height, size, orientation,
velocity; distillation terms). The engine

1. measures task affinity (per-sample loss correlation and/or gradient cosine on the
   shared features) during a warm-up and periodically, and clusters the tasks with
   scikit-learn into N > 1 task sets (or uses ``fixed_sets``);
2. first loss per set: by default (``first_weighting='fixed'``) ``F_j = sum_{i in j} w_i * L_i``,
   the raw losses with the user's ``fixed_weights`` (the tuned weights: with all second weights 1
   the engine's loss is the fixed-weight sum); with ``first_weighting='normalise'``,
   ``F_j = sum_{i in j} a_i * L_i / s_i`` with first weights ``a_i`` (the ``fixed_weights`` as
   priors, normalised to mean 1 inside the set, so that grouping by itself does not reweight tasks
   by the size of their set) and a detached per-task loss scale ``s_i``: the task's mean loss over
   the last window (``loss_scale='recent'``, refreshed every k steps, so ``L_i / s_i`` acts like a
   log-loss) or its initial loss (``'initial'``: mean of the first ``scale_warmup_steps`` finite
   non-zero values); either way each set is then invariant to the raw scale of its tasks;
3. second loss ``sum_j w_j F_j`` with second weights ``w`` positive and summing to N
   (mean weight 1: all-ones is the plain sum of the set losses);
4. alternating schedule: the caller back-propagates the returned total and steps the
   optimiser every iteration (first process); ``engine.step()`` afterwards updates the
   statistics and every ``condition_every`` steps asks the optimisation condition for new
   second weights (second process).

Learnability gate: both lag rules (second weights in ``LagCondition``, first weights here) use
a ``ProgressGate`` per set / task: from the last ``progress_windows`` condition calls it tests
whether the log-loss moved beyond its measured noise (gate ~1) or sat on a plateau
(gate ~0: unlearnable, irreducible or converged), and the lag log-ratio is pulled towards
the neutral (mean) level by ``1 - gate``: a flat set or task is treated as neither ahead nor
behind, so it keeps about the mean weight but cannot keep gaining weight.

First weights (optional in step 5, with ``first_weighting`` 'normalise' or 'fixed_lag'): with
``first_weight_temperature > 0`` the second process also applies the gated lag rule inside each set
every k steps (a task's share of its set follows ``prior * ratio ** (1 / first_weight_temperature)``,
smoothed and floored, ratio = recent loss / initial loss with 'normalise', / the lag_reference start
with 'fixed_lag', whose sets keep the total of their tuned weights); ``0`` keeps them at the priors.

Why the gate, why loss ratios rather than a gradient for the first weights, and the
measurements behind the defaults: docs/methods.md, part A, "Why these defaults".

Non-finite and zero losses: a task whose loss is NaN/inf at a step is left out of the
returned total (its term is replaced by 0 before weighting), out of every statistic, and
cannot change any weight; its graph is detached, so no NaN reaches the gradients of the
other tasks (shared parameters get only the finite tasks' gradients); when no finite task is left
with a gradient, the total is the (non-finite) sum of the raw losses, so a trainer that skips
non-finite losses skips the step instead of calling backward on a constant. ``engine.last_nonfinite``
names such tasks after ``step()``. Checking finiteness costs one device sync per step.
A loss of exactly 0 (e.g. no targets of that class in the batch) enters the total (as 0)
but is treated as "no information" by the statistics, so it cannot collapse weights.
All weights are finite, >= ``weight_floor`` (fraction of the mean) and sum to N.

With ``enabled=False`` the engine returns exactly
``sum(cfg.fixed_weights.get(name, 1.0) * losses[name] for name in task_names)``.

Parts, each with one job, composed by :class:`LossEngine` (its own per-step values: :class:`StepState`):
:class:`~bevperc.losses.statistics.TaskStatistics` (initial losses, history, loss scales),
:class:`~bevperc.losses.grouping.TaskGrouping` (affinity recording and measurement, clustering with
hysteresis), :class:`~bevperc.losses.set_weights.SetWeights` (set labels, first and second weights),
the optimisation condition (:mod:`bevperc.losses.conditions`) and :mod:`bevperc.losses.sync` (the
statistics shared over ranks); the configuration is :class:`~bevperc.losses.config.LossEngineConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from bevperc.losses import sync
from bevperc.losses.conditions import DwaCondition, FamoCondition, FixedCondition, LagCondition, UncertaintyCondition
from bevperc.losses.config import LossEngineConfig
from bevperc.losses.grouping import TaskGrouping, known_sums, labels_from_sets, sets_of
from bevperc.losses.set_weights import SetWeights
from bevperc.losses.statistics import TaskStatistics

__all__ = ["LossEngine", "LossEngineConfig", "make_condition"]


def make_condition(cfg: LossEngineConfig) -> Callable[..., Tensor]:
    """The optimisation condition named by ``cfg.condition`` with its config values."""
    if cfg.condition == "lag":
        return LagCondition(cfg.lag_temperature, cfg.lag_smoothing, cfg.lag_floor, cfg.lag_window_steps,
                            cfg.progress_windows, cfg.progress_threshold)
    if cfg.condition == "fixed":
        return FixedCondition()
    if cfg.condition == "uncertainty":
        return UncertaintyCondition(cfg.uncertainty_lr)
    if cfg.condition == "dwa":
        return DwaCondition(cfg.dwa_temperature, period=cfg.condition_every)
    return FamoCondition(cfg.famo_lr, cfg.famo_gamma)


class Observation(NamedTuple):
    """What ``forward`` records for ``step``: the raw detached losses [T], whether all are finite,
    and in affinity windows the per-sample losses [B, T] and gradient cosines [T, T]."""

    raw: Tensor
    all_finite: bool
    samples: Tensor | None
    cosine: Tensor | None


@dataclass
class StepState:
    """The engine's values that change every step. A plain object on purpose: an attribute write on
    an ``nn.Module`` goes through its bookkeeping (~3 us), more than the engine's arithmetic per step."""

    iteration: int = 0
    pending: Observation | None = None
    last_nonfinite: list[str] = field(default_factory=list)
    coefficients: Tensor | None = None
    """Cached ``SetWeights.coefficients`` [T] of the fast path (None: recompute)."""


# The order of the checkpoint's extra state (as written since the engine existed).
_STATE_KEYS = ("task_names", "iteration", "labels", "second_weights", "first_weights", "recent_scale",
               "reference_loss", "task_progress", "grouped", "initial_loss", "initial_count", "history", "samples",
               "grad_affinity_sum", "grad_affinity_count", "grad_records", "last_batch", "affinity", "grouping_score",
               "grouping_history", "weight_history", "condition", "affinity_total", "affinity_windows")


class LossEngine(nn.Module):
    """Task-set balanced multi-task loss (see module docstring).

    Usage::

        engine = LossEngine(["car.heatmap", "car.offset", ...], LossEngineConfig())
        total = engine(losses, per_sample)   # losses: name -> scalar, per_sample: name -> [B]
        total.backward(); optimizer.step(); engine.step()

    Args:
        task_names: ordered unique task names; ``losses`` must contain exactly these keys.
        cfg: LossEngineConfig.
        condition: optional custom optimisation condition (see ``conditions.py``) that
            replaces the one named by ``cfg.condition``.
    """

    def __init__(self, task_names: list[str], cfg: LossEngineConfig | None = None,
                 condition: Callable[..., Tensor] | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else LossEngineConfig()
        task_names = list(task_names)
        if not task_names or len(set(task_names)) != len(task_names):
            raise ValueError(f"LossEngine: task_names must be non-empty and unique, got {task_names}")
        unknown = sorted(set(cfg.fixed_weights) - set(task_names))
        if unknown:
            raise ValueError(f"LossEngineConfig.fixed_weights: unknown task(s) {unknown}; tasks are {task_names}")
        self.cfg = cfg
        self.task_names = task_names
        self._name_set = set(task_names)
        self.condition = condition if condition is not None else make_condition(cfg)
        self._stats = TaskStatistics(len(task_names), cfg)
        self._grouping = TaskGrouping(task_names, cfg)
        if cfg.fixed_sets is not None:
            labels = labels_from_sets(cfg.fixed_sets, task_names)
        else:
            labels = np.arange(len(task_names))                  # singletons until the first grouping
        prior = torch.tensor([float(cfg.fixed_weights.get(n, 1.0)) for n in task_names])
        self._weights = SetWeights(prior, labels, cfg)
        self._state = StepState()

    # ------------------------------------------------------------------ read-only views
    @property
    def iteration(self) -> int:
        """Engine steps done (``step()`` calls)."""
        return self._state.iteration

    @property
    def last_nonfinite(self) -> list[str]:
        """Tasks whose loss was NaN/inf at the last step (left out of the total and the statistics)."""
        return self._state.last_nonfinite

    @property
    def task_sets(self) -> list[list[str]]:
        """Current task sets, in set order (each a list of task names in task order)."""
        return sets_of(self._weights.labels.tolist(), self.task_names)

    @property
    def second_weights(self) -> Tensor:
        """Second weights [N] (positive, sum N)."""
        return self._weights.second

    @property
    def first_weights(self) -> dict[str, float]:
        """First weight a_i of each task inside its set (before division by the loss scale)."""
        return {n: float(self._weights.first[:, i].sum()) for i, n in enumerate(self.task_names)}

    @property
    def affinity(self) -> Tensor | None:
        """Task affinity [T, T] of the last grouping (None before)."""
        return self._grouping.affinity

    @property
    def grouping_score(self) -> float | None:
        """Silhouette of the current grouping on the last measured affinity."""
        return self._grouping.score

    @property
    def grouping_history(self) -> list[dict[str, Any]]:
        """One event per grouping: step, score, accepted, and sets or the current grouping's score."""
        return self._grouping.history

    @property
    def weight_history(self) -> list[dict[str, Any]]:
        """Second weights at each condition call (thinned beyond ``max_weight_history``), with the
        learnability gates the lag rules used: ``set_gates`` [N] (the condition's) and ``task_gates`` [T]
        (the first weights'), where they ran."""
        return self._weights.history

    # ------------------------------------------------------------------ forward
    def forward(self, losses: Mapping[str, Tensor], per_sample: Mapping[str, Tensor] | None = None,
                shared_features: Tensor | None = None) -> Tensor:
        """Second loss (scalar) from task losses.

        Args:
            losses: name -> scalar loss tensor, exactly the engine's task names.
            per_sample: optional name -> [B] per-sample loss (detached is fine) for the
                correlation affinity; tasks may be left out.
            shared_features: optional tensor the task losses depend on (e.g. the BEV
                feature map), only used with affinity 'grad_cos'/'both' on measurement steps.
        Returns:
            scalar tensor: ``sum_j w_j * sum_{i in j} a_i L_i / s_i`` (enabled) or the fixed sum.
        """
        if not self.cfg.enabled:
            return sum(self.cfg.fixed_weights.get(name, 1.0) * losses[name] for name in self.task_names)
        stacked = self._stack(losses)                                                   # [T]
        if stacked.device != self._stats.device:
            self._to_device(stacked.device)
        raw = stacked.detach()
        effective = getattr(self.condition, "effective_weights", None)
        total = self._fast_total(stacked) if effective is None and self._stats.all_seen else None
        all_finite = total is not None
        if total is None:
            total, all_finite = self._safe_total(stacked, raw, losses, effective)
        samples, cosine = self._grouping.observe(self._state.iteration, losses, per_sample, shared_features)
        self._state.pending = Observation(raw, all_finite, samples, cosine)
        return total

    def _stack(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The task losses [T] in task order (checked: exactly the task names, scalars)."""
        if losses.keys() != self._name_set:
            missing = sorted(self._name_set - set(losses))
            extra = sorted(set(losses) - self._name_set)
            raise KeyError(f"LossEngine: losses must have exactly the task names; missing {missing}, unknown {extra}")
        num_tasks = len(self.task_names)
        stacked = torch.stack([losses[name] for name in self.task_names])
        if stacked.dim() != 1:
            if stacked.numel() != num_tasks:
                raise ValueError(f"LossEngine: every loss must be a scalar tensor, got shape {tuple(stacked.shape)} "
                                 f"for the stacked losses of {num_tasks} tasks")
            stacked = stacked.reshape(num_tasks)
        return stacked

    def _fast_total(self, stacked: Tensor) -> Tensor | None:
        """Every step after the first observations: one dot product of the losses [T] with the cached
        per-task coefficients ``w_set(i) * a_i / s_i`` (positive and finite, so the total is finite
        exactly when every task loss is: one check, one sync per step). None when it is not finite."""
        state = self._state
        if state.coefficients is None or state.coefficients.dtype != stacked.dtype:
            state.coefficients = self._weights.coefficients(self._stats.scale()).to(stacked.dtype)
        total = torch.dot(state.coefficients, stacked)
        return total if math.isfinite(total.item()) else None  # one sync, ~20x cheaper on CPU than bool(isfinite())

    def _safe_total(self, stacked: Tensor, raw: Tensor, losses: Mapping[str, Tensor],
                    effective: Callable[[Tensor, Tensor], Tensor] | None) -> tuple[Tensor, bool]:
        """The total from the losses [T] with non-finite tasks left out, and whether all were finite.

        ``effective``: the condition's forward-pass weights from the set weights and first losses (FAMO)."""
        all_finite = bool(torch.isfinite(raw).all())
        safe = stacked
        if not all_finite:
            # Rare path: detach the non-finite tasks entirely so no NaN reaches any gradient
            # (a masked-to-zero term would still give 0 * NaN = NaN inside the task's graph).
            ok = torch.isfinite(raw).tolist()
            safe = torch.stack([losses[n].reshape(()) if ok[i] else torch.zeros((), dtype=stacked.dtype,
                                device=stacked.device) for i, n in enumerate(self.task_names)])
        scale = self._stats.scale(raw.float()).to(safe.dtype)
        first_losses = self._weights.first.to(safe.dtype) @ (safe / scale)                         # [N]
        weights = self._weights.second
        if effective is not None:
            weights = effective(weights, first_losses.detach().float())
        total = (weights.to(safe.dtype) * first_losses).sum()
        if stacked.requires_grad and not total.requires_grad:
            # No finite task carries a gradient: the non-finite raw sum tells the caller to skip the step.
            total = stacked.sum()
        return total, all_finite

    def _to_device(self, device: torch.device) -> None:
        self._stats.to(device)
        self._weights.to(device)
        self._state.coefficients = None

    # ------------------------------------------------------------------ second process
    def step(self) -> None:
        """Call after each optimiser step: update statistics, run the condition every k steps,
        regroup after warm-up and every ``regroup_every`` steps.

        No ``torch.no_grad`` around the whole call: on most steps it only files the detached
        losses, and the decorator alone cost a noticeable share of that on small models; the
        two periodic processes below enter it themselves."""
        state = self._state
        if not self.cfg.enabled:
            state.iteration += 1
            return
        pending, state.pending = state.pending, None
        if pending is not None:
            self._file(pending)
        state.iteration += 1
        if self._grouping.due(state.iteration):
            with torch.no_grad():
                self._regroup()
        if (self.cfg.lag_reference != "initial" and self._stats.reference_loss is None
                and state.iteration >= self.cfg.warmup_steps and self._stats.history):
            self._stats.set_reference()  # fixed or per-task sets: balancing starts after the warm-up
        if state.iteration % self.cfg.condition_every == 0 and self._stats.history:
            with torch.no_grad():
                self._run_condition()

    def _file(self, observed: Observation) -> None:
        """Update the statistics from a step's observation, shared over ranks first under DDP."""
        raw, all_finite, samples, cosine = observed
        cosine_sums = None if cosine is None else known_sums(cosine)
        if sync.is_distributed(self.cfg.sync_distributed):
            device = self._stats.device
            raw = sync.all_reduce_mean(raw.float().clone())
            all_finite = bool(torch.isfinite(raw).all())
            samples = sync.gather_rows(samples, len(self.task_names), device)
            if cosine_sums is not None:
                cosine_sums = sync.all_reduce_sum(cosine_sums, device)
        self._state.last_nonfinite = [] if all_finite else \
            [n for n, ok in zip(self.task_names, torch.isfinite(raw).tolist()) if not ok]
        if self._stats.record(raw):
            self._state.coefficients = None
        self._grouping.add(self._state.iteration, samples, cosine_sums)

    def _run_condition(self) -> None:
        """Second weights from the condition; first weights and recent loss scales refreshed."""
        stats, weights = self._stats, self._weights
        ordered = stats.ordered_history()          # stacked once per call, shared by the steps below
        proposed = self.condition(self.first_losses_history(ordered), weights.second.clone(),
                                  initial_first_losses=self.initial_first_losses(), step=self._state.iteration)
        weights.set_second(proposed)
        normalise = self.cfg.first_weighting == "normalise"
        adapt_first = self.cfg.first_weight_temperature > 0 and self.cfg.first_weighting != "fixed"
        if adapt_first:
            # 'fixed_lag': scale 1, so the normalised start is the lag_reference start of each task
            start = stats.initial_loss if normalise else stats.normalised_start()
            weights.adapt_first(ordered, start, stats.initial_count)
        if self.cfg.loss_scale == "recent" and normalise:
            stats.refresh_recent_scale(ordered)
        self._state.coefficients = None
        set_gate = getattr(self.condition, "progress", None)
        weights.record(self._state.iteration,
                       set_gates=set_gate.gate(len(weights.second)) if set_gate is not None and set_gate.windows else None,
                       task_gates=weights.progress.gate(len(self.task_names)) if adapt_first and weights.progress.windows else None)

    def _regroup(self) -> None:
        """Group the tasks anew (kept if the new grouping is not clearly better)."""
        labels = self._grouping.regroup(self._state.iteration, self._weights.labels.cpu().numpy(),
                                        self._stats.ordered_history())
        if labels is None:
            return
        self._weights.regroup(labels)
        self._state.coefficients = None
        if self.cfg.lag_reference == "grouping" or (self.cfg.lag_reference == "first_grouping"
                                                    and self._stats.reference_loss is None):
            self._stats.set_reference()
        on_regroup = getattr(self.condition, "on_regroup", None)
        if on_regroup is not None:
            on_regroup(self._weights.second.clone())

    def measure_affinity(self) -> Tensor:
        """Task affinity [T, T] in [-1, 1] from the recorded statistics (NaN = unknown)."""
        return self._grouping.measure_affinity(self._stats.ordered_history())

    def first_losses_history(self, ordered: Tensor | None = None) -> Tensor:
        """First loss of every set over the kept history [H, N] (NaN where no member observed).

        A set whose members were only partly observed at a step is rescaled by the first
        weight of the observed members, so a missing task does not look like progress.
        ``ordered``: the ordered raw history [H, T] when the caller already has it.
        """
        ordered = self._stats.ordered_history() if ordered is None else ordered
        return self._weights.aggregate(ordered / self._stats.scale())

    def initial_first_losses(self) -> Tensor:
        """Each set's first loss at the lag rule's start [N] (``lag_reference``: the first steps, or
        when the sets were formed), in the units of ``first_losses_history``."""
        return self._weights.aggregate(self._stats.normalised_start())

    # ------------------------------------------------------------------ state, logging
    def get_extra_state(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors and Python primitives only)."""
        condition_state = self.condition.state_dict() if hasattr(self.condition, "state_dict") else {}
        parts = {"task_names": list(self.task_names), "iteration": self._state.iteration,
                 **self._weights.state_dict(), **self._stats.state_dict(), **self._grouping.state_dict(),
                 "condition": condition_state}
        return {key: parts[key] for key in _STATE_KEYS}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["task_names"]) != self.task_names:
            raise ValueError(f"LossEngine.load_state_dict: checkpoint tasks {state['task_names']} "
                             f"differ from this engine's {self.task_names}")
        self._stats.load_state_dict(state)
        self._weights.load_state_dict(state, self._stats.device)
        self._grouping.load_state_dict(state)
        if hasattr(self.condition, "load_state_dict") and state["condition"]:
            self.condition.load_state_dict(state["condition"])
        self._state.iteration = int(state["iteration"])
        self._state.pending = None
        self._state.coefficients = None

    def task_weights(self) -> dict[str, float]:
        """Effective weight on each raw task loss: w_set * a_i / s_i."""
        return dict(zip(self.task_names, self._weights.coefficients(self._stats.scale()).tolist()))

    def log_scalars(self, writer: Any, step: int, prefix: str = "loss_engine") -> None:
        """Write second weights, each task's set index and effective weight, and the learnability gates
        of the last condition call to a SummaryWriter."""
        for j, weight in enumerate(self._weights.second.tolist()):
            writer.add_scalar(f"{prefix}/second_weight/set{j}", weight, step)
        last = self.weight_history[-1] if self.weight_history else {}
        for j, gate in enumerate(last.get("set_gates", [])):
            writer.add_scalar(f"{prefix}/set_gate/set{j}", gate, step)
        for name, gate in zip(self.task_names, last.get("task_gates", [])):
            writer.add_scalar(f"{prefix}/task_gate/{name}", gate, step)
        labels = self._weights.labels.tolist()
        for (name, weight), label in zip(self.task_weights().items(), labels):
            writer.add_scalar(f"{prefix}/set_of/{name}", label, step)
            writer.add_scalar(f"{prefix}/task_weight/{name}", weight, step)
        if self.grouping_score is not None:
            writer.add_scalar(f"{prefix}/grouping_silhouette", self.grouping_score, step)

    def summary(self) -> dict[str, Any]:
        """JSON-able record of the engine (for plots and for saving with a run)."""
        return {
            "enabled": self.cfg.enabled,
            "iteration": self.iteration,
            "task_names": list(self.task_names),
            "task_sets": self.task_sets,
            "first_weights": self.first_weights,
            "loss_scales": dict(zip(self.task_names, self._stats.scale().tolist())),
            "second_weights": self._weights.second.tolist(),
            "task_weights": self.task_weights(),
            "affinity": None if self.affinity is None else
            [[None if not np.isfinite(v) else float(v) for v in row] for row in self.affinity.tolist()],
            "grouping_score": self.grouping_score,
            "grouping_history": [dict(e) for e in self.grouping_history],
            "weight_history": [dict(e) for e in self.weight_history],
            "config": dataclasses.asdict(self.cfg),
        }
