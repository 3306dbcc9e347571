"""Configuration of the nuScenes data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ImageAugConfig:
    """Image augmentation (BEVDet-style); each op updates ``image_aug`` so geometry stays exact.

    The image is resized by ``input_width / original_width * U(resize_range)``, cropped to
    ``input_size`` (vertical crop taken near the bottom, where the road is: the crop top is
    ``(1 - U(bottom_crop_range)) * (resized_h - input_h)``), flipped with ``flip_prob``
    and rotated by ``U(rotate_range)`` degrees about the image centre. At test time only the
    deterministic resize and the mean bottom crop are applied.
    """

    resize_range: tuple[float, float] = (0.94, 1.11)
    bottom_crop_range: tuple[float, float] = (0.0, 0.22)
    flip_prob: float = 0.5
    rotate_range: tuple[float, float] = (-5.4, 5.4)


@dataclass
class BEVAugConfig:
    """BEV augmentation of the ego frame: rotation about z, uniform scale, x/y flips."""

    rotate_range: tuple[float, float] = (-22.5, 22.5)
    scale_range: tuple[float, float] = (0.95, 1.05)
    flip_x_prob: float = 0.5
    flip_y_prob: float = 0.5


@dataclass
class DataConfig:
    """Where the data is and how samples are prepared.

    ``info_dir`` defaults to ``dataroot``. ``input_size`` and ``gt_range`` are the model's: left
    out (None), :class:`bevperc.config.Config` fills them in from ``model.view.input_size`` and the
    grid ranges (a value given that disagrees is an error); a ``DataConfig`` used without a run
    config (``NuScenesBEVDataset(DataConfig(...), ...)``) must set both.
    """

    dataroot: str = "data/nuscenes-synthetic"
    version: str = "v1.0-mini"
    train_split: str = "mini_train"
    val_split: str = "mini_val"
    info_dir: Optional[str] = None
    input_size: Optional[tuple[int, int]] = None
    """(H, W) of the network input (after image augmentation); None: ``model.view.input_size``."""
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    image_aug: ImageAugConfig = field(default_factory=ImageAugConfig)
    bev_aug: BEVAugConfig = field(default_factory=BEVAugConfig)
    augment: bool = True
    load_depth: bool = False
    """Project the sample's LiDAR sweep into each augmented image (``depth_maps``, ``object_depth_maps``)."""
    image_cache: bool = False
    """Keep decoded camera images in ``cache_dir`` (``bevperc.data.image_cache``): epochs after the
    first skip JPEG decoding; the images are bit-identical."""
    cache_dir: Optional[str] = None
    """Where the image cache lives; default ``<info_dir or dataroot>/bevperc_cache``."""
    gt_range: Optional[tuple[float, float, float, float, float, float]] = None
    """``(x_min, y_min, z_min, x_max, y_max, z_max)`` (augmented ego frame): GT boxes whose centre lies
    outside are dropped; None: the model's grid ranges (``BEVGridConfig.bounds``)."""
    min_lidar_points: int = 1

    def __post_init__(self) -> None:
        if self.input_size is not None and (self.input_size[0] <= 0 or self.input_size[1] <= 0):
            raise ValueError(f"data.input_size must be positive (H, W), got {self.input_size}")

    def info_path(self, split: str) -> str:
        from pathlib import Path

        return str(Path(self.info_dir or self.dataroot) / f"bevperc_infos_{split}.json")
