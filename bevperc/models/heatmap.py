"""CenterNet class heatmaps, one home for the three detectors that use them: the BEV head
(``centerpoint_head``), the image head (``image_head``) and the gesture CenterNet (``gesture``).

A target heatmap holds one Gaussian peak (value 1) per object at its centre cell, merged by a
per-cell maximum; the loss is CenterNet's penalty-reduced focal loss. Where the users differ, the
difference is a parameter, each user's choice named where it is made:

* the Gaussian's extent (``reach``): the BEV and image heads cut it at its radius (CenterPoint);
  the gesture targets draw it over the whole map (tails beyond the radius are small but not 0);
* its evaluation (``compute_dtype``): float64 then cast (CenterPoint's NumPy kernel) for the heads,
  float32 for the gesture targets, so that each keeps its numbers bit for bit;
* the focal loss's log-probabilities (``clamp``): CenterPoint clamps the probabilities to
  ``[1e-4, 1 - 1e-4]`` (the loss of a cell is bounded), the gesture loss takes ``logsigmoid``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HEATMAP_INIT_BIAS = -2.19
"""Bias of a heatmap's last conv: sigmoid = 0.1, CenterNet's prior for rare positives (a sane early focal loss)."""


def gaussian_radius(length_cells: float, width_cells: float, min_overlap: float = 0.1) -> float:
    """CenterPoint/CornerNet Gaussian radius (cells) for a box of ``length x width`` cells.

    The smallest of the three CornerNet cases, kept exactly as CenterPoint writes it
    (including its known deviations) so heatmaps match the published models.
    """
    height, width = length_cells, width_cells
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    a2, b2 = 4, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def gaussian_kernel(radius: int, dtype: torch.dtype = torch.float32, device=None, reach: int | None = None,
                    compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[2 * reach + 1, 2 * reach + 1]`` Gaussian with sigma = (2 * radius + 1) / 6 and peak 1 (CenterNet).

    ``reach`` (default ``radius``): cells either side of the centre. The values are computed in
    ``compute_dtype``, then cast to ``dtype``.
    """
    sigma = (2 * radius + 1) / 6
    reach = radius if reach is None else reach
    offsets = torch.arange(-reach, reach + 1, dtype=compute_dtype)
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    return kernel.to(dtype=dtype, device=device)


def draw_gaussians(heatmaps: torch.Tensor, classes: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor,
                   radii: torch.Tensor, reach: int | None = None, compute_dtype: torch.dtype = torch.float64) -> None:
    """In place, for every object ``k``: ``heatmaps[classes[k]] = max(heatmaps[classes[k]], gaussian_kernel(radii[k])``
    centred at ``(ix[k], iy[k])``), clipped at the borders.

    Args:
        heatmaps: ``[C, ny, nx]`` contiguous; classes, ix, iy, radii: ``[K]`` int64.
        reach: cells drawn either side of a centre; None: the object's radius (CenterPoint). A centre in
            the map reaches every cell with ``max(ny, nx) - 1``: the untruncated Gaussian.
        compute_dtype: what the kernel is computed in (``gaussian_kernel``).
    One scatter-max per distinct radius (a handful), not one per object.
    """
    channels, rows, cols = heatmaps.shape
    flat = heatmaps.view(-1)
    for radius in radii.unique().tolist():
        chosen = radii == radius
        span = radius if reach is None else reach
        kernel = gaussian_kernel(radius, heatmaps.dtype, heatmaps.device, span, compute_dtype)
        offsets = torch.arange(-span, span + 1, device=heatmaps.device)
        y = iy[chosen, None, None] + offsets[None, :, None]  # [k, d, 1]
        x = ix[chosen, None, None] + offsets[None, None, :]  # [k, 1, d]
        inside = (y >= 0) & (y < rows) & (x >= 0) & (x < cols)  # [k, d, d]
        index = (classes[chosen, None, None] * rows + y) * cols + x
        flat.scatter_reduce_(0, index[inside], kernel.expand(inside.shape)[inside], reduce="amax")


def gaussian_focal_loss_sums(logits: torch.Tensor, target: torch.Tensor,
                             clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CenterNet focal loss (alpha 2, beta 4), summed per sample.

    Args:
        logits: ``[B, C, ny, nx]``; target: same shape, Gaussian heatmap in [0, 1].
        clamp: True, CenterPoint's: the probabilities (float32) are clamped to ``[1e-4, 1 - 1e-4]``
            before the log, which bounds a cell's loss (~9.2); False: ``logsigmoid`` of the logits
            (in their dtype), unbounded.
    Returns:
        (loss sum ``[B]``, number of positive cells ``[B]``); the loss is sum / max(positives, 1).
    """
    if clamp:
        pred = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
        log_pred, log_not_pred = torch.log(pred), torch.log(1 - pred)
    else:
        pred = torch.sigmoid(logits)
        log_pred, log_not_pred = F.logsigmoid(logits), F.logsigmoid(-logits)
    positive = target.eq(1).to(pred.dtype)
    negative_weight = (1 - target).pow(4)
    pos_loss = -log_pred * (1 - pred).pow(2) * positive
    neg_loss = -log_not_pred * pred.pow(2) * negative_weight * (1 - positive)
    return (pos_loss + neg_loss).flatten(1).sum(1), positive.flatten(1).sum(1)
