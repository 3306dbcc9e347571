"""Ground truth of a split read straight from the nuScenes tables, as the devkit's ``load_gt`` +
``add_center_dist`` see it (before filtering), without the ``NuScenes`` class.

Samples of the split in table order; annotations of a sample in table order (the devkit's
``sample['anns']`` order, which decides distance ties); the category mapping of
``category_to_detection_name``; at most one attribute; velocities as in ``NuScenes.box_velocity``
(centred difference, 1.5 s / 3 s limits, NaN when unknown); ``num_pts = num_lidar_pts +
num_radar_pts``; the ego position from the key-frame LIDAR_TOP ``sample_data`` of each sample.

The big tables (``sample_annotation``, ``sample_data``, ``ego_pose``) are decoded by msgspec in
chunks into structs holding only the fields used here, and turned into columns a chunk at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field, fields
from itertools import chain, compress, repeat
from operator import attrgetter
from pathlib import Path
from typing import Iterator

import msgspec
import numpy as np

from bevperc.data.classes import ATTRIBUTE_NAMES, CATEGORY_TO_DETECTION_NAME, DETECTION_NAME_INDEX
from bevperc.evaluation.columns import BoxColumns, RackColumns, float_fields, gc_paused, reused_buffer
from bevperc.evaluation.submission import iter_json_array
from bevperc.evaluation.timing import StageTimer
from bevperc.evaluation.workers import byte_ranges, default_workers, run_tasks

BICYCLE_RACK = "static_object.bicycle_rack"
_RACK = -2  # instance kind of a bicycle rack (detection classes are >= 0, other categories -1)
_TABLES = ("sample", "scene", "sample_annotation", "instance", "category", "attribute",
           "sample_data", "calibrated_sensor", "sensor", "ego_pose")


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
            return cls(version=version, split=split, sample_tokens=data["sample_tokens"].tolist(),
                       ego_translation=data["ego_translation"],
                       boxes=BoxColumns(**{f.name: data[f"boxes_{f.name}"] for f in fields(BoxColumns)}),
                       racks=RackColumns(**{f.name: data[f"racks_{f.name}"] for f in fields(RackColumns)}))


# --------------------------------------------------------------------------- tables
class _Annotation(msgspec.Struct, gc=False):
    token: str
    sample_token: str
    instance_token: str
    attribute_tokens: list[str]
    translation: tuple[float, float, float]
    size: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    prev: str
    next: str
    num_lidar_pts: int
    num_radar_pts: int


class _SampleData(msgspec.Struct, gc=False):
    sample_token: str
    ego_pose_token: str
    calibrated_sensor_token: str
    is_key_frame: bool


class _EgoPose(msgspec.Struct, gc=False):
    token: str
    translation: tuple[float, float, float]


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


def _table_path(table_dir: Path, name: str) -> Path:
    path = table_dir / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"nuScenes table {path} is missing (needed by the evaluation)")
    return path


def _load_table(table_dir: Path, name: str) -> list[dict]:
    path = _table_path(table_dir, name)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"nuScenes table {path} cannot be read: {err}") from None


def table_batches(path: Path, record_type: type, chunk_bytes: int = 1 << 22) -> Iterator[list]:
    """The records of a big table as lists of ``record_type`` structs, a chunk of the file at a time.

    Chunks are cut after a ``},`` between records and decoded by msgspec at once. From the first chunk
    msgspec does not take (a string holding ``},``, the non-standard NaN literal) the rest is read by
    the json module and converted, so any file the json module reads gives the same records.
    """
    handed_out = 0
    decode = msgspec.json.Decoder(list[record_type]).decode
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
                    handed_out += len(records)
                    yield records
                    return
                cut = data.rfind(b"},")
                if cut < 0:
                    continue
                records = decode(b"[" + data[:cut + 1] + b"]")
                data = data[cut + 2:]
                handed_out += len(records)
                yield records
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        pass
    batch: list = []
    for i, record in enumerate(iter_json_array(path)):  # exact errors, or a file msgspec cannot split
        if i >= handed_out:
            batch.append(record)
        if len(batch) == 1 << 16:
            yield _convert(batch, record_type, path)
            batch = []
    yield _convert(batch, record_type, path)


def _convert(records: list, record_type: type, path: Path) -> list:
    try:
        return msgspec.convert(records, list[record_type])
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path}: {exc} (a record is not as in the nuScenes schema)") from None


def table_fingerprint(table_dir: Path) -> str:
    digest = hashlib.sha1()
    for name in _TABLES:
        stat = (table_dir / f"{name}.json").stat()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- loading
def load_ground_truth(dataroot: str | Path, version: str, split: str, cache_dir: str | Path | None = None,
                      timer: StageTimer | None = None, workers: int | None = None) -> GroundTruth:
    """Read the GT of ``split`` from ``dataroot/version/*.json`` as the devkit's ``load_gt`` +
    ``add_center_dist`` see it (before filtering).

    ``cache_dir``: if given, an ``.npz`` keyed by the tables' sizes and mtimes is reused when present.
    ``timer``: gets the stages ``gt_cache`` or ``gt_samples``, ``gt_ego``, ``gt_annotations`` (and the
    task CPU of ``gt_annotation_ranges``).
    ``workers``: processes that decode ``sample_annotation.json`` (default
    :func:`~bevperc.evaluation.workers.default_workers`); the result does not depend on it.
    """
    timer = timer or StageTimer()
    table_dir = Path(dataroot) / version
    if not table_dir.is_dir():
        raise FileNotFoundError(f"{table_dir}: no nuScenes tables for version {version!r} under {dataroot}")
    _check_split(version, split)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"gt_{version}_{split}_{table_fingerprint(table_dir)}.npz"
        if cache_path.is_file():
            with timer.stage("gt_cache"):
                return GroundTruth.load(cache_path)
    with timer.stage("gt_samples"), gc_paused():
        samples = _SplitSamples.read(table_dir, split)
    with timer.stage("gt_ego"), gc_paused():
        ego_translation = _ego_translation(table_dir, split, samples.tokens)
    with timer.stage("gt_annotations"), gc_paused():
        boxes, racks = _annotations(table_dir, samples, default_workers() if workers is None else workers, timer)
    gt = GroundTruth(version=version, split=split, sample_tokens=samples.tokens, ego_translation=ego_translation,
                     boxes=boxes, racks=racks)
    if cache_path is not None:
        gt.save(cache_path)
    return gt


@dataclass
class _SplitSamples:
    """The ``sample`` table: every sample's timestamp and, for samples of the split, their index."""

    tokens: list[str]  # samples of the split, in table order (load_gt keeps nusc.sample order)
    table_row: dict[str, int]  # sample token -> row of the sample table
    timestamps: np.ndarray  # int64 [rows]
    split_index: np.ndarray  # int64 [rows]: index in ``tokens``, -1 outside the split

    @classmethod
    def read(cls, table_dir: Path, split: str) -> "_SplitSamples":
        scene_names = _split_scene_names(split)
        split_scenes = {s["token"] for s in _load_table(table_dir, "scene") if s["name"] in scene_names}
        samples = _load_table(table_dir, "sample")
        if not samples:
            raise ValueError(f"{table_dir}/sample.json: the database has no samples")
        rows = np.array([i for i, s in enumerate(samples) if s["scene_token"] in split_scenes], dtype=np.int64)
        split_index = np.full(len(samples), -1, dtype=np.int64)
        split_index[rows] = np.arange(len(rows))
        return cls(tokens=[samples[i]["token"] for i in rows],
                   table_row={s["token"]: i for i, s in enumerate(samples)},
                   timestamps=np.array([s["timestamp"] for s in samples], dtype=np.int64), split_index=split_index)


def _ego_translation(table_dir: Path, split: str, sample_tokens: list[str]) -> np.ndarray:
    """float64 [S, 3]: ``ego_pose.translation`` of each sample's key-frame LIDAR_TOP sample_data (the
    last one in table order, as NuScenes' reverse index overwrites ``sample['data'][channel]``)."""
    channel_of_sensor = {s["token"]: s["channel"] for s in _load_table(table_dir, "sensor")}
    lidar_calibrations = {c["token"] for c in _load_table(table_dir, "calibrated_sensor")
                          if channel_of_sensor.get(c["sensor_token"]) == "LIDAR_TOP"}
    pose_token_of_sample: dict[str, str] = {}
    for batch in table_batches(_table_path(table_dir, "sample_data"), _SampleData):
        lidar = [r for r in batch if r.is_key_frame and r.calibrated_sensor_token in lidar_calibrations]
        pose_token_of_sample.update(zip(map(attrgetter("sample_token"), lidar), map(attrgetter("ego_pose_token"), lidar)))
    missing = [t for t in sample_tokens if t not in pose_token_of_sample]
    if missing:
        raise ValueError(f"{table_dir}/sample_data.json: {len(missing)} samples of split {split!r} have no key-frame "
                         f"LIDAR_TOP sample_data (needed for the ego distance), e.g. {missing[:3]}")
    wanted_poses = {pose_token_of_sample[t] for t in sample_tokens}
    pose_translation: dict[str, tuple] = {}
    for batch in table_batches(_table_path(table_dir, "ego_pose"), _EgoPose):
        pose_translation.update((r.token, r.translation) for r in batch if r.token in wanted_poses)
    try:
        return np.array([pose_translation[pose_token_of_sample[t]] for t in sample_tokens],
                        dtype=np.float64).reshape(-1, 3)
    except KeyError as exc:
        raise ValueError(f"{table_dir}/ego_pose.json: ego pose {exc.args[0]!r} is missing") from None


def _instance_kinds(table_dir: Path) -> dict[str, int]:
    """instance token -> detection class index, or _RACK for bicycle racks (other categories absent)."""
    category_name = {c["token"]: c["name"] for c in _load_table(table_dir, "category")}
    kinds = {}
    for inst in _load_table(table_dir, "instance"):
        name = category_name[inst["category_token"]]
        if name in CATEGORY_TO_DETECTION_NAME:
            kinds[inst["token"]] = DETECTION_NAME_INDEX[CATEGORY_TO_DETECTION_NAME[name]]
        elif name == BICYCLE_RACK:
            kinds[inst["token"]] = _RACK
    return kinds


@dataclass
class _AnnotationContext:
    """What every byte range of ``sample_annotation.json`` needs (sent once to each worker)."""

    path: str
    table_row: dict[str, int]  # sample token -> row of the sample table
    split_index: np.ndarray  # int64 [sample rows]: index in the split, -1 outside
    kinds: dict[str, int]  # instance token -> class index or _RACK (other categories absent)
    attribute_index: dict[str, int]  # attribute token -> index in ATTRIBUTE_NAMES, -2 for other attributes


@dataclass
class _AnnotationPart:
    """The split's annotations among some records of the table."""

    gt: dict[str, np.ndarray]  # BoxColumns fields of the GT rows (no velocity, score) + table_sample
    links: "TokenLinks | dict[str, list[str]]"  # token, prev, next of the GT rows (for the velocities)
    racks: RackColumns
    cpu_s: float = 0.0  # CPU time of the task that decoded these records


_RECORD_BOUNDARY = re.compile(rb"\}(?P<cut>)[ \t\n\r]*,[ \t\n\r]*(?=\{)")
_ARRAY_START = re.compile(rb"[ \t\n\r]*\[")
_ARRAY_END = re.compile(rb"\][ \t\n\r]*\Z")
_ANNOTATIONS = msgspec.json.Decoder(list[_Annotation])
_BOX_FLOATS = attrgetter("translation", "size", "rotation")


def _annotations(table_dir: Path, samples: _SplitSamples, workers: int,
                 timer: StageTimer) -> tuple[BoxColumns, RackColumns]:
    """GT boxes (grouped by sample in split order, table order within a sample: ``EvalBoxes.all``
    order) and bicycle racks of the split's samples, from ``sample_annotation``."""
    path = _table_path(table_dir, "sample_annotation")
    context = _AnnotationContext(
        path=str(path), table_row=samples.table_row, split_index=samples.split_index, kinds=_instance_kinds(table_dir),
        attribute_index={a["token"]: ATTRIBUTE_NAMES.index(a["name"]) if a["name"] in ATTRIBUTE_NAMES else -2
                         for a in _load_table(table_dir, "attribute")})
    parts = _annotation_parts(context, workers)
    timer.add_task_cpu("gt_annotation_ranges", sum(p.cpu_s for p in parts))
    columns = {key: np.concatenate([p.gt[key] for p in parts]) for key in parts[0].gt}
    table_sample = columns.pop("table_sample")
    velocity = _box_velocity(TokenLinks.join([p.links for p in parts]), columns["translation"],
                             samples.timestamps[table_sample], path)
    boxes = BoxColumns(**columns, velocity=velocity, score=np.full(len(table_sample), -1.0))
    racks = RackColumns(**{f.name: np.concatenate([getattr(p.racks, f.name) for p in parts]) for f in fields(RackColumns)})
    return boxes.take(np.argsort(boxes.sample_index, kind="stable")), racks


def _annotation_parts(context: _AnnotationContext, workers: int) -> list[_AnnotationPart]:
    """The table in byte ranges of whole records, decoded by the workers; if msgspec cannot decode a
    range (a string holding ``},``, a NaN literal), the whole table in this process (:func:`table_batches`)."""
    path = Path(context.path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = _ARRAY_START.match(handle.read(1 << 10))
        handle.seek(max(0, size - (1 << 10)))
        tail_offset = handle.tell()
        tail = _ARRAY_END.search(handle.read())
    if head is not None and tail is not None and head.end() <= tail_offset + tail.start():
        ranges = byte_ranges(path, head.end(), tail_offset + tail.start(), _RECORD_BOUNDARY)
        parts = list(run_tasks(annotation_range, context, ranges, workers))
        if all(part is not None for part in parts):
            return parts
    return [_annotation_part(context, batch) for batch in table_batches(path, _Annotation)]


def annotation_range(context: _AnnotationContext, byte_range: tuple[int, int]) -> _AnnotationPart | None:
    """The annotations in a byte range of whole records (a worker task); None if msgspec cannot decode it."""
    started = time.process_time()
    size = byte_range[1] - byte_range[0]
    data = reused_buffer("annotations", size + 2)  # "[" + the records + "]"
    with open(context.path, "rb") as handle:
        handle.seek(byte_range[0])
        with memoryview(data) as view:
            read = handle.readinto(view[1:size + 1])
    data[0], data[read + 1] = ord("["), ord("]")
    del data[read + 2:]  # a file that got shorter
    with gc_paused():
        try:
            records = _ANNOTATIONS.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        part = _annotation_part(context, records)
        del records  # before the collector runs again
    part.cpu_s = time.process_time() - started
    return part


def _annotation_part(context: _AnnotationContext, batch: list[_Annotation]) -> _AnnotationPart:
    n = len(batch)
    try:
        table_sample = np.fromiter(map(context.table_row.__getitem__, map(attrgetter("sample_token"), batch)),
                                   dtype=np.int64, count=n)
    except KeyError as exc:
        raise ValueError(f"{context.path}: sample {exc.args[0]!r} of an annotation is not in sample.json") from None
    split_sample = context.split_index[table_sample]
    kind = np.fromiter(map(context.kinds.get, map(attrgetter("instance_token"), batch), repeat(-1)), dtype=np.int64,
                       count=n)
    is_gt = (split_sample >= 0) & (kind >= 0)
    records = list(compress(batch, is_gt))
    num_pts = (np.fromiter(map(attrgetter("num_lidar_pts"), records), dtype=np.int64, count=len(records))
               + np.fromiter(map(attrgetter("num_radar_pts"), records), dtype=np.int64, count=len(records)))
    gt = {"sample_index": split_sample[is_gt], "table_sample": table_sample[is_gt], "class_index": kind[is_gt],
          "attribute_index": _attribute_indices(records, context.attribute_index, context.path),
          "num_pts": num_pts}
    gt["translation"], gt["size"], gt["rotation"] = float_fields(records, _BOX_FLOATS, (3, 3, 4))
    is_rack = (split_sample >= 0) & (kind == _RACK)
    racks = list(compress(batch, is_rack))
    links = {name: list(map(attrgetter(name), records)) for name in ("token", "prev", "next")}
    return _AnnotationPart(gt=gt, links=TokenLinks.compact(links) or links,
                           racks=RackColumns(split_sample[is_rack], *float_fields(racks, _BOX_FLOATS, (3, 3, 4))))


def _attribute_indices(records: list[_Annotation], attribute_index: dict[str, int], path: str) -> np.ndarray:
    """int64 [len(records)]: the attribute of each GT annotation (-1: none); at most one is allowed."""
    attributes = list(map(attrgetter("attribute_tokens"), records))
    counts = np.fromiter(map(len, attributes), dtype=np.int64, count=len(records))
    if (counts <= 1).all():  # the attribute of each row with one
        index = np.full(len(records), -1, dtype=np.int64)
        index[counts == 1] = np.fromiter(map(attribute_index.get, chain.from_iterable(attributes), repeat(-3)),
                                         dtype=np.int64, count=int(counts.sum()))
    else:
        index = np.fromiter((attribute_index.get(a[0], -3) if a else -1 for a in attributes), dtype=np.int64,
                            count=len(records))
    bad = np.flatnonzero((counts > 1) | (index < -1))
    if len(bad):
        record = records[bad[0]]
        if counts[bad[0]] > 1:
            raise ValueError(f"{path}: annotation {record.token!r} has {counts[bad[0]]} attributes; GT annotations "
                             "must not have more than one attribute")
        raise ValueError(f"{path}: annotation {record.token!r} has attribute {record.attribute_tokens[0]!r}, which "
                         f"is not one of {list(ATTRIBUTE_NAMES)} in attribute.json")
    return index


@dataclass
class TokenLinks:
    """The token, prev and next of GT rows as fixed-width ASCII bytes (nuScenes tokens are 32 hex
    digits): one bytes object per column instead of three Python strings per row, so that the join
    of the rows of all ranges is a sort and binary searches (:meth:`rows`) instead of hashing each
    token. prev and next of "" (no neighbour) are left out of ``prev`` / ``next`` (``has_prev`` /
    ``has_next`` False)."""

    width: int  # bytes of each token (0: no rows)
    token: bytes
    prev: bytes
    next: bytes
    has_prev: np.ndarray  # bool [N]
    has_next: np.ndarray  # bool [N]
    _own: tuple | None = field(default=None, repr=False, compare=False)  # rows(): tokens, their order, sorted hashes

    @classmethod
    def compact(cls, links: dict[str, list[str]]) -> "TokenLinks | None":
        """None unless every token is ASCII without NUL, all of one length (prev, next: or "")."""
        if not links["token"]:
            return cls(0, b"", b"", b"", np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))
        width = len(links["token"][0])
        columns, present = {}, {}
        for name, tokens in links.items():
            text = "".join(tokens)
            lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
            present[name] = lengths > 0
            if (not text.isascii() or "\x00" in text or width == 0 or (lengths[present[name]] != width).any()
                    or (name == "token" and not present[name].all())):
                return None
            columns[name] = text.encode("ascii")
        return cls(width, columns["token"], columns["prev"], columns["next"], present["prev"], present["next"])

    @staticmethod
    def join(parts: list["TokenLinks | dict[str, list[str]]"]) -> "TokenLinks | dict[str, list[str]]":
        """The links of consecutive parts: TokenLinks if every part has them with one width, else strings."""
        widths = {p.width for p in parts if isinstance(p, TokenLinks) and p.width}
        if len(widths) <= 1 and all(isinstance(p, TokenLinks) for p in parts):
            return TokenLinks(widths.pop() if widths else 0, *(b"".join(getattr(p, name) for p in parts)
                                                                for name in ("token", "prev", "next")),
                              np.concatenate([p.has_prev for p in parts]), np.concatenate([p.has_next for p in parts]))
        return {name: [token for p in parts for token in (p.strings()[name] if isinstance(p, TokenLinks) else p[name])]
                for name in ("token", "prev", "next")}

    def _column(self, name: str) -> np.ndarray:
        return np.frombuffer(getattr(self, name), dtype=f"S{max(self.width, 1)}")

    def _bytes(self, name: str) -> np.ndarray:
        """uint8 [M, width]: the tokens of column ``name``, zero-padded to whole 8-byte words."""
        values = np.frombuffer(getattr(self, name), dtype=np.uint8).reshape(-1, max(self.width, 1))
        padded = np.zeros((len(values), -(-values.shape[1] // 8) * 8), dtype=np.uint8)
        padded[:, :values.shape[1]] = values
        return padded

    @staticmethod
    def _keys(tokens: np.ndarray) -> np.ndarray:
        """uint64 [M]: a hash of each token's bytes (equal tokens, equal keys)."""
        words = tokens.view(np.uint64)
        keys = words[:, 0].copy()
        for j in range(1, words.shape[1]):
            keys = keys * np.uint64(0x9E3779B97F4A7C15) + words[:, j]  # wraps around
        return keys

    def strings(self) -> dict[str, list[str]]:
        links = {"token": [t.decode("ascii") for t in self._column("token")]}
        for name in ("prev", "next"):
            values = iter([t.decode("ascii") for t in self._column(name)])
            links[name] = [next(values) if has else "" for has in getattr(self, f"has_{name}")]
        return links

    def rows(self, name: str) -> np.ndarray:
        """int64 [N]: the row whose token is ``name`` (prev or next) of each row (the last such row,
        as a dict from token to row keeps it), -1 without one, -2 if no row has that token. Hashes
        sorted and searched (the queries sorted too: the searches then stay in the CPU cache); the
        bytes of every candidate are compared."""
        if self._own is None:
            own = self._bytes("token")
            keys = self._keys(own)
            order = np.argsort(keys)
            self._own = own, order, keys[order]
        own, order, ordered = self._own
        wanted = self._bytes(name)
        keys = self._keys(wanted)
        by_key = np.argsort(keys)
        first, stop = (np.empty(len(keys), dtype=np.int64) for _ in range(2))
        first[by_key] = np.searchsorted(ordered, keys[by_key], side="left")
        stop[by_key] = np.searchsorted(ordered, keys[by_key], side="right")
        candidate = order[np.minimum(first, len(order) - 1)] if len(order) else first
        found = np.where(stop - first == 1, (own[candidate] == wanted).all(axis=1), False)
        match = np.where(found, candidate, -2)
        for k in np.flatnonzero(stop - first > 1).tolist():  # equal hashes: equal tokens or a collision
            same = [row for row in order[first[k]:stop[k]].tolist() if (own[row] == wanted[k]).all()]
            match[k] = max(same) if same else -2
        row = np.full(len(self.has_prev), -1, dtype=np.int64)
        row[getattr(self, f"has_{name}")] = match
        return row

    def token_of(self, name: str, row: int) -> str:
        """The token ``name`` (token, prev or next) of a row."""
        if name == "token":
            return self._column("token")[row].decode("ascii")
        has = getattr(self, f"has_{name}")
        return self._column(name)[int(has[:row].sum())].decode("ascii") if has[row] else ""


def _link_rows(links: TokenLinks | dict[str, list[str]], name: str) -> np.ndarray:
    """int64 [N]: the row of the ``name`` (prev or next) of each row, -1 without one, -2 if unknown."""
    if isinstance(links, TokenLinks):
        return links.rows(name)
    row_of_token = dict(zip(links["token"], range(len(links["token"]))))
    row_of_token[""] = -1  # no prev / next
    tokens = links[name]
    return np.fromiter(map(row_of_token.get, tokens, repeat(-2)), dtype=np.int64, count=len(tokens))


def _box_velocity(links: TokenLinks | dict[str, list[str]], translation: np.ndarray, timestamps: np.ndarray,
                  path: Path, max_time_diff: float = 1.5) -> np.ndarray:
    """``NuScenes.box_velocity(token)[:2]`` of the GT annotations -> float64 [N, 2].

    ``links``: the ``token``, ``prev`` and ``next`` of each annotation; ``translation`` [N, 3] and
    ``timestamps`` [N] (of their samples). The previous and next annotations of a track are
    annotations of the same instance in the same scene, so they are among these annotations.
    """
    n = len(translation)
    rows = np.arange(n)
    neighbours = []
    for name in ("prev", "next"):
        row = _link_rows(links, name)
        unknown = np.flatnonzero(row == -2)
        if len(unknown):
            if isinstance(links, TokenLinks):
                neighbour, own = links.token_of(name, int(unknown[0])), links.token_of("token", int(unknown[0]))
            else:
                neighbour, own = links[name][unknown[0]], links["token"][unknown[0]]
            raise ValueError(f"{path}: annotation {neighbour!r} (the {name} of GT annotation {own!r} of the split) "
                             "is not an annotation of the same category in a sample of the split")
        neighbours.append((row >= 0, np.where(row >= 0, row, rows)))
    (has_prev, first), (has_next, last) = neighbours
    pos_diff = translation[last] - translation[first]
    time_diff = 1e-6 * timestamps[last] - 1e-6 * timestamps[first]
    limit = np.where(has_prev & has_next, max_time_diff * 2, max_time_diff)
    with np.errstate(divide="ignore", invalid="ignore"):
        velocity = pos_diff / time_diff[:, None]
    velocity[(time_diff > limit) | ~(has_prev | has_next)] = np.nan
    return velocity[:, :2].copy()
