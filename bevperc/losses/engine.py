"""Loss engine: task-set balanced multi-task training (docs/methods.md, part A).

Tasks are named losses (per class group: heatmap, offset, height, size, orientation,
velocity; distillation terms). The engine

1. measures task affinity (per-sample loss correlation and/or gradient cosine on the
   shared features) during a warm-up and periodically, and clusters the tasks with
   scikit-learn into N > 1 task sets (or uses ``fixed_sets``);
2. first loss per set: ``F_j = sum_{i in j} a_i * L_i / s_i`` with first weights ``a_i``
   (the user's ``fixed_weights`` as priors, normalised to mean 1 inside the set, so that
   grouping by itself does not reweight tasks by the size of their set) and a
   detached per-task loss scale ``s_i``: by default (``loss_scale='recent'``) the task's
   mean loss over the last window, refreshed every k steps (so ``L_i / s_i`` acts like a
   log-loss and every task keeps relative pressure while it converges), or its initial
   loss (``'initial'``: mean of the first ``scale_warmup_steps`` finite non-zero values).
   Either way each set is invariant to the raw scale of its tasks;
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

First weights (optional in step 5): with ``first_weight_temperature > 0`` the second process
also applies the gated lag rule inside each set every k steps (a task's share of its set
follows ``prior * ratio ** (1 / first_weight_temperature)``, smoothed and floored, ratio =
recent loss / initial loss); ``0`` keeps them at the normalised priors.

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
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from bevperc.losses import affinity as aff
from bevperc.losses.conditions import (
    DwaCondition,
    FamoCondition,
    FixedCondition,
    LagCondition,
    ProgressGate,
    UncertaintyCondition,
    to_numpy,
    window_mean,
    window_statistics,
)
from bevperc.utils.config import check_literal_fields


@dataclass
class LossEngineConfig:
    """Configuration of the loss engine. See the module docstring for the method."""

    enabled: bool = True
    """False: return the fixed weighted sum in task order (plain fixed-weight training)."""
    fixed_weights: dict[str, float] = field(default_factory=dict)
    """Per-task weights (default 1.0). Disabled: the weights of the sum. Enabled: priors
    for the first weights (normalised inside each set when first_weighting='normalise')."""

    # --- task sets -----------------------------------------------------------------
    grouping: Literal["cluster", "per_task"] = "cluster"
    """'cluster': measured affinity + clustering; 'per_task': every task its own set."""
    fixed_sets: Optional[list[list[str]]] = None
    """User-fixed task sets (each task exactly once); disables clustering."""
    num_sets: int = 0
    """N for clustering; 0 = choose N in [min_sets, max_sets] by silhouette score."""
    min_sets: int = 2
    max_sets: int = 4
    clustering: Literal["agglomerative", "spectral"] = "agglomerative"
    """'agglomerative' (average linkage on the precomputed distance) or 'spectral'."""
    affinity: Literal["loss_corr", "grad_cos", "both"] = "loss_corr"
    """'loss_corr' (per-sample loss correlation), 'grad_cos' (gradient cosine on
    shared_features, extra per-task head backward on measurement steps) or 'both'."""
    warmup_steps: int = 100
    """Steps before the first grouping (tasks are singleton sets until then)."""
    regroup_every: int = 1000
    """Re-measure and possibly regroup every this many steps after warm-up (0 = never)."""
    regroup_margin: float = 0.05
    """Hysteresis: a new grouping replaces the current one only if its silhouette on the
    new affinity beats the current grouping's by this margin."""
    affinity_steps: int = 100
    """Per-sample losses / gradients are recorded in the last this-many steps before a grouping."""
    affinity_capacity: int = 4096
    """Samples kept in the per-sample loss buffer."""
    grad_affinity_every: int = 5
    """With affinity 'grad_cos'/'both': measure gradients every this many recorded steps."""

    # --- first loss ----------------------------------------------------------------
    first_weighting: Literal["normalise", "fixed"] = "normalise"
    """'normalise': divide each task by its initial loss (scale-invariant sets);
    'fixed': raw losses times fixed_weights (the published form of the anchors)."""
    scale_warmup_steps: int = 10
    """Finite non-zero values averaged into each task's initial loss."""
    loss_scale: Literal["initial", "recent"] = "recent"
    """Divisor s_i of the normalised first losses: 'initial' (the task's initial loss) or
    'recent' (its mean loss over the last lag window, refreshed every k steps by the second
    process, like a log-loss: every task keeps relative pressure as it converges)."""
    first_weight_temperature: float = 0.25
    """> 0 (default 0.25): the second process also moves the first weights inside each set towards
    ``prior_i * r_i ** (1 / first_weight_temperature)`` with r_i the task's loss ratio
    (the lag rule inside the set, same smoothing and floor); 0: first weights stay fixed.
    Ignored with first_weighting='fixed'."""

    # --- second loss / optimisation condition ---------------------------------------
    condition: Literal["lag", "fixed", "uncertainty", "dwa", "famo"] = "lag"
    """'lag' (default), 'fixed', 'uncertainty', 'dwa', 'famo' (or pass condition= to LossEngine)."""
    condition_every: int = 10
    """k: the condition runs every k engine steps."""
    history_length: int = 100
    """Steps of first-loss history handed to the condition."""
    lag_temperature: float = 0.33
    lag_smoothing: float = 0.5
    lag_floor: float = 0.1
    lag_window: int = 0
    """Steps averaged for the loss ratio; 0 = condition_every."""
    lag_reference: Literal["initial", "grouping"] = "initial"
    """The "start" of the lag rule's ratio L/L0 (second weights): 'initial' (each task's loss over
    the first scale_warmup_steps) or 'grouping' (its mean loss over the lag window when the current
    task sets were formed: the first grouping, every accepted regrouping; with fixed sets, at
    warmup_steps). When to use which: docs/methods.md, part A."""
    progress_windows: int = 6
    """Learnability gate of the lag rule (second and first weights): the last this-many
    condition calls are used to test whether each set's / task's log-loss still moves beyond
    its noise; a flat (unlearnable or converged) one is discounted. 0 switches the gate off."""
    progress_threshold: float = 4.0
    """Gate = snr / (snr + threshold), snr the squared t-statistic of the log-loss slope:
    movement of 2 standard errors counts half."""
    uncertainty_lr: float = 1e-2
    dwa_temperature: float = 2.0
    famo_lr: float = 0.025
    famo_gamma: float = 0.01
    weight_floor: float = 1e-3
    """Safety floor on any condition's weights, as a fraction of the mean weight."""
    sync_distributed: bool = True
    """Under torch.distributed (world size > 1): in step(), average the detached task losses over
    ranks (one all-reduce of T floats) and, in affinity windows, gather every rank's per-sample
    losses and sum the gradient cosines, so every rank holds the same state (rank 0's checkpoint
    resumes every rank exactly) and makes identical grouping and weight decisions."""
    max_weight_history: int = 2000
    """Weight-history entries kept for summary(); older ones are thinned (every other kept)."""

    @property
    def lag_window_steps(self) -> int:
        """Steps averaged for the lag rule's loss ratio: ``lag_window``, or ``condition_every`` when 0."""
        return self.lag_window or self.condition_every

    def __post_init__(self) -> None:
        check_literal_fields(self)  # the string choices, from the annotations
        positive = ("warmup_steps", "condition_every", "history_length", "scale_warmup_steps",
                    "affinity_steps", "affinity_capacity", "grad_affinity_every", "max_weight_history")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"LossEngineConfig.{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if not (self.progress_windows == 0 or self.progress_windows >= 3) or self.progress_threshold < 0:
            raise ValueError(f"LossEngineConfig.progress_windows / progress_threshold: expected 0 or >= 3 / >= 0, "
                             f"got {self.progress_windows} / {self.progress_threshold}")
        if self.num_sets < 0 or self.regroup_every < 0 or self.lag_window < 0:
            raise ValueError("LossEngineConfig.num_sets / regroup_every / lag_window: expected >= 0")
        if not 2 <= self.min_sets <= self.max_sets:
            raise ValueError(f"LossEngineConfig.min_sets/max_sets: expected 2 <= min_sets <= max_sets, "
                             f"got {self.min_sets}, {self.max_sets}")
        if self.first_weight_temperature < 0 or self.lag_temperature <= 0:
            raise ValueError(f"LossEngineConfig.first_weight_temperature / lag_temperature: expected >= 0 / > 0, "
                             f"got {self.first_weight_temperature} / {self.lag_temperature}")
        if not 0.0 <= self.weight_floor < 1.0:
            raise ValueError(f"LossEngineConfig.weight_floor: expected in [0, 1), got {self.weight_floor}")
        for name, weight in self.fixed_weights.items():
            if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight >= 0):
                raise ValueError(f"LossEngineConfig.fixed_weights[{name!r}]: expected a finite number >= 0, got {weight!r}")


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
        num_tasks = len(task_names)
        self._prior = torch.tensor([float(cfg.fixed_weights.get(n, 1.0)) for n in task_names])

        # --- state (all of it goes through get_extra_state) ---
        self.iteration = 0
        self._initial_loss = torch.zeros(num_tasks)            # mean of first finite non-zero values
        self._initial_count = torch.zeros(num_tasks, dtype=torch.long)
        self._recent_scale: Tensor | None = None               # loss_scale='recent' only
        self._reference_loss: Tensor | None = None             # lag_reference='grouping' only
        self._task_progress = ProgressGate(cfg.progress_windows, cfg.progress_threshold)  # first-weight lag rule
        # raw task-loss vectors [T] of the last history_length steps (references, no copy per step)
        self._history: collections.deque[Tensor] = collections.deque(maxlen=cfg.history_length)
        self._samples = aff.SampleLossBuffer(num_tasks, cfg.affinity_capacity)
        self._grad_affinity_sum = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self._grad_affinity_count = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self._grad_records = 0
        self._last_batch = 0                                   # per-sample rows last recorded (all ranks)
        self.affinity: Tensor | None = None                    # [T, T] last measured
        self.grouping_score: float | None = None
        self.grouping_history: list[dict[str, Any]] = []
        self.weight_history: list[dict[str, Any]] = []
        self._grouped = cfg.fixed_sets is not None or cfg.grouping == "per_task"
        if cfg.fixed_sets is not None:
            labels = self._labels_from_sets(cfg.fixed_sets)
        else:
            labels = np.arange(num_tasks)                      # singletons until the first grouping
        self._set_labels(labels, torch.ones(int(labels.max()) + 1))
        self._pending: tuple[Tensor, bool, Optional[Tensor], Optional[Tensor]] | None = None
        self._refresh_scale_flags()
        self.last_nonfinite: list[str] = []

    # Attributes written every step. They are plain tensors / Python values, never parameters
    # or submodules, so they bypass nn.Module.__setattr__ bookkeeping, which would otherwise
    # cost more than the engine's arithmetic per step.
    _PLAIN_STATE = frozenset({"_pending", "iteration", "last_nonfinite",
                              "_coefficients", "_grad_records", "_second_weights", "_initial_loss",
                              "_initial_count", "_scale_warming", "_all_seen", "_recent_scale", "_first_weights",
                              "_reference_loss",
                              "_last_batch"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in LossEngine._PLAIN_STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ grouping state
    def _labels_from_sets(self, sets: list[list[str]]) -> np.ndarray:
        flat = [name for task_set in sets for name in task_set]
        if sorted(flat) != sorted(self.task_names) or len(sets) < 1 or any(len(s) == 0 for s in sets):
            raise ValueError(f"LossEngineConfig.fixed_sets: every task exactly once in non-empty sets; "
                             f"got {sets} for tasks {self.task_names}")
        index = {name: j for j, task_set in enumerate(sets) for name in task_set}
        return np.array([index[name] for name in self.task_names])

    def _set_labels(self, labels: np.ndarray, second_weights: Tensor) -> None:
        """Install set labels [T] and second weights [N]; rebuild the first-weight matrix [N, T]."""
        self._labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        num_sets = int(self._labels.max()) + 1
        onehot = torch.zeros(num_sets, len(self.task_names))
        onehot[self._labels, torch.arange(len(self.task_names))] = 1.0
        prior = onehot * self._prior.cpu()
        if self.cfg.first_weighting == "normalise":
            # mean first weight 1 inside every set: grouping alone does not reweight tasks by set size
            prior = prior * onehot.sum(1, keepdim=True) / prior.sum(1, keepdim=True).clamp(min=1e-30)
        device = self._initial_loss.device
        self._first_weights = prior.to(device)                  # [N, T] a_i in row of its set
        self._second_weights = second_weights.to(device, torch.float32)
        self._coefficients: Tensor | None = None

    @property
    def task_sets(self) -> list[list[str]]:
        """Current task sets, in set order (each a list of task names in task order)."""
        labels = self._labels.tolist()
        return [[n for n, lab in zip(self.task_names, labels) if lab == j] for j in range(max(labels) + 1)]

    @property
    def second_weights(self) -> Tensor:
        """Second weights [N] (positive, sum N)."""
        return self._second_weights

    @property
    def first_weights(self) -> dict[str, float]:
        """First weight a_i of each task inside its set (before division by the loss scale)."""
        return {n: float(self._first_weights[:, i].sum()) for i, n in enumerate(self.task_names)}

    def _scale(self, raw: Tensor | None = None) -> Tensor:
        """Per-task divisor [T]: the initial loss (normalise) or 1 (fixed)."""
        if self.cfg.first_weighting == "fixed":
            return torch.ones_like(self._initial_loss)
        known = self._initial_count > 0
        scale = self._initial_loss if self._recent_scale is None else self._recent_scale
        if raw is None:
            return torch.where(known, scale, torch.ones_like(scale))
        # Before a task has been seen, its own current (finite, positive) value is its scale.
        fallback = torch.where(torch.isfinite(raw) & (raw > 0), raw, torch.ones_like(raw))
        return torch.where(known, scale, fallback)

    def _refresh_recent_scale(self, ordered: Tensor) -> None:
        """loss_scale='recent': s_i = mean observed loss over the last lag window (kept if none)."""
        mean = window_mean(ordered, self.cfg.lag_window_steps)
        previous = self._initial_loss if self._recent_scale is None else self._recent_scale
        self._recent_scale = torch.where(torch.isfinite(mean) & (self._initial_count > 0), mean, previous)

    def _to_device(self, device: torch.device) -> None:
        # _labels and _prior stay on the CPU (only used when regrouping / logging).
        for name in ("_initial_loss", "_initial_count", "_first_weights", "_second_weights"):
            setattr(self, name, getattr(self, name).to(device))
        self._history = collections.deque((row.to(device) for row in self._history), maxlen=self.cfg.history_length)
        if self._recent_scale is not None:
            self._recent_scale = self._recent_scale.to(device)
        if self._reference_loss is not None:
            self._reference_loss = self._reference_loss.to(device)
        self._coefficients = None

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
        if losses.keys() != self._name_set:
            missing = sorted(self._name_set - set(losses))
            extra = sorted(set(losses) - self._name_set)
            raise KeyError(f"LossEngine: losses must have exactly the task names; missing {missing}, unknown {extra}")
        num_tasks = len(self.task_names)
        stacked = torch.stack([losses[name] for name in self.task_names])                # [T]
        if stacked.dim() != 1:
            if stacked.numel() != num_tasks:
                raise ValueError(f"LossEngine: every loss must be a scalar tensor, got shape {tuple(stacked.shape)} "
                                 f"for the stacked losses of {num_tasks} tasks")
            stacked = stacked.reshape(num_tasks)
        if stacked.device != self._initial_loss.device:
            self._to_device(stacked.device)
        raw = stacked.detach()
        effective = getattr(self.condition, "effective_weights", None)
        if effective is None and self._all_seen:
            # Fast path (every step after the first observations): one dot product with the
            # cached per-task coefficients w_set(i) * a_i / s_i (positive and finite, so the
            # total is finite exactly when every task loss is: one check, one sync per step).
            if self._coefficients is None or self._coefficients.dtype != stacked.dtype:
                self._coefficients = self._task_coefficients().to(stacked.dtype)
            total = torch.dot(self._coefficients, stacked)
            all_finite = math.isfinite(total.item())  # one sync, ~20x cheaper on CPU than bool(isfinite())
            if all_finite:
                self._after_forward(raw, True, losses, per_sample, shared_features)
                return total
        all_finite = bool(torch.isfinite(raw).all())
        safe = stacked
        if not all_finite:
            # Rare path: detach the non-finite tasks entirely so no NaN reaches any gradient
            # (a masked-to-zero term would still give 0 * NaN = NaN inside the task's graph).
            ok = torch.isfinite(raw).tolist()
            safe = torch.stack([losses[n].reshape(()) if ok[i] else torch.zeros((), dtype=stacked.dtype,
                                device=stacked.device) for i, n in enumerate(self.task_names)])
        first_losses = self._first_weights.to(safe.dtype) @ (safe / self._scale(raw.float()).to(safe.dtype))  # [N]
        weights = self._second_weights
        if effective is not None:
            weights = effective(weights, first_losses.detach().float())
        total = (weights.to(safe.dtype) * first_losses).sum()
        if stacked.requires_grad and not total.requires_grad:
            # No finite task carries a gradient: the non-finite raw sum tells the caller to skip the step.
            total = stacked.sum()
        self._after_forward(raw, all_finite, losses, per_sample, shared_features)
        return total

    def _after_forward(self, raw: Tensor, all_finite: bool, losses: Mapping[str, Tensor],
                       per_sample: Mapping[str, Tensor] | None, shared_features: Tensor | None) -> None:
        """Record what step() needs: raw losses [T] and, in measurement windows, affinity data
        (per-sample losses [B, T], gradient cosines [T, T])."""
        samples = cosine = None
        if self._recording():
            if per_sample and self._samples_survive():
                samples = self._stack_per_sample(per_sample)
            if (self.cfg.affinity != "loss_corr" and shared_features is not None
                    and self._grad_records % self.cfg.grad_affinity_every == 0):
                cosine = aff.gradient_cosine([losses[n] for n in self.task_names], shared_features).double()
        self._pending = (raw, all_finite, samples, cosine)

    def _task_coefficients(self) -> Tensor:
        """Per-task coefficient [T] of the second loss: w_set(i) * a_i / s_i."""
        per_set = self._second_weights[self._labels.to(self._second_weights.device)]
        return per_set * self._first_weights.sum(0) / self._scale()

    def _recording(self) -> bool:
        """Whether this step's per-sample losses/gradients feed the next grouping."""
        if self.cfg.fixed_sets is not None or self.cfg.grouping != "cluster":
            return False
        if self.iteration < self.cfg.warmup_steps:
            return self.iteration >= self.cfg.warmup_steps - self.cfg.affinity_steps
        if self.cfg.regroup_every == 0:
            return False
        steps_to_regroup = self.cfg.regroup_every - (self.iteration - self.cfg.warmup_steps) % self.cfg.regroup_every
        return steps_to_regroup <= self.cfg.affinity_steps

    def _samples_survive(self) -> bool:
        """Whether this step's per-sample losses will still be in the buffer at the next grouping.

        The buffer keeps the newest ``affinity_capacity`` samples, so with batch B only the last
        ``capacity // B`` recorded steps count; stacking and copying earlier ones is wasted time
        (a large share of the engine's cost on small models). B is the last recorded batch size.
        """
        if self._last_batch == 0:
            return True
        if self.iteration < self.cfg.warmup_steps:
            steps_left = self.cfg.warmup_steps - self.iteration
        else:
            steps_left = self.cfg.regroup_every - (self.iteration - self.cfg.warmup_steps) % self.cfg.regroup_every
        return steps_left * self._last_batch <= self.cfg.affinity_capacity

    def _stack_per_sample(self, per_sample: Mapping[str, Tensor]) -> Tensor | None:
        """[B, T] per-sample losses (NaN for tasks not given); B from the first vector given."""
        if len(per_sample) == len(self.task_names):
            try:  # common case: every task gave a [B] vector
                return torch.stack([per_sample[n].reshape(-1) for n in self.task_names], 1).detach().float().cpu()
            except (RuntimeError, KeyError):
                pass  # unequal lengths or other names: the checked path below explains
        batch = None
        columns = []
        for name in self.task_names:
            vector = per_sample.get(name)
            if vector is not None:
                vector = vector.detach().reshape(-1).float()
                batch = vector.numel() if batch is None else batch
                if vector.numel() != batch:
                    raise ValueError(f"LossEngine: per_sample[{name!r}] has {vector.numel()} entries, "
                                     f"expected {batch} like the other tasks (one per sample)")
            columns.append(vector)
        if batch is None or batch < 2:
            return None
        nan = torch.full((batch,), float("nan"))
        return torch.stack([c.cpu() if c is not None else nan for c in columns], 1)

    # ------------------------------------------------------------------ second process
    def step(self) -> None:
        """Call after each optimiser step: update statistics, run the condition every k steps,
        regroup after warm-up and every ``regroup_every`` steps.

        No ``torch.no_grad`` around the whole call: on most steps it only files the detached
        losses, and the decorator alone cost a noticeable share of that on small models; the
        two periodic processes below enter it themselves."""
        if not self.cfg.enabled:
            self.iteration += 1
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            raw, all_finite, samples, cosine = pending
            cosine_sums = None if cosine is None else self._known_sums(cosine)
            if self._distributed():
                raw = self._all_reduce_mean(raw.float().clone())
                all_finite = bool(torch.isfinite(raw).all())
                samples = self._gather_rows(samples)
                if cosine_sums is not None:
                    cosine_sums = self._all_reduce_sum(cosine_sums)
            self.last_nonfinite = [] if all_finite else \
                [n for n, ok in zip(self.task_names, torch.isfinite(raw).tolist()) if not ok]
            self._update_statistics(raw, samples, cosine_sums)
        self.iteration += 1
        if self._should_group():
            with torch.no_grad():
                self._regroup()
        if (self.cfg.lag_reference == "grouping" and self._reference_loss is None
                and self.iteration >= self.cfg.warmup_steps and self._history):
            self._set_reference()  # fixed or per-task sets: balancing starts after the warm-up
        if self.iteration % self.cfg.condition_every == 0 and self._history:
            with torch.no_grad():
                self._run_condition()

    def _distributed(self) -> bool:
        return (self.cfg.sync_distributed and torch.distributed.is_available()
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)

    @staticmethod
    def _all_reduce_mean(values: Tensor) -> Tensor:
        """Mean over ranks (NaN/inf propagate: a task non-finite on any rank is skipped everywhere)."""
        torch.distributed.all_reduce(values)
        return values / torch.distributed.get_world_size()

    def _all_reduce_sum(self, values: Tensor) -> Tensor:
        """Sum over ranks of a CPU tensor (through the training device, which NCCL needs)."""
        values = values.to(self._initial_loss.device)
        torch.distributed.all_reduce(values)
        return values.cpu()

    @staticmethod
    def _known_sums(cosine: Tensor) -> Tensor:
        """[2, T, T]: the finite cosines (0 where unknown) and their count."""
        known = torch.isfinite(cosine)
        return torch.stack([torch.where(known, cosine, torch.zeros_like(cosine)), known.double()])

    def _gather_rows(self, rows: Tensor | None) -> Tensor | None:
        """Every rank's per-sample losses [B_r, T] stacked in rank order [sum_r B_r, T] (None if none).

        The per-sample buffer then holds the global batch on every rank, as one process would, so the
        engine's state (and a checkpoint of rank 0's) is the same on every rank: exact DDP resume."""
        device, world = self._initial_loss.device, torch.distributed.get_world_size()
        count = torch.tensor([0 if rows is None else rows.shape[0]], device=device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        torch.distributed.all_gather(counts, count)
        counts = [int(c) for c in counts]
        if max(counts) == 0:
            return None
        padded = torch.full((max(counts), len(self.task_names)), float("nan"), device=device)
        if rows is not None:
            padded[:rows.shape[0]] = rows.to(device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(gathered, padded)
        return torch.cat([part[:c] for part, c in zip(gathered, counts)]).cpu()

    def _update_statistics(self, raw: Tensor, samples: Tensor | None, cosine_sums: Tensor | None) -> None:
        if self._scale_warming:
            self._update_scale(raw.float())
        # The raw (detached) loss vector is kept by reference; zeros and non-finite values are
        # read back as "not observed" (NaN) by _ordered_history. No tensor op per step.
        self._history.append(raw)
        if samples is not None:
            self._samples.add(samples)
            self._last_batch = int(samples.shape[0])
        if cosine_sums is not None:
            self._grad_affinity_sum += cosine_sums[0]
            self._grad_affinity_count += cosine_sums[1]
        if self._recording_was_gradient():
            self._grad_records += 1

    def _update_scale(self, raw: Tensor) -> None:
        """Running mean of each task's first ``scale_warmup_steps`` finite, non-zero losses."""
        observed = torch.isfinite(raw) & (raw != 0)
        warming = observed & (self._initial_count < self.cfg.scale_warmup_steps)
        count = self._initial_count + warming.long()
        increment = (torch.where(warming, raw, torch.zeros_like(raw)) - self._initial_loss) / count.clamp(min=1)
        self._initial_loss = torch.where(warming, self._initial_loss + increment, self._initial_loss)
        self._initial_count = count
        self._refresh_scale_flags()

    def _refresh_scale_flags(self) -> None:
        # A task that is never observed keeps the engine on the slow path (documented edge case).
        self._scale_warming = bool((self._initial_count < self.cfg.scale_warmup_steps).any())
        self._all_seen = self.cfg.first_weighting == "fixed" or bool((self._initial_count > 0).all())
        self._coefficients = None

    def _recording_was_gradient(self) -> bool:
        return self.cfg.affinity != "loss_corr" and self._recording()

    def _ordered_history(self) -> Tensor:
        """Raw task losses [H, T], oldest first (NaN = not observed: zero or non-finite)."""
        if not self._history:
            return torch.zeros(0, len(self.task_names), device=self._initial_loss.device)
        history = torch.stack(list(self._history)).float()
        return torch.where(torch.isfinite(history) & (history != 0), history, torch.full_like(history, float("nan")))

    def first_losses_history(self, ordered: Tensor | None = None) -> Tensor:
        """First loss of every set over the kept history [H, N] (NaN where no member observed).

        A set whose members were only partly observed at a step is rescaled by the first
        weight of the observed members, so a missing task does not look like progress.
        ``ordered``: ``_ordered_history()`` when the caller already has it.
        """
        ordered = self._ordered_history() if ordered is None else ordered
        return self._aggregate_sets(ordered / self._scale())

    def _aggregate_sets(self, task_values: Tensor) -> Tensor:
        """Task values [..., T] (NaN = not observed) -> first-weighted set values [..., N].

        A set whose members were only partly observed is rescaled by the first weight of its
        observed members; a set with none observed is NaN.
        """
        observed = torch.isfinite(task_values)
        numerator = torch.where(observed, task_values, torch.zeros_like(task_values)) @ self._first_weights.T
        coverage = observed.float() @ self._first_weights.T
        full = self._first_weights.sum(1)
        return torch.where(coverage > 0, numerator / coverage.clamp(min=1e-30) * full,
                           torch.full_like(numerator, float("nan")))

    def initial_first_losses(self) -> Tensor:
        """Each set's first loss at the lag rule's start [N] (``lag_reference``: the first steps, or
        when the sets were formed), in the units of ``first_losses_history``."""
        start = self._initial_loss if self._reference_loss is None else self._reference_loss
        initial = torch.where(self._initial_count > 0, start / self._scale(),
                              torch.full_like(self._initial_loss, float("nan")))
        return self._aggregate_sets(initial)

    def _set_reference(self) -> None:
        """lag_reference='grouping': each task's mean loss over the last lag window (initial loss if none)."""
        mean = window_mean(self._ordered_history(), self.cfg.lag_window_steps)
        self._reference_loss = torch.where(torch.isfinite(mean), mean, self._initial_loss)

    def _run_condition(self) -> None:
        current = self._second_weights
        ordered = self._ordered_history()          # stacked once per call, shared by the steps below
        proposed = self.condition(self.first_losses_history(ordered), current.clone(),
                                  initial_first_losses=self.initial_first_losses(), step=self.iteration)
        self._second_weights = self._sanitise(proposed, current)
        if self.cfg.first_weight_temperature > 0 and self.cfg.first_weighting == "normalise":
            self._adapt_first_weights(ordered)
        if self.cfg.loss_scale == "recent" and self.cfg.first_weighting == "normalise":
            self._refresh_recent_scale(ordered)
        self._coefficients = None
        self._record_weights()

    def _adapt_first_weights(self, ordered: Tensor) -> None:
        """Gated lag rule inside each set: first weights follow ``prior * exp(l_i / T)`` (smoothed,
        floored, mean 1 per set) with ``l_i = g_i log r_i + (1 - g_i) * mean of l over the set``.

        ``r_i`` is the task's mean loss over the last window over its initial loss; ``g_i`` is
        its learnability (``ProgressGate`` over its recent log-loss records), so an unlearnable
        task grouped with learnable ones counts as neutral and cannot take its set's first
        weight. A task without data in the window gets its set's mean (no push either way).
        NumPy: a few numbers per task, where torch's per-op dispatch would dominate the cost.
        """
        cfg = self.cfg
        window = cfg.lag_window_steps
        mean, variance = window_statistics(to_numpy(ordered), window)
        initial = to_numpy(self._initial_loss)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_ratio = np.log(np.maximum(mean / initial, 1e-30))
        valid = np.isfinite(mean) & (self._initial_count.cpu().numpy() > 0) & np.isfinite(log_ratio)
        log_ratio = np.where(valid, log_ratio, np.nan)
        self._task_progress.update(log_ratio, variance)
        gate = self._task_progress.gate(log_ratio.size)
        membership = to_numpy(self._first_weights) > 0                       # [N, T]
        labels = self._labels.numpy()
        member_valid = membership & valid
        per_set_valid = np.maximum(member_valid.sum(1), 1)
        filled = np.where(valid, log_ratio, 0.0)
        # without evidence of learning, a task counts as neutral: its set's mean log-ratio
        neutral = (member_valid * filled).sum(1) / per_set_valid
        lag = np.where(valid, gate * filled + (1.0 - gate) * neutral[labels], 0.0)
        set_mean = (member_valid * lag).sum(1) / per_set_valid
        lag = np.where(valid, lag, set_mean[labels])
        prior = self._prior.to(torch.float64).numpy()
        logits = np.log(np.maximum(prior, 1e-30)) + lag / cfg.first_weight_temperature
        logits = logits - np.where(membership, logits, -np.inf).max(1)[labels]     # stable per-set softmax
        exp = np.exp(logits)
        share = exp / (membership * exp).sum(1)[labels]
        set_size = membership.sum(1)[labels]
        target = cfg.lag_floor + (1.0 - cfg.lag_floor) * set_size * share          # mean 1 inside the set
        current = to_numpy(self._first_weights).sum(0)
        updated = (1.0 - cfg.lag_smoothing) * current + cfg.lag_smoothing * target
        self._first_weights = torch.from_numpy(membership * updated).to(self._first_weights.device, torch.float32)

    def _sanitise(self, proposed: Any, current: Tensor) -> Tensor:
        """Positive, finite, >= weight_floor * mean, summing to N; falls back to ``current``."""
        proposed = torch.as_tensor(proposed, dtype=current.dtype, device=current.device)
        if proposed.shape != current.shape:
            raise ValueError(f"LossEngine: condition returned weights of shape {tuple(proposed.shape)}, "
                             f"expected {tuple(current.shape)} (one per task set)")
        proposed = torch.where(torch.isfinite(proposed) & (proposed > 0), proposed, current)
        num_sets = current.numel()
        total = proposed.sum()
        if not bool(torch.isfinite(total)) or float(total) <= 0:
            return current
        share = proposed / total
        floor = self.cfg.weight_floor
        return (floor + (1.0 - floor) * num_sets * share).float()

    def _record_weights(self) -> None:
        self.weight_history.append({"step": self.iteration, "weights": self._second_weights.tolist()})
        if len(self.weight_history) > self.cfg.max_weight_history:
            self.weight_history = self.weight_history[::2]

    # ------------------------------------------------------------------ regrouping
    def _should_group(self) -> bool:
        if self.cfg.fixed_sets is not None or self.cfg.grouping != "cluster":
            return False
        if self.iteration == self.cfg.warmup_steps:
            return True
        return (self.cfg.regroup_every > 0 and self.iteration > self.cfg.warmup_steps
                and (self.iteration - self.cfg.warmup_steps) % self.cfg.regroup_every == 0)

    def measure_affinity(self) -> Tensor:
        """Task affinity [T, T] in [-1, 1] from the recorded statistics (NaN = unknown).

        Falls back to the correlation of step-to-step changes of the log task losses when no
        per-sample losses or gradients were recorded.
        """
        matrices = []
        if self.cfg.affinity in ("loss_corr", "both") and self._samples.filled >= 8:
            matrices.append(self._samples.correlation())
        if self.cfg.affinity in ("grad_cos", "both") and float(self._grad_affinity_count.max()) > 0:
            mean = self._grad_affinity_sum / self._grad_affinity_count.clamp(min=1)
            mean[self._grad_affinity_count == 0] = float("nan")
            matrices.append(mean.float())
        if not matrices:
            log_history = self._ordered_history().cpu().clamp(min=1e-30).log()
            matrices.append(aff.pairwise_correlation(log_history[1:] - log_history[:-1], min_pairs=4))
        stacked = torch.stack(matrices)
        known = torch.isfinite(stacked)
        count = known.sum(0)
        mean = torch.where(known, stacked, torch.zeros_like(stacked)).sum(0) / count.clamp(min=1)
        return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))

    def _regroup(self) -> None:
        cfg = self.cfg
        affinity = self.measure_affinity()  # the same on every rank: step() shares the statistics
        self.affinity = affinity
        labels, score = aff.cluster_tasks(affinity, cfg.num_sets, cfg.min_sets, cfg.max_sets, cfg.clustering)
        old_labels = self._labels.cpu().numpy()
        event = {"step": self.iteration, "score": float(score), "accepted": False}
        if self._grouped:
            distance = aff.affinity_to_distance(affinity)
            old_score = aff.grouping_score(distance, old_labels)
            same = np.array_equal(aff.canonical_labels(labels), aff.canonical_labels(old_labels))
            if same or score < old_score + cfg.regroup_margin:
                self.grouping_score = old_score
                event.update(current_score=float(old_score))
                self.grouping_history.append(event)
                self._reset_recording()
                return
            labels = aff.align_labels(labels, old_labels)
        else:
            labels = aff.canonical_labels(labels)
        # Carry weights over: a new set gets the mean of its members' old set weights.
        per_task = self._second_weights.cpu()[torch.as_tensor(old_labels)]
        num_sets = int(labels.max()) + 1
        new_weights = torch.stack([per_task[torch.as_tensor(labels == j)].mean() for j in range(num_sets)])
        new_weights = new_weights * (num_sets / new_weights.sum())
        self._set_labels(labels, new_weights)
        self._grouped = True
        if cfg.lag_reference == "grouping":
            self._set_reference()
        self.grouping_score = float(score)
        on_regroup = getattr(self.condition, "on_regroup", None)
        if on_regroup is not None:
            on_regroup(self._second_weights.clone())
        event.update(accepted=True, sets=self.task_sets)
        self.grouping_history.append(event)
        self._reset_recording()

    def _reset_recording(self) -> None:
        """Start the next affinity measurement from fresh samples/gradients."""
        self._samples = aff.SampleLossBuffer(len(self.task_names), self.cfg.affinity_capacity)
        self._grad_affinity_sum.zero_()
        self._grad_affinity_count.zero_()
        self._grad_records = 0

    # ------------------------------------------------------------------ state, logging
    def get_extra_state(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors and Python primitives only)."""
        condition_state = self.condition.state_dict() if hasattr(self.condition, "state_dict") else {}
        return {
            "task_names": list(self.task_names),
            "iteration": self.iteration,
            "labels": self._labels.cpu().clone(),
            "second_weights": self._second_weights.cpu().clone(),
            "first_weights": self._first_weights.cpu().clone(),
            "recent_scale": None if self._recent_scale is None else self._recent_scale.cpu().clone(),
            "reference_loss": None if self._reference_loss is None else self._reference_loss.cpu().clone(),
            "task_progress": self._task_progress.state_dict(),
            "grouped": self._grouped,
            "initial_loss": self._initial_loss.cpu().clone(),
            "initial_count": self._initial_count.cpu().clone(),
            "history": torch.stack(list(self._history)).cpu().clone() if self._history
            else torch.zeros(0, len(self.task_names)),
            "samples": self._samples.state_dict(),
            "grad_affinity_sum": self._grad_affinity_sum.clone(),
            "grad_affinity_count": self._grad_affinity_count.clone(),
            "grad_records": self._grad_records,
            "last_batch": self._last_batch,
            "affinity": None if self.affinity is None else self.affinity.clone(),
            "grouping_score": self.grouping_score,
            "grouping_history": [dict(e) for e in self.grouping_history],
            "weight_history": [dict(e) for e in self.weight_history],
            "condition": condition_state,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["task_names"]) != self.task_names:
            raise ValueError(f"LossEngine.load_state_dict: checkpoint tasks {state['task_names']} "
                             f"differ from this engine's {self.task_names}")
        self.iteration = int(state["iteration"])
        self._grouped = bool(state["grouped"])
        self._initial_loss = state["initial_loss"].clone()
        self._initial_count = state["initial_count"].clone()
        self._refresh_scale_flags()
        self._set_labels(state["labels"].numpy(), state["second_weights"].clone())
        self._first_weights = state["first_weights"].clone().to(self._initial_loss.device)
        self._recent_scale = None if state["recent_scale"] is None else \
            state["recent_scale"].clone().to(self._initial_loss.device)
        reference = state.get("reference_loss")  # absent in checkpoints written before lag_reference
        self._reference_loss = None if reference is None else reference.clone().to(self._initial_loss.device)
        if "task_progress" in state:  # absent in checkpoints written before the gate existed
            self._task_progress.load_state_dict(state["task_progress"])
        device = self._initial_loss.device
        self._history = collections.deque((row.to(device) for row in state["history"].clone().unbind(0)),
                                          maxlen=self.cfg.history_length)
        self._samples.load_state_dict(state["samples"])
        self._grad_affinity_sum = state["grad_affinity_sum"].clone()
        self._grad_affinity_count = state["grad_affinity_count"].clone()
        self._grad_records = int(state["grad_records"])
        self._last_batch = int(state.get("last_batch", 0))
        self.affinity = None if state["affinity"] is None else state["affinity"].clone()
        self.grouping_score = state["grouping_score"]
        self.grouping_history = [dict(e) for e in state["grouping_history"]]
        self.weight_history = [dict(e) for e in state["weight_history"]]
        if hasattr(self.condition, "load_state_dict") and state["condition"]:
            self.condition.load_state_dict(state["condition"])
        self._pending = None

    def task_weights(self) -> dict[str, float]:
        """Effective weight on each raw task loss: w_set * a_i / s_i."""
        per_set = self._second_weights[self._labels.to(self._second_weights.device)]
        weights = per_set * self._first_weights.sum(0) / self._scale()
        return dict(zip(self.task_names, weights.tolist()))

    def log_scalars(self, writer: Any, step: int, prefix: str = "loss_engine") -> None:
        """Write second weights, each task's set index and effective weight to a SummaryWriter."""
        for j, weight in enumerate(self._second_weights.tolist()):
            writer.add_scalar(f"{prefix}/second_weight/set{j}", weight, step)
        labels = self._labels.tolist()
        for (name, weight), label in zip(self.task_weights().items(), labels):
            writer.add_scalar(f"{prefix}/set_of/{name}", label, step)
            writer.add_scalar(f"{prefix}/task_weight/{name}", weight, step)
        if self.grouping_score is not None:
            writer.add_scalar(f"{prefix}/grouping_silhouette", self.grouping_score, step)

    def summary(self) -> dict[str, Any]:
        """JSON-able record of the engine (for plots and for saving with a run)."""
        scale = self._scale().tolist()
        return {
            "enabled": self.cfg.enabled,
            "iteration": self.iteration,
            "task_names": list(self.task_names),
            "task_sets": self.task_sets,
            "first_weights": self.first_weights,
            "loss_scales": dict(zip(self.task_names, scale)),
            "second_weights": self._second_weights.tolist(),
            "task_weights": self.task_weights(),
            "affinity": None if self.affinity is None else
            [[None if not np.isfinite(v) else float(v) for v in row] for row in self.affinity.tolist()],
            "grouping_score": self.grouping_score,
            "grouping_history": [dict(e) for e in self.grouping_history],
            "weight_history": [dict(e) for e in self.weight_history],
            "config": dataclasses.asdict(self.cfg),
        }
