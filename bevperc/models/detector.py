"""The camera BEV detector, composed explicitly from its parts (torchvision-detection style)."""

from __future__ import annotations

import torch
from torch import nn

from bevperc.models.backbone import ImageBackbone, build_backbone
from bevperc.models.bev_encoder import BEVEncoder
from bevperc.models.centerpoint_head import CenterPointHead
from bevperc.models.config import DecodeConfig, ModelConfig
from bevperc.models.image_head import ImageHeatmapHead, orient_by_image
from bevperc.models.lift import LSSViewTransformer
from bevperc.models.neck import FPNNeck
from bevperc.models.postprocess import decode_detections

GEOMETRY_KEYS = ("intrinsics", "ego_from_camera", "image_aug", "bev_aug")


class BEVDetector(nn.Module):
    """images -> backbone -> neck -> LSS lift/splat -> BEV encoder -> CenterPoint head.

    ``forward(batch)`` returns the raw head outputs ``{"group.branch": [B, c, ny, nx]}`` plus
    ``"depth"``: depth logits ``[B, N, D, h, w]``, and, where the view transformer ran its image
    head, ``"image_heatmap"``: ``[B * N, classes, h, w]`` logits. ``loss`` and ``decode`` take those outputs
    and the same batch.
    """

    def __init__(
        self,
        backbone: ImageBackbone,
        neck: FPNNeck,
        view_transformer: LSSViewTransformer,
        bev_encoder: BEVEncoder,
        head: CenterPointHead,
        decode_cfg: DecodeConfig | None = None,
    ):
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.view_transformer, self.bev_encoder, self.head = view_transformer, bev_encoder, head
        self.decode_cfg = decode_cfg

    def _check_batch(self, batch: dict) -> None:
        missing = [key for key in ("images", *GEOMETRY_KEYS) if key not in batch]
        if missing:
            raise KeyError(f"BEVDetector: batch is missing {missing} (the batch of bevperc.data.dataset.collate_bev)")
        images = batch["images"]
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"batch['images']: expected [B, N, 3, H, W], got {tuple(images.shape)}")
        expected = tuple(self.view_transformer.view_cfg.input_size)
        if tuple(images.shape[-2:]) != expected:
            raise ValueError(f"batch['images']: expected H, W = {expected} (view.input_size), got {tuple(images.shape[-2:])}")

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        self._check_batch(batch)
        images = batch["images"]
        batch_size, cams = images.shape[:2]
        features = self.neck(self.backbone(images.flatten(0, 1)))  # [B*N, C, h, w]
        bev, depth_logits, image_logits = self.view_transformer(features, batch)
        outputs = self.head(self.bev_encoder(bev))
        outputs["depth"] = depth_logits
        if image_logits is not None:
            outputs["image_heatmap"] = image_logits
        return outputs

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(task_losses {name: scalar}, per_sample {name: [B]})``: the head's tasks
        (``CenterPointHead.loss``), then the view transformer's ``depth`` task when it has one."""
        task_losses, per_sample = self.head.loss(outputs, batch)
        view_losses, view_per_sample = self.view_transformer.loss(outputs, batch)
        return task_losses | view_losses, per_sample | view_per_sample

    @torch.no_grad()
    def decode(self, outputs: dict[str, torch.Tensor], batch: dict) -> list[dict[str, torch.Tensor]]:
        """Per sample ``{"boxes": [K, 9] ego frame, "scores": [K], "labels": [K]}``."""
        if self.decode_cfg is None:
            raise ValueError("BEVDetector.decode: built without a DecodeConfig")
        detections = decode_detections(outputs, batch["bev_aug"], self.head.head_cfg, self.head.grid_cfg, self.decode_cfg)
        if self.decode_cfg.direction_from_image:
            detections = orient_by_image(detections, outputs["image_heatmap"], batch, self.view_transformer.view_cfg)
        return detections


def default_task_weights(cfg: ModelConfig) -> dict[str, float]:
    """The detector's tasks in the order of :meth:`BEVDetector.loss` (the head's, then the view
    transformer's), with the fixed weights each part declares (CenterPoint's, BEVDepth's)."""
    return CenterPointHead.task_weights(cfg.head) | LSSViewTransformer.task_weights(cfg.view, cfg.image_head)


def task_names(cfg: ModelConfig) -> list[str]:
    """The names of :func:`default_task_weights`, in order: the loss engine's tasks."""
    return list(default_task_weights(cfg))


def build_detector(cfg: ModelConfig) -> BEVDetector:
    """Build every part from the dataclass config."""
    backbone = build_backbone(cfg.backbone, cfg.view.feature_stride)
    neck = FPNNeck(backbone.out_channels, cfg.neck.out_channels)
    image_head = ImageHeatmapHead(cfg.neck.out_channels, cfg.image_head.channels, cfg.view, cfg.image_head.min_radius,
                                  cfg.image_head.heading, cfg.image_head.heading_as_imaged) if cfg.image_head.enabled else None
    view_transformer = LSSViewTransformer(cfg.neck.out_channels, cfg.view, cfg.grid, image_head, cfg.image_head.lift_scores)
    bev_encoder = BEVEncoder(view_transformer.out_channels, cfg.bev_encoder)
    head = CenterPointHead(bev_encoder.out_channels, cfg.head, cfg.grid)
    return BEVDetector(backbone, neck, view_transformer, bev_encoder, head, cfg.decode)
