"""Load one keyframe into the plain arrays the drawing functions take.

:func:`load_info_sample` reads a keyframe stored in the mmdetection3d 1.x info layout
(``sample_info.json`` next to the camera JPEGs and the LiDAR ``.pcd.bin``), as the real
nuScenes sample in ``shared/data/nuscenes-real-sample`` is. Its boxes are in the LiDAR
frame as ``[x, y, z, l, w, h, yaw]`` (z: the geometric centre, see
:func:`info_boxes_to_bevperc`); they come out in the bevperc convention
``[x, y, z, w, l, h, yaw, vx, vy]`` in the ego frame (at the LiDAR timestamp).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bevperc.data.classes import CLASS_INDEX
from bevperc.data.infos import CAMERA_NAMES
from bevperc.geometry import transform_boxes, transform_points


@dataclass
class SampleArrays:
    """One keyframe as arrays (ego frame, box convention). Shapes in the field comments."""

    images: np.ndarray  # (N_cam, H, W, 3) uint8
    intrinsics: np.ndarray  # (N_cam, 3, 3)
    ego_from_camera: np.ndarray  # (N_cam, 4, 4)
    gt_boxes: np.ndarray  # (M, 9) ego frame
    gt_labels: np.ndarray  # (M,) DETECTION_CLASSES index
    lidar_points: np.ndarray  # (P, 4) ego frame x, y, z, intensity
    camera_names: tuple[str, ...] = CAMERA_NAMES
    sample_token: str = ""
    extra: dict = field(default_factory=dict)


def info_boxes_to_bevperc(bbox_3d: np.ndarray, velocity: np.ndarray, z_is_bottom: bool = False) -> np.ndarray:
    """mmdet3d LiDAR boxes ``(M, 7)`` ``[x, y, z, l, w, h, yaw]`` + velocity ``(M, 2)`` -> ``(M, 9)`` (same frame).

    ``z_is_bottom``: whether ``z`` is the bottom face centre (the ``LiDARInstance3DBoxes``
    default origin) rather than the geometric centre. mmdet3d's nuScenes info files store the
    devkit's ``Box.center``, the geometric centre, and the real sample in
    ``shared/data/nuscenes-real-sample`` agrees with that (checked in tests/test_viz.py: with
    z as the centre, LiDAR points in the boxes match ``num_lidar_pts`` and projected corners
    match the 2D boxes of ``cam_instances``; with z as the bottom they do not), so the
    default is False although that sample's README calls z the bottom.
    """
    bbox_3d = np.asarray(bbox_3d, dtype=np.float64).reshape(-1, 7)
    velocity = np.nan_to_num(np.asarray(velocity, dtype=np.float64).reshape(-1, 2))
    x, y, z, length, width, height, yaw = bbox_3d.T
    z_centre = z + height / 2 if z_is_bottom else z
    return np.stack([x, y, z_centre, width, length, height, yaw, velocity[:, 0], velocity[:, 1]], 1)


def load_info_sample(root: str | Path, load_images: bool = True, z_is_bottom: bool = False) -> SampleArrays:
    """Read ``root/sample_info.json`` (mmdet3d 1.x info, first entry) and its files in place.

    Raises:
        FileNotFoundError / ValueError naming the file and field when something is missing.
    """
    from PIL import Image

    root = Path(root)
    info_path = root / "sample_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: not found (expected an mmdet3d-style sample_info.json)")
    info = json.loads(info_path.read_text())
    try:
        categories = {index: name for name, index in info["metainfo"]["categories"].items()}
        entry = info["data_list"][0]
        lidar = entry["lidar_points"]
        ego_from_lidar = np.asarray(lidar["lidar2ego"], dtype=np.float64)
    except (KeyError, IndexError) as error:
        raise ValueError(f"{info_path}: missing field {error}") from None

    images, intrinsics, ego_from_camera = [], [], []
    for name in CAMERA_NAMES:
        camera = entry["images"].get(name)
        if camera is None:
            raise ValueError(f"{info_path}: data_list[0].images has no {name}")
        intrinsics.append(np.asarray(camera["cam2img"], dtype=np.float64)[:3, :3])
        # Boxes and points live in the ego frame at the LiDAR timestamp; the camera fired a few ms
        # earlier or later while the car moved, so use lidar2cam (which includes that ego motion)
        # rather than the static cam2ego: ego_from_camera = ego_from_lidar @ lidar_from_camera.
        if "lidar2cam" in camera:
            lidar_from_camera = np.linalg.inv(np.asarray(camera["lidar2cam"], dtype=np.float64))
            ego_from_camera.append(ego_from_lidar @ lidar_from_camera)
        else:
            ego_from_camera.append(np.asarray(camera["cam2ego"], dtype=np.float64))
        if load_images:
            images.append(np.asarray(Image.open(root / Path(camera["img_path"]).name).convert("RGB")))

    # Label -1 marks categories outside the 10 detection classes (mmdet3d convention): skip them.
    instances = [
        inst
        for inst in entry.get("instances", [])
        if inst.get("bbox_3d_isvalid", True) and inst.get("bbox_label_3d", -1) in categories
    ]
    boxes_lidar = info_boxes_to_bevperc(
        np.array([inst["bbox_3d"] for inst in instances]).reshape(-1, 7),
        np.array([inst.get("velocity", [0.0, 0.0]) for inst in instances]).reshape(-1, 2),
        z_is_bottom,
    )
    gt_boxes = transform_boxes(ego_from_lidar, boxes_lidar)
    gt_labels = np.array([CLASS_INDEX[categories[inst["bbox_label_3d"]]] for inst in instances], dtype=np.int64)

    points_path = root / Path(lidar["lidar_path"]).name
    num_features = int(lidar.get("num_pts_feats", 5))
    raw = np.fromfile(points_path, dtype=np.float32)
    if raw.size % num_features:
        raise ValueError(f"{points_path}: size {raw.size} is not a multiple of num_pts_feats={num_features}")
    points = raw.reshape(-1, num_features)[:, :4].astype(np.float64)
    points[:, :3] = transform_points(ego_from_lidar, points[:, :3])

    return SampleArrays(
        images=np.stack(images) if images else np.zeros((0, 900, 1600, 3), np.uint8),
        intrinsics=np.stack(intrinsics),
        ego_from_camera=np.stack(ego_from_camera),
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        lidar_points=points,
        sample_token=str(entry.get("token", "")),
        extra={"ego_from_lidar": ego_from_lidar, "global_from_ego": np.asarray(entry.get("ego2global", np.eye(4)))},
    )
