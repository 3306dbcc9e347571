"""Perspective supervision: a CenterNet class heatmap on the image features (training only).

The BEV heatmap reaches the image backbone only through the depth-weighted splat, a weak and
sparse signal for a backbone trained from scratch. This head asks the image features directly
where the objects are: per camera, one Gaussian per GT box at the feature cell its 3D centre
projects to (radius from the projected box's extent, CenterNet's 2D rule), one channel per
detection class, Gaussian focal loss (task ``image_heatmap``). It needs nothing beyond the GT
boxes and the camera geometry every batch carries, so it works on real nuScenes as on the
synthetic world. It runs at inference where its class probabilities are lifted into the BEV
(``image_head.lift_scores``) or where it predicts the observation angle (``image_head.heading``), which
:func:`orient_by_image` can use to tell the front of a decoded box from its back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bevperc.data.classes import DETECTION_CLASSES
from bevperc.geometry import box_corners, pixels_from_ego_points
from bevperc.models.config import ViewTransformerConfig
from bevperc.models.heatmap import HEATMAP_INIT_BIAS, draw_gaussians, gaussian_focal_loss_sums, gaussian_radius

MIN_OVERLAP = 0.7
"""CenterNet's Gaussian radius overlap for 2D boxes."""
MIN_DEPTH = 1.0
"""Boxes whose centre is nearer than this (camera z, metres) or with a corner behind the camera are skipped."""


@dataclass
class ImageTargets:
    """Targets of the image head for a batch."""

    heatmap: torch.Tensor
    """``[B, N, C, h, w]`` Gaussian class heatmaps (C = detection classes)."""
    centres: torch.Tensor
    """``[K]`` int64 flat index ``((b * N + n) * h + y) * w + x`` of each drawn box's centre cell."""
    observation: torch.Tensor
    """``[K, 2]`` ``(sin, cos)`` of its observation angle as the image shows it: the box yaw minus the
    azimuth of the ray from the camera to the box centre (augmented ego frame), negated where the
    augmentation mirrors the camera (an image flip or a BEV mirror, not both), since the image is then
    the mirror image of what that angle looks like. Without the negation the sign of the sine would be
    a coin toss for the network: the same image comes with both signs."""


def camera_handedness(ego_from_camera: torch.Tensor, pixels_from_camera: torch.Tensor) -> torch.Tensor:
    """``[...]`` sign of the determinant of the pixel -> ray map (``ego_from_camera [..., 4, 4]``,
    ``pixels_from_camera [..., 3, 3]``): -1 where the camera is mirrored (as ``lift.RAY_HANDEDNESS``)."""
    return torch.sign(torch.linalg.det(ego_from_camera[..., :3, :3]) * torch.linalg.det(pixels_from_camera))


def image_targets(batch: dict, view: ViewTransformerConfig, min_radius: int = 1, as_imaged: bool = True) -> ImageTargets:
    """Image-head targets at the feature stride.

    ``as_imaged=False``: the observation angle is not negated under a mirror (see ``ImageTargets``).
    Box centres (augmented ego frame) go to each augmented image by
    ``image_aug @ K @ inv(bev_aug @ ego_from_camera)`` (``bevperc.geometry.pixels_from_ego_points``);
    a box is drawn where its centre lands inside the image, in front of the camera (all 8 corners too).
    """
    intrinsics, ego_from_camera = batch["intrinsics"].double(), batch["ego_from_camera"].double()
    image_aug, bev_aug = batch["image_aug"].double(), batch["bev_aug"].double()
    batch_size, cams = intrinsics.shape[:2]
    height, width = view.feature_size
    stride = view.feature_stride
    classes = len(DETECTION_CLASSES)
    heatmaps = torch.zeros(batch_size * cams * classes, height, width, device=intrinsics.device)
    centres_found: list[torch.Tensor] = []
    observations: list[torch.Tensor] = []
    aug_ego_from_camera = bev_aug[:, None] @ ego_from_camera  # [B, N, 4, 4]
    pixels_from_camera = image_aug @ intrinsics  # [B, N, 3, 3]
    # sign of det(pixel -> augmented-ego ray map): -1 where the camera is mirrored (RAY_HANDEDNESS)
    handedness = camera_handedness(aug_ego_from_camera, pixels_from_camera)
    if not as_imaged:
        handedness = torch.ones_like(handedness)
    for b, (boxes, labels) in enumerate(zip(batch["gt_boxes"], batch["gt_labels"])):
        if len(boxes) == 0:
            continue
        corners = box_corners(boxes.double())  # [M, 8, 3]
        points = torch.cat([boxes[:, None, :3].double(), corners], dim=1)  # [M, 9, 3]: centre, then corners
        pixels, depth = pixels_from_ego_points(points, aug_ego_from_camera[b, :, None], pixels_from_camera[b, :, None])
        uv = pixels / stride  # [N, M, 9, 2] feature-cell coordinates; depth [N, M, 9]
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
        centres_found.append(((b * cams + cam_index) * height + cells[:, 1]) * width + cells[:, 0])
        sight = boxes[box_index, :2].double() - aug_ego_from_camera[b, cam_index, :2, 3]  # camera -> box centre
        angle = (boxes[box_index, 6].double() - torch.atan2(sight[:, 1], sight[:, 0])) * handedness[b, cam_index]
        observations.append(torch.stack([torch.sin(angle), torch.cos(angle)], dim=1).float())
    empty = torch.zeros(0, dtype=torch.long, device=heatmaps.device)
    return ImageTargets(heatmaps.view(batch_size, cams, classes, height, width),
                        torch.cat(centres_found) if centres_found else empty,
                        torch.cat(observations) if observations else torch.zeros(0, 2, device=heatmaps.device))


class ImageHeatmapHead(nn.Module):
    """Image features ``[B * N, C_in, h, w]`` -> class heatmap logits ``[B * N, classes, h, w]``, then
    with ``heading`` the ``(sin, cos)`` of the observation angle (2 more channels, read at box centres)."""

    def __init__(self, in_channels: int, channels: int, view: ViewTransformerConfig, min_radius: int = 1,
                 heading: bool = False, heading_as_imaged: bool = True):
        super().__init__()
        self.view_cfg, self.min_radius, self.heading = view, min_radius, heading
        self.heading_as_imaged = heading_as_imaged
        self.num_classes = len(DETECTION_CLASSES)
        final = nn.Conv2d(channels, self.num_classes + (2 if heading else 0), kernel_size=1)
        nn.init.constant_(final.bias, HEATMAP_INIT_BIAS)
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            final,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

    def loss(self, outputs: torch.Tensor, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``image_heatmap``: focal loss over all cameras / positive cells of the batch (and per sample);
        with ``heading``, ``image_heading``: L1 of the observation angle's (sin, cos) at the box centres."""
        targets = image_targets(batch, self.view_cfg, self.min_radius, self.heading_as_imaged)
        batch_size = targets.heatmap.shape[0]
        logits = outputs[:, : self.num_classes]
        sums, positives = gaussian_focal_loss_sums(logits.reshape(batch_size, -1, *logits.shape[-2:]),
                                                   targets.heatmap.flatten(1, 2))
        losses = {"image_heatmap": sums.sum() / positives.sum().clamp(min=1)}
        per_sample = {"image_heatmap": sums / positives.clamp(min=1)}
        if self.heading:
            predicted = outputs[:, self.num_classes :].permute(0, 2, 3, 1).reshape(-1, 2)[targets.centres]
            errors = (predicted.float() - targets.observation).abs().sum(1)  # [K]
            sample = targets.centres // (outputs.shape[0] // batch_size * outputs[0, 0].numel())
            counts = torch.bincount(sample, minlength=batch_size).float()
            sample_sums = torch.zeros(batch_size, device=errors.device).index_add(0, sample, errors)
            losses["image_heading"] = sample_sums.sum() / (counts.sum() + 1e-4)
            per_sample["image_heading"] = sample_sums / (counts + 1e-4)
        return losses, per_sample


def orient_by_image(detections: list[dict[str, torch.Tensor]], image_logits: torch.Tensor, batch: dict,
                    view: ViewTransformerConfig) -> list[dict[str, torch.Tensor]]:
    """Turn by 180 degrees each box whose heading disagrees with what the image head sees of it.

    Each box centre (ego frame) is projected into every camera; of the cameras where it lands inside
    the image, in front of the camera, the one whose image heatmap scores the box's class highest at
    that feature cell gives the observation angle there, which turned by the azimuth of the camera ->
    centre ray and the camera's handedness (as :func:`bevperc.models.lift.ego_heading`) is the image's
    heading. A box keeps its yaw when ``cos(yaw - image heading) >= 0`` or when no camera sees its centre,
    and gets ``yaw + pi`` (wrapped to [-pi, pi)) otherwise; nothing else changes.

    Args:
        detections: per sample ``{"boxes": [K, 9] ego frame, "scores", "labels"}`` (``decode_detections``).
        image_logits: ``[B * N, classes + 2, h, w]`` the image head's output (with ``heading``).
        batch: ``intrinsics [B, N, 3, 3]``, ``ego_from_camera [B, N, 4, 4]``, ``image_aug [B, N, 3, 3]``.
    """
    batch_size, cams = batch["intrinsics"].shape[:2]
    height, width = view.feature_size
    classes = len(DETECTION_CLASSES)
    if image_logits.shape[1] != classes + 2:
        raise ValueError(f"orient_by_image: the image head has no observation angle (image_head.heading); "
                         f"got {image_logits.shape[1]} channels, expected {classes + 2}")
    maps = image_logits.reshape(batch_size, cams, classes + 2, height, width)
    oriented = []
    for b, det in enumerate(detections):
        boxes = det["boxes"]
        if len(boxes) == 0:
            oriented.append(det)
            continue
        ego_from_camera = batch["ego_from_camera"][b].to(boxes.device, torch.float64)  # [N, 4, 4]
        pixels_from_camera = (batch["image_aug"][b] @ batch["intrinsics"][b]).to(boxes.device, torch.float64)
        centres = boxes[:, :3].double()
        pixels, depth = pixels_from_ego_points(centres, ego_from_camera, pixels_from_camera)  # [N, K, 2], [N, K]
        cell = (pixels / view.feature_stride).floor()
        x, y = cell[..., 0].clamp(0, width - 1).long(), cell[..., 1].clamp(0, height - 1).long()
        seen = (depth > MIN_DEPTH) & (cell[..., 0] >= 0) & (cell[..., 0] < width) \
            & (cell[..., 1] >= 0) & (cell[..., 1] < height)
        camera_index = torch.arange(cams, device=boxes.device)[:, None]
        score = maps[b, camera_index, det["labels"][None, :], y, x].float()  # [N, K]
        best = torch.where(seen, score, torch.full_like(score, -math.inf)).argmax(0)  # [K]
        box_index = torch.arange(len(boxes), device=boxes.device)
        observation = maps[b, best, classes:, y[best, box_index], x[best, box_index]].double()  # [K, 2]
        sight = centres[:, :2] - ego_from_camera[best, :2, 3]
        handedness = camera_handedness(ego_from_camera[best], pixels_from_camera[best])
        image_yaw = torch.atan2(sight[:, 1], sight[:, 0]) + handedness * torch.atan2(observation[:, 0], observation[:, 1])
        turn = seen.any(0) & (torch.cos(boxes[:, 6].double() - image_yaw) < 0)
        turned = boxes.clone()
        turned[turn, 6] = torch.remainder(boxes[turn, 6] + 2 * math.pi, 2 * math.pi) - math.pi  # yaw + pi in [-pi, pi)
        oriented.append({**det, "boxes": turned})
    return oriented
