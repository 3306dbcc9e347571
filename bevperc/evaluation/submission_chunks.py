"""Fast path of :func:`~bevperc.evaluation.submission.read_submission`: byte ranges of the file
decoded by msgspec straight into columns, in worker processes.

1. **Layout** (this process): the file must be ``{"meta": {...}, "results": {...}}`` or
   ``{"results": {...}, "meta": {...}}`` (any JSON whitespace; ``meta`` a flat object). Anything else
   is left to the json-module stream reader.
2. **Ranges**: the members of ``results`` are cut into byte ranges of about
   :data:`~bevperc.evaluation.workers.RANGE_BYTES` after a sample's list of boxes (``}]`` or ``[]``
   followed by ``,``).
3. **Decoding** (a worker per range): each member is a JSON key and a list of boxes; the list ends at
   the first ``}]`` and msgspec decodes it into structs (types, lengths, integers and the class and
   attribute names checked; every number it returns is finite). The non-standard ``NaN`` literal (NaN velocities, which the devkit
   allows) is first overwritten with the string ``"N"`` (same length: offsets hold), which is accepted
   only in ``velocity``, and only when the range has no ``"N"`` of its own. A list msgspec does not
   take (null, Infinity, numbers beyond float range, wrong types, NaN elsewhere, a ``}]`` inside a
   string) is decoded by the json module from the original bytes, as the stream reader would.
4. **Validation**: the structs become columns and are checked with array operations
   (:func:`~bevperc.evaluation.submission.columns_valid`); a batch that fails is decoded again by the
   json module and checked box by box, so the error names the sample, the box and the field exactly
   as the stream reader does. The first problem in file order wins (a repeated sample included).
5. **Filtering** (when evaluating): each worker drops the boxes the devkit's ``filter_eval_boxes``
   drops and splits the rest by class, so only those travel back.

If a range does not scan as complete members (invalid JSON, or a cut inside a string), the whole
file goes to the stream reader, which raises its JSON error or reads it. A successful scan is a
proof of validity: each range is a sequence of complete members, so their concatenation is too.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import closing
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain, repeat
from operator import attrgetter
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import msgspec
import numpy as np

from bevperc.data.classes import ATTRIBUTE_NAMES, DETECTION_NAME_INDEX, DETECTION_NAMES
from bevperc.evaluation.columns import BoxColumns, gc_paused, struct_floats
from bevperc.evaluation.metrics import BoxFilter
from bevperc.evaluation.submission import (
    ATTRIBUTE_INDEX,
    SubmissionError,
    attribute_table,
    check_meta,
    check_sample_set,
    columns_valid,
    duplicate_error,
    empty_columns,
    sample_columns,
)
from bevperc.evaluation.timing import StageTimer
from bevperc.evaluation.workers import byte_ranges, default_workers, run_tasks

_WS = rb"[ \t\n\r]*"
_META = rb"(\{[^{}]*\})"
_HEAD_META_FIRST = re.compile(rb"\A" + _WS + rb'\{' + _WS + rb'"meta"' + _WS + rb":" + _WS + _META + _WS + rb","
                              + _WS + rb'"results"' + _WS + rb":" + _WS + rb"\{")
_HEAD_RESULTS_FIRST = re.compile(rb"\A" + _WS + rb"\{" + _WS + rb'"results"' + _WS + rb":" + _WS + rb"\{")
_TAIL_META_FIRST = re.compile(rb"\}" + _WS + rb"\}" + _WS + rb"\Z")
_TAIL_RESULTS_FIRST = re.compile(rb"\}" + _WS + rb"," + _WS + rb'"meta"' + _WS + rb":" + _WS + _META + _WS
                                 + rb"\}" + _WS + rb"\Z")
_BOUNDARY = re.compile(rb"(?:\}" + _WS + rb"\]|\[" + _WS + rb"\])(?P<cut>)" + _WS + rb",")  # after a list of boxes
_KEY = re.compile(_WS + rb'("(?:[^"\\]|\\.)*")' + _WS + rb":" + _WS, re.DOTALL)
_EMPTY_LIST = re.compile(rb"\[" + _WS + rb"\]")
_LIST_END = re.compile(rb"\}" + _WS + rb"\]")
_SEPARATOR = re.compile(_WS + rb",")
_REST_IS_SPACE = re.compile(_WS + rb"\Z")
_JSON = json.JSONDecoder()


class _Box(msgspec.Struct, gc=False):
    sample_token: str
    translation: tuple[float, float, float]
    size: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    velocity: tuple[float, float]
    detection_name: Literal[DETECTION_NAMES]
    detection_score: float
    attribute_name: Literal[ATTRIBUTE_NAMES + ("",)]
    num_pts: int = -1
    ego_translation: Union[tuple[float, float, float], msgspec.UnsetType] = msgspec.UNSET


class _NanBox(_Box, gc=False):
    velocity: tuple[Union[float, Literal["N"]], Union[float, Literal["N"]]]  # "N": NaN (see _for_msgspec)


_BOXES = msgspec.json.Decoder(list[_Box])
_NAN_BOXES = msgspec.json.Decoder(list[_NanBox])
_NAN = {"N": float("nan")}


class _ScanError(Exception):
    """A byte range is not a sequence of complete ``"token": value`` members."""


# --------------------------------------------------------------------------- planning (this process)
@dataclass
class _Layout:
    meta: Any
    start: int  # byte offset of the members of "results"
    end: int  # byte offset of the brace closing "results"


def _layout(path: Path, window: int = 1 << 16) -> _Layout | None:
    """Where the members of ``results`` are, and the decoded ``meta``; None for another layout."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(window)
        tail_offset = max(0, size - window)
        handle.seek(tail_offset)
        tail = handle.read()
    head_match = _HEAD_META_FIRST.match(head)
    if head_match is not None:
        tail_match = _TAIL_META_FIRST.search(tail)
        meta_text = head_match.group(1)
    else:
        head_match = _HEAD_RESULTS_FIRST.match(head)
        tail_match = _TAIL_RESULTS_FIRST.search(tail) if head_match is not None else None
        meta_text = tail_match.group(1) if tail_match is not None else b""
    if head_match is None or tail_match is None or tail_offset + tail_match.start() < head_match.end():
        return None
    try:
        meta = json.loads(meta_text)
    except ValueError:
        return None
    return _Layout(meta=meta, start=head_match.end(), end=tail_offset + tail_match.start())


# --------------------------------------------------------------------------- one range (a worker)
@dataclass
class _ChunkOptions:
    """What every range of one file shares (sent once to each worker)."""

    path: str
    max_boxes_per_sample: int
    allow_empty_attribute: bool
    box_filter: BoxFilter | None  # evaluation: filter the boxes and split them by class
    split_tokens: list[str] | None  # with box_filter: the GT's samples (sample_index of the output)

    @cached_property
    def split_index_of(self) -> dict[str, int]:
        """token -> index in split_tokens (built once per worker and file)."""
        return {token: i for i, token in enumerate(self.split_tokens)}


@dataclass
class _ChunkResult:
    readable: bool  # False: the range did not scan (the stream reader takes over)
    tokens: list[str] = field(default_factory=list)
    columns: dict[str, np.ndarray] | None = None  # without box_filter; sample_index within the range
    by_class: dict[int, BoxColumns] | None = None  # with box_filter; sample_index into split_tokens
    error: SubmissionError | None = None
    error_sample: int = -1  # the member (index in tokens) that error is about
    task_cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class _Member:
    token: str
    boxes: Any  # list of _Box, or what the json module decoded
    structs: bool  # boxes are _Box structs
    start: int  # byte range of the value in the chunk
    end: int


def _for_msgspec(raw: bytes) -> tuple[bytes | bytearray, msgspec.json.Decoder]:
    """What msgspec decodes the lists of a range from, and with which decoder: NaN literals overwritten
    by ``"N"`` (same length) for the decoder that reads ``"N"`` in ``velocity`` as NaN; the original
    bytes and the decoder that takes numbers only when the range has a ``"N"`` of its own (its lists
    with NaN then go to the json module)."""
    nan_at = []
    at = raw.find(b"N")  # a capital N is rare in a submission: this is a fast scan
    while at >= 0:
        if raw.startswith(b"NaN", at):
            nan_at.append(at)
        elif at > 0 and raw.startswith(b'"N"', at - 1):
            return raw, _BOXES
        at = raw.find(b"N", at + 1)
    if not nan_at:
        return raw, _NAN_BOXES
    patched = bytearray(raw)
    for at in nan_at:
        patched[at:at + 3] = b'"N"'
    return patched, _NAN_BOXES


def _decode_boxes(msgspec_input: tuple[bytes | bytearray, msgspec.json.Decoder], start: int, end: int) -> list | None:
    """msgspec structs of the list of boxes at [start, end), or None."""
    data, decoder = msgspec_input
    try:
        return decoder.decode(memoryview(data)[start:end])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _decode_json(buf: bytes, start: int) -> tuple[Any, int]:
    """The JSON value at buf[start:] decoded by the json module, and the byte offset after it."""
    close = _LIST_END.search(buf, start)
    for stop in ([close.end()] if close is not None else []) + [len(buf)]:
        try:
            text = buf[start:stop].decode("utf-8")
            value, end = _JSON.raw_decode(text)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer beyond the digit limit
            continue
        return value, start + len(text[:end].encode("utf-8"))
    raise _ScanError


def _member_value(raw: bytes, msgspec_input: tuple[bytes | bytearray, msgspec.json.Decoder], token: str,
                  start: int) -> _Member:
    empty = _EMPTY_LIST.match(raw, start)
    if empty is not None:
        return _Member(token, [], True, start, empty.end())
    close = _LIST_END.search(raw, start) if raw.startswith(b"[", start) else None
    if close is not None:
        boxes = _decode_boxes(msgspec_input, start, close.end())
        if boxes is not None:
            return _Member(token, boxes, True, start, close.end())
    value, end = _decode_json(raw, start)
    return _Member(token, value, False, start, end)


def _scan(raw: bytes) -> list[_Member]:
    """The members of a range of ``results``, decoded; raises :class:`_ScanError`."""
    members: list[_Member] = []
    if _REST_IS_SPACE.match(raw):
        return members
    msgspec_input = _for_msgspec(raw)
    pos = 0
    while True:
        key = _KEY.match(raw, pos)
        if key is None:
            raise _ScanError
        try:
            token = json.loads(key.group(1))
        except ValueError:
            raise _ScanError from None
        member = _member_value(raw, msgspec_input, token, key.end())
        members.append(member)
        separator = _SEPARATOR.match(raw, member.end)
        if separator is not None:
            pos = separator.end()
        elif _REST_IS_SPACE.match(raw, member.end):
            return members
        else:
            raise _ScanError


def _struct_fields(boxes: list[_Box], expected_tokens: list[str]) -> dict[str, Any] | None:
    """Raw columns of msgspec-decoded boxes (types and lengths already checked by msgspec)."""
    if list(map(attrgetter("sample_token"), boxes)) != expected_tokens:
        return None
    n = len(boxes)
    egos = [b.ego_translation for b in boxes if b.ego_translation is not msgspec.UNSET]
    if egos and not np.isfinite(np.array(egos, dtype=np.float64)).all():
        return None
    try:
        num_pts = np.fromiter(map(attrgetter("num_pts"), boxes), dtype=np.int64, count=n)
    except OverflowError:
        return None
    velocity = list(chain.from_iterable(map(attrgetter("velocity"), boxes)))
    return dict(translation=struct_floats(boxes, "translation", 3), size=struct_floats(boxes, "size", 3),
                rotation=struct_floats(boxes, "rotation", 4),
                velocity=np.fromiter(map(_NAN.get, velocity, velocity), dtype=np.float64, count=2 * n).reshape(n, 2),
                score=np.fromiter(map(attrgetter("detection_score"), boxes), dtype=np.float64, count=n),
                class_index=np.fromiter(map(DETECTION_NAME_INDEX.__getitem__, map(attrgetter("detection_name"), boxes)),
                                        dtype=np.int64, count=n),
                attribute_index=np.fromiter(map(ATTRIBUTE_INDEX.__getitem__, map(attrgetter("attribute_name"), boxes)),
                                            dtype=np.int64, count=n),
                num_pts=num_pts)


def _struct_columns(members: list[_Member], first: int, task: _ChunkOptions,
                    attributes: np.ndarray) -> dict[str, np.ndarray] | None:
    """Columns of consecutive struct members (sample_index: ``first`` + position), None if invalid."""
    if any(len(m.boxes) > task.max_boxes_per_sample for m in members):
        return None
    boxes = list(chain.from_iterable(m.boxes for m in members))
    if not boxes:
        return empty_columns()
    counts = [len(m.boxes) for m in members]
    expected = list(chain.from_iterable(repeat(m.token, c) for m, c in zip(members, counts)))
    columns = _struct_fields(boxes, expected)
    if not columns_valid(columns, len(boxes), attributes):
        return None
    columns["sample_index"] = np.repeat(np.arange(first, first + len(members), dtype=np.int64), counts)
    return columns


def _json_columns(buf: bytes, members: list[_Member], first: int, task: _ChunkOptions,
                  attributes: np.ndarray) -> dict[str, np.ndarray]:
    """Columns of consecutive members from the json module's values (as the stream reader validates
    them); raises the first problem as (member index, error)."""
    samples = [(first + k, m.token, m.boxes if not m.structs else json.loads(buf[m.start:m.end]))
               for k, m in enumerate(members)]
    try:
        return sample_columns(samples, task.max_boxes_per_sample, task.allow_empty_attribute, attributes)
    except SubmissionError:
        for sample in samples:  # which member: the batch fails iff one of its samples does
            try:
                sample_columns([sample], task.max_boxes_per_sample, task.allow_empty_attribute, attributes)
            except SubmissionError as error:
                raise _MemberError(sample[0], error) from None
        raise


class _MemberError(Exception):
    def __init__(self, member: int, error: SubmissionError):
        super().__init__(member, error)
        self.member, self.error = member, error


def _chunk_columns(buf: bytes, members: list[_Member], task: _ChunkOptions) -> dict[str, np.ndarray]:
    """Validated columns of the range's boxes, runs of struct and json members in order."""
    attributes = attribute_table(task.allow_empty_attribute)
    parts = []
    start = 0
    while start < len(members):
        stop = start + 1
        while stop < len(members) and members[stop].structs == members[start].structs:
            stop += 1
        run = members[start:stop]
        columns = _struct_columns(run, start, task, attributes) if run[0].structs else None
        parts.append(columns if columns is not None else _json_columns(buf, run, start, task, attributes))
        start = stop
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _filtered_by_class(columns: dict[str, np.ndarray], tokens: list[str], task: _ChunkOptions) -> dict[int, BoxColumns]:
    """The boxes ``filter_eval_boxes`` keeps, by class; sample_index into ``task.split_tokens`` (boxes
    of samples outside the split are dropped: the sample set check rejects such a file)."""
    split_index = np.array([task.split_index_of.get(t, -1) for t in tokens], dtype=np.int64)
    boxes = BoxColumns(**dict(columns, sample_index=split_index[columns["sample_index"]]))
    known = np.flatnonzero(boxes.sample_index >= 0)
    if len(known) < len(boxes):
        boxes = boxes.take(known)
    return boxes.split_by_class(np.flatnonzero(task.box_filter.mask(boxes)))


def read_chunk(task: _ChunkOptions, byte_range: tuple[int, int]) -> _ChunkResult:
    """Decode, validate (and filter) one byte range of ``results`` (runs in a worker process)."""
    started = time.process_time()
    with open(task.path, "rb") as handle:
        handle.seek(byte_range[0])
        buf = handle.read(byte_range[1] - byte_range[0])
    with gc_paused():
        return _read_range(task, buf, started)


def _read_range(task: _ChunkOptions, buf: bytes, started: float) -> _ChunkResult:
    cpu = {}
    try:
        members = _scan(buf)
    except _ScanError:
        return _ChunkResult(readable=False)
    cpu["sub_decode"] = time.process_time() - started
    result = _ChunkResult(readable=True, tokens=[m.token for m in members], task_cpu=cpu)
    started = time.process_time()
    try:
        columns = _chunk_columns(buf, members, task)
    except _MemberError as failure:
        result.error, result.error_sample = failure.error, failure.member
        return result
    del buf, members
    cpu["sub_validate"] = time.process_time() - started
    if task.box_filter is None:
        result.columns = columns
    else:
        started = time.process_time()
        result.by_class = _filtered_by_class(columns, result.tokens, task)
        cpu["pred_filter"] = time.process_time() - started
    return result


# --------------------------------------------------------------------------- the whole file
@dataclass
class ChunkedSubmission:
    """A valid submission read by :func:`read_chunked`."""

    sample_tokens: list[str]  # in file order
    meta: dict
    columns: list[dict[str, np.ndarray]]  # without box_filter: parts in file order, sample_index into sample_tokens
    by_class: dict[int, list[BoxColumns]]  # with box_filter: kept boxes of each class, parts in file order


def read_chunked(path: Path, expected_sample_tokens: Iterable[str] | None, max_boxes_per_sample: int,
                 allow_empty_attribute: bool, workers: int | None = None, box_filter: BoxFilter | None = None,
                 split_tokens: list[str] | None = None, timer: StageTimer | None = None) -> ChunkedSubmission | None:
    """Read and validate a submission file in byte ranges, by ``workers`` processes; None when the
    file's layout or JSON needs the stream reader (which then gives the result or the error).

    Raises the :class:`SubmissionError` the stream reader raises for the same file. With
    ``box_filter`` (and ``split_tokens``, the GT's samples) the boxes come back filtered and by class.
    ``timer`` gets ``sub_plan`` and ``sub_chunks`` (wall) and the task CPU of ``sub_decode``,
    ``sub_validate`` and ``pred_filter``.
    """
    timer = timer or StageTimer()
    with timer.stage("sub_plan"):
        layout = _layout(path)
        if layout is None:
            return None
        options = _ChunkOptions(str(path), max_boxes_per_sample, allow_empty_attribute, box_filter, split_tokens)
        ranges = byte_ranges(path, layout.start, layout.end, _BOUNDARY)
    source = str(path)
    out = ChunkedSubmission(sample_tokens=[], meta=layout.meta, columns=[], by_class={})
    seen: set[str] = set()
    results = run_tasks(read_chunk, options, ranges, default_workers() if workers is None else workers)
    with timer.stage("sub_chunks"), closing(results):
        for result in results:
            for name, seconds in result.task_cpu.items():
                timer.add_task_cpu(name, seconds)
            base = len(out.sample_tokens)
            for k, token in enumerate(result.tokens):
                if token in seen:
                    raise duplicate_error(token, source)
                if k == result.error_sample:
                    raise result.error
                seen.add(token)
            if not result.readable:
                return None
            out.sample_tokens.extend(result.tokens)
            if result.columns is not None:
                result.columns["sample_index"] += base
                out.columns.append(result.columns)
            for cls, boxes in (result.by_class or {}).items():
                out.by_class.setdefault(cls, []).append(boxes)
    check_meta(layout.meta, f"{source}: meta")
    check_sample_set(out.sample_tokens, expected_sample_tokens, source)
    return out
