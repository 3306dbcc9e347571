"""Exponential moving average (EMA) of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """A frozen copy of a model whose floating-point weights track an EMA of the live ones.

    After each applied optimizer step: ``ema = d * ema + (1 - d) * weights`` with the
    warmed-up decay ``d = min(decay, (1 + n) / (10 + n))`` (``n`` = updates so far), so early
    averages are not dominated by the random initialisation. Integer buffers (e.g.
    BatchNorm's ``num_batches_tracked``) are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model`` (the unwrapped, non-DDP module)."""
        decay = self.current_decay()
        live = model.state_dict()
        for name, averaged in self.module.state_dict().items():
            current = live[name].detach()
            if averaged.dtype.is_floating_point:
                averaged.mul_(decay).add_(current.to(averaged.dtype), alpha=1.0 - decay)
            else:
                averaged.copy_(current)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
