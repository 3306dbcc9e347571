"""Fast, exact nuScenes detection evaluation (same numbers as ``nuscenes.eval.detection.DetectionEval``).

The devkit builds one Python object per box and matches predictions in a Python loop. This engine
keeps every box set as NumPy columns and reproduces the devkit step by step:

* **Ground truth** is read straight from the tables (``sample``, ``scene``, ``sample_annotation``,
  ``instance``, ``category``, ``attribute``, ``sample_data``, ``calibrated_sensor``, ``sensor``,
  ``ego_pose``) without the ``NuScenes`` class: samples of the split in table order, annotations of a
  sample in table order (the devkit's ``sample['anns']`` order, which decides distance ties), the
  category mapping of ``category_to_detection_name``, at most one attribute, velocities as in
  ``NuScenes.box_velocity`` (centred difference, 1.5 s / 3 s limits, NaN when unknown) and
  ``num_pts = num_lidar_pts + num_radar_pts``.
* **Filtering** (``filter_eval_boxes``), for GT and predictions alike: xy distance to the ego pose of
  the sample's key-frame LIDAR_TOP ``sample_data`` strictly below the class range; ``num_pts != 0``;
  bicycles and motorcycles whose centre is inside a ``static_object.bicycle_rack`` box of the sample
  are dropped (the devkit's ``points_in_box`` test).
* **Matching** (``accumulate``): predictions of a class sorted by score, descending, ties broken like
  the devkit's ``sorted((v, i))[::-1]`` (the later box first); each is matched greedily to the
  nearest (xy centre distance, first on ties) untaken GT of its class in its sample, a match if the
  distance is strictly below the threshold. Samples are independent, so the k-th prediction of every
  sample is matched in one vectorised step; the four thresholds share the distance matrices.
* **Curves and metrics** (``accumulate``/``calc_ap``/``calc_tp``/``DetectionMetrics``): the same
  NumPy calls on the same arrays in the same order (cumulative TP/FP, ``np.interp`` onto 101 recall
  points, NaN-aware cumulative means of the TP errors, barrier yaw period pi, NaN for traffic_cone
  attr/vel/orient and barrier attr/vel, ``nanmean`` over classes, NDS).

Box columns use the devkit class order ``DETECTION_NAMES`` (car, truck, bus, trailer,
construction_vehicle, pedestrian, motorcycle, bicycle, traffic_cone, barrier) for ``class_index``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from array import array
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bevperc.evaluation.submission import (
    ATTRIBUTE_NAMES,
    DETECTION_NAMES,
    PredictionBoxes,
    iter_json_array,
    read_submission,
    submission_from_dict,
)

TP_METRICS: tuple[str, ...] = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
N_RECALL_POINTS = 101  # DetectionMetricData.nelem

# nuscenes.eval.detection.utils.category_to_detection_name
CATEGORY_TO_DETECTION_NAME: dict[str, str] = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}
BICYCLE_RACK = "static_object.bicycle_rack"
_CLASS_INDEX = {name: i for i, name in enumerate(DETECTION_NAMES)}
_CYCLE_CLASSES = np.array([_CLASS_INDEX["bicycle"], _CLASS_INDEX["motorcycle"]])


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DetectionEvalConfig:
    """The devkit's ``DetectionConfig`` (defaults: ``detection_cvpr_2019``)."""

    class_range: dict[str, float] = field(default_factory=lambda: {
        "car": 50, "truck": 50, "bus": 50, "trailer": 50, "construction_vehicle": 50,
        "pedestrian": 40, "motorcycle": 40, "bicycle": 40, "traffic_cone": 30, "barrier": 30})
    dist_fcn: str = "center_distance"
    dist_ths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    dist_th_tp: float = 2.0
    min_recall: float = 0.1
    min_precision: float = 0.1
    max_boxes_per_sample: int = 500
    mean_ap_weight: int = 5

    def __post_init__(self) -> None:
        unknown = [name for name in self.class_range if name not in _CLASS_INDEX]
        if unknown:
            raise ValueError(f"DetectionEvalConfig.class_range: unknown classes {unknown}; expected {list(DETECTION_NAMES)}")
        if self.dist_fcn != "center_distance":
            raise ValueError(f"DetectionEvalConfig.dist_fcn: only 'center_distance' is supported, got {self.dist_fcn!r}")
        if self.dist_th_tp not in self.dist_ths:
            raise ValueError(f"DetectionEvalConfig.dist_th_tp={self.dist_th_tp} must be one of dist_ths={self.dist_ths}")

    @property
    def class_names(self) -> list[str]:
        return list(self.class_range.keys())

    @classmethod
    def from_dict(cls, content: dict) -> "DetectionEvalConfig":
        """From the devkit's JSON config format (``DetectionConfig.serialize()``)."""
        return cls(class_range=dict(content["class_range"]), dist_fcn=content["dist_fcn"],
                   dist_ths=tuple(content["dist_ths"]), dist_th_tp=content["dist_th_tp"],
                   min_recall=content["min_recall"], min_precision=content["min_precision"],
                   max_boxes_per_sample=content["max_boxes_per_sample"], mean_ap_weight=content["mean_ap_weight"])

    def to_dict(self) -> dict:
        """Same keys and order as ``DetectionConfig.serialize()``."""
        return {"class_range": dict(self.class_range), "dist_fcn": self.dist_fcn,
                "dist_ths": list(self.dist_ths), "dist_th_tp": self.dist_th_tp, "min_recall": self.min_recall,
                "min_precision": self.min_precision, "max_boxes_per_sample": self.max_boxes_per_sample,
                "mean_ap_weight": self.mean_ap_weight}


# --------------------------------------------------------------------------- box columns
@dataclass
class BoxColumns:
    """Boxes of one evaluation as columns (GT or predictions), in the devkit's list order.

    ``sample_index`` indexes :attr:`GroundTruth.sample_tokens`. ``attribute_index`` is -1 for "".
    """

    sample_index: np.ndarray  # int64 [N]
    translation: np.ndarray  # float64 [N, 3] global
    size: np.ndarray  # float64 [N, 3] w, l, h
    rotation: np.ndarray  # float64 [N, 4] w, x, y, z
    velocity: np.ndarray  # float64 [N, 2]
    class_index: np.ndarray  # int64 [N] into DETECTION_NAMES
    attribute_index: np.ndarray  # int64 [N] into ATTRIBUTE_NAMES, -1 = ""
    score: np.ndarray  # float64 [N] (-1 for GT)
    num_pts: np.ndarray  # int64 [N] (-1 for predictions)

    def __len__(self) -> int:
        return int(self.sample_index.shape[0])

    def take(self, index: np.ndarray) -> "BoxColumns":
        return BoxColumns(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass
class RackColumns:
    """``static_object.bicycle_rack`` annotations of the split (for the bike-rack filter)."""

    sample_index: np.ndarray  # int64 [R]
    translation: np.ndarray  # float64 [R, 3]
    size: np.ndarray  # float64 [R, 3]
    rotation: np.ndarray  # float64 [R, 4]


@dataclass
class GroundTruth:
    """The GT of one split: samples (devkit order), ego positions, boxes and bicycle racks."""

    version: str
    split: str
    sample_tokens: list[str]
    ego_translation: np.ndarray  # float64 [S, 3] ego pose of each sample's key-frame LIDAR_TOP sample_data
    boxes: BoxColumns
    racks: RackColumns

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` cache (atomically)."""
        arrays = {f"boxes_{f.name}": getattr(self.boxes, f.name) for f in fields(BoxColumns)}
        arrays |= {f"racks_{f.name}": getattr(self.racks, f.name) for f in fields(RackColumns)}
        arrays["ego_translation"] = self.ego_translation
        arrays["sample_tokens"] = np.array(self.sample_tokens)
        arrays["version_split"] = np.array([self.version, self.split])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "GroundTruth":
        with np.load(path, allow_pickle=False) as data:
            version, split = (str(x) for x in data["version_split"])
            return cls(version=version, split=split, sample_tokens=[str(t) for t in data["sample_tokens"]],
                       ego_translation=data["ego_translation"],
                       boxes=BoxColumns(**{f.name: data[f"boxes_{f.name}"] for f in fields(BoxColumns)}),
                       racks=RackColumns(**{f.name: data[f"racks_{f.name}"] for f in fields(RackColumns)}))


# --------------------------------------------------------------------------- GT from the tables
_TABLES = ("sample", "scene", "sample_annotation", "instance", "category", "attribute",
           "sample_data", "calibrated_sensor", "sensor", "ego_pose")


def _check_split(version: str, split: str) -> None:
    """The devkit's ``load_gt`` version/split compatibility check."""
    if split in {"train", "val", "train_detect", "train_track"}:
        ok = version.endswith("trainval")
    elif split in {"mini_train", "mini_val"}:
        ok = version.endswith("mini")
    elif split == "test":
        ok = version.endswith("test")
    else:
        raise ValueError(f"split {split!r} is not a predefined nuScenes split (train, val, mini_train, mini_val, "
                         "test, train_detect, train_track)")
    if not ok:
        raise ValueError(f"split {split!r} is not compatible with nuScenes version {version!r}")


def _split_scene_names(split: str) -> set[str]:
    from bevperc.data.splits import scene_splits  # the devkit's lists, without importing the devkit

    return set(scene_splits()[split])


def _load_table(table_dir: Path, name: str) -> list[dict]:
    path = table_dir / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"nuScenes table {path} is missing (needed by the evaluation)")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"nuScenes table {path} cannot be read: {err}") from None


def _record_types() -> dict[str, Any]:
    """msgspec structs holding only the fields the evaluation reads (decoding skips the others).
    ``record["field"]`` works on them as on the json module's dicts."""
    try:
        import msgspec
    except ImportError:
        return {}

    class _Record(msgspec.Struct, gc=False):
        def __getitem__(self, key: str) -> Any:
            return getattr(self, key)

    class SampleAnnotation(_Record):
        token: str
        sample_token: str
        instance_token: str
        attribute_tokens: list[str]
        translation: list[float]
        size: list[float]
        rotation: list[float]
        prev: str
        next: str
        num_lidar_pts: int
        num_radar_pts: int

    class SampleData(_Record):
        sample_token: str
        ego_pose_token: str
        calibrated_sensor_token: str
        is_key_frame: bool

    class EgoPose(_Record):
        token: str
        translation: list[float]

    return {"sample_annotation": SampleAnnotation, "sample_data": SampleData, "ego_pose": EgoPose}


_RECORD_TYPES = _record_types()


def iter_table(path: Path, chunk_bytes: int = 1 << 24) -> Iterator[dict]:
    """Stream the records of a big table.

    With msgspec installed: chunks cut after a ``},`` between records, each decoded at once (about
    2x faster than the json module). Otherwise, or from the first chunk msgspec does not take (a
    string holding ``},``, non-standard JSON), the json module record by record.
    """
    try:
        import msgspec
    except ImportError:
        yield from iter_json_array(path)
        return
    handed_out = 0
    record_type = _RECORD_TYPES.get(Path(path).stem)
    decode = msgspec.json.Decoder(list[record_type]).decode if record_type is not None else msgspec.json.decode
    try:
        with open(path, "rb") as handle:
            data = handle.read(chunk_bytes).lstrip()
            if not data.startswith(b"["):
                raise ValueError(f"{path}: not a JSON array")
            data = data[1:]
            while True:
                chunk = handle.read(chunk_bytes)
                data += chunk
                if not chunk:
                    rest = data.strip()
                    records = [] if rest == b"]" else decode(b"[" + rest)
                    if not isinstance(records, list) or (record_type is None
                                                         and not all(isinstance(r, dict) for r in records)):
                        raise ValueError(f"{path}: not an array of records")
                    for record in records:
                        handed_out += 1
                        yield record
                    return
                cut = data.rfind(b"},")
                if cut < 0:
                    continue
                records = decode(b"[" + data[:cut + 1] + b"]")
                data = data[cut + 2:]
                for record in records:
                    handed_out += 1
                    yield record
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        for i, record in enumerate(iter_json_array(path)):  # exact errors, or a file msgspec cannot split
            if i >= handed_out:
                yield record


def _table_fingerprint(table_dir: Path) -> str:
    digest = hashlib.sha1()
    for name in _TABLES:
        stat = (table_dir / f"{name}.json").stat()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def load_ground_truth(dataroot: str | Path, version: str, split: str, cache_dir: str | Path | None = None,
                      verbose: bool = False) -> GroundTruth:
    """Read the GT of ``split`` from ``dataroot/version/*.json`` as the devkit's ``load_gt`` +
    ``add_center_dist`` see it (before filtering).

    ``cache_dir``: if given, an ``.npz`` keyed by the tables' sizes and mtimes is reused when present.
    """
    table_dir = Path(dataroot) / version
    if not table_dir.is_dir():
        raise FileNotFoundError(f"{table_dir}: no nuScenes tables for version {version!r} under {dataroot}")
    _check_split(version, split)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"gt_{version}_{split}_{_table_fingerprint(table_dir)}.npz"
        if cache_path.is_file():
            return GroundTruth.load(cache_path)
    started = time.perf_counter()

    # Samples of the split, in table order (load_gt keeps nusc.sample order).
    scene_names = _split_scene_names(split)
    split_scene_tokens = {s["token"] for s in _load_table(table_dir, "scene") if s["name"] in scene_names}
    samples = _load_table(table_dir, "sample")
    if not samples:
        raise ValueError(f"{table_dir}/sample.json: the database has no samples")
    all_sample_index = {s["token"]: i for i, s in enumerate(samples)}
    timestamps = np.array([s["timestamp"] for s in samples], dtype=np.int64)
    split_rows = np.array([i for i, s in enumerate(samples) if s["scene_token"] in split_scene_tokens], dtype=np.int64)
    sample_tokens = [samples[i]["token"] for i in split_rows]
    del samples
    split_of_table_row = np.full(len(timestamps), -1, dtype=np.int64)
    split_of_table_row[split_rows] = np.arange(len(split_rows))

    # Ego position of each sample: its key-frame LIDAR_TOP sample_data (the last one in table order,
    # as NuScenes' reverse index overwrites sample['data'][channel]) -> ego_pose.translation.
    channel_of_sensor = {s["token"]: s["channel"] for s in _load_table(table_dir, "sensor")}
    lidar_calibrations = {c["token"] for c in _load_table(table_dir, "calibrated_sensor")
                          if channel_of_sensor.get(c["sensor_token"]) == "LIDAR_TOP"}
    pose_token_of_sample: dict[str, str] = {}
    for record in iter_table(table_dir / "sample_data.json"):
        if record["is_key_frame"] and record["calibrated_sensor_token"] in lidar_calibrations:
            pose_token_of_sample[record["sample_token"]] = record["ego_pose_token"]
    missing = [t for t in sample_tokens if t not in pose_token_of_sample]
    if missing:
        raise ValueError(f"{table_dir}/sample_data.json: {len(missing)} samples of split {split!r} have no key-frame "
                         f"LIDAR_TOP sample_data (needed for the ego distance), e.g. {missing[:3]}")
    wanted_poses = {pose_token_of_sample[t] for t in sample_tokens}
    pose_translation: dict[str, list] = {}
    for record in iter_table(table_dir / "ego_pose.json"):
        if record["token"] in wanted_poses:
            pose_translation[record["token"]] = record["translation"]
    try:
        ego_translation = np.array([pose_translation[pose_token_of_sample[t]] for t in sample_tokens],
                                   dtype=np.float64).reshape(-1, 3)
    except KeyError as exc:
        raise ValueError(f"{table_dir}/ego_pose.json: ego pose {exc.args[0]!r} is missing") from None
    del pose_token_of_sample, pose_translation

    # Annotations -> columns. Every row keeps (token, translation, sample) for the velocity lookups.
    category_name = {c["token"]: c["name"] for c in _load_table(table_dir, "category")}
    class_of_instance: dict[str, int] = {}
    rack_instances: set[str] = set()
    for inst in _load_table(table_dir, "instance"):
        name = category_name[inst["category_token"]]
        if name in CATEGORY_TO_DETECTION_NAME:
            class_of_instance[inst["token"]] = _CLASS_INDEX[CATEGORY_TO_DETECTION_NAME[name]]
        elif name == BICYCLE_RACK:
            rack_instances.add(inst["token"])
    attribute_index_of_token = {}
    for a in _load_table(table_dir, "attribute"):
        attribute_index_of_token[a["token"]] = ATTRIBUTE_NAMES.index(a["name"]) if a["name"] in ATTRIBUTE_NAMES else None

    row_token: list[str] = []
    row_translation = array("d")
    row_table_sample = array("q")
    gt_rows = array("q")
    gt_class = array("q")
    gt_attr = array("q")
    gt_size = array("d")
    gt_rotation = array("d")
    gt_num_pts = array("q")
    gt_prev: list[str] = []
    gt_next: list[str] = []
    rack_rows = array("q")
    rack_size = array("d")
    rack_rotation = array("d")
    annotation_path = table_dir / "sample_annotation.json"
    for row, ann in enumerate(iter_table(annotation_path)):
        table_sample = all_sample_index[ann["sample_token"]]
        row_token.append(ann["token"])
        row_translation.extend(ann["translation"])
        row_table_sample.append(table_sample)
        if split_of_table_row[table_sample] < 0:
            continue
        instance = ann["instance_token"]
        cls = class_of_instance.get(instance)
        if cls is not None:
            attrs = ann["attribute_tokens"]
            if len(attrs) > 1:
                raise ValueError(f"{annotation_path}: annotation {ann['token']!r} has {len(attrs)} attributes; "
                                 "GT annotations must not have more than one attribute")
            attr = -1
            if attrs:
                attr = attribute_index_of_token[attrs[0]]
                if attr is None:
                    raise ValueError(f"{annotation_path}: annotation {ann['token']!r} has an attribute that is not "
                                     f"one of {list(ATTRIBUTE_NAMES)}")
            gt_rows.append(row)
            gt_class.append(cls)
            gt_attr.append(attr)
            gt_size.extend(ann["size"])
            gt_rotation.extend(ann["rotation"])
            gt_num_pts.append(ann["num_lidar_pts"] + ann["num_radar_pts"])
            gt_prev.append(ann["prev"])
            gt_next.append(ann["next"])
        elif instance in rack_instances:
            rack_rows.append(row)
            rack_size.extend(ann["size"])
            rack_rotation.extend(ann["rotation"])

    translation_all = np.frombuffer(row_translation, dtype=np.float64).reshape(-1, 3)
    table_sample_all = np.frombuffer(row_table_sample, dtype=np.int64)
    rows = np.frombuffer(gt_rows, dtype=np.int64)
    velocity = _box_velocity(rows, gt_prev, gt_next, row_token, translation_all, table_sample_all, timestamps)
    del row_token, gt_prev, gt_next

    boxes = BoxColumns(
        sample_index=split_of_table_row[table_sample_all[rows]],
        translation=translation_all[rows].copy(),
        size=np.frombuffer(gt_size, dtype=np.float64).reshape(-1, 3).copy(),
        rotation=np.frombuffer(gt_rotation, dtype=np.float64).reshape(-1, 4).copy(),
        velocity=velocity,
        class_index=np.frombuffer(gt_class, dtype=np.int64).copy(),
        attribute_index=np.frombuffer(gt_attr, dtype=np.int64).copy(),
        score=np.full(len(rows), -1.0),
        num_pts=np.frombuffer(gt_num_pts, dtype=np.int64).copy(),
    )
    racks_at = np.frombuffer(rack_rows, dtype=np.int64)
    racks = RackColumns(sample_index=split_of_table_row[table_sample_all[racks_at]],
                        translation=translation_all[racks_at].copy(),
                        size=np.frombuffer(rack_size, dtype=np.float64).reshape(-1, 3).copy(),
                        rotation=np.frombuffer(rack_rotation, dtype=np.float64).reshape(-1, 4).copy())
    # Group by sample in split order, table order within a sample: the devkit's EvalBoxes.all order.
    boxes = boxes.take(np.argsort(boxes.sample_index, kind="stable"))
    gt = GroundTruth(version=version, split=split, sample_tokens=sample_tokens, ego_translation=ego_translation,
                     boxes=boxes, racks=racks)
    if verbose:
        print(f"Loaded {len(boxes)} GT boxes of {len(sample_tokens)} samples ({split}) from {table_dir} "
              f"in {time.perf_counter() - started:.1f} s")
    if cache_path is not None:
        gt.save(cache_path)
    return gt


def _box_velocity(rows: np.ndarray, prev_tokens: list[str], next_tokens: list[str], row_token: list[str],
                  translation_all: np.ndarray, table_sample_all: np.ndarray, timestamps: np.ndarray,
                  max_time_diff: float = 1.5) -> np.ndarray:
    """``NuScenes.box_velocity(token)[:2]`` for the annotation rows ``rows`` -> float64 [N, 2]."""
    row_of_token = {token: i for i, token in enumerate(row_token)}
    n = len(rows)
    has_prev = np.fromiter((t != "" for t in prev_tokens), dtype=bool, count=n)
    has_next = np.fromiter((t != "" for t in next_tokens), dtype=bool, count=n)
    first = np.fromiter((row_of_token[t] if t else -1 for t in prev_tokens), dtype=np.int64, count=n)
    last = np.fromiter((row_of_token[t] if t else -1 for t in next_tokens), dtype=np.int64, count=n)
    first = np.where(has_prev, first, rows)
    last = np.where(has_next, last, rows)
    pos_diff = translation_all[last] - translation_all[first]
    time_last = 1e-6 * timestamps[table_sample_all[last]]
    time_first = 1e-6 * timestamps[table_sample_all[first]]
    time_diff = time_last - time_first
    limit = np.where(has_prev & has_next, max_time_diff * 2, max_time_diff)
    with np.errstate(divide="ignore", invalid="ignore"):
        velocity = pos_diff / time_diff[:, None]
    velocity[(time_diff > limit) | ~(has_prev | has_next)] = np.nan
    return velocity[:, :2].copy()


# --------------------------------------------------------------------------- predictions
def prediction_columns(pred: PredictionBoxes, gt: GroundTruth) -> BoxColumns:
    """Map a submission's samples onto the GT's; the devkit requires the same sample set."""
    index_of = {token: i for i, token in enumerate(gt.sample_tokens)}
    try:
        remap = np.array([index_of[t] for t in pred.sample_tokens], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"results: sample {exc.args[0]!r} is not in split {gt.split!r}") from None
    if len(set(pred.sample_tokens)) != len(gt.sample_tokens):
        missing = sorted(set(gt.sample_tokens) - set(pred.sample_tokens))
        raise ValueError(f"results: {len(missing)} samples of split {gt.split!r} are missing, e.g. {missing[:5]}")
    return BoxColumns(sample_index=remap[pred.sample_index] if len(pred) else pred.sample_index,
                      translation=pred.translation, size=pred.size, rotation=pred.rotation, velocity=pred.velocity,
                      class_index=pred.class_index, attribute_index=pred.attribute_index, score=pred.score,
                      num_pts=pred.num_pts)


# --------------------------------------------------------------------------- filtering
def filter_mask(boxes: BoxColumns, ego_translation: np.ndarray, racks: RackColumns, cfg: DetectionEvalConfig) -> np.ndarray:
    """bool [N]: which boxes survive the devkit's ``filter_eval_boxes`` (range, points, bike racks)."""
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=bool)
    # add_center_dist: ego_translation = box - pose (3D); ego_dist = sqrt(sum(ego[:2] ** 2)).
    ego = boxes.translation - ego_translation[boxes.sample_index]
    ego_dist = np.sqrt(ego[:, 0] ** 2 + ego[:, 1] ** 2)
    max_dist = np.full(len(DETECTION_NAMES), -np.inf)  # classes outside class_range: the devkit raises
    for name, value in cfg.class_range.items():
        max_dist[_CLASS_INDEX[name]] = value
    if not np.isin(boxes.class_index, [_CLASS_INDEX[c] for c in cfg.class_range]).all():
        raise ValueError("boxes of a class that is not in DetectionEvalConfig.class_range")
    keep = (ego_dist < max_dist[boxes.class_index]) & (boxes.num_pts != 0)
    if len(racks.sample_index):
        cycles = np.flatnonzero(keep & np.isin(boxes.class_index, _CYCLE_CLASSES)
                                & np.isin(boxes.sample_index, racks.sample_index))
        if len(cycles):
            keep[cycles[_in_any_rack(boxes.translation[cycles], boxes.sample_index[cycles], racks)]] = False
    return keep


def _rack_corners(translation: np.ndarray, size: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Corners [3, 8] of one box, computed as ``nuscenes.utils.data_classes.Box.corners()`` does."""
    from pyquaternion import Quaternion

    w, l, h = size
    corners = np.vstack((l / 2 * np.array([1, 1, 1, 1, -1, -1, -1, -1]),
                         w / 2 * np.array([1, -1, -1, 1, 1, -1, -1, 1]),
                         h / 2 * np.array([1, 1, -1, -1, 1, 1, -1, -1])))
    corners = np.dot(Quaternion(rotation).rotation_matrix, corners)
    return corners + np.asarray(translation).reshape(3, 1)


def _in_any_rack(points: np.ndarray, sample_index: np.ndarray, racks: RackColumns) -> np.ndarray:
    """bool [P]: whether each point lies in a rack of its sample (``points_in_box`` with wlh_factor 1)."""
    inside = np.zeros(len(points), dtype=bool)
    for r in range(len(racks.sample_index)):
        candidates = np.flatnonzero(sample_index == racks.sample_index[r])
        if not len(candidates):
            continue
        corners = _rack_corners(racks.translation[r], racks.size[r], racks.rotation[r])
        p1 = corners[:, 0]
        i, j, k = corners[:, 4] - p1, corners[:, 1] - p1, corners[:, 3] - p1
        v = points[candidates].T - p1.reshape((-1, 1))
        iv, jv, kv = np.dot(i, v), np.dot(j, v), np.dot(k, v)
        in_box = ((0 <= iv) & (iv <= np.dot(i, i)) & (0 <= jv) & (jv <= np.dot(j, j))
                  & (0 <= kv) & (kv <= np.dot(k, k)))
        inside[candidates[in_box]] = True
    return inside


# --------------------------------------------------------------------------- metric data
@dataclass
class MetricCurves:
    """The devkit's ``DetectionMetricData``: 101-point curves of one (class, distance threshold)."""

    recall: np.ndarray
    precision: np.ndarray
    confidence: np.ndarray
    trans_err: np.ndarray
    vel_err: np.ndarray
    scale_err: np.ndarray
    orient_err: np.ndarray
    attr_err: np.ndarray

    @classmethod
    def no_predictions(cls) -> "MetricCurves":
        n = N_RECALL_POINTS
        return cls(recall=np.linspace(0, 1, n), precision=np.zeros(n), confidence=np.zeros(n),
                   trans_err=np.ones(n), vel_err=np.ones(n), scale_err=np.ones(n), orient_err=np.ones(n),
                   attr_err=np.ones(n))

    @property
    def max_recall_ind(self) -> int:
        non_zero = np.nonzero(self.confidence)[0]
        return 0 if len(non_zero) == 0 else int(non_zero[-1])

    def serialize(self) -> dict[str, list[float]]:
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    def to_devkit(self):
        """The same data as a ``nuscenes`` ``DetectionMetricData`` (for the devkit's plots)."""
        from nuscenes.eval.detection.data_classes import DetectionMetricData

        return DetectionMetricData(**{f.name: getattr(self, f.name) for f in fields(self)})


def score_order(score: np.ndarray) -> np.ndarray:
    """Indices that sort predictions as the devkit does: ``[i for (v, i) in sorted((v, i) ...)][::-1]``,
    i.e. descending score and, among equal scores, descending index."""
    return np.lexsort((np.arange(len(score)), score))[::-1]


def cummean(x: np.ndarray) -> np.ndarray:
    """NaN-aware cumulative mean (``nuscenes.eval.common.utils.cummean``)."""
    if sum(np.isnan(x)) == len(x):
        return np.ones(len(x))
    sum_vals = np.nancumsum(x.astype(float))
    count_vals = np.cumsum(~np.isnan(x))
    return np.divide(sum_vals, count_vals, out=np.zeros_like(sum_vals), where=count_vals != 0)


def quaternion_yaw(rotation: np.ndarray) -> np.ndarray:
    """Yaw [N] of quaternions [N, 4] (w, x, y, z): angle of R @ (1, 0, 0) in the xy plane."""
    w, x, y, z = rotation.T
    return np.arctan2(2 * (x * y + w * z), w * w + x * x - y * y - z * z)


def _group_slots(group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Position of each element among the elements of its group (in array order), and group sizes."""
    counts = np.bincount(group, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    order = np.argsort(group, kind="stable")
    slot = np.empty(len(group), dtype=np.int64)
    slot[order] = np.arange(len(group)) - starts[group[order]]
    return slot, counts


def match_class(gt_xy: np.ndarray, gt_sample: np.ndarray, pred_xy: np.ndarray, pred_sample: np.ndarray,
                n_samples: int, dist_ths: Sequence[float]) -> np.ndarray:
    """Greedy matching of one class for several thresholds at once.

    Predictions must already be in the devkit's processing order (:func:`score_order`). Each takes
    the nearest untaken GT of its sample (xy centre distance; the first GT in table order on ties) and
    is a match if that distance is ``< dist_th``.

    gt_xy [G, 2], gt_sample [G], pred_xy [P, 2], pred_sample [P] -> matched GT index int64 [T, P] (-1: none).
    """
    n_th = len(dist_ths)
    matched = np.full((n_th, len(pred_sample)), -1, dtype=np.int64)
    if len(gt_sample) == 0 or len(pred_sample) == 0:
        return matched
    gt_slot, gt_counts = _group_slots(gt_sample, n_samples)
    gt_at = np.full((n_samples, int(gt_counts.max())), -1, dtype=np.int64)  # [S, Gmax] GT index or -1
    gt_at[gt_sample, gt_slot] = np.arange(len(gt_sample))
    # Only predictions in samples with GT of this class can match; samples are independent, so the
    # k-th prediction (rank k) of every sample is processed in the same vectorised step.
    active = np.flatnonzero(gt_counts[pred_sample] > 0)
    if not len(active):
        return matched
    rank, _ = _group_slots(pred_sample[active], n_samples)
    by_rank = active[np.argsort(rank, kind="stable")]
    rank_counts = np.bincount(rank)
    taken = np.zeros((n_th, n_samples, gt_at.shape[1]), dtype=bool)
    thresholds = np.asarray(dist_ths, dtype=np.float64)
    start = 0
    for count in rank_counts:
        preds = by_rank[start:start + count]
        start += count
        samples = pred_sample[preds]
        width = int(gt_counts[samples].max())
        candidates = gt_at[samples, :width]  # [A, W]
        valid = candidates >= 0
        dx = pred_xy[preds, 0][:, None] - gt_xy[candidates, 0]
        dy = pred_xy[preds, 1][:, None] - gt_xy[candidates, 1]
        dist = np.sqrt(dx * dx + dy * dy)
        rows = np.arange(count)
        for t in range(n_th):
            free_dist = np.where(valid & ~taken[t, samples, :width], dist, np.inf)
            nearest = free_dist.argmin(axis=1)  # first minimum, like the devkit's strict '<' scan
            hit = free_dist[rows, nearest] < thresholds[t]
            taken[t, samples[hit], nearest[hit]] = True
            matched[t, preds[hit]] = candidates[rows[hit], nearest[hit]]
    return matched


def _curves(is_match: np.ndarray, conf_sorted: np.ndarray, npos: int, errors: dict[str, np.ndarray],
            match_conf: np.ndarray) -> MetricCurves:
    """``accumulate`` after the matching loop: PR curve and TP-error curves on 101 recall points."""
    tp = np.cumsum(is_match).astype(float)
    fp = np.cumsum(~is_match).astype(float)
    prec = tp / (fp + tp)
    rec = tp / float(npos)
    rec_interp = np.linspace(0, 1, N_RECALL_POINTS)
    prec = np.interp(rec_interp, rec, prec, right=0)
    conf = np.interp(rec_interp, rec, conf_sorted, right=0)
    resampled = {}
    for key, values in errors.items():
        tmp = cummean(values)
        resampled[key] = np.interp(conf[::-1], match_conf[::-1], tmp[::-1])[::-1]
    return MetricCurves(recall=rec_interp, precision=prec, confidence=conf, **resampled)


def accumulate_class(gt: BoxColumns, pred: BoxColumns, class_name: str, n_samples: int,
                     dist_ths: Sequence[float]) -> dict[float, MetricCurves]:
    """The devkit's ``accumulate`` for one class and every threshold of ``dist_ths``.

    ``gt``/``pred``: filtered boxes (any classes), predictions in file order.
    """
    cls = _CLASS_INDEX[class_name]
    gt_c = gt.take(np.flatnonzero(gt.class_index == cls))
    npos = len(gt_c)
    if npos == 0:
        return {th: MetricCurves.no_predictions() for th in dist_ths}
    pred_c = pred.take(np.flatnonzero(pred.class_index == cls))
    pred_c = pred_c.take(score_order(pred_c.score))
    matched = match_class(gt_c.translation[:, :2], gt_c.sample_index, pred_c.translation[:, :2],
                          pred_c.sample_index, n_samples, dist_ths)
    period = np.pi if class_name == "barrier" else 2 * np.pi
    out = {}
    for t, th in enumerate(dist_ths):
        is_match = matched[t] >= 0
        if not is_match.any():
            out[th] = MetricCurves.no_predictions()
            continue
        p = np.flatnonzero(is_match)
        g = matched[t, p]
        out[th] = _curves(is_match, pred_c.score, npos, _match_errors(gt_c, g, pred_c, p, period), pred_c.score[p])
    return out


def _match_errors(gt: BoxColumns, g: np.ndarray, pred: BoxColumns, p: np.ndarray, period: float) -> dict[str, np.ndarray]:
    """TP errors of matched pairs (gt[g[k]], pred[p[k]]), in matching order (``center_distance``,
    ``velocity_l2``, ``1 - scale_iou``, ``yaw_diff``, ``1 - attr_acc``)."""
    d = pred.translation[p, :2] - gt.translation[g, :2]
    trans_err = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
    dv = pred.velocity[p] - gt.velocity[g]
    vel_err = np.sqrt(dv[:, 0] * dv[:, 0] + dv[:, 1] * dv[:, 1])
    sa, sr = gt.size[g], pred.size[p]
    mn = np.minimum(sa, sr)
    intersection = mn[:, 0] * mn[:, 1] * mn[:, 2]
    union = sa[:, 0] * sa[:, 1] * sa[:, 2] + sr[:, 0] * sr[:, 1] * sr[:, 2] - intersection
    scale_err = 1 - intersection / union
    diff = (quaternion_yaw(gt.rotation[g]) - quaternion_yaw(pred.rotation[p]) + period / 2) % period - period / 2
    diff = np.where(diff > np.pi, diff - 2 * np.pi, diff)
    orient_err = np.abs(diff)
    gt_attr = gt.attribute_index[g]
    attr_acc = np.where(gt_attr == -1, np.nan, (gt_attr == pred.attribute_index[p]).astype(float))
    return {"trans_err": trans_err, "vel_err": vel_err, "scale_err": scale_err, "orient_err": orient_err,
            "attr_err": 1 - attr_acc}


def calc_ap(md: MetricCurves, min_recall: float, min_precision: float) -> float:
    """The devkit's ``calc_ap``."""
    prec = np.copy(md.precision)
    prec = prec[round(100 * min_recall) + 1:]
    prec -= min_precision
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - min_precision)


def calc_tp(md: MetricCurves, min_recall: float, metric_name: str) -> float:
    """The devkit's ``calc_tp``."""
    first_ind = round(100 * min_recall) + 1
    last_ind = md.max_recall_ind
    if last_ind < first_ind:
        return 1.0
    return float(np.mean(getattr(md, metric_name)[first_ind: last_ind + 1]))


# --------------------------------------------------------------------------- metrics
def summarize(metric_data: dict[tuple[str, float], MetricCurves], cfg: DetectionEvalConfig) -> dict[str, Any]:
    """``DetectionEval.evaluate`` step 2 + ``DetectionMetrics.serialize()`` (without eval_time)."""
    label_aps: dict[str, dict[float, float]] = {}
    label_tp_errors: dict[str, dict[str, float]] = {}
    for class_name in cfg.class_names:
        label_aps[class_name] = {th: calc_ap(metric_data[(class_name, th)], cfg.min_recall, cfg.min_precision)
                                 for th in cfg.dist_ths}
        label_tp_errors[class_name] = {}
        for metric_name in TP_METRICS:
            md = metric_data[(class_name, cfg.dist_th_tp)]
            if class_name == "traffic_cone" and metric_name in ("attr_err", "vel_err", "orient_err"):
                tp = np.nan
            elif class_name == "barrier" and metric_name in ("attr_err", "vel_err"):
                tp = np.nan
            else:
                tp = calc_tp(md, cfg.min_recall, metric_name)
            label_tp_errors[class_name][metric_name] = tp
    mean_dist_aps = {c: np.mean(list(d.values())) for c, d in label_aps.items()}
    mean_ap = float(np.mean(list(mean_dist_aps.values())))
    tp_errors = {m: float(np.nanmean([label_tp_errors[c][m] for c in cfg.class_names])) for m in TP_METRICS}
    tp_scores = {m: max(0.0, 1.0 - tp_errors[m]) for m in TP_METRICS}
    nd_score = float(cfg.mean_ap_weight * mean_ap + np.sum(list(tp_scores.values())))
    nd_score = nd_score / float(cfg.mean_ap_weight + len(tp_scores))
    return {"label_aps": label_aps, "mean_dist_aps": {c: float(v) for c, v in mean_dist_aps.items()},
            "mean_ap": mean_ap, "label_tp_errors": label_tp_errors, "tp_errors": tp_errors,
            "tp_scores": tp_scores, "nd_score": nd_score}


@dataclass
class EvalResult:
    """Metrics summary (``metrics_summary.json`` layout) and per (class, threshold) curves."""

    summary: dict[str, Any]
    metric_data: dict[tuple[str, float], MetricCurves]

    def details(self) -> dict[str, dict]:
        """``metrics_details.json`` layout (``DetectionMetricDataList.serialize()``)."""
        return {f"{name}:{th}": md.serialize() for (name, th), md in self.metric_data.items()}


def evaluate_boxes(gt: GroundTruth, pred: BoxColumns, cfg: DetectionEvalConfig | None = None, meta: dict | None = None) -> EvalResult:
    """Evaluate prediction columns against the GT (both unfiltered; filtering happens here)."""
    cfg = cfg or DetectionEvalConfig()
    started = time.time()
    gt_boxes = gt.boxes.take(np.flatnonzero(filter_mask(gt.boxes, gt.ego_translation, gt.racks, cfg)))
    pred_boxes = pred.take(np.flatnonzero(filter_mask(pred, gt.ego_translation, gt.racks, cfg)))
    metric_data: dict[tuple[str, float], MetricCurves] = {}
    n_samples = len(gt.sample_tokens)
    for class_name in cfg.class_names:
        for th, md in accumulate_class(gt_boxes, pred_boxes, class_name, n_samples, cfg.dist_ths).items():
            metric_data[(class_name, th)] = md
    summary = summarize(metric_data, cfg)
    summary["eval_time"] = time.time() - started
    summary["cfg"] = cfg.to_dict()
    summary["meta"] = dict(meta or {})
    return EvalResult(summary=summary, metric_data=metric_data)


class FastDetectionEval:
    """Holds one split's GT (read once from the tables) and evaluates any number of submissions.

    >>> evaluator = FastDetectionEval("data/nuscenes", "v1.0-mini", "mini_val")   # doctest: +SKIP
    >>> result = evaluator.evaluate_file("results_nusc.json")                       # doctest: +SKIP
    >>> result.summary["nd_score"], result.summary["mean_ap"]                       # doctest: +SKIP
    """

    def __init__(self, dataroot: str | Path, version: str, split: str, cfg: DetectionEvalConfig | None = None,
                 cache_dir: str | Path | None = None, verbose: bool = False):
        self.cfg = cfg or DetectionEvalConfig()
        self.gt = load_ground_truth(dataroot, version, split, cache_dir=cache_dir, verbose=verbose)

    @property
    def sample_tokens(self) -> list[str]:
        return self.gt.sample_tokens

    def evaluate_file(self, results_path: str | Path, allow_empty_attribute: bool = False) -> EvalResult:
        """Validate (strictly) and evaluate a submission file."""
        pred = read_submission(results_path, self.gt.sample_tokens, self.cfg.max_boxes_per_sample,
                               allow_empty_attribute)
        return self.evaluate_predictions(pred)

    def evaluate_dict(self, submission: dict, allow_empty_attribute: bool = False) -> EvalResult:
        """Validate and evaluate an in-memory submission ``{"meta": ..., "results": ...}``."""
        pred = submission_from_dict(submission, self.gt.sample_tokens, self.cfg.max_boxes_per_sample,
                                    allow_empty_attribute)
        return self.evaluate_predictions(pred)

    def evaluate_predictions(self, pred: PredictionBoxes) -> EvalResult:
        return evaluate_boxes(self.gt, prediction_columns(pred, self.gt), self.cfg, pred.meta)


def write_metrics(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics_summary.json`` and ``metrics_details.json`` atomically (devkit file names)."""
    from bevperc.utils.io import atomic_write_json

    out_dir = Path(out_dir)
    summary = atomic_write_json(out_dir / "metrics_summary.json", to_jsonable(result.summary))
    details = atomic_write_json(out_dir / "metrics_details.json", result.details())
    return summary, details


def to_jsonable(obj: Any) -> Any:
    """NumPy scalars -> floats, float dict keys -> their str() (as json.dump writes the devkit's)."""
    if isinstance(obj, dict):
        return {(str(k) if isinstance(k, float) else k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
