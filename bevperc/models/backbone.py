"""torchvision image backbones cut into stages, returning the maps the neck fuses.

Every backbone is a list of stages (stem included) with known strides and channels; the
forward pass returns the outputs of the stages whose stride lies in ``[min_stride, last]``
(finest first). Supported trunks, all built by torchvision (ImageNet weights through
torchvision's weight enums when ``pretrained``):

=====================  ==========================  =================================
``backbone.name``      stages (stride: channels)    note
=====================  ==========================  =================================
``resnet``             4: 64-256, 8: 128-512,       ``depth`` 18/34/50; ``num_stages``
                       16: 256-1024, 32: 512-2048   3 cuts after layer3 (stride 16)
``regnet_x_400mf``     4: 32, 8: 64, 16: 160,
                       32: 400
``mobilenet_v3_large`` 4: 24, 8: 40, 16: 112,
                       32: 960
``mobilenet_v3_small`` 4: 16, 8: 24, 16: 48,
                       32: 576
=====================  ==========================  =================================

The MobileNet splits are found by running a probe image through ``features`` and cutting
where the resolution halves, so they follow torchvision's definition of the model.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from bevperc.models.config import BackboneConfig

_RESNETS = {
    18: (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    34: (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    50: (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
}
_MOBILENETS = {
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V2),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
}


def _resnet_stages(cfg: BackboneConfig) -> tuple[list[nn.Module], list[int]]:
    build, weights = _RESNETS[cfg.depth]
    # Loading goes through torchvision's weight enum (downloads to the torch hub cache on
    # first use); tests always build with pretrained=False.
    resnet = build(weights=weights if cfg.pretrained else None)
    stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
    return [stem, resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4], [4, 4, 8, 16, 32]


def _regnet_stages(cfg: BackboneConfig) -> tuple[list[nn.Module], list[int]]:
    weights = torchvision.models.RegNet_X_400MF_Weights.IMAGENET1K_V2 if cfg.pretrained else None
    regnet = torchvision.models.regnet_x_400mf(weights=weights)
    return [regnet.stem, *regnet.trunk_output.children()], [2, 4, 8, 16, 32]


def _mobilenet_stages(cfg: BackboneConfig) -> tuple[list[nn.Module], list[int]]:
    build, weights = _MOBILENETS[cfg.name]
    layers = list(build(weights=weights if cfg.pretrained else None).features.children())
    # Group consecutive layers by the stride of their output: the stem (stride 2), then 4, 8, 16, 32.
    groups: list[list[nn.Module]] = []
    strides: list[int] = []
    for layer, (stride, _) in zip(layers, _probe(layers)):
        if strides and strides[-1] == stride:
            groups[-1].append(layer)
        else:
            groups.append([layer])
            strides.append(stride)
    return [nn.Sequential(*group) for group in groups], strides


def _probe(modules: list[nn.Module], size: int = 64) -> list[tuple[int, int]]:
    """``(stride, channels)`` of each module's output when chained on a ``size``x``size`` image."""
    shapes = []
    modes = [module.training for module in modules]
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        for module in modules:
            x = module.eval()(x)
            shapes.append((size // x.shape[-1], x.shape[1]))
    for module, mode in zip(modules, modes):
        module.train(mode)
    return shapes


class ImageBackbone(nn.Module):
    """Backbone stages (the stem, then up to 4 stages) -> the outputs from stride ``min_stride`` on, finest first.

    ``frozen_stages`` follows mmdet: 0 freezes the stem, k also freezes stages 1..k (parameters get ``requires_grad=False``
    and their BatchNorms stay in eval mode). ``norm_eval`` keeps all BatchNorms in eval mode while
    training (small batches). ``channels_last`` runs the convolutions in NHWC layout, which
    oneDNN executes faster on CPUs.
    """

    def __init__(self, stages: list[nn.Module], strides: list[int], channels: list[int], min_stride: int,
                 frozen_stages: int = -1, norm_eval: bool = False, channels_last: bool = False):
        super().__init__()
        if min_stride not in strides[1:]:
            raise ValueError(f"backbone: no stage at stride {min_stride}; stage strides are {strides[1:]}")
        self.stages = nn.ModuleList(stages)
        self.strides, self.channels = list(strides), list(channels)
        self.first_output = len(strides) - 1 - strides[::-1].index(min_stride)  # the last stage at that stride
        self.out_channels = tuple(channels[self.first_output:])
        self.frozen_stages, self.norm_eval, self.channels_last = frozen_stages, norm_eval, channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self._freeze()

    def _freeze(self) -> None:
        for module in list(self.stages)[: self.frozen_stages + 1] if self.frozen_stages >= 0 else []:
            module.eval()
            for param in module.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> "ImageBackbone":
        super().train(mode)
        self._freeze()  # frozen stages keep eval-mode BatchNorm statistics
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images ``[B', 3, H, W]`` -> maps ``[B', c_i, H / s_i, W / s_i]`` for the output strides."""
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        outputs = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index >= self.first_output:
                outputs.append(x)
        return outputs


def build_backbone(cfg: BackboneConfig, min_stride: int) -> ImageBackbone:
    """The backbone of ``cfg``, returning its maps from stride ``min_stride`` on."""
    if cfg.name == "resnet":
        stages, strides = _resnet_stages(cfg)
    elif cfg.name == "regnet_x_400mf":
        stages, strides = _regnet_stages(cfg)
    else:
        stages, strides = _mobilenet_stages(cfg)
    stages, strides = stages[: cfg.num_stages + 1], strides[: cfg.num_stages + 1]  # the stem + num_stages
    channels = [channel for _, channel in _probe(stages)]
    return ImageBackbone(stages, strides, channels, min_stride, cfg.frozen_stages, cfg.norm_eval, cfg.channels_last)
