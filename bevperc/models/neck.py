"""Image neck: a two-level FPN fusing the stride-16 and stride-32 maps into one stride-16 map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPNNeck(nn.Module):
    """FPN top-down path over two levels, output at stride 16 only.

    ``out = smooth3x3(lateral16(C4) + upsample2x(lateral32(C5)))``: the same layers as
    torchvision's ``FeaturePyramidNetwork`` (1x1 laterals, nearest upsampling, 3x3 output
    conv) minus the stride-32 output branch, which the LSS lift does not use (it would be
    dead parameters without gradient). Plays the role of BEVDet's image ``FPN_LSS`` neck.
    """

    def __init__(self, in_channels: tuple[int, int], out_channels: int = 256):
        super().__init__()
        stride16_channels, stride32_channels = in_channels
        self.lateral16 = nn.Conv2d(stride16_channels, out_channels, kernel_size=1)
        self.lateral32 = nn.Conv2d(stride32_channels, out_channels, kernel_size=1)
        self.smooth = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        for conv in (self.lateral16, self.lateral32, self.smooth):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # torchvision FPN's init
            nn.init.constant_(conv.bias, 0)
        self.out_channels = out_channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """[C4 [B', c4, h, w], C5 [B', c5, h/2, w/2]] -> [B', out_channels, h, w]."""
        if len(features) != 2:
            raise ValueError(f"FPNNeck: expected [stride-16, stride-32] maps, got {len(features)} maps")
        stride16, stride32 = features
        top_down = F.interpolate(self.lateral32(stride32), size=stride16.shape[-2:], mode="nearest")
        return self.smooth(self.lateral16(stride16) + top_down)
