"""The multi-camera nuScenes dataset for BEV detection (reads info files, never the devkit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bevperc.data.augment import apply_image_aug, decode_image, draft_size, sample_bev_aug, sample_image_aug
from bevperc.data.classes import DETECTION_CLASSES
from bevperc.data.config import DataConfig
from bevperc.data.image_cache import ImageCache
from bevperc.data.infos import CAMERA_NAMES, DataError, dataroot_file, load_infos
from bevperc.geometry import camera_from_ego_points, points_in_boxes, project_to_image, transform_boxes, transform_points


def load_lidar_points(path: str | Path) -> np.ndarray:
    """Read a nuScenes ``.pcd.bin`` sweep: float32 rows of (x, y, z, intensity, ring) -> ``(P, 5)``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: LiDAR file not found")
    size = path.stat().st_size
    if size % 20:
        raise DataError(f"{path}: size {size} bytes is not a whole number of points (20 bytes: 5 float32 columns)")
    return np.fromfile(path, dtype=np.float32).reshape(-1, 5)


def _project_lidar(
    points_ego: np.ndarray, ego_from_camera: np.ndarray, intrinsics: np.ndarray, image_aug: np.ndarray,
    input_size: tuple[int, int], min_depth: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points ``(P, 3)`` -> (flat pixel ``row * W + col``, camera depth, index into ``points_ego``) of those
    in front of the camera and inside the augmented image."""
    input_h, input_w = input_size
    points_camera = camera_from_ego_points(points_ego, ego_from_camera)
    in_front = np.nonzero(points_camera[:, 2] > min_depth)[0]
    pixels, depth = project_to_image(points_camera[in_front], intrinsics)
    pixels = pixels @ image_aug[:2, :2].T + image_aug[:2, 2]
    cols, rows = np.floor(pixels[:, 0]).astype(np.int64), np.floor(pixels[:, 1]).astype(np.int64)
    inside = (cols >= 0) & (cols < input_w) & (rows >= 0) & (rows < input_h)
    return rows[inside] * input_w + cols[inside], depth[inside], in_front[inside]


def _nearest_depth_map(flat_pixels: np.ndarray, depth: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` float32 nearest depth per pixel, 0 where no point."""
    depth_map = np.full(input_size[0] * input_size[1], np.inf, dtype=np.float64)
    np.minimum.at(depth_map, flat_pixels, depth)
    depth_map[~np.isfinite(depth_map)] = 0.0
    return depth_map.reshape(input_size).astype(np.float32)


def lidar_depth_map(
    points_ego: np.ndarray,
    ego_from_camera: np.ndarray,
    intrinsics: np.ndarray,
    image_aug: np.ndarray,
    input_size: tuple[int, int],
    min_depth: float = 0.5,
) -> np.ndarray:
    """Project ego-frame LiDAR points ``(P, 3)`` into one augmented camera image.

    Returns:
        ``(H, W)`` float32 depth (camera z, metres) of the nearest point per pixel, 0 where none.
    """
    flat_pixels, depth, _ = _project_lidar(points_ego, ego_from_camera, intrinsics, image_aug, input_size, min_depth)
    return _nearest_depth_map(flat_pixels, depth, input_size)


def lidar_depth_maps(
    points_ego: np.ndarray,
    boxes_ego: np.ndarray,
    ego_from_camera: Sequence[np.ndarray],
    intrinsics: Sequence[np.ndarray],
    image_augs: Sequence[np.ndarray],
    input_size: tuple[int, int],
) -> dict[str, np.ndarray]:
    """The depth labels of one sample: LiDAR ``(P, 3)`` and GT boxes ``(M, >=7)`` in the ego frame.

    Returns ``depth_maps`` (every point) and ``object_depth_maps`` (the points inside a GT box),
    each ``(N_cameras, H, W)`` float32 as :func:`lidar_depth_map` makes them (one projection per camera). LiDAR only sees visible
    surfaces, so where a nearer object hides part of a farther one, the hidden part's pixels hold
    the nearer object's points.
    """
    on_object = points_in_boxes(points_ego, boxes_ego[:, :7]).any(axis=0) if len(boxes_ego) else np.zeros(len(points_ego), bool)
    maps: dict[str, list[np.ndarray]] = {"depth_maps": [], "object_depth_maps": []}
    for e, k, a in zip(ego_from_camera, intrinsics, image_augs):
        flat_pixels, depth, index = _project_lidar(points_ego, e, k, a, input_size, min_depth=0.5)
        chosen = on_object[index]
        maps["depth_maps"].append(_nearest_depth_map(flat_pixels, depth, input_size))
        maps["object_depth_maps"].append(_nearest_depth_map(flat_pixels[chosen], depth[chosen], input_size))
    return {key: np.stack(value) for key, value in maps.items()}

def prepare_image(image: Image.Image, original_size: tuple[int, int], rng: np.random.Generator | None,
                  cfg: DataConfig) -> tuple[torch.Tensor, np.ndarray]:
    """One decoded camera image -> (normalised network input ``[3, H, W]`` float32, ``image_aug`` ``(3, 3)``).

    ``original_size`` (w, h) is the camera's image size (the decoded image may be smaller, see
    :func:`bevperc.data.augment.decode_image`). ``rng`` None is the deterministic test-time
    transform (resize to the input width, bottom crop).
    """
    input_size = tuple(cfg.input_size)
    resize, crop_flip_rotate = sample_image_aug(rng, original_size, input_size, cfg.image_aug)
    image, image_aug = apply_image_aug(image, original_size, resize, crop_flip_rotate, input_size)
    mean = np.asarray(cfg.image_mean, dtype=np.float32) * 255.0
    std = np.asarray(cfg.image_std, dtype=np.float32) * 255.0
    array = (np.asarray(image, dtype=np.float32) - mean) / std
    return torch.from_numpy(array.transpose(2, 0, 1).copy()), image_aug


class NuScenesBEVDataset(Dataset):
    """Six-camera samples in the batch format of :func:`collate_bev`.

    Each item is a dict:
        images          float32 [6, 3, H, W]  normalised network input
        intrinsics      float32 [6, 3, 3]     of the original camera
        ego_from_camera float32 [6, 4, 4]
        image_aug       float32 [6, 3, 3]     original pixel -> input pixel
        bev_aug         float32 [4, 4]        ego -> augmented ego
        gt_boxes        float32 [M, 9]        augmented ego frame, box convention
        gt_labels       int64   [M]
        depth_maps      float32 [6, H, W]     only with ``cfg.load_depth``: nearest LiDAR depth per pixel, 0 = none
        object_depth_maps float32 [6, H, W]   likewise, from the LiDAR points inside GT boxes only
        global_from_ego float64 [4, 4]
        sample_token    str

    Augmentation randomness comes from a generator seeded by ``(seed, epoch, index)``, so
    an item is a pure function of its index and epoch: resuming a killed run replays the
    same augmentations, whatever the number of workers.
    """

    def __init__(self, cfg: DataConfig, split: str, train: bool, seed: int = 0) -> None:
        unset = [name for name in ("input_size", "gt_range") if getattr(cfg, name) is None]
        if unset:
            raise ValueError(f"data.{' and data.'.join(unset)} not set: a run config (bevperc.config.Config) takes "
                             "them from the model; a DataConfig used on its own must set them")
        self.cfg = cfg
        self.split = split
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.dataroot = Path(cfg.dataroot)
        self.info_path = Path(cfg.info_path(split))
        payload = load_infos(self.info_path, split=split, version=cfg.version)
        self.samples: list[dict[str, Any]] = payload["samples"]
        self.class_names: Sequence[str] = DETECTION_CLASSES
        self.image_cache = None
        if cfg.image_cache:
            cache_root = Path(cfg.cache_dir or self.info_path.parent / "bevperc_cache")
            self.image_cache = ImageCache(cache_root, split, self.info_path, self._decode_size(CAMERA_NAMES[0]))

    def _decode_size(self, camera: str) -> tuple[int, int]:
        """The (w, h) camera images are decoded at (:func:`bevperc.data.augment.draft_size`)."""
        cam = self.samples[0]["cameras"][camera] if self.samples else {"width": 1600, "height": 900}
        return draft_size((cam["width"], cam["height"]), tuple(self.cfg.input_size), self.cfg.image_aug)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch so augmentations change between epochs."""
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator | None:
        if not (self.train and self.cfg.augment):
            return None
        return np.random.default_rng([self.seed, self.epoch, index])

    def _decoded_image(self, sample: dict, camera: str) -> Image.Image:
        where = f"{self.info_path}: sample {sample['token']} camera {camera}"
        path = dataroot_file(self.dataroot, sample["cameras"][camera]["path"], where)
        if not path.is_file():
            raise DataError(f"{where}: image file not found: {path}")
        try:
            if self.image_cache is not None:
                return self.image_cache.load(path, f"{sample['token']}_{camera}")
            return decode_image(path, self._decode_size(camera))
        except OSError as err:
            raise DataError(f"{path}: cannot read image ({err})") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        rng = self._rng(index)
        input_size = tuple(self.cfg.input_size)
        images, intrinsics, ego_from_camera, image_augs = [], [], [], []
        for camera in CAMERA_NAMES:
            cam = sample["cameras"][camera]
            original_size = (cam["width"], cam["height"])
            image, image_aug = prepare_image(self._decoded_image(sample, camera), original_size, rng, self.cfg)
            images.append(image)
            intrinsics.append(np.asarray(cam["intrinsics"], dtype=np.float64))
            ego_from_camera.append(np.asarray(cam["ego_from_camera"], dtype=np.float64))
            image_augs.append(image_aug)

        bev_aug = sample_bev_aug(rng, self.cfg.bev_aug)
        boxes, labels = self._gt(sample, bev_aug)
        item = {
            "images": torch.stack(images),
            "intrinsics": torch.tensor(np.stack(intrinsics), dtype=torch.float32),
            "ego_from_camera": torch.tensor(np.stack(ego_from_camera), dtype=torch.float32),
            "image_aug": torch.tensor(np.stack(image_augs), dtype=torch.float32),
            "bev_aug": torch.tensor(bev_aug, dtype=torch.float32),
            "gt_boxes": torch.tensor(boxes, dtype=torch.float32),
            "gt_labels": torch.tensor(labels, dtype=torch.int64),
            "global_from_ego": torch.tensor(sample["global_from_ego"], dtype=torch.float64),
            "sample_token": sample["token"],
        }
        if self.cfg.load_depth:
            item.update(self._depth_maps(sample, ego_from_camera, intrinsics, image_augs))
        return item

    def _depth_maps(self, sample: dict, ego_from_camera: list, intrinsics: list, image_augs: list) -> dict[str, torch.Tensor]:
        points = load_lidar_points(dataroot_file(self.dataroot, sample["lidar"]["path"],
                                                 f"{self.info_path}: sample {sample['token']} lidar"))
        points_ego = transform_points(np.asarray(sample["lidar"]["ego_from_lidar"]), points[:, :3].astype(np.float64))
        boxes = np.asarray(sample["gt"]["boxes"], dtype=np.float64).reshape(-1, 9)
        maps = lidar_depth_maps(points_ego, boxes, ego_from_camera, intrinsics, image_augs, tuple(self.cfg.input_size))
        return {key: torch.from_numpy(value) for key, value in maps.items()}

    def _gt(self, sample: dict, bev_aug: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gt = sample["gt"]
        boxes = np.asarray(gt["boxes"], dtype=np.float64).reshape(-1, 9)
        labels = np.array([self.class_names.index(n) for n in gt["names"]], dtype=np.int64)
        points = np.asarray(gt["num_lidar_pts"]) + np.asarray(gt["num_radar_pts"])
        keep = points >= self.cfg.min_lidar_points if len(points) else np.zeros(0, dtype=bool)
        boxes, labels = transform_boxes(bev_aug, boxes[keep]), labels[keep]
        low, high = np.asarray(self.cfg.gt_range[:3]), np.asarray(self.cfg.gt_range[3:])
        inside = np.all((boxes[:, :3] >= low) & (boxes[:, :3] <= high), axis=1)
        return boxes[inside], labels[inside]


def collate_bev(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items: tensors gain a batch dim B; boxes, labels and tokens become lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key in ("gt_boxes", "gt_labels", "sample_token"):
            out[key] = values
        else:
            out[key] = torch.stack(values)
    return out
