"""nuScenes data: info files, the multi-camera dataset, augmentation, synthetic worlds."""

from bevperc.data.config import BEVAugConfig, DataConfig, ImageAugConfig
from bevperc.data.dataset import NuScenesBEVDataset, collate_bev, load_lidar_points
from bevperc.data.infos import CAMERA_NAMES, DataError, create_infos, load_infos

__all__ = [
    "BEVAugConfig",
    "CAMERA_NAMES",
    "DataConfig",
    "DataError",
    "ImageAugConfig",
    "NuScenesBEVDataset",
    "collate_bev",
    "create_infos",
    "load_infos",
    "load_lidar_points",
]
