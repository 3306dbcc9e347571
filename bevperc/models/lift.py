"""LSS view transformer: lift image features to a depth-weighted frustum, splat to BEV.

Frustum: one ray per feature cell (stride ``s`` = 8 or 16), ``D`` depth bins per ray. The ray
of feature cell ``(y, x)`` goes through the augmented-image pixel at the centre of the ``s x s``
block it summarises, ``(u', v') = (x * s + (s - 1) / 2, y * s + (s - 1) / 2)`` (pixel centres
at integer coordinates, as in the intrinsics). Depth bin ``i`` covers
``[start + i * step, start + (i + 1) * step)`` and its frustum point sits at the bin centre.

Geometry (the one convention of ``bevperc.geometry``): a pixel ``(u', v')`` at camera depth ``d`` maps to the augmented
ego frame as ``bev_aug @ ego_from_camera @ [K^-1 @ inv(image_aug) @ [u', v', 1] * d, 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bevperc.models.bev_pool import PoolPlanCache, bev_pool, make_pool_plan
from bevperc.models.config import BEVGridConfig, ImageHeadConfig, ViewTransformerConfig
from bevperc.models.image_head import ImageHeatmapHead


DEPTH_LOSS_WEIGHT = 3.0
"""BEVDepth's weight of the depth loss."""


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


def rays_in_ego(
    pixels: torch.Tensor,
    intrinsics: torch.Tensor,
    ego_from_camera: torch.Tensor,
    image_aug: torch.Tensor,
    bev_aug: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera centres and ray directions in the augmented ego frame.

    Args:
        pixels: ``[h, w, 2]`` augmented-image pixels (u', v').
        intrinsics: ``[B, N, 3, 3]`` of the original camera.
        ego_from_camera: ``[B, N, 4, 4]``.
        image_aug: ``[B, N, 3, 3]`` original pixel -> augmented pixel.
        bev_aug: ``[B, 4, 4]`` ego -> augmented ego.
    Returns:
        origins ``[B, N, 3]`` and directions ``[B, N, h, w, 3]`` float64, scaled so that a
        point at camera depth ``d`` (camera z) is ``origin + d * direction``.
    """
    dtype = torch.float64
    intrinsics, ego_from_camera = intrinsics.to(dtype), ego_from_camera.to(dtype)
    image_aug, bev_aug = image_aug.to(dtype), bev_aug.to(dtype)
    pixels = pixels.to(device=intrinsics.device, dtype=dtype)
    # ray direction with camera z = 1 for each augmented pixel: K^-1 @ inv(image_aug) @ [u', v', 1]
    rays_from_pixels = inverse_3x3(intrinsics) @ inverse_3x3(image_aug)  # [B, N, 3, 3]
    aug_ego_from_camera = bev_aug[:, None] @ ego_from_camera  # [B, N, 4, 4]
    linear = aug_ego_from_camera[..., :3, :3] @ rays_from_pixels  # [B, N, 3, 3]
    pixels_h = torch.cat([pixels, torch.ones_like(pixels[..., :1])], dim=-1)  # [h, w, 3]
    directions = torch.einsum("bnij,hwj->bnhwi", linear, pixels_h)
    return aug_ego_from_camera[..., :3, 3], directions


def frustum_to_ego(
    frustum: torch.Tensor,
    intrinsics: torch.Tensor,
    ego_from_camera: torch.Tensor,
    image_aug: torch.Tensor,
    bev_aug: torch.Tensor,
) -> torch.Tensor:
    """Frustum points ``[D, h, w, 3]`` (u', v', d) in the augmented ego frame -> ``[B, N, D, h, w, 3]`` float64.

    The geometry arguments are those of :func:`rays_in_ego`.
    """
    origins, directions = rays_in_ego(frustum[0, ..., :2], intrinsics, ego_from_camera, image_aug, bev_aug)
    depth = frustum[:, 0, 0, 2].to(directions)  # [D]
    return origins[:, :, None, None, None, :] + depth[:, None, None, None] * directions[:, :, None]


RAY_FEATURES = 7
"""Channels of :func:`ray_features`."""
RAY_DEPTH_CUES = slice(0, 6)
"""The channels of :func:`ray_features` a camera-aware depth net reads (all but the handedness)."""
RAY_AZIMUTH = slice(4, 6)
"""The ``cos, sin`` of the ray's azimuth in :func:`ray_features`."""
RAY_HANDEDNESS = slice(6, 7)
"""+1, or -1 where the augmentation mirrors the camera (see :func:`ray_features`)."""


def ray_features(origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """What the network is told about each ray, ``[B, N, RAY_FEATURES, h, w]`` float32.

    Per ray in the augmented ego frame (ground plane z = 0): the sine of its elevation, the camera
    height (m, / 2), the inverse of the camera depth at which it meets the ground (1/m, x 10; 0 for
    rays at or above the horizon), the log of the metres a feature cell spans at 10 m depth (the
    augmented focal length), and the cosine and sine of its azimuth. Image resizing, cropping and
    rotation and BEV scaling all change these, so the depth net sees what the augmentation did to the
    camera (BEVDepth feeds camera parameters to its depth net for the same reason). Last, the
    camera's handedness: -1 where exactly one of the image flip and the BEV mirror is applied (the
    sign of the determinant of the pixel -> ray map), so that what the image shows of a heading can be
    turned into the augmented ego frame (:func:`ego_heading`).
    """
    unit = directions / directions.norm(dim=-1, keepdim=True)
    height = origins[..., 2][:, :, None, None].expand_as(unit[..., 2])
    # origin_z + d * direction_z = 0  ->  1 / d = -direction_z / origin_z (rays pointing down only)
    inverse_ground_depth = (-directions[..., 2] / height.clamp(min=1e-3)).clamp(min=0.0)
    # neighbouring rays differ by one feature cell: their angle is the angular size of the cell
    spacing = (unit[..., :, 1:, :] - unit[..., :, :-1, :]).norm(dim=-1).mean(dim=(-2, -1))  # [B, N]
    log_scale = torch.log(10.0 * spacing.clamp(min=1e-6))[:, :, None, None].expand_as(height)
    horizontal = directions[..., :2] / directions[..., :2].norm(dim=-1, keepdim=True).clamp(min=1e-9)
    handedness = mirror_sign(directions)[:, :, None, None].expand_as(height)
    features = torch.stack([unit[..., 2], height / 2.0, 10.0 * inverse_ground_depth, log_scale,
                            horizontal[..., 0], horizontal[..., 1], handedness], dim=2)
    return features.float()


def mirror_sign(directions: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` sign of ``det(L)`` for the ray directions ``[B, N, h, w, 3]`` = ``L @ [u', v', 1]`` of
    :func:`rays_in_ego` (``h, w >= 2``): ``det[L e_u, L e_v, L p] = det(L)``, with the two differences
    taken between neighbouring rays. -1 where the augmented image is a mirror image of the scene."""
    corner = directions[:, :, 0, 0]
    along_u = directions[:, :, 0, 1] - corner
    along_v = directions[:, :, 1, 0] - corner
    cross = torch.stack([along_u[..., 1] * along_v[..., 2] - along_u[..., 2] * along_v[..., 1],
                         along_u[..., 2] * along_v[..., 0] - along_u[..., 0] * along_v[..., 2],
                         along_u[..., 0] * along_v[..., 1] - along_u[..., 1] * along_v[..., 0]], dim=-1)
    return torch.sign((cross * corner).sum(-1))


def ego_heading(observation: torch.Tensor, azimuth: torch.Tensor, handedness: torch.Tensor) -> torch.Tensor:
    """``(sin, cos)`` of the ego-frame yaw from those of the observation angle as the image shows it
    (:func:`bevperc.models.image_head.image_targets`), the ray's azimuth ``(cos, sin)`` and the
    camera's handedness (+1 / -1, :data:`RAY_HANDEDNESS`); all ``[B', c, h, w]``. The ego-frame
    observation angle is ``handedness x`` the image's."""
    sin_a, cos_a = observation[:, 0:1] * handedness, observation[:, 1:2]
    cos_p, sin_p = azimuth[:, 0:1], azimuth[:, 1:2]
    return torch.cat([sin_a * cos_p + cos_a * sin_p, cos_a * cos_p - sin_a * sin_p], dim=1)


def _block_nearest(depth_maps: torch.Tensor, stride: int) -> torch.Tensor:
    """``[B, N, H, W]`` depth (0 = none) -> ``[B, N, H/s, W/s]`` nearest depth per block (inf = none)."""
    batch, cams, height, width = depth_maps.shape
    blocks = depth_maps.reshape(batch, cams, height // stride, stride, width // stride, stride)
    blocks = torch.where(blocks > 0, blocks, torch.full_like(blocks, float("inf")))
    return blocks.amin(dim=(3, 5))


def depth_targets(
    depth_maps: torch.Tensor, cfg: ViewTransformerConfig, object_depth_maps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BEVDepth-style depth labels at feature resolution.

    Args:
        depth_maps: ``[B, N, H, W]`` LiDAR depth in metres at input resolution, 0 = no point.
        object_depth_maps: same, only the LiDAR points inside GT boxes; with it (and
            ``cfg.depth_target == "object"``) a block holding such points is labelled with the nearest
            of them (foreground priority), every other block with its nearest point.
    Returns:
        target: ``[B, N, h, w, D]`` float labels: one-hot of the label depth's bin, or with
            ``cfg.depth_target_sigma`` a Gaussian over bin centres (sigma in bins) summing to 1;
        valid: ``[B, N, h, w]`` bool, the block has a label depth inside the bins.
    """
    height, width = depth_maps.shape[-2:]
    if (height, width) != tuple(cfg.input_size):
        raise ValueError(f"batch['depth_maps']: expected [B, N, {cfg.input_size[0]}, {cfg.input_size[1]}], "
                         f"got {tuple(depth_maps.shape)}")
    label = _block_nearest(depth_maps, cfg.feature_stride)  # [B, N, h, w]
    if cfg.depth_target == "object":
        if object_depth_maps is None:
            raise KeyError("batch['object_depth_maps'] is required by view.depth_target: object")
        on_object = _block_nearest(object_depth_maps, cfg.feature_stride)
        label = torch.where(torch.isfinite(on_object), on_object, label)
    start, _, step = cfg.depth_bins
    position = (label - start) / step  # continuous bin coordinate; bin i covers [i, i + 1)
    valid = torch.isfinite(label) & (position >= 0) & (position < cfg.num_depth_bins)
    position = torch.where(valid, position, torch.zeros_like(position))
    if cfg.depth_target_sigma == 0:
        target = F.one_hot(position.floor().long(), cfg.num_depth_bins).to(depth_maps.dtype)
    else:
        centres = torch.arange(cfg.num_depth_bins, dtype=depth_maps.dtype, device=depth_maps.device) + 0.5
        target = torch.exp(-0.5 * ((centres - position.unsqueeze(-1)) / cfg.depth_target_sigma) ** 2)
        target = target / target.sum(-1, keepdim=True)
    return target, valid


def depth_loss(
    depth_logits: torch.Tensor, depth_maps: torch.Tensor, cfg: ViewTransformerConfig,
    object_depth_maps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE between predicted depth distributions and the :func:`depth_targets` labels on valid cells.

    Args:
        depth_logits: ``[B, N, D, h, w]``.
        depth_maps, object_depth_maps: ``[B, N, H, W]`` (see :func:`depth_targets`).
    Returns:
        (scalar mean over all valid cells of the batch, ``[B]`` mean over each sample's valid cells).
        Each cell's BCE is summed over bins (BEVDepth).
    """
    target, valid = depth_targets(depth_maps, cfg, object_depth_maps)
    probs = depth_logits.float().softmax(dim=2).permute(0, 1, 3, 4, 2)  # [B, N, h, w, D]
    probs = probs.clamp(1e-6, 1 - 1e-6)
    target = target.float()
    # BCE on probabilities as BEVDepth, written out: F.binary_cross_entropy refuses to run
    # inside a CUDA autocast region.
    bce = -(target * probs.log() + (1 - target) * (1 - probs).log()).sum(-1)
    bce = bce * valid
    per_sample_sum = bce.flatten(1).sum(1)
    per_sample_count = valid.flatten(1).sum(1)
    per_sample = per_sample_sum / per_sample_count.clamp(min=1)
    total = per_sample_sum.sum() / per_sample_count.sum().clamp(min=1)
    return total, per_sample


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class LSSViewTransformer(nn.Module):
    """Image features -> (BEV features, depth logits).

    The depth net predicts ``D`` depth logits and ``C`` context channels per feature cell: one
    1x1 conv (BEVDet, ``view.depth_net: linear``) or two 3x3 conv-BN-ReLU layers and the 1x1
    conv (``conv``). With ``view.ray_features`` it also reads :func:`ray_features` (embedded by a
    1x1 conv and added to the image features). An optional :class:`ImageHeatmapHead` predicts class
    heatmaps from the same features (perspective supervision); with ``lift_scores`` their
    probabilities join the context. softmax(depth) x context is splatted into the BEV grid with
    ``bev_pool``; the pooling plan is cached while the geometry inputs are unchanged.
    """

    def __init__(self, in_channels: int, view: ViewTransformerConfig, grid: BEVGridConfig,
                 image_head: ImageHeatmapHead | None = None, lift_scores: bool = False):
        super().__init__()
        if lift_scores and image_head is None:
            raise ValueError("LSSViewTransformer: lift_scores needs an image head")
        self.view_cfg, self.grid_cfg = view, grid
        self.image_head, self.lift_scores = image_head, lift_scores
        self.lift_heading = lift_scores and image_head.heading
        self.num_depth_bins = view.num_depth_bins
        self.context_channels = view.context_channels
        self.lifted_channels = view.context_channels + (image_head.num_classes if lift_scores else 0)
        self.lifted_channels += 2 if self.lift_heading else 0
        """Channels lifted per pixel, and of the BEV map: the context, plus the class probabilities
        (``lift_scores``) and the ego-frame heading of the image head (its observation angle turned by
        the ray's azimuth, weighted by the top class probability)."""
        self.out_channels = self.lifted_channels
        self.ray_embedding = nn.Conv2d(RAY_DEPTH_CUES.stop, in_channels, kernel_size=1) if view.ray_features else None
        layers = [_conv_bn_relu(in_channels, in_channels), _conv_bn_relu(in_channels, in_channels)] \
            if view.depth_net == "conv" else []
        self.depth_net = nn.Sequential(
            *layers, nn.Conv2d(in_channels, self.num_depth_bins + self.context_channels, kernel_size=1))
        # Built once; not saved in checkpoints (it is a function of the config).
        self.register_buffer("frustum", make_frustum(view), persistent=False)
        self.plan_cache = PoolPlanCache()

    @staticmethod
    def task_weights(view: ViewTransformerConfig, image_head: ImageHeadConfig) -> dict[str, float]:
        """Its tasks in the order of :meth:`loss` merged after the head's, with their fixed weights:
        ``depth`` (BEVDepth's 3.0) with ``view.depth_supervision``, ``image_heatmap`` and ``image_heading``
        (``image_head.weight``, ``image_head.heading_weight``) where the image head has them."""
        weights = {"depth": DEPTH_LOSS_WEIGHT} if view.depth_supervision else {}
        if image_head.enabled:
            weights["image_heatmap"] = image_head.weight
            if image_head.heading:
                weights["image_heading"] = image_head.heading_weight
        return weights

    def _geometry_inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        return batch["intrinsics"], batch["ego_from_camera"], batch["image_aug"], batch["bev_aug"]

    def geometry(self, batch: dict) -> torch.Tensor:
        """``[B, N, D, h, w, 3]`` frustum points in the augmented ego frame for a batch."""
        return frustum_to_ego(self.frustum, *self._geometry_inputs(batch))

    def pool_plan(self, batch: dict):
        return self.plan_cache.get(self._geometry_inputs(batch),
                                   lambda: make_pool_plan(self.geometry(batch), self.grid_cfg))

    def forward(self, features: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """
        Args:
            features: ``[B * N, C_in, h, w]`` image features at ``view.feature_stride``.
            batch: contract batch with ``intrinsics``, ``ego_from_camera``, ``image_aug``, ``bev_aug``.
        Returns:
            bev: ``[B, out_channels, ny, nx]``; depth_logits: ``[B, N, D, h, w]``; the image head's
            logits ``[B * N, classes, h, w]`` (None without a head, or in eval mode unless lifted).
        """
        batch_size, cams = batch["intrinsics"].shape[:2]
        height, width = self.view_cfg.feature_size
        if features.shape[0] != batch_size * cams or features.shape[-2:] != (height, width):
            raise ValueError(
                f"LSSViewTransformer: features {tuple(features.shape)} do not match "
                f"B*N={batch_size * cams} cameras at feature size {(height, width)}"
            )
        depth_logits, depth_probs, context, image_logits = self.lift(features, cams, self.ray_inputs(batch))
        bev = bev_pool(depth_probs, context, self.pool_plan(batch))
        return bev, depth_logits, image_logits

    def ray_inputs(self, geometry: dict) -> torch.Tensor | None:
        """:func:`ray_features` ``[B * N, RAY_FEATURES, h, w]`` for the geometry keys of a batch
        (None unless the depth net reads them or a lifted heading needs the ray azimuths)."""
        if self.ray_embedding is None and not self.lift_heading:
            return None
        origins, directions = rays_in_ego(self.frustum[0, ..., :2], *self._geometry_inputs(geometry))
        return ray_features(origins, directions).flatten(0, 1)

    def lift(self, features: torch.Tensor, cams: int, rays: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``[B * N, C_in, h, w]`` (+ ``ray_inputs``) -> depth logits and probabilities ``[B, N, D, h, w]``,
        context ``[B, N, h, w, lifted_channels]``, image-head logits ``[B * N, classes, h, w]`` or None."""
        height, width = features.shape[-2:]
        image_logits = None
        if self.image_head is not None and (self.training or self.lift_scores or self.image_head.heading):
            image_logits = self.image_head(features)
        if (self.ray_embedding is not None or self.lift_heading) and rays is None:
            raise ValueError("LSSViewTransformer.lift: give the ray_inputs of the batch (ray features or lifted heading)")
        if self.ray_embedding is not None:
            features = features + self.ray_embedding(rays[:, RAY_DEPTH_CUES].to(features))
        out = self.depth_net(features)
        depth_logits = out[:, : self.num_depth_bins].reshape(-1, cams, self.num_depth_bins, height, width)
        context = [out[:, self.num_depth_bins :]]
        if self.lift_scores:
            scores = torch.sigmoid(image_logits[:, : self.image_head.num_classes])
            context.append(scores)
        if self.lift_heading:
            handedness = rays[:, RAY_HANDEDNESS] if self.image_head.heading_as_imaged else torch.ones_like(rays[:, RAY_HANDEDNESS])
            context.append(ego_heading(image_logits[:, self.image_head.num_classes :], rays[:, RAY_AZIMUTH].to(scores),
                                       handedness.to(scores))
                           * scores.amax(dim=1, keepdim=True))
        context = torch.cat(context, dim=1).reshape(-1, cams, self.lifted_channels, height, width)
        # float32 depth probabilities (a no-op without autocast): the pooling sums in the wider type
        return depth_logits, depth_logits.float().softmax(dim=2), context.permute(0, 1, 3, 4, 2), image_logits

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Its tasks (scalar, and ``[B]`` per sample): ``depth`` with ``view.depth_supervision``, and the
        image head's ``image_heatmap``; ``outputs`` from a training-mode forward of the detector."""
        task_losses, per_sample = {}, {}
        if self.image_head is not None:
            if outputs.get("image_heatmap") is None:
                raise ValueError("LSSViewTransformer.loss: needs outputs['image_heatmap'] of a training-mode forward")
            task_losses, per_sample = self.image_head.loss(outputs["image_heatmap"], batch)
        if not self.view_cfg.depth_supervision:
            return task_losses, per_sample
        if "depth_maps" not in batch:
            raise KeyError("batch['depth_maps'] is required when view.depth_supervision is on (set data.load_depth: true)")
        total, depth_per_sample = depth_loss(outputs["depth"], batch["depth_maps"], self.view_cfg,
                                             batch.get("object_depth_maps"))
        return {"depth": total, **task_losses}, {"depth": depth_per_sample, **per_sample}
