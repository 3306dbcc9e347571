"""The nuScenes tables of a synthetic world: their records, and writing tables to disk.

A world's ``<out>/<version>/`` holds the 13 tables ``nuscenes.nuscenes.NuScenes`` loads:
the static ones (all 32 real categories, the 8 attributes, the 4 visibility levels, the 7
sensors; tokens independent of the seed) and per scene one log (one per scene keeps scenes
independent; captured one scene per hour from 2018-07-01 UTC), one calibrated sensor per
channel, the samples (keyframes, 2 Hz), their sample_data (six cameras and LIDAR_TOP, all
keyframes) and ego poses, the instances and their annotations, plus one map per location.
Tokens are :func:`~bevperc.synthetic.config.make_token` of the seed, version, scene name and
the record's role, so a world is the same whatever the number of workers.

Annotation fields: ``visibility_token`` bins the visible fraction over all six cameras
into the nuScenes levels 0-40, 40-60, 60-80, 80-100 %; ``num_lidar_pts`` counts the
written LiDAR points in the box (or estimates them, see
:mod:`~bevperc.synthetic.estimates`); ``num_radar_pts`` is 0 (there are no radars).

:func:`write_tables` is the one writer of nuScenes table files (``bench/eval.py``'s
evaluation fixture writes its tables with it too).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bevperc.geometry import matrix_to_quaternion, yaw_to_quaternion
from bevperc.synthetic.config import make_token
from bevperc.synthetic.rig import (
    CAMERA_CALIBRATION,
    CAMERA_NAMES,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    LIDAR_CALIBRATION,
    camera_intrinsics,
)
from bevperc.synthetic.taxonomy import ATTRIBUTES, CATEGORIES, LOCATIONS, VISIBILITY_LEVELS
from bevperc.synthetic.world import Instance

SCENE_TABLES = ("log", "scene", "sample", "sample_data", "ego_pose", "calibrated_sensor", "instance",
                "sample_annotation")
"""The tables each scene adds records to (the others are static, or the maps)."""
CHANNELS = CAMERA_NAMES + ("LIDAR_TOP",)
FIRST_CAPTURE_S = 1530403200  # 2018-07-01 00:00 UTC


@dataclass(frozen=True)
class StaticTables:
    """The tables that do not depend on the scenes, and their tokens by name."""

    tables: dict[str, list[dict]]  # category, attribute, visibility, sensor
    sensor_tokens: dict[str, str]  # channel -> token
    category_tokens: dict[str, str]  # category name -> token
    attribute_tokens: dict[str, str]  # attribute name -> token


def static_tables() -> StaticTables:
    """category, attribute, visibility and sensor tables (tokens independent of the seed)."""
    category = [{"token": make_token("category", name), "name": name, "description": desc, "index": idx}
                for idx, (name, desc) in enumerate(CATEGORIES)]
    attribute = [{"token": make_token("attribute", name), "name": name, "description": desc} for name, desc in ATTRIBUTES]
    visibility = [{"token": tok, "level": level, "description": desc} for tok, level, desc in VISIBILITY_LEVELS]
    sensor = [{"token": make_token("sensor", ch), "channel": ch, "modality": "camera"} for ch in CAMERA_NAMES]
    sensor.append({"token": make_token("sensor", "LIDAR_TOP"), "channel": "LIDAR_TOP", "modality": "lidar"})
    return StaticTables(
        {"category": category, "attribute": attribute, "visibility": visibility, "sensor": sensor},
        {r["channel"]: r["token"] for r in sensor},
        {r["name"]: r["token"] for r in category},
        {r["name"]: r["token"] for r in attribute},
    )


def capture_start_s(scene_index: int) -> int:
    """Capture time (s, UTC) of a scene's first keyframe: one scene per hour from 2018-07-01."""
    return FIRST_CAPTURE_S + scene_index * 3600


def log_record(key: tuple, scene_index: int, location: str) -> dict:
    """The scene's log; its ``logfile`` names the sensor files like the real ones (vehicle, capture time, zone).

    ``key`` is ``(seed, version, scene name)``, the prefix of every token of the scene.
    """
    date = time.gmtime(capture_start_s(scene_index))
    vehicle = "n008" if location.startswith("boston") else "n015"
    logfile = f"{vehicle}-{time.strftime('%Y-%m-%d-%H-%M-%S', date)}{'-0400' if vehicle == 'n008' else '+0800'}"
    return {"token": make_token(*key, "log"), "logfile": logfile, "vehicle": vehicle,
            "date_captured": time.strftime("%Y-%m-%d", date), "location": location}


def calibrated_sensor_records(key: tuple, sensor_tokens: dict[str, str]) -> dict[str, dict]:
    """One calibrated_sensor record per channel of the rig (as in real nuScenes, one set per log)."""
    records = {}
    for channel in CHANNELS:
        if channel == "LIDAR_TOP":
            translation, rotation = LIDAR_CALIBRATION
            intrinsic: list = []
        else:
            translation, rotation, _ = CAMERA_CALIBRATION[channel]
            intrinsic = camera_intrinsics(channel).tolist()
        records[channel] = {"token": make_token(*key, "calibrated_sensor", channel),
                            "sensor_token": sensor_tokens[channel], "translation": list(translation),
                            "rotation": list(rotation), "camera_intrinsic": intrinsic}
    return records


@dataclass
class Keyframes:
    """The samples of a scene and what is annotated at each (``S`` samples, ``N`` instances)."""

    tokens: list[str]  # (S,) sample tokens
    times_us: list[int]  # (S,) timestamps (us) of the LiDAR keyframes
    ego_poses: list[np.ndarray]  # (S,) 4x4 global_from_ego at the keyframes
    boxes: list[np.ndarray]  # (S,) global boxes (N, 9) of all instances at the keyframes
    annotated: np.ndarray  # (S, N) bool: a contiguous span of samples per instance


def scene_records(key: tuple, name: str, description: str, log_token: str,
                  keyframes: Keyframes) -> tuple[dict, list[dict]]:
    """The scene record and its linked sample records."""
    scene_token = make_token(*key, "scene")
    tokens, n = keyframes.tokens, len(keyframes.tokens)
    samples = [{"token": token, "timestamp": keyframes.times_us[k], "prev": tokens[k - 1] if k > 0 else "",
                "next": tokens[k + 1] if k + 1 < n else "", "scene_token": scene_token}
               for k, token in enumerate(tokens)]
    scene = {"token": scene_token, "log_token": log_token, "nbr_samples": n, "first_sample_token": tokens[0],
             "last_sample_token": tokens[-1], "name": name, "description": description}
    return scene, samples


def pose_record(token: str, timestamp: int, pose: np.ndarray) -> dict:
    """An ego_pose record of a 4x4 global_from_ego ``pose``."""
    return {
        "token": token,
        "timestamp": int(timestamp),
        "rotation": [float(v) for v in matrix_to_quaternion(pose[:3, :3])],
        "translation": [float(v) for v in pose[:3, 3]],
    }


def sample_data_record(token: str, sample_token: str, calibrated_sensor_token: str, timestamp: int,
                       filename: str) -> dict:
    """A keyframe's sample_data record (its ego pose has the same token); prev/next are linked later."""
    camera = not filename.startswith("samples/LIDAR_TOP/")
    return {"token": token, "sample_token": sample_token, "ego_pose_token": token,
            "calibrated_sensor_token": calibrated_sensor_token, "timestamp": timestamp,
            "fileformat": "jpg" if camera else "pcd", "is_key_frame": True,
            "height": IMAGE_HEIGHT if camera else 0, "width": IMAGE_WIDTH if camera else 0,
            "filename": filename, "prev": "", "next": ""}


def link_sample_data(records: dict[str, list[dict]]) -> list[dict]:
    """Chain each channel's records in time (prev/next) and list them channel after channel."""
    out = []
    for channel_records in records.values():
        for j, rec in enumerate(channel_records):
            rec["prev"] = channel_records[j - 1]["token"] if j > 0 else ""
            rec["next"] = channel_records[j + 1]["token"] if j + 1 < len(channel_records) else ""
        out.extend(channel_records)
    return out


def visibility_token(fraction: float) -> str:
    """The nuScenes visibility level token ("1".."4") of a visible fraction in [0, 1]."""
    if fraction < 0.4:
        return "1"
    if fraction < 0.6:
        return "2"
    if fraction < 0.8:
        return "3"
    return "4"


def annotation_records(key: tuple, instances: list[Instance], keyframes: Keyframes, visible_fraction: np.ndarray,
                       lidar_counts: np.ndarray, static: StaticTables) -> tuple[list[dict], list[dict]]:
    """The sample_annotation records (sample by sample) and the instance records of the annotated instances.

    ``visible_fraction`` ``(S, N)`` and ``lidar_counts`` ``(S, N)`` int per sample and instance.
    """
    annotated = keyframes.annotated
    inst_ids = [i for i in range(len(instances)) if annotated[:, i].any()]
    ann_token = {}
    for i in inst_ids:
        for k in np.nonzero(annotated[:, i])[0]:
            ann_token[(k, i)] = make_token(*key, "sample_annotation", i, k)
    annotations = []
    for k in range(len(keyframes.tokens)):
        for i in inst_ids:
            if not annotated[k, i]:
                continue
            inst = instances[i]
            box = keyframes.boxes[k][i]
            annotations.append({
                "token": ann_token[(k, i)], "sample_token": keyframes.tokens[k],
                "instance_token": make_token(*key, "instance", i),
                "visibility_token": visibility_token(float(visible_fraction[k, i])),
                "attribute_tokens": [static.attribute_tokens[inst.attribute]] if inst.attribute else [],
                "translation": [float(box[0]), float(box[1]), float(box[2])],
                "size": [float(box[3]), float(box[4]), float(box[5])],
                "rotation": [float(v) for v in yaw_to_quaternion(float(box[6]))],
                "prev": ann_token.get((k - 1, i), ""), "next": ann_token.get((k + 1, i), ""),
                "num_lidar_pts": int(lidar_counts[k, i]), "num_radar_pts": 0,
            })
    instance_table = []
    for i in inst_ids:
        ks = np.nonzero(annotated[:, i])[0]
        instance_table.append({
            "token": make_token(*key, "instance", i), "category_token": static.category_tokens[instances[i].category],
            "nbr_annotations": int(len(ks)), "first_annotation_token": ann_token[(ks[0], i)],
            "last_annotation_token": ann_token[(ks[-1], i)],
        })
    return annotations, instance_table


def map_records(out: Path, logs: list[dict]) -> list[dict]:
    """One semantic-prior map per location of the ``logs``, its mask written under ``out/maps``."""
    (out / "maps").mkdir(exist_ok=True)
    records = []
    for location in LOCATIONS:
        log_tokens = [r["token"] for r in logs if r["location"] == location]
        if not log_tokens:
            continue
        token = make_token("map", location)
        filename = f"maps/{token}.png"
        write_map_png(out / filename)
        records.append({"category": "semantic_prior", "token": token, "filename": filename, "log_tokens": log_tokens})
    return records


def write_map_png(path: Path) -> None:
    """A small semantic-prior mask (the devkit only checks it exists unless map APIs are used)."""
    import cv2

    mask = np.full((64, 64), 255, np.uint8)
    cv2.imwrite(str(path), mask)


def write_json(path: Path, obj: Any, indent: Optional[int] = None) -> None:
    """Atomic JSON write (compact by default: the tables are large)."""
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(obj, indent=indent)  # dumps (not dump) uses the C encoder: 5-10x faster on big tables
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_tables(table_dir: str | os.PathLike, tables: dict[str, list[dict]]) -> None:
    """Write nuScenes tables as ``<table_dir>/<name>.json``: compact JSON, each file replaced atomically."""
    table_dir = Path(table_dir)
    table_dir.mkdir(parents=True, exist_ok=True)
    for name, records in tables.items():
        write_json(table_dir / f"{name}.json", records)
