"""Perspective supervision: a CenterNet class heatmap on the image features (training only).

The BEV heatmap reaches the image backbone only through the depth-weighted splat, a weak and
sparse signal for a backbone trained from scratch. This head asks the image features directly
where the objects are: per camera, one Gaussian per GT box at the feature cell its 3D centre
projects to (radius from the projected box's extent, CenterNet's 2D rule), one channel per
detection class, Gaussian focal loss (task ``image_heatmap``). It needs nothing beyond the GT
boxes and the camera geometry every batch carries, so it works on real nuScenes as on the
synthetic world. It runs at inference only where its class probabilities are lifted into the BEV
(``image_head.lift_scores``).
"""

from __future__ import annotations

import torch
from torch import nn

from bevperc.data.classes import DETECTION_CLASSES
from bevperc.geometry import box_corners
from bevperc.models.centerpoint_head import HEATMAP_INIT_BIAS, draw_gaussians, gaussian_focal_loss_sums, gaussian_radius
from bevperc.models.config import ViewTransformerConfig

MIN_OVERLAP = 0.7
"""CenterNet's Gaussian radius overlap for 2D boxes."""
MIN_DEPTH = 1.0
"""Boxes whose centre is nearer than this (camera z, metres) or with a corner behind the camera are skipped."""


def image_heatmap_targets(batch: dict, view: ViewTransformerConfig, min_radius: int = 1) -> torch.Tensor:
    """``[B, N, C, h, w]`` Gaussian class heatmaps (C = detection classes) at the feature stride.

    Box centres (augmented ego frame) go to each augmented image by
    ``image_aug @ K @ inv(bev_aug @ ego_from_camera)``; a box is drawn where its centre lands inside
    the image, in front of the camera (all 8 corners too).
    """
    intrinsics, ego_from_camera = batch["intrinsics"].double(), batch["ego_from_camera"].double()
    image_aug, bev_aug = batch["image_aug"].double(), batch["bev_aug"].double()
    batch_size, cams = intrinsics.shape[:2]
    height, width = view.feature_size
    stride = view.feature_stride
    classes = len(DETECTION_CLASSES)
    heatmaps = torch.zeros(batch_size * cams * classes, height, width, device=intrinsics.device)
    camera_from_aug_ego = torch.linalg.inv(bev_aug[:, None] @ ego_from_camera)  # [B, N, 4, 4]
    pixels_from_camera = image_aug @ intrinsics  # [B, N, 3, 3]
    for b, (boxes, labels) in enumerate(zip(batch["gt_boxes"], batch["gt_labels"])):
        if len(boxes) == 0:
            continue
        corners = box_corners(boxes.double())  # [M, 8, 3]
        points = torch.cat([boxes[:, None, :3].double(), corners], dim=1)  # [M, 9, 3]: centre, then corners
        camera = points @ camera_from_aug_ego[b, :, None, :3, :3].transpose(-1, -2) + camera_from_aug_ego[b, :, None, None, :3, 3]
        depth = camera[..., 2]  # [N, M, 9]
        projected = camera @ pixels_from_camera[b, :, None].transpose(-1, -2)
        uv = projected[..., :2] / depth.clamp(min=1e-6)[..., None] / stride  # feature-cell coordinates
        centre = uv[:, :, 0]  # [N, M, 2]
        extent = uv[:, :, 1:].amax(dim=2) - uv[:, :, 1:].amin(dim=2)  # [N, M, 2] (w, h) in cells
        visible = (depth[:, :, 0] > MIN_DEPTH) & (depth[:, :, 1:] > 0.1).all(dim=2)
        visible &= (centre[..., 0] >= 0) & (centre[..., 0] < width) & (centre[..., 1] >= 0) & (centre[..., 1] < height)
        cam_index, box_index = torch.nonzero(visible, as_tuple=True)
        if len(cam_index) == 0:
            continue
        sizes = extent[cam_index, box_index].tolist()
        radii = [max(min_radius, int(gaussian_radius(h, w, MIN_OVERLAP))) for w, h in sizes]
        cells = centre[cam_index, box_index].floor().long()
        channel = (b * cams + cam_index) * classes + labels[box_index].to(cam_index.device)
        draw_gaussians(heatmaps, channel, cells[:, 0], cells[:, 1], torch.tensor(radii, device=heatmaps.device))
    return heatmaps.view(batch_size, cams, classes, height, width)


class ImageHeatmapHead(nn.Module):
    """Image features ``[B * N, C_in, h, w]`` -> class heatmap logits ``[B * N, classes, h, w]``."""

    def __init__(self, in_channels: int, channels: int, view: ViewTransformerConfig, min_radius: int = 1):
        super().__init__()
        self.view_cfg, self.min_radius = view, min_radius
        self.num_classes = len(DETECTION_CLASSES)
        final = nn.Conv2d(channels, self.num_classes, kernel_size=1)
        nn.init.constant_(final.bias, HEATMAP_INIT_BIAS)
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            final,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

    def loss(self, logits: torch.Tensor, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``image_heatmap``: focal loss over all cameras / positive cells of the batch (and per sample)."""
        target = image_heatmap_targets(batch, self.view_cfg, self.min_radius)  # [B, N, C, h, w]
        batch_size = target.shape[0]
        sums, positives = gaussian_focal_loss_sums(logits.reshape(batch_size, -1, *logits.shape[-2:]),
                                                   target.flatten(1, 2))
        total = sums.sum() / positives.sum().clamp(min=1)
        return {"image_heatmap": total}, {"image_heatmap": sums / positives.clamp(min=1)}
