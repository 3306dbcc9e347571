"""torchvision ResNet image backbone returning the stride-16 and stride-32 feature maps."""

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


def resnet_out_channels(depth: int) -> tuple[int, int]:
    """Channels of (layer3, layer4) = (stride 16, stride 32) outputs of a torchvision ResNet."""
    return (256, 512) if depth in (18, 34) else (1024, 2048)


class ResNetBackbone(nn.Module):
    """ResNet-18/34/50 trunk (no avgpool/fc) -> ``[C4 (stride 16), C5 (stride 32)]``.

    ``frozen_stages`` follows mmdet: 0 freezes the stem, k freezes the stem and layer1..k
    (parameters get ``requires_grad=False`` and their BatchNorms stay in eval mode).
    ``norm_eval`` keeps all BatchNorms in eval mode while training (small batches).
    """

    def __init__(self, depth: int = 50, pretrained: bool = False, frozen_stages: int = -1, norm_eval: bool = False):
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNetBackbone: depth must be one of {sorted(_RESNETS)}, got {depth}")
        build, weights = _RESNETS[depth]
        # Loading goes through torchvision's weight enum (downloads to the torch hub cache
        # on first use); tests always build with pretrained=False.
        resnet = build(weights=weights if pretrained else None)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = resnet_out_channels(depth)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        stages = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        return stages[: self.frozen_stages + 1] if self.frozen_stages >= 0 else []

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        self._freeze()  # frozen stages keep eval-mode BatchNorm statistics
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B', 3, H, W] -> [C4 [B', c4, H/16, W/16], C5 [B', c5, H/32, W/32]]."""
        x = self.stem(images)
        x = self.layer2(self.layer1(x))
        c4 = self.layer3(x)
        c5 = self.layer4(c4)
        return [c4, c5]


def build_backbone(cfg: BackboneConfig) -> ResNetBackbone:
    return ResNetBackbone(cfg.depth, cfg.pretrained, cfg.frozen_stages, cfg.norm_eval)
