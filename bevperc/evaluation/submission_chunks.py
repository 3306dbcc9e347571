"""Fast path of :func:`~bevperc.evaluation.submission.read_submission`: byte ranges of the file
decoded by msgspec straight into columns, in worker processes.

Stages 1 to 3 read bytes and are detailed in :mod:`~bevperc.evaluation.submission_scan`; this module
runs them and does stages 4 and 5.

1. **Layout** (this process): where the members of ``results`` are, in either of the two layouts of
   the result format; anything else is left to the json-module stream reader.
2. **Ranges**: the members of ``results`` are cut into byte ranges of about
   :data:`~bevperc.evaluation.workers.RANGE_BYTES` after a sample's list of boxes.
3. **Decoding** (a worker per range): the range is cut into pieces, each decoded by one msgspec call
   into structs (``NaN`` velocities included); if a piece does not decode or validate, the range is
   read member by member, by msgspec or else the json module.
4. **Columns and validation**: each piece's structs become columns right after decoding, while they
   are in the CPU cache: msgspec's msgpack encoder writes their floats as IEEE doubles in one call, a
   fixed layout that NumPy reads as strided columns (the bits: nothing is converted one by one, see
   :func:`~bevperc.evaluation.columns.float_fields`). The columns are checked with array operations
   (:func:`~bevperc.evaluation.submission.columns_valid`); a batch that fails is decoded again by the
   json module and checked box by box, so the error names the sample, the box and the field exactly
   as the stream reader does. The first problem in file order wins (a repeated sample included).
5. **Filtering** (when evaluating): each worker drops the boxes the devkit's ``filter_eval_boxes``
   drops and splits the rest by class, so only those travel back.

If a range does not scan as complete members, the whole file goes to the stream reader, which raises
its JSON error or reads it.
"""

from __future__ import annotations

import json
import time
from contextlib import closing
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain, repeat
from operator import attrgetter
from pathlib import Path
from typing import Any, Iterable

import msgspec
import numpy as np

from bevperc.data.classes import DETECTION_NAME_INDEX
from bevperc.evaluation.columns import (
    FLOAT64_TAG,
    BoxColumns,
    float_fields,
    gc_paused,
    msgpack_array_header,
    reused_buffer,
)
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
from bevperc.evaluation.submission_scan import (
    BOUNDARY,
    Box,
    Member,
    ScanError,
    decode_piece,
    for_msgspec,
    piece_ranges,
    read_layout,
    scan_members,
)
from bevperc.evaluation.timing import StageTimer
from bevperc.evaluation.workers import byte_ranges, default_workers, run_tasks

_NAN = {"N": float("nan")}
_BATCH_BOXES = 2048  # member by member: boxes turned into columns at a time (their structs still in the CPU cache)
_TOKEN = attrgetter("sample_token")
_FIXED = attrgetter("translation", "size", "rotation", "detection_score")
_FIXED_WIDTHS = (3, 3, 4, 0)
_VELOCITY = attrgetter("velocity")
_MSGPACK = msgspec.msgpack.Encoder()
_VELOCITY_RECORD = 19  # msgpack bytes of a (float, float) tuple: header, then 0xcb + 8 bytes per float
_N_SHORTER = 7  # the string "N" takes 2 bytes instead of 9


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


def _velocities(boxes: list[Box]) -> np.ndarray:
    """float64 [n, 2]: the velocities of structs, "N" read as NaN.

    Through msgpack, as :func:`~bevperc.evaluation.columns.float_fields`: a (float, float) tuple is
    19 bytes; a "N" is 2 bytes (0xa1 "N") instead of 9. The boxes with a "N" are found in those bytes
    (each "N" shifts the rest by 7), their tuples are replaced by ones with NaN, and the whole list is
    encoded again; the floats-only layout of that encoding proves that no "N" is left."""
    n = len(boxes)
    if n == 0:
        return np.zeros((0, 2))
    velocities = list(map(_VELOCITY, boxes))
    data = _MSGPACK.encode(velocities)
    header = msgpack_array_header(n)
    count, rest = divmod(header + n * _VELOCITY_RECORD - len(data), _N_SHORTER)
    if count and not rest:
        raw = np.frombuffer(data, dtype=np.uint8, offset=header)
        found = 0
        for at in np.flatnonzero((raw[:-1] == 0xA1) & (raw[1:] == 0x4E)).tolist():
            box, offset = divmod(at - 1 + _N_SHORTER * found, _VELOCITY_RECORD)
            if offset in (0, 9) and 0 <= box < n:  # an element starts here, given the "N" found before
                velocities[box] = tuple(map(_NAN.get, velocities[box], velocities[box]))
                found += 1
        data = _MSGPACK.encode(velocities)
    if len(data) == header + n * _VELOCITY_RECORD:
        records = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(n, _VELOCITY_RECORD)
        if (records[:, [1, 10]] == FLOAT64_TAG).all():  # floats only
            return np.ndarray((n, 2), dtype="V8", buffer=data, offset=header + 2,
                              strides=(_VELOCITY_RECORD, 9)).copy().view(">f8").astype(np.float64)
    values = list(chain.from_iterable(velocities))  # not the layout expected: one value at a time
    return np.fromiter(map(_NAN.get, values, values), dtype=np.float64, count=2 * n).reshape(n, 2)


def _struct_fields(boxes: list[Box], expected_tokens: list[str], optional: bool) -> dict[str, Any] | None:
    """Raw columns of msgspec-decoded boxes (types and lengths already checked by msgspec);
    ``optional``: some are _FullBox structs (num_pts and ego_translation are read)."""
    if list(map(_TOKEN, boxes)) != expected_tokens:
        return None
    n = len(boxes)
    num_pts = np.full(n, -1, dtype=np.int64)
    if optional:
        egos = [b.ego_translation for b in boxes if getattr(b, "ego_translation", msgspec.UNSET) is not msgspec.UNSET]
        if egos and not np.isfinite(np.array(egos, dtype=np.float64)).all():
            return None
        try:
            num_pts = np.fromiter((getattr(b, "num_pts", -1) for b in boxes), dtype=np.int64, count=n)
        except OverflowError:
            return None
    translation, size, rotation, score = float_fields(boxes, _FIXED, _FIXED_WIDTHS)
    return dict(translation=translation, size=size, rotation=rotation, velocity=_velocities(boxes), score=score,
                class_index=np.fromiter(map(DETECTION_NAME_INDEX.__getitem__, map(attrgetter("detection_name"), boxes)),
                                        dtype=np.int64, count=n),
                attribute_index=np.fromiter(map(ATTRIBUTE_INDEX.__getitem__, map(attrgetter("attribute_name"), boxes)),
                                            dtype=np.int64, count=n),
                num_pts=num_pts)


def _struct_columns(members: list[Member], first: int, task: _ChunkOptions,
                    attributes: np.ndarray | None) -> dict[str, np.ndarray] | None:
    """Columns of consecutive struct members (sample_index: ``first`` + position), None if invalid;
    ``attributes`` None: the checks of :func:`columns_valid` are left to the caller."""
    if any(len(m.boxes) > task.max_boxes_per_sample for m in members):
        return None
    boxes = list(chain.from_iterable(m.boxes for m in members))
    if not boxes:
        return empty_columns()
    counts = [len(m.boxes) for m in members]
    expected = list(chain.from_iterable(repeat(m.token, c) for m, c in zip(members, counts)))
    columns = _struct_fields(boxes, expected, any(m.optional for m in members))
    if columns is None or attributes is not None and not columns_valid(columns, len(boxes), attributes):
        return None
    columns["sample_index"] = np.repeat(np.arange(first, first + len(members), dtype=np.int64), counts)
    return columns


def _json_columns(buf: bytes, members: list[Member], first: int, task: _ChunkOptions,
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


class _RangeColumns:
    """Validated columns of a range's members, built as they are decoded: runs of struct members
    (up to about :data:`_BATCH_BOXES` boxes) and of json members, in order. The first invalid run is
    checked by the json module (:func:`_json_columns`), which names the member; later members are
    still decoded (a range that does not scan goes to the stream reader whatever came before) but
    no longer converted."""

    def __init__(self, buf: bytes, task: _ChunkOptions):
        self.buf, self.task = buf, task
        self.attributes = attribute_table(task.allow_empty_attribute)
        self.tokens: list[str] = []
        self.parts: list[dict[str, np.ndarray]] = []
        self.run: list[Member] = []  # members of one kind not yet in parts
        self.run_first = 0  # index of run[0] among the range's members
        self.run_boxes = 0
        self.failure: _MemberError | None = None
        self.cpu = 0.0  # CPU seconds spent turning structs into columns and validating them

    def add(self, member: Member) -> None:
        index = len(self.tokens)
        self.tokens.append(member.token)
        if self.failure is not None:
            return
        if self.run and self.run[0].structs != member.structs:
            self.flush()
        if not self.run:
            self.run_first = index
        self.run.append(member)
        if member.structs:
            self.run_boxes += len(member.boxes)
            if self.run_boxes >= _BATCH_BOXES:
                self.flush()

    def flush(self) -> None:
        run, first = self.run, self.run_first
        self.run, self.run_boxes = [], 0
        if not run or self.failure is not None:
            return
        started = time.process_time()
        try:
            columns = _struct_columns(run, first, self.task, self.attributes) if run[0].structs else None
            self.parts.append(columns if columns is not None
                              else _json_columns(self.buf, run, first, self.task, self.attributes))
        except _MemberError as failure:
            self.failure = failure
        self.cpu += time.process_time() - started


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
    buf = reused_buffer("range", byte_range[1] - byte_range[0])
    with open(task.path, "rb") as handle:
        handle.seek(byte_range[0])
        read = handle.readinto(buf)
    del buf[read:]  # a file that got shorter
    with gc_paused():
        return _read_range(task, buf, started)


def _whole_pieces(task: _ChunkOptions, buf: bytes,
                  msgspec_input: tuple[bytes | bytearray, bool]) -> tuple[list[str], list[dict], float] | None:
    """The members of a valid range, decoded piece by piece (:func:`piece_ranges`), each piece by one
    msgspec call as a JSON object ``{token: boxes}`` and turned into columns right away, then
    validated: the tokens, the columns and the CPU seconds spent on columns. None when a piece
    does not decode (a NaN or "N" where the fast decoders do not take it, null, Infinity, wrong types,
    a cut inside a string, invalid JSON) or the range does not validate: then the member-by-member path
    (:func:`scan_members`) reads the range, with the json module where msgspec does not take a list, and
    names the first problem.

    A piece that decodes is a sequence of complete members read as the member-by-member path reads
    them (the same text, decoders and checks; the keys decoded by msgspec, which takes a string only
    when the json module gives the same one), so its end is a member's end and the next piece
    starts at the next member: by induction, the same members, values and columns."""
    attributes = attribute_table(task.allow_empty_attribute)
    tokens: list[str] = []
    parts: list[dict] = []
    cpu = 0.0
    for begin, end in piece_ranges(buf):
        decoded, optional = decode_piece(msgspec_input, begin, end)
        if decoded is None:
            return None
        started = time.process_time()
        members = [Member(key.token, boxes, True, begin, end, optional) for key, boxes in decoded.items()]
        del decoded
        columns = _struct_columns(members, len(tokens), task, None)
        if columns is None:
            return None
        tokens.extend(member.token for member in members)
        parts.append(columns)
        del members
        cpu += time.process_time() - started
    started = time.process_time()
    columns = _concatenated(parts)
    valid = columns_valid(columns, len(columns["score"]), attributes)  # once for the range: fewer NumPy calls
    cpu += time.process_time() - started
    return (tokens, [columns], cpu) if valid else None


def _read_range(task: _ChunkOptions, buf: bytes | bytearray, started: float) -> _ChunkResult:
    msgspec_input = for_msgspec(buf)
    whole = _whole_pieces(task, buf, msgspec_input)
    if whole is not None:
        tokens, parts, convert_cpu = whole
    else:
        range_columns = _RangeColumns(buf, task)
        try:
            for member in scan_members(buf, msgspec_input):
                range_columns.add(member)
            range_columns.flush()
        except ScanError:
            return _ChunkResult(readable=False)
        tokens, parts, convert_cpu = range_columns.tokens, range_columns.parts, range_columns.cpu
    cpu = {"sub_decode": time.process_time() - started - convert_cpu, "sub_validate": convert_cpu}
    result = _ChunkResult(readable=True, tokens=tokens, task_cpu=cpu)
    if whole is None and range_columns.failure is not None:
        result.error, result.error_sample = range_columns.failure.error, range_columns.failure.member
        return result
    del buf, msgspec_input
    columns = _concatenated(parts)
    if task.box_filter is None:
        result.columns = columns
    else:
        started = time.process_time()
        result.by_class = _filtered_by_class(columns, result.tokens, task)
        cpu["pred_filter"] = time.process_time() - started
    return result


def _concatenated(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return empty_columns()
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


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
        layout = read_layout(path)
        if layout is None:
            return None
        options = _ChunkOptions(str(path), max_boxes_per_sample, allow_empty_attribute, box_filter, split_tokens)
        ranges = byte_ranges(path, layout.start, layout.end, BOUNDARY)
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
