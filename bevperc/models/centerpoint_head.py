"""CenterPoint head: per class group a heatmap and regression branches, targets and losses.

Outputs (``CenterPointHead.forward``), one map per ``f"{group}.{branch}"`` on the BEV grid
``[B, channels, ny, nx]`` (row = y cell, column = x cell of the augmented ego frame):

=========  ========  =========================================================
branch     channels  target at the object's centre cell (ix, iy)
=========  ========  =========================================================
heatmap    classes   Gaussian peaks (logits; sigmoid at use)
offset     2         sub-cell centre ``(cx - ix, cy - iy)`` in cells, in [0, 1)
height     1         z of the box centre (metres)
size       3         ``log(w), log(l), log(h)``
rotation   2         ``sin(yaw), cos(yaw)``
velocity   2         ``vx, vy`` (m/s)
=========  ========  =========================================================

``cx = (x - x_min) / cell_size`` is the continuous cell coordinate. Losses: Gaussian focal
loss (CenterNet, ``bevperc.models.heatmap``) for heatmaps, L1 at centre cells normalised by the
number of objects for regressions; each is one named task ``f"{group}.{branch}"`` (+ ``"depth"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bevperc.data.classes import CLASS_INDEX
from bevperc.models.config import BEVGridConfig, HeadConfig
from bevperc.models.heatmap import HEATMAP_INIT_BIAS, draw_gaussians, gaussian_focal_loss_sums, gaussian_radius

REGRESSION_BRANCHES: dict[str, int] = {"offset": 2, "height": 1, "size": 3, "rotation": 2, "velocity": 2}
"""Regression branch -> channels, in CenterPoint's code order (reg, height, dim, rot, vel)."""
BRANCHES: tuple[str, ...] = ("heatmap", *REGRESSION_BRANCHES)

# CenterPoint nuScenes: code_weights [1]*8 + [0.2]*2 (velocity), loss_bbox weight 0.25, heatmap weight 1.
CENTERPOINT_CODE_WEIGHTS = {"offset": 1.0, "height": 1.0, "size": 1.0, "rotation": 1.0, "velocity": 0.2}
REGRESSION_LOSS_WEIGHT = 0.25
HEATMAP_LOSS_WEIGHT = 1.0


# --------------------------------------------------------------------------- targets
def encode_boxes(boxes: torch.Tensor, grid: BEVGridConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Boxes ``[M, 9]`` (augmented ego frame) -> centre cells and regression targets.

    Returns:
        cells: ``[M, 2]`` int64 (ix, iy) -- may lie outside the grid;
        inside: ``[M]`` bool, the centre cell is in the grid;
        targets: branch -> ``[M, channels]`` (see module docstring). Non-finite velocities
            (nuScenes gives NaN for some boxes) become 0.
    """
    cx = (boxes[:, 0] - grid.x_range[0]) / grid.cell_size
    cy = (boxes[:, 1] - grid.y_range[0]) / grid.cell_size
    ix, iy = torch.floor(cx).long(), torch.floor(cy).long()
    inside = (ix >= 0) & (ix < grid.num_x) & (iy >= 0) & (iy < grid.num_y)
    targets = {
        "offset": torch.stack([cx - ix, cy - iy], dim=1),
        "height": boxes[:, 2:3],
        "size": boxes[:, 3:6].clamp(min=1e-3).log(),
        "rotation": torch.stack([torch.sin(boxes[:, 6]), torch.cos(boxes[:, 6])], dim=1),
        "velocity": torch.nan_to_num(boxes[:, 7:9], nan=0.0, posinf=0.0, neginf=0.0),
    }
    return torch.stack([ix, iy], dim=1), inside, targets


def decode_boxes(
    ix: torch.Tensor, iy: torch.Tensor, regressions: dict[str, torch.Tensor], grid: BEVGridConfig
) -> torch.Tensor:
    """Inverse of ``encode_boxes``: cells ``[K]`` + regressions (branch -> ``[K, c]``) -> boxes ``[K, 9]``."""
    offset = regressions["offset"]
    x = (ix.to(offset.dtype) + offset[:, 0]) * grid.cell_size + grid.x_range[0]
    y = (iy.to(offset.dtype) + offset[:, 1]) * grid.cell_size + grid.y_range[0]
    size = regressions["size"].exp()
    rotation = regressions["rotation"]
    yaw = torch.atan2(rotation[:, 0], rotation[:, 1])
    return torch.cat(
        [x[:, None], y[:, None], regressions["height"], size, yaw[:, None], regressions["velocity"]], dim=1
    )


@dataclass
class GroupTargets:
    """Training targets of one class group for a batch."""

    heatmap: torch.Tensor
    """``[B, classes, ny, nx]`` Gaussian heatmaps (1 exactly at centre cells)."""
    indices: torch.Tensor
    """``[B, max_objs]`` int64 flat centre cell ``iy * nx + ix``."""
    mask: torch.Tensor
    """``[B, max_objs]`` bool, slot holds an object."""
    regression: dict[str, torch.Tensor]
    """branch -> ``[B, max_objs, channels]``."""


def assign_targets(
    gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], head: HeadConfig, grid: BEVGridConfig
) -> dict[str, GroupTargets]:
    """CenterPoint targets per class group.

    Args:
        gt_boxes: per sample ``[M, 9]`` boxes in the augmented ego frame.
        gt_labels: per sample ``[M]`` DETECTION_CLASSES indices.
    Returns:
        group name -> ``GroupTargets``. Objects whose centre falls outside the grid or whose
        class is in no group are skipped; at most ``head.max_objs`` per sample and group.
    """
    batch = len(gt_boxes)
    device = gt_boxes[0].device if batch else torch.device("cpu")
    out: dict[str, GroupTargets] = {}
    for group_name, group in zip(head.group_names, head.class_groups):
        class_ids = [CLASS_INDEX[name] for name in group]
        heatmap = torch.zeros(batch, len(group), grid.num_y, grid.num_x, device=device)
        indices = torch.zeros(batch, head.max_objs, dtype=torch.long, device=device)
        mask = torch.zeros(batch, head.max_objs, dtype=torch.bool, device=device)
        regression = {
            name: torch.zeros(batch, head.max_objs, dim, device=device) for name, dim in REGRESSION_BRANCHES.items()
        }
        for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
            if boxes.shape[0] != labels.shape[0]:
                raise ValueError(f"batch['gt_boxes'][{b}] has {boxes.shape[0]} boxes but gt_labels has {labels.shape[0]}")
            boxes = boxes.float()
            in_group = torch.zeros_like(labels, dtype=torch.bool)
            class_in_group = torch.zeros_like(labels)
            for k, class_id in enumerate(class_ids):
                in_group |= labels == class_id
                class_in_group[labels == class_id] = k
            cells, inside, targets = encode_boxes(boxes, grid)
            keep = torch.nonzero(in_group & inside).squeeze(1)[: head.max_objs]
            # one slot per kept object, in order; a degenerate box keeps its slot empty
            width_cells = boxes[keep, 3].double() / grid.cell_size
            length_cells = boxes[keep, 4].double() / grid.cell_size
            drawable = (width_cells > 0) & (length_cells > 0)
            slots, objects = torch.nonzero(drawable).squeeze(1), keep[drawable]
            radii = [max(head.min_radius, int(gaussian_radius(length, width, head.gaussian_overlap)))
                     for length, width in zip(length_cells[drawable].tolist(), width_cells[drawable].tolist())]
            ix, iy = cells[objects, 0], cells[objects, 1]
            draw_gaussians(heatmap[b], class_in_group[objects], ix, iy, torch.tensor(radii, dtype=torch.long, device=device))
            indices[b, slots] = iy * grid.num_x + ix
            mask[b, slots] = True
            for name in REGRESSION_BRANCHES:
                regression[name][b, slots] = targets[name][objects]
        out[group_name] = GroupTargets(heatmap, indices, mask, regression)
    return out


# --------------------------------------------------------------------------- losses
def gather_at_indices(prediction: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[B, c, ny, nx]`` map sampled at flat cells ``[B, K]`` -> ``[B, K, c]``."""
    flat = prediction.flatten(2)  # [B, c, ny*nx]
    gathered = flat.gather(2, indices.unsqueeze(1).expand(-1, flat.shape[1], -1))
    return gathered.transpose(1, 2)


def masked_l1_sums(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 summed over channels and valid slots per sample: ``[B, K, c]`` x2, ``[B, K]`` -> ``[B]``."""
    return ((prediction.float() - target).abs() * mask.unsqueeze(-1)).flatten(1).sum(1)


# --------------------------------------------------------------------------- module
def _branch(in_channels: int, mid_channels: int, out_channels: int, bias_init: float | None = None) -> nn.Sequential:
    """3x3 conv-BN-ReLU then a 3x3 conv to the outputs (CenterPoint's SeparateHead, final_kernel 3)."""
    final = nn.Conv2d(mid_channels, out_channels, 3, padding=1)
    if bias_init is not None:
        nn.init.constant_(final.bias, bias_init)
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        final,
    )


class CenterPointHead(nn.Module):
    """Shared conv, then per class group a heatmap branch and the regression branches.

    With ``head.merged_regression`` one branch per group predicts all regression channels,
    split into the same named outputs.
    """

    @staticmethod
    def task_weights(head: HeadConfig) -> dict[str, float]:
        """Its tasks ``"group.branch"`` in the order of :meth:`loss`, with CenterPoint's fixed weights:
        heatmap 1.0, each regression branch 0.25 x its code weight (velocity 0.2 -> 0.05)."""
        return {f"{group}.{branch}": HEATMAP_LOSS_WEIGHT if branch == "heatmap"
                else REGRESSION_LOSS_WEIGHT * CENTERPOINT_CODE_WEIGHTS[branch]
                for group in head.group_names for branch in BRANCHES}

    def __init__(self, in_channels: int, head: HeadConfig, grid: BEVGridConfig):
        super().__init__()
        self.head_cfg, self.grid_cfg = head, grid
        self.shared = nn.Sequential(
            nn.Conv2d(in_channels, head.shared_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(head.shared_channels),
            nn.ReLU(inplace=True),
        )
        self.branches = nn.ModuleDict()
        for group_name, group in zip(head.group_names, head.class_groups):
            branches = {"heatmap": _branch(head.shared_channels, head.head_channels, len(group), HEATMAP_INIT_BIAS)}
            if head.merged_regression:
                branches["regression"] = _branch(head.shared_channels, head.head_channels,
                                                 sum(REGRESSION_BRANCHES.values()))
            else:
                branches |= {name: _branch(head.shared_channels, head.head_channels, dim)
                             for name, dim in REGRESSION_BRANCHES.items()}
            # ModuleDict keys cannot contain "."; group names contain "+" only.
            self.branches[group_name] = nn.ModuleDict(branches)

    def forward(self, bev: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, C, ny, nx]`` -> ``{"group.branch": [B, channels, ny, nx]}``."""
        shared = self.shared(bev)
        outputs = {}
        for group_name, branches in self.branches.items():
            for branch, module in branches.items():
                if branch == "regression":
                    maps = module(shared).split(list(REGRESSION_BRANCHES.values()), dim=1)
                    outputs |= {f"{group_name}.{name}": out for name, out in zip(REGRESSION_BRANCHES, maps)}
                else:
                    outputs[f"{group_name}.{branch}"] = module(shared)
        return outputs

    def loss(self, preds: dict[str, torch.Tensor], batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Task losses (scalars) and per-sample losses (``[B]``), keyed ``"group.branch"``.

        Heatmap: focal sum / max(#positive cells, 1). Regression: L1 sum at centre cells /
        (#objects + 1e-4), as mmdet3d's CenterHead. Per-sample values use the same formula
        restricted to one sample.
        """
        targets = assign_targets(batch["gt_boxes"], batch["gt_labels"], self.head_cfg, self.grid_cfg)
        task_losses: dict[str, torch.Tensor] = {}
        per_sample: dict[str, torch.Tensor] = {}
        for group_name, target in targets.items():
            sums, positives = gaussian_focal_loss_sums(preds[f"{group_name}.heatmap"], target.heatmap)
            name = f"{group_name}.heatmap"
            task_losses[name] = sums.sum() / positives.sum().clamp(min=1)
            per_sample[name] = sums / positives.clamp(min=1)
            num_objects = target.mask.sum(1).float()  # [B]
            for branch in REGRESSION_BRANCHES:
                name = f"{group_name}.{branch}"
                predicted = gather_at_indices(preds[name], target.indices)
                sums = masked_l1_sums(predicted, target.regression[branch], target.mask)
                task_losses[name] = sums.sum() / (num_objects.sum() + 1e-4)
                per_sample[name] = sums / (num_objects + 1e-4)
        return task_losses, per_sample
