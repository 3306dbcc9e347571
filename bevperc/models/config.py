"""Dataclass configuration of the camera BEV detector (LSS / BEVDet style).

``ModelConfig`` is the root; ``build_detector(cfg)`` in ``bevperc.models.detector`` turns
it into modules with plain imports. Every field is loadable from YAML with
``bevperc.utils.config.load_config`` (unknown keys rejected).

Defaults follow BEVDet-R50 on nuScenes (256x704 input, 59 depth bins in [1, 60) m,
128x128 BEV grid of 0.8 m). ``configs/demo_cpu.yaml`` is the small variant that trains on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from bevperc.data.classes import DETECTION_CLASSES, STANDARD_CLASS_GROUPS

# CenterPoint's circle-NMS thresholds per class group (nuScenes config, ``min_radius``).
# CenterPoint compares them with the *squared* centre distance, so the radius in metres
# is their square root; we store metres (a real radius) and convert here once.
_CENTERPOINT_NMS_SQUARED = {
    "car": 4.0,
    "truck": 12.0,
    "construction_vehicle": 12.0,
    "bus": 10.0,
    "trailer": 10.0,
    "barrier": 1.0,
    "motorcycle": 0.85,
    "bicycle": 0.85,
    "pedestrian": 0.175,
    "traffic_cone": 0.175,
}
CENTERPOINT_NMS_RADII: dict[str, float] = {k: math.sqrt(v) for k, v in _CENTERPOINT_NMS_SQUARED.items()}


BACKBONE_NAMES = ("resnet", "regnet_x_400mf", "mobilenet_v3_large", "mobilenet_v3_small")


@dataclass
class BackboneConfig:
    """torchvision image backbone (see ``bevperc.models.backbone`` for the stages of each)."""

    name: Literal["resnet", "regnet_x_400mf", "mobilenet_v3_large", "mobilenet_v3_small"] = "resnet"
    depth: int = 50
    """ResNet depth: 18, 34 or 50 (``name: resnet`` only)."""
    num_stages: int = 4
    """Stages after the stem (strides 4, 8, 16, 32); 3 cuts the stride-32 stage (e.g. ResNet18 after layer3)."""
    pretrained: bool = False
    """Load torchvision ImageNet weights (e.g. ``ResNet{depth}_Weights.IMAGENET1K_V1``; needs the
    weights in the torch hub cache or internet)."""
    frozen_stages: int = -1
    """-1: train everything; 0: freeze the stem; k>=1: also freeze stages 1..k."""
    norm_eval: bool = False
    """Keep every BatchNorm of the backbone in eval mode (frozen running stats) while training."""
    channels_last: bool = False
    """Run the backbone in NHWC memory layout (faster convolutions on CPUs with oneDNN)."""

    def __post_init__(self) -> None:
        if self.name not in BACKBONE_NAMES:
            raise ValueError(f"backbone.name: expected one of {BACKBONE_NAMES}, got {self.name!r}")
        if self.depth not in (18, 34, 50):
            raise ValueError(f"backbone.depth: expected 18, 34 or 50, got {self.depth}")
        if not 2 <= self.num_stages <= 4:
            raise ValueError(f"backbone.num_stages: expected 2..4, got {self.num_stages}")
        if not -1 <= self.frozen_stages <= self.num_stages:
            raise ValueError(f"backbone.frozen_stages: expected -1..{self.num_stages}, got {self.frozen_stages}")


@dataclass
class NeckConfig:
    """FPN fusing the backbone maps from the view transformer's feature stride on into one map."""

    out_channels: int = 256


@dataclass
class ViewTransformerConfig:
    """LSS lift: per-pixel depth distribution times context features."""

    input_size: tuple[int, int] = (256, 704)
    """(H, W) of the network input images (after image augmentation)."""
    feature_stride: int = 16
    """Stride of the neck output, 8 or 16; the frustum has one ray per feature cell."""
    depth_bins: tuple[float, float, float] = (1.0, 60.0, 1.0)
    """(start, stop, step) in metres: bin i covers [start + i*step, start + (i+1)*step)."""
    context_channels: int = 64
    """Channels of the lifted features (the BEV feature width before the encoder)."""
    depth_net: Literal["linear", "conv"] = "linear"
    """``linear``: one 1x1 conv predicts depth and context (BEVDet); ``conv``: two 3x3 conv-BN-ReLU
    layers first (a wider view of the image, e.g. of where an object meets the ground)."""
    ray_features: bool = False
    """Camera-aware depth: the depth net also sees, per ray, the geometry of the (augmented) camera:
    the ray's elevation, the camera height and the depth where the ray meets the ground plane."""
    depth_supervision: bool = False
    """BEVDepth-style BCE on projected LiDAR depth (needs ``data.load_depth``)."""
    depth_target: Literal["nearest", "object"] = "nearest"
    """Depth label of a feature cell: ``nearest``, the nearest LiDAR return in its pixel block
    (BEVDepth); ``object``, the nearest return inside a GT box where the block has one (foreground
    priority: a large block at low resolution often holds the road or a nearer object), else the nearest."""
    depth_target_sigma: float = 0.0
    """0: one-hot depth labels; > 0: a Gaussian over bins (sigma in bins) around the label depth."""

    def __post_init__(self) -> None:
        start, stop, step = self.depth_bins
        if not (step > 0 and stop > start > 0):
            raise ValueError(f"view.depth_bins: expected (start>0, stop>start, step>0), got {self.depth_bins}")
        if self.feature_stride not in (8, 16):
            raise ValueError(f"view.feature_stride: expected 8 or 16, got {self.feature_stride}")
        height, width = self.input_size
        if height % 32 or width % 32:
            raise ValueError(f"view.input_size: H and W must be multiples of 32, got {self.input_size}")
        if self.depth_target_sigma < 0:
            raise ValueError(f"view.depth_target_sigma: expected >= 0, got {self.depth_target_sigma}")

    @property
    def num_depth_bins(self) -> int:
        start, stop, step = self.depth_bins
        return int(round((stop - start) / step))

    @property
    def feature_size(self) -> tuple[int, int]:
        """(h, w) of the feature map the lift reads."""
        return self.input_size[0] // self.feature_stride, self.input_size[1] // self.feature_stride


@dataclass
class BEVGridConfig:
    """The BEV grid in the (augmented) ego frame. Rows index y, columns index x."""

    x_range: tuple[float, float] = (-51.2, 51.2)
    y_range: tuple[float, float] = (-51.2, 51.2)
    z_range: tuple[float, float] = (-5.0, 3.0)
    """Points outside [z_min, z_max) are dropped; inside, z is collapsed (one voxel in z)."""
    cell_size: float = 0.8

    def __post_init__(self) -> None:
        for name in ("x_range", "y_range", "z_range"):
            low, high = getattr(self, name)
            if not high > low:
                raise ValueError(f"grid.{name}: expected (low, high) with high > low, got {(low, high)}")
        if self.cell_size <= 0:
            raise ValueError(f"grid.cell_size: expected > 0, got {self.cell_size}")
        for name in ("x_range", "y_range"):
            low, high = getattr(self, name)
            cells = (high - low) / self.cell_size
            if abs(cells - round(cells)) > 1e-6:
                raise ValueError(f"grid.{name}: length {high - low} is not a multiple of cell_size {self.cell_size}")

    @property
    def bounds(self) -> tuple[float, float, float, float, float, float]:
        """``(x_min, y_min, z_min, x_max, y_max, z_max)`` of the grid (the run's ``data.gt_range``)."""
        (x_min, x_max), (y_min, y_max), (z_min, z_max) = self.x_range, self.y_range, self.z_range
        return (x_min, y_min, z_min, x_max, y_max, z_max)

    @property
    def num_x(self) -> int:
        return int(round((self.x_range[1] - self.x_range[0]) / self.cell_size))

    @property
    def num_y(self) -> int:
        return int(round((self.y_range[1] - self.y_range[0]) / self.cell_size))


@dataclass
class BEVEncoderConfig:
    """ResNet basic blocks at BEV strides 2 and 4, fused back to the BEV resolution."""

    stage_channels: tuple[int, int] = (128, 256)
    blocks_per_stage: int = 2
    out_channels: int = 256
    full_resolution_skip: bool = False
    """Also feed the input BEV map to the last conv: detail at the grid's own resolution (otherwise
    the output is upsampled from stride-2 features, as in BEVDet, which blurs objects smaller than 2 cells)."""


@dataclass
class HeadConfig:
    """CenterPoint head: one heatmap + regression branches per class group."""

    class_groups: list[list[str]] = field(default_factory=lambda: [list(g) for g in STANDARD_CLASS_GROUPS])
    shared_channels: int = 64
    head_channels: int = 64
    max_objs: int = 500
    """Regression targets kept per sample and group (CenterPoint: 500)."""
    gaussian_overlap: float = 0.1
    min_radius: int = 2
    merged_regression: bool = False
    """One regression branch per class group predicting all regression channels at once (offset,
    height, size, rotation, velocity), instead of CenterPoint's one branch each: ~1/3 of the head's cost."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for group in self.class_groups:
            if not group:
                raise ValueError("head.class_groups: empty group")
            for name in group:
                if name not in DETECTION_CLASSES:
                    raise ValueError(
                        f"head.class_groups: unknown class {name!r}; expected names from {list(DETECTION_CLASSES)}"
                    )
                if name in seen:
                    raise ValueError(f"head.class_groups: class {name!r} appears in two groups")
                seen.add(name)

    @property
    def group_names(self) -> list[str]:
        """``"truck+construction_vehicle"`` style names, used in loss names."""
        return ["+".join(group) for group in self.class_groups]


@dataclass
class ImageHeadConfig:
    """Perspective supervision (``bevperc.models.image_head``): a class heatmap on the image features."""

    enabled: bool = False
    channels: int = 64
    min_radius: int = 1
    weight: float = 1.0
    """Fixed weight of the ``image_heatmap`` task."""
    lift_scores: bool = False
    """Lift the head's class probabilities with the context features: the BEV then receives explicit
    class evidence where the depth net puts each pixel (the head also runs at inference)."""
    heading: bool = False
    """Also predict each object's observation angle (task ``image_heading``); with ``lift_scores`` it is
    lifted as an ego-frame heading (turned by the ray's azimuth): front and back of a vehicle differ in
    the image, much less in the splatted BEV shape. The head then also runs at inference (for the lift,
    and for ``decode.direction_from_image``)."""
    heading_weight: float = 0.25
    """Fixed weight of the ``image_heading`` task (the BEV regressions' 0.25)."""
    heading_as_imaged: bool = True
    """The observation angle is the one the image shows: negated where an image flip or a BEV mirror
    (one of them) is applied, and turned back with the camera's handedness when lifted. False: the
    angle in the augmented ego frame whatever the mirror (the same picture then comes with both signs
    of the sine); ``configs/demo_cpu.yaml`` keeps False, measured in docs/learning.md."""


@dataclass
class DecodeConfig:
    """Turning heatmaps into boxes."""

    top_k: int = 500
    """Peaks taken per class group before thresholding and NMS."""
    score_threshold: float = 0.1
    nms_radii: dict[str, float] = field(default_factory=lambda: dict(CENTERPOINT_NMS_RADII))
    """Circle-NMS radius in metres per class (centre distance); 0 or missing disables NMS for it."""
    max_detections: int = 500
    """Kept per sample after NMS (the nuScenes submission limit)."""
    direction_from_image: bool = False
    """Take each box's direction along its axis from the image head (``image_head.heading``): a box is
    turned by 180 degrees where its heading disagrees with the observation angle the image head predicts
    where the box centre projects (the camera that scores the box's class highest there). The BEV head
    finds the axis; front and back are what the image shows (``bevperc.models.image_head.orient_by_image``)."""


@dataclass
class ModelConfig:
    """The whole detector."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    view: ViewTransformerConfig = field(default_factory=ViewTransformerConfig)
    grid: BEVGridConfig = field(default_factory=BEVGridConfig)
    bev_encoder: BEVEncoderConfig = field(default_factory=BEVEncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    image_head: ImageHeadConfig = field(default_factory=ImageHeadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        if self.decode.direction_from_image and not (self.image_head.enabled and self.image_head.heading):
            raise ValueError("decode.direction_from_image needs the image head's observation angle: "
                             "set image_head.enabled: true and image_head.heading: true")
