"""Box sets as NumPy columns: the one data layout of the fast evaluator (GT, predictions, racks).

Box columns use the devkit class order (``bevperc.data.classes.DETECTION_NAMES``: car, truck, bus,
trailer, construction_vehicle, pedestrian, motorcycle, bicycle, traffic_cone, barrier) for ``class_index``.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from itertools import chain
from operator import itemgetter
from typing import Callable, Iterator, Sequence

import msgspec
import numpy as np


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

    @staticmethod
    def concatenate(parts: Sequence["BoxColumns"]) -> "BoxColumns":
        """The parts one after the other (at least one part)."""
        if len(parts) == 1:
            return parts[0]
        return BoxColumns(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(BoxColumns)})

    @staticmethod
    def empty() -> "BoxColumns":
        return BoxColumns(sample_index=np.zeros(0, dtype=np.int64), translation=np.zeros((0, 3)), size=np.zeros((0, 3)),
                          rotation=np.zeros((0, 4)), velocity=np.zeros((0, 2)), class_index=np.zeros(0, dtype=np.int64),
                          attribute_index=np.zeros(0, dtype=np.int64), score=np.zeros(0),
                          num_pts=np.zeros(0, dtype=np.int64))

    def split_by_class(self, keep: np.ndarray | None = None) -> dict[int, "BoxColumns"]:
        """class index -> the boxes of that class (among the indices ``keep``, default all), in list
        order; one gather, the classes are views of it."""
        index = np.arange(len(self)) if keep is None else keep
        grouped = self.take(index[np.argsort(self.class_index[index], kind="stable")])
        classes, starts = np.unique(grouped.class_index, return_index=True)
        ends = np.append(starts[1:], len(grouped)).astype(np.int64)
        return {int(c): grouped.take(slice(int(s), int(e))) for c, s, e in zip(classes, starts, ends)}


@dataclass
class RackColumns:
    """``static_object.bicycle_rack`` annotations of the split (for the bike-rack filter)."""

    sample_index: np.ndarray  # int64 [R]
    translation: np.ndarray  # float64 [R, 3]
    size: np.ndarray  # float64 [R, 3]
    rotation: np.ndarray  # float64 [R, 4]


_MSGPACK = msgspec.msgpack.Encoder()
FLOAT64_TAG = 0xCB  # msgpack: a float 64 follows (8 bytes, big-endian)


def msgpack_array_header(n: int) -> int:
    """Bytes of the msgpack header of an array of n items."""
    return 1 if n < 16 else 3 if n < 1 << 16 else 5


def float_fields(records: Sequence, getter: Callable, widths: Sequence[int]) -> list[np.ndarray]:
    """float64 columns of struct fields typed ``tuple[float, ...]`` (width w: [n, w]) or ``float``
    (width 0: [n]); ``getter`` returns those fields of a record as a tuple (an ``attrgetter``).

    One C call writes them all: msgspec's msgpack encoder turns the tuples into bytes, each Python float
    as 0xcb and the 8 bytes of its IEEE double (the bits: nothing is rounded), each tuple behind a
    one-byte header, so every record has the same layout and each column is a strided view of those
    bytes. Much cheaper than converting the floats one by one from Python (``np.fromiter``); records
    whose values are not all floats (the layout does not hold) are converted one by one instead.
    """
    n = len(records)
    offsets, at = [], 1  # the tuple's header
    for width in widths:
        at += 1 if width else 0  # a tuple field's header
        offsets.append(at)
        at += 9 * max(width, 1)
    record = at
    if n == 0 or len(widths) > 15 or max(widths) > 15:
        return [struct_field_floats(records, getter, i, width) for i, width in enumerate(widths)]
    try:
        data = _MSGPACK.encode(list(map(getter, records)))
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):  # not floats
        return [struct_field_floats(records, getter, i, width) for i, width in enumerate(widths)]
    header = msgpack_array_header(n)
    tags = [offset + 9 * k for offset, width in zip(offsets, widths) for k in range(max(width, 1))]
    if len(data) != header + n * record or not (
            np.frombuffer(data, np.uint8, offset=header).reshape(n, record)[:, tags] == FLOAT64_TAG).all():
        return [struct_field_floats(records, getter, i, width) for i, width in enumerate(widths)]
    columns = []
    for offset, width in zip(offsets, widths):
        shape, strides = ((n, width), (record, 9)) if width else ((n,), (record,))
        raw = np.ndarray(shape, dtype="V8", buffer=data, offset=header + offset + 1, strides=strides).copy()
        columns.append(raw.view(">f8").astype(np.float64))
    return columns


def struct_field_floats(records: Sequence, getter: Callable, index: int, width: int) -> np.ndarray:
    """Field ``index`` of ``getter``'s tuples as float64 [n, width] (width 0: [n]), one value at a time."""
    values = map(itemgetter(index), map(getter, records))
    if width == 0:
        return np.fromiter(values, dtype=np.float64, count=len(records))
    return np.fromiter(chain.from_iterable(values), dtype=np.float64, count=width * len(records)).reshape(-1, width)


_BUFFERS = threading.local()  # slot -> bytearray, per thread (evaluations in threads of one process)


def reused_buffer(slot: str, size: int) -> bytearray:
    """A bytearray of ``size`` bytes (contents left over) whose memory is kept from one call to the
    next: a worker that reads range after range of a file writes into the same pages instead of fresh
    ones, which the kernel would first have to map and clear (a page fault per 4 KiB, dearer than
    reading the bytes). Use the buffer before the next call with the same slot."""
    buffers = _BUFFERS.__dict__
    buffer = buffers.get(slot)
    try:
        if buffer is None:
            raise BufferError
        if len(buffer) > size:
            del buffer[size:]  # keeps the allocation unless it shrinks to less than half
        elif len(buffer) < size:
            buffer.extend(bytes(size - len(buffer)))
    except BufferError:  # new, or a view of it is still alive
        buffer = buffers[slot] = bytearray(size)
    return buffer


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: decoding creates ~10^5 objects per chunk, none in cycles,
    and the collections they trigger would only cost time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
