"""Image neck: an FPN top-down path fusing the backbone maps into one map at the finest stride."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPNNeck(nn.Module):
    """FPN top-down path over the backbone's output maps, output at the finest one only.

    ``top = lateral(C_coarsest)``, then for each finer map ``top = lateral(C) + upsample2x(top)``,
    and ``out = smooth3x3(top)``: the same layers as torchvision's ``FeaturePyramidNetwork``
    (1x1 laterals, nearest upsampling, 3x3 output conv) minus the coarser output branches, which
    the LSS lift does not use (they would be dead parameters without gradient). Plays the role of
    BEVDet's image ``FPN_LSS`` neck. With the stride-16 and stride-32 maps of a ResNet it is
    BEVDet's two-level neck; with stride 8 first, the lift gets 4x as many rays.
    """

    def __init__(self, in_channels: tuple[int, ...], out_channels: int = 256):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(channels, out_channels, kernel_size=1) for channels in in_channels)
        self.smooth = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        for conv in (*self.laterals, self.smooth):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # torchvision FPN's init
            nn.init.constant_(conv.bias, 0)
        self.out_channels = out_channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """maps ``[B', c_i, h_i, w_i]``, finest first -> ``[B', out_channels, h_0, w_0]``."""
        if len(features) != len(self.laterals):
            raise ValueError(f"FPNNeck: expected {len(self.laterals)} maps (finest first), got {len(features)}")
        top = self.laterals[-1](features[-1])
        for lateral, feature in zip(self.laterals[-2::-1], features[-2::-1]):
            top = lateral(feature) + F.interpolate(top, size=feature.shape[-2:], mode="nearest")
        return self.smooth(top)
