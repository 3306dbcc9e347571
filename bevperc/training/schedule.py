"""The optimizer (:func:`build_optimizer`, AdamW) and its learning-rate schedules, stepped once per iteration.

* ``cosine``: linear warm-up from ``lr * warmup_ratio`` to ``lr`` over ``warmup_iters``, then
  cosine annealing to ``lr * min_lr_ratio`` at the last iteration.
* ``step``: the same warm-up, then ``lr * step_gamma ** k`` after the k-th milestone
  (milestones are fractions of the total iterations).
* ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR`` (cosine up from
  ``lr / onecycle_div_factor`` over ``warmup_iters``, cosine down to
  ``lr / (onecycle_div_factor * onecycle_final_div_factor)``), without momentum cycling.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from bevperc.training.config import TrainConfig


def build_optimizer(cfg: TrainConfig, model_params: list[nn.Parameter], extra_parameters: list[nn.Parameter],
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model_params`` (``cfg.weight_decay``) and, as a second group without weight decay,
    ``extra_parameters`` (e.g. the loss engine's); a ValueError when an extra parameter also belongs to the
    model or is not on the training ``device``."""
    overlap = {id(p) for p in model_params} & {id(p) for p in extra_parameters}
    if overlap:
        raise ValueError(f"extra_parameters: {len(overlap)} parameter(s) also belong to the model; "
                         f"pass only parameters outside it (e.g. the loss engine's)")
    for param in extra_parameters:
        if param.device != device:
            raise ValueError(f"extra_parameters: a parameter is on {param.device}, training runs on "
                             f"{device}; pass its owner module in extra_state so it is moved")
    groups = [{"params": model_params, "weight_decay": cfg.weight_decay}]
    if extra_parameters:
        groups.append({"params": extra_parameters, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(cfg: TrainConfig, iteration: int, total_iters: int) -> float:
    """Multiplier of ``cfg.lr`` at 0-based ``iteration`` for the ``cosine`` and ``step`` schedules."""
    if cfg.schedule not in ("cosine", "step"):
        raise ValueError(f"lr_factor covers 'cosine' and 'step'; got schedule {cfg.schedule!r}")
    warmup = min(cfg.warmup_iters, total_iters)
    if iteration < warmup:
        return cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * iteration / warmup
    if cfg.schedule == "cosine":
        span = max(total_iters - 1 - warmup, 1)
        progress = min(max((iteration - warmup) / span, 0.0), 1.0)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(1 for fraction in cfg.step_milestones if iteration >= round(fraction * total_iters))
    return cfg.step_gamma ** passed


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_iters: int) -> LRScheduler:
    """The scheduler for ``cfg.schedule``; its state_dict holds only numbers (checkpoint-safe).

    ``optimizer``'s param groups must already hold their peak learning rates.
    """
    if total_iters < 1:
        raise ValueError(f"build_scheduler: total_iters must be >= 1, got {total_iters}")
    if cfg.schedule == "onecycle":
        if total_iters < 3:  # no room for a cycle: hold the peak rate
            return LambdaLR(optimizer, lambda iteration: 1.0)
        # OneCycleLR divides by the length of each phase, so both need at least one step:
        # the rising phase spans >= 2 iterations and leaves >= 1 for annealing (a warm-up
        # as long as a short run would otherwise divide by zero).
        pct_start = min(max(cfg.warmup_iters, 2), total_iters - 1) / total_iters
        return OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
                          total_steps=total_iters, pct_start=pct_start, anneal_strategy="cos",
                          cycle_momentum=False, div_factor=cfg.onecycle_div_factor,
                          final_div_factor=cfg.onecycle_final_div_factor)
    return LambdaLR(optimizer, lambda iteration: lr_factor(cfg, iteration, total_iters))
