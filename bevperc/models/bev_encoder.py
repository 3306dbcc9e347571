"""BEV encoder: ResNet basic blocks at BEV strides 2 and 4, fused back to full resolution.

A small, readable form of BEVDet's ``CustomResNet`` + ``FPN_LSS``: the stride-4 map is
upsampled to stride 2 and concatenated with the stride-2 map, two 3x3 convs fuse them and
a final x2 upsampling (+ 3x3 conv, optionally also reading the input map) returns to the BEV grid
resolution the head predicts on.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from bevperc.models.config import BEVEncoderConfig


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _stage(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
    """``num_blocks`` basic blocks, the first with stride 2 and a 1x1 projection shortcut."""
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False), nn.BatchNorm2d(out_channels)
    )
    blocks = [BasicBlock(in_channels, out_channels, stride=2, downsample=downsample)]
    blocks += [BasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class BEVEncoder(nn.Module):
    """``[B, C_in, ny, nx]`` -> ``[B, out_channels, ny, nx]`` (ny, nx divisible by 4)."""

    def __init__(self, in_channels: int, cfg: BEVEncoderConfig):
        super().__init__()
        low, high = cfg.stage_channels
        self.stage1 = _stage(in_channels, low, cfg.blocks_per_stage)  # stride 2
        self.stage2 = _stage(low, high, cfg.blocks_per_stage)  # stride 4
        self.up_stride4 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.fuse = nn.Sequential(_conv_bn_relu(low + high, cfg.out_channels), _conv_bn_relu(cfg.out_channels, cfg.out_channels))
        self.up_full = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.full_resolution_skip = cfg.full_resolution_skip
        refine_in = cfg.out_channels + (in_channels if cfg.full_resolution_skip else 0)
        self.refine = _conv_bn_relu(refine_in, cfg.out_channels)  # smooth the upsampled map (+ the input's detail)
        self.out_channels = cfg.out_channels

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        if bev.shape[-1] % 4 or bev.shape[-2] % 4:
            raise ValueError(f"BEVEncoder: BEV grid {tuple(bev.shape[-2:])} must be divisible by 4")
        stride2 = self.stage1(bev)
        stride4 = self.stage2(stride2)
        fused = self.up_full(self.fuse(torch.cat([stride2, self.up_stride4(stride4)], dim=1)))
        return self.refine(torch.cat([fused, bev], dim=1) if self.full_resolution_skip else fused)
