"""Compact per-split info files built from any nuScenes root (real or synthetic).

Training workers must not load the devkit (it holds every table in memory and takes
seconds to index), so ``create_infos`` walks the dataset once with the real devkit and
writes one JSON file per split holding what a sample needs: camera paths, intrinsics,
camera-to-ego transforms, ego-to-global, the LiDAR path, and the GT boxes in the ego
frame (box convention of :mod:`bevperc.geometry`). JSON, not pickle: info files are
data, never code.

Info file layout (``bevperc_infos_<split>.json``)::

    {"format": "bevperc-infos", "format_version": 1, "nuscenes_version": "v1.0-mini",
     "split": "mini_val", "classes": [...], "samples": [
        {"token", "scene_name", "timestamp",
         "global_from_ego": 4x4,                     # ego pose at the LIDAR_TOP keyframe
         "lidar": {"path", "ego_from_lidar": 4x4},
         "cameras": {CAM: {"path", "intrinsics": 3x3, "ego_from_camera": 4x4,
                           "width", "height", "timestamp"}},
         "gt": {"boxes": [[x,y,z,w,l,h,yaw,vx,vy], ...], "names": [...],
                "num_lidar_pts": [...], "num_radar_pts": [...], "tokens": [...]}}]}

The sample's ego frame is the ego pose at the LIDAR_TOP keyframe timestamp. Cameras
fire at slightly different times, so ``ego_from_camera`` composes the camera's own
ego pose: ``inv(global_from_ego_lidar) @ global_from_ego_cam @ ego_cam_from_camera``.

File paths read from tables and info files are relative to the dataroot and must stay inside it
(:func:`dataroot_file`). Annotations of a category that nuScenes does not know are dropped with a
warning naming the category and the count (an error with ``strict=True``); those of known
categories outside the 10 detection classes (animals, debris, bicycle racks...) silently, as in
the devkit.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

from bevperc.data.classes import CATEGORY_TO_DETECTION_NAME, DETECTION_CLASSES
from bevperc.geometry import invert_transform, make_transform, quaternion_to_yaw, transform_boxes
from bevperc.utils.io import atomic_write_json

log = logging.getLogger(__name__)

# The camera order of every batch (BEVDet's): the N dimension of images, intrinsics and
# ego_from_camera, and of the info files. The one list of camera names; the 2x3 figure grid
# (viz.cameras.CAMERA_GRID) is its front and back halves.
CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK",
    "CAM_BACK_RIGHT",
)
INFO_FORMAT = "bevperc-infos"
INFO_FORMAT_VERSION = 1

# Fields each table must have for bevperc (a subset of the nuScenes schema).
REQUIRED_TABLE_FIELDS: dict[str, tuple[str, ...]] = {
    "category": ("token", "name"),
    "attribute": ("token", "name"),
    "visibility": ("token", "level"),
    "instance": ("token", "category_token", "first_annotation_token", "last_annotation_token"),
    "sensor": ("token", "channel", "modality"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "ego_pose": ("token", "translation", "rotation", "timestamp"),
    "log": ("token", "location"),
    "scene": ("token", "name", "log_token", "first_sample_token", "last_sample_token"),
    "sample": ("token", "timestamp", "scene_token", "prev", "next"),
    "sample_data": (
        "token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "filename",
        "is_key_frame", "timestamp", "width", "height",
    ),
    "sample_annotation": (
        "token", "sample_token", "instance_token", "attribute_tokens", "visibility_token",
        "translation", "size", "rotation", "num_lidar_pts", "num_radar_pts", "prev", "next",
    ),
    "map": ("token", "log_tokens", "filename"),
}


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file and field."""


def dataroot_file(dataroot: str | Path, relative: Any, where: str) -> Path:
    """``dataroot / relative`` for a file path read from a table or an info file.

    A :class:`DataError` naming ``where`` unless ``relative`` is a relative path that stays inside
    the dataroot: an absolute path or a ``..`` component could make a data file open any file of
    the machine. Checked on the text, not the resolved path, so a dataroot whose folders are
    symbolic links (a real nuScenes root often is) works.
    """
    check_relative_path(relative, dataroot, where)
    return Path(dataroot) / relative


def check_relative_path(relative: Any, dataroot: str | Path, where: str) -> None:
    """The check of :func:`dataroot_file`, without building the path (cheap on millions of records)."""
    if not isinstance(relative, str) or not relative:
        raise DataError(f"{where}: expected a file path relative to the dataroot, got {relative!r}")
    if relative.startswith("/") or (".." in relative and ".." in PurePosixPath(relative).parts):
        raise DataError(f"{where}: path {relative!r} leaves the dataroot {dataroot} (an absolute path or '..'); "
                        f"paths in tables and info files must be relative paths inside it")


def _read_json(path: Path) -> Any:
    """A JSON file's content; :class:`DataError` naming the file when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 JSON text file ({err.reason} at byte {err.start})") from None


# --------------------------------------------------------------------------- validation
def validate_tables(dataroot: str | Path, version: str) -> None:
    """Check that every nuScenes table of ``version`` exists, parses and has the fields bevperc reads.

    The devkit would fail later with an ``AssertionError`` or ``KeyError`` deep inside;
    this names the file, the record index and the missing field instead.
    """
    table_root = Path(dataroot) / version
    if not table_root.is_dir():
        raise DataError(f"{table_root}: table folder for version {version!r} not found under dataroot {dataroot}")
    for table, fields in REQUIRED_TABLE_FIELDS.items():
        path = table_root / f"{table}.json"
        if not path.is_file():
            raise DataError(f"{path}: table {table!r} is missing")
        records = _read_json(path)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{path}: record {index} is {type(record).__name__}, expected an object")
            missing = [f for f in fields if f not in record]
            if missing:
                raise DataError(f"{path}: record {index} (token {record.get('token', '?')!r}) lacks field(s) {missing}")
            if table == "sample_data":
                check_relative_path(record["filename"], dataroot,
                                    f"{path}: record {index} (token {record['token']!r}) field 'filename'")


# --------------------------------------------------------------------------- building
def _pose_transform(record: dict) -> np.ndarray:
    return make_transform(record["rotation"], record["translation"])


def split_scene_names(version: str, split: str) -> list[str]:
    """Scene names of a devkit split (``mini_train``, ``val``, ...) valid for ``version``."""
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    if split not in splits:
        raise DataError(f"unknown split {split!r}; the devkit knows {sorted(splits)}")
    allowed = {
        "v1.0-mini": {"mini_train", "mini_val"},
        "v1.0-trainval": {"train", "val", "train_detect", "train_track"},
        "v1.0-test": {"test"},
    }.get(version)
    if allowed is not None and split not in allowed:
        raise DataError(f"split {split!r} does not belong to version {version!r}; use one of {sorted(allowed)}")
    return list(splits[split])


def _sample_info(nusc: Any, sample: dict, scene_name: str, unknown_categories: collections.Counter) -> dict:
    """The info record of one sample; counts annotations of unknown categories in ``unknown_categories``."""
    lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    global_from_ego = _pose_transform(nusc.get("ego_pose", lidar_sd["ego_pose_token"]))
    ego_from_global = invert_transform(global_from_ego)
    lidar_cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
    info = {
        "token": sample["token"],
        "scene_name": scene_name,
        "timestamp": sample["timestamp"],
        "global_from_ego": global_from_ego.tolist(),
        "lidar": {"path": lidar_sd["filename"], "ego_from_lidar": _pose_transform(lidar_cs).tolist()},
        "cameras": {},
    }
    for cam in CAMERA_NAMES:
        if cam not in sample["data"]:
            raise DataError(f"sample {sample['token']}: no sample_data for camera {cam}")
        cam_sd = nusc.get("sample_data", sample["data"][cam])
        cam_cs = nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"])
        global_from_cam_ego = _pose_transform(nusc.get("ego_pose", cam_sd["ego_pose_token"]))
        ego_from_camera = ego_from_global @ global_from_cam_ego @ _pose_transform(cam_cs)
        info["cameras"][cam] = {
            "path": cam_sd["filename"],
            "intrinsics": cam_cs["camera_intrinsic"],
            "ego_from_camera": ego_from_camera.tolist(),
            "width": cam_sd["width"],
            "height": cam_sd["height"],
            "timestamp": cam_sd["timestamp"],
        }
    boxes, names, n_lidar, n_radar, tokens = [], [], [], [], []
    for ann_token in sample["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        name = CATEGORY_TO_DETECTION_NAME.get(ann["category_name"])
        if name is None:
            if ann["category_name"] not in _nuscenes_categories():
                unknown_categories[ann["category_name"]] += 1
            continue
        velocity = nusc.box_velocity(ann_token)[:2]
        if not np.all(np.isfinite(velocity)):
            velocity = np.zeros(2)  # single-annotation instances: velocity unknown, train as 0
        w, l, h = ann["size"]
        boxes.append([*ann["translation"], w, l, h, quaternion_to_yaw(ann["rotation"]), *velocity])
        names.append(name)
        n_lidar.append(int(ann["num_lidar_pts"]))
        n_radar.append(int(ann["num_radar_pts"]))
        tokens.append(ann_token)
    boxes_global = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
    boxes_ego = transform_boxes(ego_from_global, boxes_global)
    info["gt"] = {
        "boxes": [[round(float(v), 6) for v in row] for row in boxes_ego],
        "names": names,
        "num_lidar_pts": n_lidar,
        "num_radar_pts": n_radar,
        "tokens": tokens,
    }
    return info


def create_infos(
    dataroot: str | Path,
    version: str,
    splits: Iterable[str],
    out_dir: str | Path | None = None,
    progress: bool = True,
    strict: bool = False,
) -> dict[str, Path]:
    """Write ``bevperc_infos_<split>.json`` for each split; return their paths.

    Args:
        dataroot: nuScenes root (holds ``<version>/`` tables, ``samples/``, ``sweeps/``).
        version: ``v1.0-mini``, ``v1.0-trainval`` or ``v1.0-test``.
        splits: devkit split names, e.g. ``["mini_train", "mini_val"]``.
        out_dir: where to write (default: ``dataroot``).
        strict: annotations of an unknown category are an error (before that split's file is
            written) instead of a warning.
    """
    from nuscenes.nuscenes import NuScenes
    from tqdm import tqdm

    dataroot = Path(dataroot)
    out_dir = Path(out_dir) if out_dir is not None else dataroot
    validate_tables(dataroot, version)
    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    scenes_by_name = {scene["name"]: scene for scene in nusc.scene}
    written = {}
    for split in splits:
        names = [n for n in split_scene_names(version, split) if n in scenes_by_name]
        if not names:
            raise DataError(f"{dataroot}: split {split!r} has none of its scenes in {version}")
        infos = []
        unknown: collections.Counter = collections.Counter()
        total = sum(scenes_by_name[n]["nbr_samples"] for n in names)
        with tqdm(total=total, desc=f"infos {split}", disable=not progress, leave=False) as bar:
            for name in names:
                token = scenes_by_name[name]["first_sample_token"]
                while token:
                    sample = nusc.get("sample", token)
                    infos.append(_sample_info(nusc, sample, name, unknown))
                    token = sample["next"]
                    bar.update(1)
        _report_unknown_categories(unknown, dataroot / version / "category.json", split, strict)
        payload = {
            "format": INFO_FORMAT,
            "format_version": INFO_FORMAT_VERSION,
            "nuscenes_version": version,
            "split": split,
            "classes": list(DETECTION_CLASSES),
            "samples": infos,
        }
        path = atomic_write_json(out_dir / f"bevperc_infos_{split}.json", payload, indent=None)
        log.info("wrote %d samples of %s to %s", len(infos), split, path)
        written[split] = path
    return written


@functools.lru_cache(maxsize=1)
def _nuscenes_categories() -> frozenset[str]:
    """Every category name of nuScenes (the devkit's lidarseg colour map lists all 32)."""
    from nuscenes.utils.color_map import get_colormap

    return frozenset(get_colormap())


def _report_unknown_categories(unknown: collections.Counter, table: Path, split: str, strict: bool) -> None:
    """Warn (or, ``strict``, raise) about annotations dropped because nuScenes does not know their category."""
    if not unknown:
        return
    counts = ", ".join(f"{count} of {name!r}" for name, count in unknown.most_common())
    message = (f"{table}: split {split!r}: {sum(unknown.values())} annotations of categories that are not "
               f"nuScenes categories were dropped ({counts}); fix the category names")
    if strict:
        raise DataError(message)
    log.warning(message)


# --------------------------------------------------------------------------- reading
def load_infos(path: str | Path, split: str | None = None, version: str | None = None) -> dict:
    """Read and check an info file written by :func:`create_infos`.

    ``split`` / ``version``: what the caller expects; an info file of another split or nuScenes
    version (a renamed or copied file) is a :class:`DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: info file not found (create it with data_tools/create_infos.py)")
    payload = _read_json(path)
    if not isinstance(payload, dict) or payload.get("format") != INFO_FORMAT:
        raise DataError(f"{path}: not a bevperc info file (field 'format' must be {INFO_FORMAT!r})")
    if payload.get("format_version") != INFO_FORMAT_VERSION:
        raise DataError(
            f"{path}: field 'format_version' is {payload.get('format_version')!r}, this bevperc reads "
            f"{INFO_FORMAT_VERSION}; re-create the infos"
        )
    for field, expected in (("split", split), ("nuscenes_version", version)):
        if expected is not None and payload.get(field) != expected:
            raise DataError(f"{path}: field {field!r} is {payload.get(field)!r} but the config asks for {expected!r}: "
                            f"this info file was made for another {field.replace('nuscenes_', '')}")
    for index, sample in enumerate(payload.get("samples", [])):
        for field in ("token", "global_from_ego", "lidar", "cameras", "gt"):
            if field not in sample:
                raise DataError(f"{path}: samples[{index}] lacks field {field!r}")
        for name in sample["gt"]["names"]:
            if name not in DETECTION_CLASSES:
                raise DataError(
                    f"{path}: samples[{index}] (token {sample['token']}) field gt.names has unknown class "
                    f"{name!r}; expected one of {list(DETECTION_CLASSES)}"
                )
        boxes = sample["gt"]["boxes"]
        if any(len(b) != 9 or not all(math.isfinite(v) for v in b) for b in boxes):
            raise DataError(f"{path}: samples[{index}] field gt.boxes must be finite rows of 9 values")
    return payload
