"""Geometry builders shared by the model tests."""

from __future__ import annotations

import math

import torch


def bev_aug_matrix(angle_deg: float, scale: float, flip_y: bool) -> torch.Tensor:
    """A 4x4 BEV augmentation: rotation about z by ``angle_deg``, uniform ``scale``, optional y flip."""
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    linear = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]]) * scale
    if flip_y:
        linear = torch.diag(torch.tensor([1.0, -1.0, 1.0])) @ linear
    out = torch.eye(4)
    out[:3, :3] = linear
    return out
