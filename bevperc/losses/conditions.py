"""Optimisation condition functions: the "second process" of task-set balanced training.

A condition turns the recent first-loss values of the N task sets into new second
weights (docs/methods.md, part A, step 5). The loss engine calls it every ``k`` steps::

    new_weights = condition(first_losses_history, current_weights,
                            initial_first_losses=..., step=...)

* ``first_losses_history``: float [H, N], the first loss of each set at each of the last
  H steps, oldest first, NaN where a set had no finite, non-zero loss at that step.
* ``current_weights``: float [N], the second weights in use (positive, summing to N).
* ``initial_first_losses``: float [N], each set's first loss at the start of training
  (mean over the scale warm-up; with normalised first losses, in the same units as the
  history, so only ratios of the two are meaningful).
* returns float [N]. The engine sanitises it (non-finite -> keep the old weights,
  floor, renormalise to sum N), so a plain function is a valid condition.

Weight convention (all conditions): second weights are positive and sum to N (the
simplex scaled by N), so "all weights 1" is the plain sum of the set losses.

Stateful conditions are classes with ``state_dict()`` / ``load_state_dict()`` holding only
tensors and Python primitives (checkpoints load with ``torch.load(weights_only=True)``),
and ``on_regroup(new_weights)`` which the engine calls when the task sets change.
A condition may also define ``effective_weights(weights, first_losses)`` which the engine
applies in the forward pass (FAMO needs the current loss values there).

Shipped conditions:
  * ``LagCondition`` (default): emphasise the set whose loss has improved least relative
    to its start among the sets whose loss still moves (``ProgressGate`` discounts
    unlearnable / plateaued sets).
  * anchors for comparison: ``FixedCondition`` (CenterPoint-style fixed weights),
    ``UncertaintyCondition`` (Kendall et al. 2018), ``DwaCondition`` (Liu et al. 2019),
    ``FamoCondition`` (Liu et al. 2023).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor


class OptimisationCondition(Protocol):
    """Anything callable as ``condition(history [H, N], weights [N], **context) -> [N]``."""

    def __call__(
        self, first_losses_history: Tensor, current_weights: Tensor, *, initial_first_losses: Tensor, step: int
    ) -> Tensor: ...


def _latest_finite_row(history: Tensor) -> Tensor | None:
    """The newest row [N] of ``history`` [H, N] in which every set is finite, or None."""
    if history.numel() == 0:
        return None
    row = history[-1]
    return row if bool(torch.isfinite(row).all()) else None


def window_mean(history: Tensor, window: int) -> Tensor:
    """NaN-aware mean [N] of the last ``window`` rows of ``history`` [H, N] (NaN if none)."""
    recent = history[-window:]
    finite = torch.isfinite(recent)
    count = finite.sum(0)
    total = torch.where(finite, recent, torch.zeros_like(recent)).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def window_statistics(history: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware mean [N] of the last ``window`` rows of ``history`` [H, N] and the squared
    standard error [N] of the log of that mean.

    Delta method: ``se**2 = var(values) / (count * mean**2)``, unit-free, so it compares across
    loss scales. Mean is NaN without finite values, the error NaN with fewer than two.
    NumPy on purpose: these vectors have a handful of entries, where one torch op costs
    ~10 us of dispatch and the condition would spend milliseconds per call.
    """
    recent = np.asarray(history, dtype=np.float64)[-window:]
    finite = np.isfinite(recent)
    count = finite.sum(0)
    values = np.where(finite, recent, 0.0)
    mean = values.sum(0) / np.maximum(count, 1)
    centred = np.where(finite, recent - mean, 0.0)
    variance = np.square(centred).sum(0) / np.maximum(count - 1, 1)
    se2 = variance / (np.maximum(count, 1) * np.maximum(np.square(mean), 1e-30))
    return np.where(count > 0, mean, np.nan), np.where(count >= 2, se2, np.nan)


def to_numpy(values: Tensor) -> np.ndarray:
    """Float64 NumPy copy of a (possibly GPU) tensor: condition-time math on a few numbers."""
    return values.detach().to("cpu", torch.float64).numpy()


class ProgressGate:
    """Learnability of K losses from their recent progress: a gate in [0, 1] per loss.

    Why: extra weight only helps a loss that responds to optimisation. An unlearnable loss
    (single-frame velocity, a noise target) or one that sits at its irreducible floor (soft-
    target cross-entropy, a converged task) has a flat trajectory, however much weight it is
    given; a loss-ratio lag rule alone would keep raising its weight for ever and starve the
    tasks that can still improve.

    Every call of the condition records, per loss, ``y = log(window mean / initial loss)`` and
    the squared standard error of that log mean measured inside the window. Over the last
    ``windows`` records the gate fits a least-squares slope ``b`` of ``y`` per call and its
    signal-to-noise ratio ``snr = b**2 * Sxx / mean(se**2)`` (the squared t-statistic of the
    movement), and returns the Wiener-style shrinkage ``snr / (snr + threshold)``: ~0 when
    the loss has not moved beyond its noise (a plateau), ~1 when it moves clearly. The test is
    two-sided on purpose: a loss that rises (typically after losing weight) does respond to
    the optimisation and must be able to win weight back. Logs make it invariant to the scale
    of every loss; a loss with fewer than 3 finite records gets gate 1 (no evidence yet).
    Records are float64 NumPy arrays; ``state_dict`` holds them as tensors.
    """

    def __init__(self, windows: int = 6, threshold: float = 4.0):
        if windows != 0 and windows < 3:
            raise ValueError(f"ProgressGate.windows must be 0 (off) or >= 3, got {windows}")
        if threshold < 0:
            raise ValueError(f"ProgressGate.threshold must be >= 0, got {threshold}")
        self.windows = int(windows)
        self.threshold = float(threshold)
        self.log_ratio: np.ndarray | None = None    # [M, K] records, oldest first
        self.variance: np.ndarray | None = None     # [M, K] squared standard errors of the records

    def reset(self) -> None:
        """Forget the records (the losses being tracked changed meaning, e.g. after regrouping)."""
        self.log_ratio = None
        self.variance = None

    def update(self, log_ratio: np.ndarray, variance: np.ndarray) -> None:
        """Append one record: ``log_ratio`` [K] and its squared standard error [K] (NaN = unknown)."""
        if self.windows == 0:
            return
        log_ratio = np.asarray(log_ratio, dtype=np.float64).reshape(1, -1)
        variance = np.asarray(variance, dtype=np.float64).reshape(1, -1)
        if self.log_ratio is None or self.log_ratio.shape[1] != log_ratio.shape[1]:
            self.log_ratio, self.variance = log_ratio, variance
            return
        self.log_ratio = np.concatenate([self.log_ratio, log_ratio])[-self.windows:]
        self.variance = np.concatenate([self.variance, variance])[-self.windows:]

    def gate(self, num: int) -> np.ndarray:
        """Gate [num] in [0, 1] (all ones without enough records or when switched off)."""
        if self.windows == 0 or self.log_ratio is None or self.log_ratio.shape[1] != num:
            return np.ones(num)
        y = self.log_ratio
        finite = np.isfinite(y)
        count = finite.sum(0)
        x = np.broadcast_to(np.arange(y.shape[0], dtype=np.float64)[:, None], y.shape)
        x_mean = np.where(finite, x, 0.0).sum(0) / np.maximum(count, 1)
        y_mean = np.where(finite, y, 0.0).sum(0) / np.maximum(count, 1)
        dx = np.where(finite, x - x_mean, 0.0)
        sxx = np.square(dx).sum(0)
        slope = (dx * np.where(finite, y - y_mean, 0.0)).sum(0) / np.maximum(sxx, 1e-30)
        known = np.isfinite(self.variance) & finite
        noise = np.where(known, self.variance, 0.0).sum(0) / np.maximum(known.sum(0), 1)
        snr = np.square(slope) * sxx / np.maximum(noise, 1e-30)
        gate = snr / (snr + self.threshold) if self.threshold > 0 else (snr > 0).astype(np.float64)
        return np.where(count >= 3, gate, 1.0)

    def state_dict(self) -> dict[str, Any]:
        def tensor(array: np.ndarray | None) -> Tensor | None:
            return None if array is None else torch.from_numpy(array.copy())
        return {"log_ratio": tensor(self.log_ratio), "variance": tensor(self.variance)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def array(value: Tensor | None) -> np.ndarray | None:
            return None if value is None else value.detach().to("cpu", torch.float64).numpy().copy()
        self.log_ratio = array(state["log_ratio"])
        self.variance = array(state["variance"])


class LagCondition:
    """Default condition: no task set that can still learn may lag behind.

    Every call computes each set's loss ratio ``r_j = mean(L_j over the last window) / L_j(0)``
    (how much of its starting loss is left) and a learnability gate ``g_j`` in [0, 1] from
    the set's recent progress (``ProgressGate``: ~0 when the set's loss has not moved beyond
    its noise over the last ``progress_windows`` calls, ~1 when it clearly moves). The lag
    log-ratio is pulled towards the neutral level (the mean log-ratio of the sets) by the
    missing evidence: ``l_j = g_j log r_j + (1 - g_j) mean_k log r_k``, and the target weights
    are ``N * softmax(l / temperature)``. With every gate 1 that is ``r_j ** (1/temperature)``:
    the set that improved least relative to its start gets the most weight. A set whose loss
    does not move (unlearnable like single-frame velocity, or at its irreducible floor) is
    treated as neither ahead nor behind: it keeps about the mean weight and cannot keep
    gaining weight, which goes to the lagging sets that still learn. Ratios, log-progress
    and its noise are all invariant to the raw loss scale of every task. The target is mixed
    into the current weights with ``smoothing`` (EMA, so weights move gradually) and floored
    at ``floor``.

    With gate 1 and temperature 1, ``sum_j w_j L_j`` with w proportional to ``L_j / L_j(0)`` has
    the gradient of ``sum_j (L_j / L_j(0))**2 / 2``: the worst ratio is pushed hardest; a
    smaller temperature moves towards a minimax of the ratios.
    Sets without finite data in the window keep their share of the weight. The progress
    records are state (``state_dict``) and are reset when the task sets change.
    """

    def __init__(self, temperature: float = 0.33, smoothing: float = 0.5, floor: float = 0.1, window: int = 10,
                 progress_windows: int = 6, progress_threshold: float = 4.0):
        if temperature <= 0:
            raise ValueError(f"LagCondition.temperature must be > 0, got {temperature}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"LagCondition.smoothing must be in (0, 1], got {smoothing}")
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"LagCondition.floor must be in [0, 1), got {floor}")
        self.temperature = temperature
        self.smoothing = smoothing
        self.floor = floor
        self.window = max(1, int(window))
        self.progress = ProgressGate(progress_windows, progress_threshold)

    def on_regroup(self, new_weights: Tensor) -> None:
        self.progress.reset()

    def __call__(
        self, first_losses_history: Tensor, current_weights: Tensor, *, initial_first_losses: Tensor, step: int
    ) -> Tensor:
        recent, variance = window_statistics(to_numpy(first_losses_history), self.window)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = recent / to_numpy(initial_first_losses)
        valid = np.isfinite(ratio) & (ratio > 0)
        log_ratio = np.where(valid, np.log(np.where(valid, ratio, 1.0)), np.nan)
        self.progress.update(log_ratio, variance)
        if not valid.any():
            return current_weights
        gate = self.progress.gate(ratio.size)
        log_lag = gate * log_ratio + (1.0 - gate) * log_ratio[valid].mean()
        logits = log_lag[valid] / self.temperature
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        # Sets without data keep their current weight; the others share the remaining mass.
        weights = to_numpy(current_weights)
        target = weights.copy()
        num_valid = int(valid.sum())
        target[valid] = (self.floor + (1.0 - self.floor) * num_valid * probabilities) * weights[valid].sum() / num_valid
        mixed = (1.0 - self.smoothing) * weights + self.smoothing * target
        return torch.from_numpy(mixed).to(current_weights.device, current_weights.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self.progress.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "progress" in state:
            self.progress.load_state_dict(state["progress"])


class FixedCondition:
    """Fixed second weights (CenterPoint-style hand-tuned weighting): never changes them."""

    def __call__(
        self, first_losses_history: Tensor, current_weights: Tensor, *, initial_first_losses: Tensor, step: int
    ) -> Tensor:
        return current_weights


def _adam_update(
    param: Tensor, grad: Tensor, state: dict[str, Any], lr: float, weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
) -> Tensor:
    """One step of torch.optim.Adam (L2 ``weight_decay`` added to the gradient), functional.

    Kept functional so the optimiser state is plain tensors in ``state`` (checkpoint-safe,
    follows the device of ``param``).
    """
    grad = grad + weight_decay * param
    step = state.get("step", 0) + 1
    exp_avg = state.get("exp_avg", torch.zeros_like(param)).mul(betas[0]).add(grad, alpha=1 - betas[0])
    exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(param)).mul(betas[1]).addcmul(grad, grad, value=1 - betas[1])
    bias1 = 1 - betas[0] ** step
    bias2 = 1 - betas[1] ** step
    denom = (exp_avg_sq / bias2).sqrt().add(eps)
    state.update(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    return param - lr * (exp_avg / bias1) / denom


class UncertaintyCondition:
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    The published objective is ``sum_j exp(-s_j) L_j + s_j`` with learned log-variances
    ``s_j`` optimised jointly with the model. Its gradient w.r.t. ``s_j`` is
    ``1 - exp(-s_j) L_j`` and depends only on the (detached) loss value, so updating ``s``
    with Adam from the newest first losses after each model step (call every step,
    ``condition_every=1``) is the same optimisation as putting ``s`` into the model's
    optimiser. The model sees weights ``exp(-s_j)``; the engine reports them normalised to
    sum N (ratios exactly as published; the overall factor is dropped, which an
    adaptive optimiser like Adam largely ignores).
    """

    def __init__(self, lr: float = 1e-2):
        self.lr = lr
        self.log_variance: Tensor | None = None
        self.adam: dict[str, Any] = {}

    def on_regroup(self, new_weights: Tensor) -> None:
        self.log_variance = -(new_weights / new_weights.sum()).log()
        self.adam = {}

    def __call__(
        self, first_losses_history: Tensor, current_weights: Tensor, *, initial_first_losses: Tensor, step: int
    ) -> Tensor:
        if self.log_variance is None or self.log_variance.numel() != current_weights.numel():
            self.log_variance = torch.zeros_like(current_weights)
            self.adam = {}
        losses = _latest_finite_row(first_losses_history)
        if losses is not None:
            grad = 1.0 - torch.exp(-self.log_variance) * losses
            self.log_variance = _adam_update(self.log_variance, grad, self.adam, self.lr)
        precision = torch.exp(-self.log_variance)
        return precision * (current_weights.numel() / precision.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"log_variance": self.log_variance, "adam": dict(self.adam)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_variance = state["log_variance"]
        self.adam = dict(state["adam"])


class DwaCondition:
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    Called once per "epoch" of ``period`` steps: with ``A_j(t)`` the mean first loss of set j
    over the last period, ``r_j = A_j(t) / A_j(t-1)`` and
    ``w = N * softmax(r / temperature)`` (temperature 2 as published); weights are 1 until
    two periods have been seen.
    """

    def __init__(self, temperature: float = 2.0, period: int = 50):
        self.temperature = temperature
        self.period = max(1, int(period))
        self.previous_mean: Tensor | None = None

    def on_regroup(self, new_weights: Tensor) -> None:
        self.previous_mean = None

    def __call__(
        self, first_losses_history: Tensor, current_weights: Tensor, *, initial_first_losses: Tensor, step: int
    ) -> Tensor:
        mean = window_mean(first_losses_history, self.period)
        previous, self.previous_mean = self.previous_mean, mean
        if previous is None or previous.numel() != mean.numel():
            return torch.ones_like(current_weights)
        ratio = mean / previous
        if not bool(torch.isfinite(ratio).all()):
            return current_weights
        return current_weights.numel() * torch.softmax(ratio / self.temperature, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"previous_mean": self.previous_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous_mean = state["previous_mean"]


class FamoCondition:
    """Fast Adaptive Multitask Optimization (Liu, Liang, Chen & Liu, NeurIPS 2023).

    Keeps task logits ``xi`` with ``z = softmax(xi)``. The model is trained on
    ``sum_j z_j log L_j / c`` with ``c = sum_j z_j / L_j`` (detached), whose gradient is
    ``sum_j (z_j / (c L_j)) grad L_j``: ``effective_weights`` applies these weights (they sum
    to one; scaled here to sum N) to the current first losses in the forward pass.
    After each model step the logits are updated by Adam (lr 0.025, weight decay
    gamma 0.01, the published defaults) with gradient ``J_softmax(xi)^T delta`` where
    ``delta_j = log L_j(t-1) - log L_j(t)`` is the log-loss decrease. As in common
    practice we use the next mini-batch's loss for ``L(t)`` instead of an extra forward
    pass on the same batch; the engine therefore calls it every step (``condition_every=1``).
    ``second_weights`` stores ``N * z``.
    """

    def __init__(self, lr: float = 0.025, gamma: float = 0.01, eps: float = 1e-8):
        self.lr = lr
        self.gamma = gamma
        self.eps = eps
        self.logits: Tensor | None = None
        self.adam: dict[str, Any] = {}

    def on_regroup(self, new_weights: Tensor) -> None:
        self.logits = (new_weights / new_weights.sum()).log()
        self.adam = {}

    def effective_weights(self, weights: Tensor, first_losses: Tensor) -> Tensor:
        """Weights [N] for the forward pass from ``weights`` (N * z) and detached first losses [N]."""
        inverse = weights / (first_losses.clamp(min=0) + self.eps)
        return inverse * (weights.numel() / inverse.sum())

    def __call__(
        self, first_losses_history: Tensor, current_weights: Tensor, *, initial_first_losses: Tensor, step: int
    ) -> Tensor:
        if self.logits is None or self.logits.numel() != current_weights.numel():
            self.logits = torch.zeros_like(current_weights)
            self.adam = {}
        if first_losses_history.shape[0] >= 2:
            previous, current = first_losses_history[-2], first_losses_history[-1]
            delta = (previous + self.eps).log() - (current + self.eps).log()
            if bool(torch.isfinite(delta).all()):
                z = torch.softmax(self.logits, 0)
                # J_softmax^T delta = z * (delta - <z, delta>)
                grad = z * (delta - (z * delta).sum())
                self.logits = _adam_update(self.logits, grad, self.adam, self.lr, weight_decay=self.gamma)
        return current_weights.numel() * torch.softmax(self.logits, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"logits": self.logits, "adam": dict(self.adam)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.logits = state["logits"]
        self.adam = dict(state["adam"])
