"""Configuration of the loss engine (``loss:`` in the run config): its choices and their checks.

The method each field belongs to is described in :mod:`bevperc.losses.engine` and docs/methods.md, part A.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from bevperc.utils.config import check_literal_fields


@dataclass
class LossEngineConfig:
    """Configuration of the loss engine (the method: :mod:`bevperc.losses.engine`)."""

    enabled: bool = True
    """False: return the fixed weighted sum in task order (plain fixed-weight training)."""
    fixed_weights: dict[str, float] = field(default_factory=dict)
    """Per-task weights (default 1.0). Disabled: the weights of the sum. Enabled: the first weights
    (first_weighting='fixed'), or their priors (normalised inside each set, 'normalise')."""

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
    affinity_memory: Literal["window", "cumulative"] = "cumulative"
    """The affinity a (re)grouping clusters: 'cumulative' (default: the mean of every window's affinity
    so far: the evidence adds up over training, so weakly structured tasks settle into stable sets
    instead of being regrouped on each window's noise) or 'window' (measured in the last affinity
    window only)."""
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
    first_weighting: Literal["normalise", "fixed", "fixed_lag"] = "fixed"
    """'fixed' (default): raw losses times fixed_weights, so with all second weights 1 the engine's loss
    is the tuned fixed-weight sum and the condition only corrects it; 'fixed_lag': the same raw losses,
    with first weights that start at fixed_weights and follow the gated lag rule inside each set (each
    set's total first weight kept, so the rule only shifts pull between the set's tasks); 'normalise':
    divide each task by its loss scale (scale-invariant sets, for tasks without tuned weights). Why:
    docs/methods.md, part A."""
    scale_warmup_steps: int = 10
    """Finite non-zero values averaged into each task's initial loss."""
    loss_scale: Literal["initial", "recent"] = "recent"
    """Divisor s_i of the normalised first losses: 'initial' (the task's initial loss) or
    'recent' (its mean loss over the last lag window, refreshed every k steps by the second
    process, like a log-loss: every task keeps relative pressure as it converges)."""
    first_weight_temperature: float = 0.25
    """> 0 (default 0.25): with first_weighting 'normalise' or 'fixed_lag' the second process also moves
    the first weights inside each set towards ``prior_i * r_i ** (1 / first_weight_temperature)`` with
    r_i the task's loss ratio (the lag rule inside the set, same smoothing and floor; 'normalise' from
    the initial loss, 'fixed_lag' from the lag_reference start); 0: first weights stay fixed.
    Ignored with first_weighting='fixed'."""

    # --- second loss / optimisation condition ---------------------------------------
    condition: Literal["lag", "fixed", "uncertainty", "dwa", "famo"] = "lag"
    """'lag' (default), 'fixed', 'uncertainty', 'dwa', 'famo' (or pass condition= to LossEngine)."""
    condition_every: int = 10
    """k: the condition runs every k engine steps."""
    history_length: int = 100
    """Steps of first-loss history handed to the condition."""
    lag_temperature: float = 1.0
    lag_smoothing: float = 0.5
    lag_floor: float = 0.1
    lag_window: int = 0
    """Steps averaged for the loss ratio; 0 = condition_every."""
    lag_reference: Literal["initial", "grouping", "first_grouping"] = "first_grouping"
    """The "start" of the lag rule's ratio L/L0 (second weights): 'initial' (each task's loss over
    the first scale_warmup_steps), 'grouping' (its mean loss over the lag window when the current
    task sets were formed: the first grouping, every accepted regrouping; with fixed sets, at
    warmup_steps) or 'first_grouping' (default: that mean at the first grouping, kept over regroupings:
    a set's start is the sum of its tasks' starts, so a regrouping does not reset the lag). When to use which:
    docs/loss_engine.md."""
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

