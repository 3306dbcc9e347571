"""Untrained BEV detectors with realistic activations, for export tests and benchmarks.

A freshly built detector's head maps are nearly constant (default conv init shrinks the signal
layer after layer; heatmap std ~1e-4), so comparing two runtimes on it would prove little and
decoded boxes would be near-ties. ``calibrate_batchnorm`` sets every BatchNorm's running
statistics to those of real batches, as training does: each BN then outputs unit-scale
activations and the head maps vary by O(1) across the grid.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: list[dict]) -> nn.Module:
    """Running mean/var of every BatchNorm := the exact average over ``batches`` (train-mode forwards).

    Returns ``model.eval()``.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    for batch in batches:
        model(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()
