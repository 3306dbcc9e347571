"""Image neck: torchvision FPN over the stride-16/32 maps, returning the fused stride-16 map."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork


class FPNNeck(nn.Module):
    """FPN (lateral 1x1 + top-down upsampling + 3x3 smoothing) -> one stride-16 map.

    The stride-32 map is upsampled and added to the stride-16 lateral, so the output
    carries both scales (the role of BEVDet's ``FPN_LSS`` image neck).
    """

    def __init__(self, in_channels: tuple[int, int], out_channels: int = 256):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels)
        self.out_channels = out_channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """[C4 [B', c4, h, w], C5 [B', c5, h/2, w/2]] -> [B', out_channels, h, w]."""
        if len(features) != 2:
            raise ValueError(f"FPNNeck: expected [stride-16, stride-32] maps, got {len(features)} maps")
        fused = self.fpn(OrderedDict([("stride16", features[0]), ("stride32", features[1])]))
        return fused["stride16"]
