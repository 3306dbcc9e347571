"""LSS view transformer: lift image features to a depth-weighted frustum, splat to BEV.

Frustum: one ray per stride-16 feature cell, ``D`` depth bins per ray. The ray of feature
cell ``(y, x)`` goes through the augmented-image pixel at the centre of the 16x16 block it
summarises, ``(u', v') = (x * 16 + 7.5, y * 16 + 7.5)`` (pixel centres at integer
coordinates, as in the intrinsics). Depth bin ``i`` covers
``[start + i * step, start + (i + 1) * step)`` and its frustum point sits at the bin centre.

Geometry (the one convention of ``bevperc.geometry``): a pixel ``(u', v')`` at camera depth ``d`` maps to the augmented
ego frame as ``bev_aug @ ego_from_camera @ [K^-1 @ inv(image_aug) @ [u', v', 1] * d, 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bevperc.models.bev_pool import PoolPlanCache, bev_pool, make_pool_plan
from bevperc.models.config import BEVGridConfig, ViewTransformerConfig


def depth_bin_centres(cfg: ViewTransformerConfig) -> torch.Tensor:
    """``[D]`` float64 depth (metres) of each bin's frustum point."""
    start, _, step = cfg.depth_bins
    return start + (torch.arange(cfg.num_depth_bins, dtype=torch.float64) + 0.5) * step


def make_frustum(cfg: ViewTransformerConfig) -> torch.Tensor:
    """``[D, h, w, 3]`` float64 frustum: (u', v') augmented-image pixel and depth d per point."""
    height, width = cfg.feature_size
    stride = cfg.feature_stride
    depths = depth_bin_centres(cfg)
    u = torch.arange(width, dtype=torch.float64) * stride + (stride - 1) / 2.0
    v = torch.arange(height, dtype=torch.float64) * stride + (stride - 1) / 2.0
    d_grid, v_grid, u_grid = torch.meshgrid(depths, v, u, indexing="ij")
    return torch.stack([u_grid, v_grid, d_grid], dim=-1)


def inverse_3x3(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of ``[..., 3, 3]`` matrices by the adjugate over the determinant.

    Plain arithmetic (no LAPACK call), so it traces to standard ONNX ops; for the
    well-conditioned intrinsics and image-augmentation matrices it agrees with
    ``torch.linalg.inv`` to float64 rounding.
    """
    a, b, c = matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 0, 2]
    d, e, f = matrix[..., 1, 0], matrix[..., 1, 1], matrix[..., 1, 2]
    g, h, i = matrix[..., 2, 0], matrix[..., 2, 1], matrix[..., 2, 2]
    cofactor_rows = [e * i - f * h, c * h - b * i, b * f - c * e,
                     f * g - d * i, a * i - c * g, c * d - a * f,
                     d * h - e * g, b * g - a * h, a * e - b * d]  # fmt: skip
    adjugate = torch.stack(cofactor_rows, dim=-1).reshape(matrix.shape)
    determinant = a * cofactor_rows[0] + b * cofactor_rows[3] + c * cofactor_rows[6]
    return adjugate / determinant[..., None, None]


def frustum_to_ego(
    frustum: torch.Tensor,
    intrinsics: torch.Tensor,
    ego_from_camera: torch.Tensor,
    image_aug: torch.Tensor,
    bev_aug: torch.Tensor,
) -> torch.Tensor:
    """Frustum points in the augmented ego frame.

    Args:
        frustum: ``[D, h, w, 3]`` (u', v', d) from ``make_frustum``.
        intrinsics: ``[B, N, 3, 3]`` of the original camera.
        ego_from_camera: ``[B, N, 4, 4]``.
        image_aug: ``[B, N, 3, 3]`` original pixel -> augmented pixel.
        bev_aug: ``[B, 4, 4]`` ego -> augmented ego.
    Returns:
        ``[B, N, D, h, w, 3]`` float64 points.
    """
    dtype = torch.float64
    intrinsics, ego_from_camera = intrinsics.to(dtype), ego_from_camera.to(dtype)
    image_aug, bev_aug = image_aug.to(dtype), bev_aug.to(dtype)
    frustum = frustum.to(device=intrinsics.device, dtype=dtype)
    # ray direction with camera z = 1 for each augmented pixel: K^-1 @ inv(image_aug) @ [u', v', 1]
    rays_from_pixels = inverse_3x3(intrinsics) @ inverse_3x3(image_aug)  # [B, N, 3, 3]
    # augmented ego <- camera, linear part and translation
    aug_ego_from_camera = bev_aug[:, None] @ ego_from_camera  # [B, N, 4, 4]
    linear = aug_ego_from_camera[..., :3, :3] @ rays_from_pixels  # [B, N, 3, 3]
    translation = aug_ego_from_camera[..., :3, 3]  # [B, N, 3]
    pixels_h = torch.cat([frustum[..., :2], torch.ones_like(frustum[..., :1])], dim=-1)  # [D, h, w, 3]
    depth = frustum[..., 2:3]
    directions = torch.einsum("bnij,dhwj->bndhwi", linear, pixels_h)  # [B, N, D, h, w, 3]
    return directions * depth + translation[:, :, None, None, None, :]


def depth_targets(depth_maps: torch.Tensor, cfg: ViewTransformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """BEVDepth-style depth labels at feature resolution.

    Args:
        depth_maps: ``[B, N, H, W]`` LiDAR depth in metres at input resolution, 0 = no point.
    Returns:
        one_hot: ``[B, N, h, w, D]`` float one-hot of the bin of the nearest LiDAR depth in
            each 16x16 block (min over valid pixels: the visible surface);
        valid: ``[B, N, h, w]`` bool, the block has a LiDAR point whose depth falls in a bin.
    """
    batch, cams, height, width = depth_maps.shape
    stride = cfg.feature_stride
    if (height, width) != tuple(cfg.input_size):
        raise ValueError(f"batch['depth_maps']: expected [B, N, {cfg.input_size[0]}, {cfg.input_size[1]}], got {tuple(depth_maps.shape)}")
    blocks = depth_maps.reshape(batch, cams, height // stride, stride, width // stride, stride)
    blocks = torch.where(blocks > 0, blocks, torch.full_like(blocks, float("inf")))
    nearest = blocks.amin(dim=(3, 5))  # [B, N, h, w]
    start, _, step = cfg.depth_bins
    bins = torch.floor((nearest - start) / step)
    valid = torch.isfinite(nearest) & (bins >= 0) & (bins < cfg.num_depth_bins)
    bins = torch.where(valid, bins, torch.zeros_like(bins)).long()
    one_hot = F.one_hot(bins, cfg.num_depth_bins).to(depth_maps.dtype)
    return one_hot, valid


def depth_loss(depth_logits: torch.Tensor, depth_maps: torch.Tensor, cfg: ViewTransformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE between predicted depth distributions and one-hot LiDAR bins on valid cells.

    Args:
        depth_logits: ``[B, N, D, h, w]``.
        depth_maps: ``[B, N, H, W]``.
    Returns:
        (scalar mean over all valid cells of the batch, ``[B]`` mean over each sample's valid cells).
        Each cell's BCE is summed over bins (BEVDepth).
    """
    one_hot, valid = depth_targets(depth_maps, cfg)
    probs = depth_logits.float().softmax(dim=2).permute(0, 1, 3, 4, 2)  # [B, N, h, w, D]
    probs = probs.clamp(1e-6, 1 - 1e-6)
    target = one_hot.float()
    # BCE on probabilities as BEVDepth, written out: F.binary_cross_entropy refuses to run
    # inside a CUDA autocast region.
    bce = -(target * probs.log() + (1 - target) * (1 - probs).log()).sum(-1)
    bce = bce * valid
    per_sample_sum = bce.flatten(1).sum(1)
    per_sample_count = valid.flatten(1).sum(1)
    per_sample = per_sample_sum / per_sample_count.clamp(min=1)
    total = per_sample_sum.sum() / per_sample_count.sum().clamp(min=1)
    return total, per_sample


class LSSViewTransformer(nn.Module):
    """Image features -> (BEV features, depth logits).

    A 1x1 conv predicts ``D`` depth logits and ``C`` context channels per feature cell
    (BEVDet); softmax(depth) x context is splatted into the BEV grid with ``bev_pool``.
    The pooling plan is cached while the geometry inputs are unchanged.
    """

    def __init__(self, in_channels: int, view: ViewTransformerConfig, grid: BEVGridConfig):
        super().__init__()
        self.view_cfg, self.grid_cfg = view, grid
        self.num_depth_bins = view.num_depth_bins
        self.context_channels = view.context_channels
        self.depth_net = nn.Conv2d(in_channels, self.num_depth_bins + self.context_channels, kernel_size=1)
        # Built once; not saved in checkpoints (it is a function of the config).
        self.register_buffer("frustum", make_frustum(view), persistent=False)
        self.plan_cache = PoolPlanCache()

    def geometry(self, batch: dict) -> torch.Tensor:
        """``[B, N, D, h, w, 3]`` frustum points in the augmented ego frame for a batch."""
        return frustum_to_ego(
            self.frustum, batch["intrinsics"], batch["ego_from_camera"], batch["image_aug"], batch["bev_aug"]
        )

    def pool_plan(self, batch: dict):
        key = (batch["intrinsics"], batch["ego_from_camera"], batch["image_aug"], batch["bev_aug"])
        return self.plan_cache.get(key, lambda: make_pool_plan(self.geometry(batch), self.grid_cfg))

    def forward(self, features: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            features: ``[B * N, C_in, h, w]`` stride-16 image features.
            batch: contract batch with ``intrinsics``, ``ego_from_camera``, ``image_aug``, ``bev_aug``.
        Returns:
            bev: ``[B, C, ny, nx]``; depth_logits: ``[B, N, D, h, w]``.
        """
        batch_size, cams = batch["intrinsics"].shape[:2]
        height, width = self.view_cfg.feature_size
        if features.shape[0] != batch_size * cams or features.shape[-2:] != (height, width):
            raise ValueError(
                f"LSSViewTransformer: features {tuple(features.shape)} do not match "
                f"B*N={batch_size * cams} cameras at feature size {(height, width)}"
            )
        depth_logits, depth_probs, context = self.lift(features, cams)
        bev = bev_pool(depth_probs, context, self.pool_plan(batch))
        return bev, depth_logits

    def lift(self, features: torch.Tensor, cams: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B * N, C_in, h, w]`` -> depth logits and probabilities ``[B, N, D, h, w]``, context ``[B, N, h, w, C]``."""
        height, width = features.shape[-2:]
        out = self.depth_net(features)
        depth_logits = out[:, : self.num_depth_bins].reshape(-1, cams, self.num_depth_bins, height, width)
        context = out[:, self.num_depth_bins :].reshape(-1, cams, self.context_channels, height, width)
        return depth_logits, depth_logits.softmax(dim=2), context.permute(0, 1, 3, 4, 2)

    def depth_loss(self, depth_logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "depth_maps" not in batch:
            raise KeyError("batch['depth_maps'] is required when view.depth_supervision is on")
        return depth_loss(depth_logits, batch["depth_maps"], self.view_cfg)
