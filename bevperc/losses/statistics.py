"""Per-task loss statistics of the loss engine: initial losses, loss history, loss scales, lag reference.

Every vector is [T] (one entry per task, in task order) on the training device. The raw detached loss
vector of each step is kept by reference (no tensor op per step); zeros and non-finite values are read
back as NaN, "not observed", so a step without targets or with a NaN loss cannot move a statistic.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch import Tensor

from bevperc.losses.conditions import window_mean
from bevperc.losses.config import LossEngineConfig


class TaskStatistics:
    """What the engine knows about each task's loss values.

    * ``initial_loss`` [T]: mean of the task's first ``scale_warmup_steps`` finite non-zero losses
      (``initial_count`` [T] of them seen so far);
    * ``history``: the raw loss vectors [T] of the last ``history_length`` steps;
    * ``recent_scale`` [T] (``loss_scale='recent'``): mean loss over the last lag window, refreshed by
      the second process; ``reference_loss`` [T] (``lag_reference='grouping'``): the lag rule's start.
    """

    def __init__(self, num_tasks: int, cfg: LossEngineConfig):
        self.cfg = cfg
        self.num_tasks = num_tasks
        self.initial_loss = torch.zeros(num_tasks)
        self.initial_count = torch.zeros(num_tasks, dtype=torch.long)
        self.recent_scale: Tensor | None = None
        self.reference_loss: Tensor | None = None
        self.history: collections.deque[Tensor] = collections.deque(maxlen=cfg.history_length)
        self._refresh_flags()

    @property
    def device(self) -> torch.device:
        return self.initial_loss.device

    def _refresh_flags(self) -> None:
        # A task that is never observed keeps the engine on the slow path (documented edge case).
        self.warming = bool((self.initial_count < self.cfg.scale_warmup_steps).any())
        self.all_seen = self.cfg.first_weighting != "normalise" or bool((self.initial_count > 0).all())

    def record(self, raw: Tensor) -> bool:
        """File one step's raw losses [T]; True when the loss scales may have changed (scale warm-up)."""
        warming = self.warming
        if warming:
            self._update_initial(raw.float())
        self.history.append(raw)
        return warming

    def _update_initial(self, raw: Tensor) -> None:
        """Running mean of each task's first ``scale_warmup_steps`` finite, non-zero losses."""
        observed = torch.isfinite(raw) & (raw != 0)
        warming = observed & (self.initial_count < self.cfg.scale_warmup_steps)
        count = self.initial_count + warming.long()
        increment = (torch.where(warming, raw, torch.zeros_like(raw)) - self.initial_loss) / count.clamp(min=1)
        self.initial_loss = torch.where(warming, self.initial_loss + increment, self.initial_loss)
        self.initial_count = count
        self._refresh_flags()

    def ordered_history(self) -> Tensor:
        """Raw task losses [H, T], oldest first (NaN = not observed: zero or non-finite)."""
        if not self.history:
            return torch.zeros(0, self.num_tasks, device=self.device)
        history = torch.stack(list(self.history)).float()
        return torch.where(torch.isfinite(history) & (history != 0), history, torch.full_like(history, float("nan")))

    def scale(self, raw: Tensor | None = None) -> Tensor:
        """Per-task divisor s_i [T]: the initial or recent loss (normalise) or 1 (fixed, fixed_lag).

        ``raw`` [T]: this step's losses; a task not seen yet is then divided by its own current
        (finite, positive) value, otherwise by 1."""
        if self.cfg.first_weighting != "normalise":
            return torch.ones_like(self.initial_loss)
        known = self.initial_count > 0
        scale = self.initial_loss if self.recent_scale is None else self.recent_scale
        if raw is None:
            return torch.where(known, scale, torch.ones_like(scale))
        fallback = torch.where(torch.isfinite(raw) & (raw > 0), raw, torch.ones_like(raw))
        return torch.where(known, scale, fallback)

    def refresh_recent_scale(self, ordered: Tensor) -> None:
        """loss_scale='recent': s_i = mean observed loss over the last lag window (kept if none).

        ``ordered``: :meth:`ordered_history` [H, T]."""
        mean = window_mean(ordered, self.cfg.lag_window_steps)
        previous = self.initial_loss if self.recent_scale is None else self.recent_scale
        self.recent_scale = torch.where(torch.isfinite(mean) & (self.initial_count > 0), mean, previous)

    def set_reference(self) -> None:
        """lag_reference='grouping': each task's mean loss over the last lag window (initial loss if none)."""
        mean = window_mean(self.ordered_history(), self.cfg.lag_window_steps)
        self.reference_loss = torch.where(torch.isfinite(mean), mean, self.initial_loss)

    def normalised_start(self) -> Tensor:
        """Each task's loss at the lag rule's start over its scale [T] (NaN before it is seen)."""
        start = self.initial_loss if self.reference_loss is None else self.reference_loss
        return torch.where(self.initial_count > 0, start / self.scale(),
                           torch.full_like(self.initial_loss, float("nan")))

    def to(self, device: torch.device) -> None:
        self.initial_loss = self.initial_loss.to(device)
        self.initial_count = self.initial_count.to(device)
        self.history = collections.deque((row.to(device) for row in self.history), maxlen=self.cfg.history_length)
        if self.recent_scale is not None:
            self.recent_scale = self.recent_scale.to(device)
        if self.reference_loss is not None:
            self.reference_loss = self.reference_loss.to(device)

    def state_dict(self) -> dict[str, Any]:
        """The statistics as CPU tensors (checkpoint keys of the engine's extra state)."""
        return {
            "recent_scale": None if self.recent_scale is None else self.recent_scale.cpu().clone(),
            "reference_loss": None if self.reference_loss is None else self.reference_loss.cpu().clone(),
            "initial_loss": self.initial_loss.cpu().clone(),
            "initial_count": self.initial_count.cpu().clone(),
            "history": torch.stack(list(self.history)).cpu().clone() if self.history
            else torch.zeros(0, self.num_tasks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (on the device of the saved ``initial_loss``)."""
        self.initial_loss = state["initial_loss"].clone()
        self.initial_count = state["initial_count"].clone()
        self._refresh_flags()
        device = self.device
        self.recent_scale = None if state["recent_scale"] is None else state["recent_scale"].clone().to(device)
        reference = state.get("reference_loss")  # absent in checkpoints written before lag_reference
        self.reference_loss = None if reference is None else reference.clone().to(device)
        self.history = collections.deque((row.to(device) for row in state["history"].clone().unbind(0)),
                                         maxlen=self.cfg.history_length)
