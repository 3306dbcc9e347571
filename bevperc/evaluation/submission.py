"""nuScenes detection submissions: strict validation, and the reader for files and dicts.

A submission is the devkit's JSON format::

    {"meta": {"use_camera": bool, "use_lidar": bool, "use_radar": bool, "use_map": bool, "use_external": bool},
     "results": {sample_token: [box, ...], ...}}

with each box ``{"sample_token", "translation" [3], "size" [3] (wlh), "rotation" [4] (w, x, y, z),
"velocity" [2], "detection_name", "detection_score", "attribute_name"}`` in the global frame.

The checks are at least as strict as the devkit's (which asserts, without saying where) and each
failure names the sample token, the box index, the field, what was found and what was expected:

* the top level has ``meta`` (the five ``use_*`` booleans) and ``results`` (an object);
* the samples are exactly those of the evaluated split: none missing, none extra, none repeated;
* at most ``max_boxes_per_sample`` (500) boxes per sample;
* each box has every field; its ``sample_token`` equals the sample it is listed under;
* ``translation`` 3 finite numbers, ``size`` 3 finite numbers > 0, ``rotation`` 4 finite numbers
  with a non-zero norm (a quaternion; normalised by the devkit, which accepts any size: one whose
  squared norm overflows becomes 0 there and has yaw 0, in the fast evaluator too), ``velocity`` 2 numbers
  (finite or NaN: the devkit allows NaN velocities);
* ``detection_name`` one of the 10 detection classes; ``detection_score`` a finite number in [0, 1];
* ``attribute_name`` one of the attributes of that class (``""`` for barrier and traffic_cone; ``""``
  for other classes only with ``allow_empty_attribute=True``);
* optional devkit fields ``num_pts`` (an integer in [-2**63, 2**63): a 64-bit int) and
  ``ego_translation`` (3 finite numbers) are checked too.

:func:`read_submission` turns the boxes into columns (:class:`PredictionBoxes`), so a
1.8-million-box file never exists as 1.8 million Python dicts: the fast path
(:mod:`bevperc.evaluation.submission_chunks`) decodes byte ranges of the file with msgspec in worker
processes; files it does not take (other layouts, invalid JSON) are streamed here with the json module,
one sample's list of boxes at a time. Both validate a batch of boxes with array operations and, when a
batch is invalid, check its samples one by one in file order, so the error names the first bad sample,
box and field either way.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from bevperc.data.classes import ATTRIBUTE_NAMES, CLASS_ATTRIBUTES, DETECTION_NAME_INDEX, DETECTION_NAMES

META_FIELDS: tuple[str, ...] = ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")
BOX_FIELDS: tuple[str, ...] = (
    "sample_token", "translation", "size", "rotation", "velocity",
    "detection_name", "detection_score", "attribute_name",
)
MAX_BOXES_PER_SAMPLE = 500
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

ATTRIBUTE_INDEX = {name: i for i, name in enumerate(ATTRIBUTE_NAMES)}
ATTRIBUTE_INDEX[""] = -1


def attribute_table(allow_empty_attribute: bool) -> np.ndarray:
    """bool [n_classes, n_attributes + 1]: column a+1 says whether attribute index a (-1 = "") is valid."""
    table = np.zeros((len(DETECTION_NAMES), len(ATTRIBUTE_NAMES) + 1), dtype=bool)
    for c, name in enumerate(DETECTION_NAMES):
        for attr in CLASS_ATTRIBUTES[name]:
            table[c, ATTRIBUTE_INDEX[attr] + 1] = True
        if not CLASS_ATTRIBUTES[name] or allow_empty_attribute:
            table[c, 0] = True
    return table


COLUMN_NAMES = ("sample_index", "translation", "size", "rotation", "velocity",
                "class_index", "attribute_index", "score", "num_pts")


class SubmissionError(ValueError):
    """A submission does not follow the nuScenes detection format; the message says where and why."""


# --------------------------------------------------------------------------- streaming JSON
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class JsonStream:
    """Character stream over a JSON file that decodes one value at a time.

    Only a window of the file is held in memory (``chunk_chars`` plus the value being decoded).
    """

    def __init__(self, path: str | Path, chunk_chars: int = 1 << 23):
        self.path = str(path)
        self._file = open(path, "r", encoding="utf-8")
        self._chunk_chars = chunk_chars
        self._buf = ""
        self._pos = 0
        self._consumed = 0  # characters dropped from the front of the buffer
        self._eof = False
        self._decoder = json.JSONDecoder()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def offset(self) -> int:
        """Character offset in the file of the next unread character."""
        return self._consumed + self._pos

    def _fill(self, min_chars: int) -> None:
        while not self._eof and len(self._buf) - self._pos < min_chars:
            try:
                chunk = self._file.read(max(self._chunk_chars, min_chars))
            except UnicodeDecodeError as err:
                raise self.error(f"not a UTF-8 JSON text file ({err.reason})") from None
            if not chunk:
                self._eof = True
                break
            self._consumed += self._pos
            self._buf = self._buf[self._pos:] + chunk
            self._pos = 0

    def error(self, message: str) -> SubmissionError:
        return SubmissionError(f"{self.path}: {message} (at character {self.offset})")

    def peek(self) -> str:
        """Next non-whitespace character ('' at the end of the file)."""
        while True:
            self._pos = _WHITESPACE.match(self._buf, self._pos).end()
            if self._pos < len(self._buf) or self._eof:
                break
            self._fill(1)
        return self._buf[self._pos] if self._pos < len(self._buf) else ""

    def expect(self, char: str) -> None:
        found = self.peek()
        if found != char:
            raise self.error(f"invalid JSON: expected {char!r}, found {found or 'end of file'!r}")
        self._pos += 1

    def value(self) -> Any:
        """Decode the next JSON value; the buffer grows until the whole value is in it."""
        self.peek()
        want = 1 << 20
        while True:
            self._fill(want)
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except ValueError as exc:  # JSONDecodeError, or an integer beyond Python's digit limit
                if self._eof:
                    raise self.error(f"invalid JSON: {getattr(exc, 'msg', exc)}") from None
                want = 2 * max(want, len(self._buf) - self._pos)
                continue
            if end == len(self._buf) and not self._eof:  # a number may continue in the next chunk
                want = 2 * max(want, len(self._buf) - self._pos)
                continue
            self._pos = end
            return value

    def object_items(self) -> Iterator[str]:
        """Iterate the keys of the JSON object starting here; the caller consumes each value."""
        self.expect("{")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            if self.peek() != '"':
                raise self.error("invalid JSON: expected an object key")
            key = self.value()
            self.expect(":")
            yield key
            sep = self.peek()
            self._pos += 1
            if sep == "}":
                return
            if sep != ",":
                raise self.error(f"invalid JSON: expected ',' or '}}' after the value of {key!r}")

    def array_items(self) -> Iterator[Any]:
        """Iterate the values of the JSON array starting here."""
        self.expect("[")
        if self.peek() == "]":
            self._pos += 1
            return
        while True:
            yield self.value()
            sep = self.peek()
            self._pos += 1
            if sep == "]":
                return
            if sep != ",":
                raise self.error("invalid JSON: expected ',' or ']' in an array")

    def at_end(self) -> bool:
        return self.peek() == ""


def iter_json_array(path: str | Path) -> Iterator[dict]:
    """Stream the records of a file holding one JSON array (a nuScenes table)."""
    with JsonStream(path) as stream:
        yield from stream.array_items()
        if not stream.at_end():
            raise stream.error("unexpected data after the top-level array")


# --------------------------------------------------------------------------- columns
@dataclass
class PredictionBoxes:
    """Submitted boxes as columns, in file order (sample by sample, box by box).

    ``sample_tokens[sample_index[i]]`` is the sample of box i; samples keep the order of the file
    (the devkit's tie order for equal scores depends on it).
    """

    sample_tokens: list[str]
    sample_index: np.ndarray  # int64 [N]
    translation: np.ndarray  # float64 [N, 3] global frame, box centre
    size: np.ndarray  # float64 [N, 3] w, l, h
    rotation: np.ndarray  # float64 [N, 4] quaternion w, x, y, z
    velocity: np.ndarray  # float64 [N, 2] vx, vy (may be NaN)
    class_index: np.ndarray  # int64 [N] index into DETECTION_NAMES (devkit order)
    attribute_index: np.ndarray  # int64 [N] index into ATTRIBUTE_NAMES, -1 for ""
    score: np.ndarray  # float64 [N]
    num_pts: np.ndarray  # int64 [N], -1 unless the submission gives num_pts (devkit default)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.score.shape[0])

    @staticmethod
    def concatenate(sample_tokens: list[str], parts: Sequence[dict[str, np.ndarray]], meta: dict) -> "PredictionBoxes":
        shapes = {"translation": (0, 3), "size": (0, 3), "rotation": (0, 4), "velocity": (0, 2)}
        columns = {}
        for name in COLUMN_NAMES:
            if parts:
                columns[name] = np.concatenate([p[name] for p in parts])
            else:
                dtype = np.float64 if name in shapes or name == "score" else np.int64
                columns[name] = np.zeros(shapes.get(name, (0,)), dtype=dtype)
        return PredictionBoxes(sample_tokens=sample_tokens, meta=meta, **columns)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int64(x: Any) -> bool:
    """An int (not a bool) that fits in 64 bits, as the devkit's ``num_pts`` column needs."""
    return isinstance(x, int) and not isinstance(x, bool) and INT64_MIN <= x <= INT64_MAX


def _isfinite(x: int | float) -> bool:
    """math.isfinite, with integers too large for a float counted as not finite."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _check_vector(where: str, name: str, value: Any, length: int, *, finite: bool = True,
                  positive: bool = False) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != length or not all(_is_number(v) for v in value):
        raise SubmissionError(f"{where}: field {name!r} must be a list of {length} numbers, got {value!r}")
    if finite and not all(_isfinite(v) for v in value):
        raise SubmissionError(f"{where}: field {name!r} must be finite, got {value!r}")
    if not finite and not all(_isfinite(v) or (isinstance(v, float) and math.isnan(v)) for v in value):
        raise SubmissionError(f"{where}: field {name!r} must be finite or NaN, got {value!r}")
    if positive and not all(v > 0 for v in value):
        raise SubmissionError(f"{where}: field {name!r} must be > 0 (w, l, h in metres), got {value!r}")


def check_box(sample_token: str, index: int, box: Any, allow_empty_attribute: bool = False) -> None:
    """Raise a :class:`SubmissionError` naming the first problem of one box (no-op for a valid box)."""
    where = f"results[{sample_token!r}][{index}]"
    if not isinstance(box, dict):
        raise SubmissionError(f"{where}: a box must be a JSON object, got {type(box).__name__}")
    missing = [name for name in BOX_FIELDS if name not in box]
    if missing:
        raise SubmissionError(f"{where}: missing field(s) {missing}; a box needs {list(BOX_FIELDS)}")
    if box["sample_token"] != sample_token:
        raise SubmissionError(
            f"{where}: field 'sample_token' is {box['sample_token']!r} but the box is listed under {sample_token!r}")
    _check_vector(where, "translation", box["translation"], 3)
    _check_vector(where, "size", box["size"], 3, positive=True)
    _check_vector(where, "rotation", box["rotation"], 4)
    if not any(v * v > 0.0 for v in box["rotation"]):  # the sum of squares is 0 (also after underflow)
        raise SubmissionError(f"{where}: field 'rotation' must be a quaternion (w, x, y, z) with non-zero norm, "
                              f"got {box['rotation']!r}")
    _check_vector(where, "velocity", box["velocity"], 2, finite=False)
    name = box["detection_name"]
    if not isinstance(name, str) or name not in DETECTION_NAME_INDEX:
        raise SubmissionError(f"{where}: field 'detection_name' is {name!r}; expected one of {list(DETECTION_NAMES)}")
    score = box["detection_score"]
    if not _is_number(score) or not _isfinite(score) or not 0.0 <= score <= 1.0:
        raise SubmissionError(f"{where}: field 'detection_score' must be a number in [0, 1], got {score!r}")
    attr = box["attribute_name"]
    valid = list(CLASS_ATTRIBUTES[name])
    if not CLASS_ATTRIBUTES[name] or allow_empty_attribute:
        valid.append("")
    if not isinstance(attr, str) or attr not in valid:
        raise SubmissionError(f"{where}: field 'attribute_name' is {attr!r}, not valid for class {name!r}; "
                              f"expected one of {valid}")
    if "num_pts" in box and not _is_int64(box["num_pts"]):
        raise SubmissionError(f"{where}: optional field 'num_pts' must be an integer in [-2**63, 2**63), "
                              f"got {box['num_pts']!r}")
    if "ego_translation" in box:
        _check_vector(where, "ego_translation", box["ego_translation"], 3)


def _numeric(values: list, width: int) -> np.ndarray | None:
    """float64 [n, width] from nested lists, or None if they are not all lists of ``width`` numbers
    (within float range)."""
    try:
        array = np.array(values)
        if array.dtype == object and array.shape == (len(values), width):  # integers beyond int64
            if not all(_is_number(v) for row in values for v in row):
                return None
            array = np.array(values, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.dtype.kind not in "fi" or array.shape != (len(values), width):
        return None
    return array.astype(np.float64, copy=False)


def _dict_fields(boxes: list, expected_tokens: list[str]) -> dict[str, Any] | None:
    """Raw columns of JSON-decoded boxes (dicts), or None when a field is missing or mistyped."""
    try:
        if [b["sample_token"] for b in boxes] != expected_tokens:
            return None
        score = [b["detection_score"] for b in boxes]
        if any(v is True or v is False for v in score):  # np.array would turn a bool into 0/1
            return None
        fields = dict(translation=_numeric([b["translation"] for b in boxes], 3),
                      size=_numeric([b["size"] for b in boxes], 3),
                      rotation=_numeric([b["rotation"] for b in boxes], 4),
                      velocity=_numeric([b["velocity"] for b in boxes], 2),
                      score=np.array(score),
                      class_index=np.array([DETECTION_NAME_INDEX.get(b["detection_name"], -1) for b in boxes],
                                           dtype=np.int64),
                      attribute_index=np.array([ATTRIBUTE_INDEX.get(b["attribute_name"], -2) for b in boxes],
                                               dtype=np.int64),
                      num_pts=np.full(len(boxes), -1, dtype=np.int64))
        if max(map(len, boxes)) > len(BOX_FIELDS):  # optional devkit fields: num_pts, ego_translation
            for i, b in enumerate(boxes):
                if "num_pts" in b:
                    value = b["num_pts"]
                    if not _is_int64(value):
                        return None
                    fields["num_pts"][i] = value
                if "ego_translation" in b:
                    ego = _numeric([b["ego_translation"]], 3)
                    if ego is None or not np.isfinite(ego).all():
                        return None
    except (KeyError, TypeError, AttributeError, OverflowError):
        return None
    return fields


def columns_valid(columns: dict[str, Any] | None, n: int, attributes: np.ndarray) -> bool:
    """Whether raw columns of n boxes (from :func:`_dict_fields` or the msgspec path) pass every check
    of :func:`check_box` that their types have not already passed; ``attributes``: :func:`attribute_table`."""
    if columns is None or any(columns[k] is None for k in ("translation", "size", "rotation", "velocity")):
        return False
    score = columns["score"]
    if score.dtype.kind not in "fi" or score.shape != (n,):
        return False
    columns["score"] = score = score.astype(np.float64, copy=False)
    translation, size, rotation, velocity = (columns[k] for k in ("translation", "size", "rotation", "velocity"))
    class_index, attribute_index = columns["class_index"], columns["attribute_index"]
    with np.errstate(invalid="ignore", over="ignore"):
        ok = (np.isfinite(translation).all()
              and np.isfinite(size).all() and (size > 0).all()
              and np.isfinite(rotation).all() and ((rotation * rotation).sum(1) > 0).all()
              and not np.isinf(velocity).any()
              and np.isfinite(score).all() and ((score >= 0) & (score <= 1)).all()
              and (class_index >= 0).all() and (attribute_index >= -1).all())
    return bool(ok and attributes[class_index, attribute_index + 1].all())


def first_error(samples: Sequence[tuple[int, str, Any]], max_boxes_per_sample: int,
                allow_empty_attribute: bool) -> SubmissionError:
    """The error of the first invalid sample (JSON-decoded boxes), checked one by one in order."""
    for _, token, boxes in samples:
        if not isinstance(boxes, list):
            return SubmissionError(f"results[{token!r}]: must be a list of boxes, got {type(boxes).__name__}")
        if len(boxes) > max_boxes_per_sample:
            return SubmissionError(f"results[{token!r}]: {len(boxes)} boxes; at most {max_boxes_per_sample} "
                                   "boxes per sample are allowed")
        for i, box in enumerate(boxes):
            check_box(token, i, box, allow_empty_attribute)
    return SubmissionError("invalid boxes in samples " + str([t for _, t, _ in samples][:5]))


def sample_columns(samples: Sequence[tuple[int, str, Any]], max_boxes_per_sample: int = MAX_BOXES_PER_SAMPLE,
                   allow_empty_attribute: bool = False, attributes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Validate the boxes (JSON-decoded) of several samples and return them as columns.

    ``samples``: (sample_index, sample_token, boxes) triples. The common case (valid) is checked with
    array operations; otherwise :func:`first_error` names the first problem.
    """
    if attributes is None:
        attributes = attribute_table(allow_empty_attribute)
    columns = None
    if all(isinstance(b, list) and len(b) <= max_boxes_per_sample for _, _, b in samples):
        boxes = list(chain.from_iterable(b for _, _, b in samples))
        if not boxes:
            return empty_columns()
        expected = list(chain.from_iterable([t] * len(b) for _, t, b in samples))
        columns = _dict_fields(boxes, expected)
        if not columns_valid(columns, len(boxes), attributes):
            columns = None
    if columns is None:
        raise first_error(samples, max_boxes_per_sample, allow_empty_attribute)
    columns["sample_index"] = np.repeat(np.array([s for s, _, _ in samples], dtype=np.int64),
                                        [len(b) for _, _, b in samples])
    return columns


def empty_columns() -> dict[str, np.ndarray]:
    empty = PredictionBoxes.concatenate([], [], {})
    return {name: getattr(empty, name) for name in COLUMN_NAMES}


def check_meta(meta: Any, where: str = "meta") -> dict:
    if not isinstance(meta, dict):
        raise SubmissionError(f"{where}: must be an object with {list(META_FIELDS)}, got {type(meta).__name__}")
    for name in META_FIELDS:
        if name not in meta:
            raise SubmissionError(f"{where}: missing field {name!r}; expected booleans {list(META_FIELDS)}")
        if not isinstance(meta[name], bool):
            raise SubmissionError(f"{where}: field {name!r} must be true or false, got {meta[name]!r}")
    return meta


def check_sample_set(seen: Sequence[str], expected: Iterable[str] | None, source: str) -> None:
    if expected is None:
        return
    expected_set = set(expected)
    seen_set = set(seen)
    missing = [t for t in expected_set if t not in seen_set]
    extra = [t for t in seen if t not in expected_set]
    if missing:
        raise SubmissionError(f"{source}: {len(missing)} of the {len(expected_set)} samples of the split are missing "
                              f"from 'results' (every sample must be listed, with [] if it has no boxes), "
                              f"e.g. {sorted(missing)[:5]}")
    if extra:
        raise SubmissionError(f"{source}: 'results' has {len(extra)} sample(s) that are not in the evaluated split, "
                              f"e.g. {extra[:5]}")


def duplicate_error(token: str, source: str) -> SubmissionError:
    return SubmissionError(f"{source}: sample {token!r} is listed twice in 'results'")


class _ColumnBuilder:
    """Collects (sample, boxes) pairs and validates them in batches of about ``batch_boxes`` boxes."""

    def __init__(self, max_boxes_per_sample: int, allow_empty_attribute: bool, batch_boxes: int = 1 << 15):
        self.tokens: list[str] = []
        self.token_set: set[str] = set()
        self.parts: list[dict[str, np.ndarray]] = []
        self.pending: list[tuple[int, str, Any]] = []
        self.pending_boxes = 0
        self.max_boxes = max_boxes_per_sample
        self.allow_empty = allow_empty_attribute
        self.attributes = attribute_table(allow_empty_attribute)
        self.batch_boxes = batch_boxes

    def add(self, token: str, boxes: Any, source: str) -> None:
        if token in self.token_set:
            self.flush()  # an invalid box listed before the repeated sample is the first problem
            raise duplicate_error(token, source)
        self.token_set.add(token)
        self.pending.append((len(self.tokens), token, boxes))
        self.tokens.append(token)
        self.pending_boxes += len(boxes) if isinstance(boxes, list) else 0
        if self.pending_boxes >= self.batch_boxes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.parts.append(sample_columns(self.pending, self.max_boxes, self.allow_empty, self.attributes))
        self.pending = []
        self.pending_boxes = 0


def existing_results_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: the results file does not exist")
    return path


def read_submission(path: str | Path, expected_sample_tokens: Iterable[str] | None = None,
                    max_boxes_per_sample: int = MAX_BOXES_PER_SAMPLE,
                    allow_empty_attribute: bool = False, use_msgspec: bool = True,
                    workers: int | None = None) -> PredictionBoxes:
    """Read, validate and convert a submission file.

    ``use_msgspec``: take the fast path (:func:`bevperc.evaluation.submission_chunks.read_chunked`:
    msgspec, byte ranges decoded by ``workers`` processes, default :func:`~bevperc.evaluation.workers.default_workers`)
    when the file's layout allows it; otherwise, and with ``use_msgspec=False``, the file is streamed
    with the json module. Both give the same columns and the same errors.

    ``expected_sample_tokens``: the samples of the evaluated split (all must be present, no others);
    None skips that check. Raises :class:`SubmissionError` with the sample, box index and field.
    """
    path = existing_results_file(path)
    if use_msgspec:
        from bevperc.evaluation.submission_chunks import read_chunked

        parts = read_chunked(path, expected_sample_tokens, max_boxes_per_sample, allow_empty_attribute, workers)
        if parts is not None:
            return PredictionBoxes.concatenate(parts.sample_tokens, parts.columns, parts.meta)
    return read_submission_stream(path, expected_sample_tokens, max_boxes_per_sample, allow_empty_attribute)


def read_submission_stream(path: Path, expected_sample_tokens: Iterable[str] | None = None,
                           max_boxes_per_sample: int = MAX_BOXES_PER_SAMPLE,
                           allow_empty_attribute: bool = False) -> PredictionBoxes:
    """:func:`read_submission` with the json module, streaming one sample's boxes at a time (any
    layout of the top-level object; the reference for what the fast path accepts and raises)."""
    source = str(path)
    builder = _ColumnBuilder(max_boxes_per_sample, allow_empty_attribute)
    meta: Any = None
    seen_results = False
    with JsonStream(path) as stream:
        if stream.peek() != "{":
            raise stream.error("a submission must be a JSON object with 'meta' and 'results'")
        for key in stream.object_items():
            if key == "results":
                if stream.peek() != "{":
                    raise stream.error("'results' must be an object mapping sample tokens to lists of boxes")
                seen_results = True
                for token in stream.object_items():
                    builder.add(token, stream.value(), source)
            elif key == "meta":
                meta = stream.value()
            else:
                stream.value()  # the devkit ignores other top-level fields
        if not stream.at_end():
            raise stream.error("unexpected data after the top-level object")
    builder.flush()
    if not seen_results:
        raise SubmissionError(f"{source}: no field 'results' (the nuScenes result format needs 'meta' and 'results')")
    if meta is None:
        raise SubmissionError(f"{source}: no field 'meta'; expected booleans {list(META_FIELDS)}")
    check_meta(meta, f"{source}: meta")
    check_sample_set(builder.tokens, expected_sample_tokens, source)
    return PredictionBoxes.concatenate(builder.tokens, builder.parts, meta)


def submission_from_dict(submission: dict, expected_sample_tokens: Iterable[str] | None = None,
                         max_boxes_per_sample: int = MAX_BOXES_PER_SAMPLE,
                         allow_empty_attribute: bool = False, source: str = "submission") -> PredictionBoxes:
    """Validate and convert an in-memory submission ``{"meta": ..., "results": ...}``."""
    if not isinstance(submission, dict):
        raise SubmissionError(f"{source}: must be an object with 'meta' and 'results'")
    if "results" not in submission:
        raise SubmissionError(f"{source}: no field 'results' (the nuScenes result format needs 'meta' and 'results')")
    if "meta" not in submission:
        raise SubmissionError(f"{source}: no field 'meta'; expected booleans {list(META_FIELDS)}")
    check_meta(submission["meta"], f"{source}: meta")
    results = submission["results"]
    if not isinstance(results, dict):
        raise SubmissionError(f"{source}: 'results' must be an object mapping sample tokens to lists of boxes")
    builder = _ColumnBuilder(max_boxes_per_sample, allow_empty_attribute)
    for token, boxes in results.items():
        builder.add(token, boxes, source)
    builder.flush()
    check_sample_set(builder.tokens, expected_sample_tokens, source)
    return PredictionBoxes.concatenate(builder.tokens, builder.parts, submission["meta"])


def validate_submission(submission: str | Path | dict, expected_sample_tokens: Iterable[str] | None = None,
                        max_boxes_per_sample: int = MAX_BOXES_PER_SAMPLE,
                        allow_empty_attribute: bool = False) -> None:
    """Raise :class:`SubmissionError` if the submission (file path or dict) is not a valid one."""
    if isinstance(submission, dict):
        submission_from_dict(submission, expected_sample_tokens, max_boxes_per_sample, allow_empty_attribute)
    else:
        read_submission(submission, expected_sample_tokens, max_boxes_per_sample, allow_empty_attribute)
