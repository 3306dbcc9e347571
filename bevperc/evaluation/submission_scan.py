"""Byte-level stages of the fast submission reader (:mod:`~bevperc.evaluation.submission_chunks` has
the overview and stages 4 and 5): from the file's bytes to msgspec structs, or to what the json module
decodes where msgspec does not take a list.

1. **Layout** (this process, :func:`read_layout`): the file must be ``{"meta": {...}, "results": {...}}``
   or ``{"results": {...}, "meta": {...}}`` (any JSON whitespace; ``meta`` a flat object). Anything
   else is left to the json-module stream reader.
2. **Ranges** (:data:`BOUNDARY`): the members of ``results`` are cut into byte ranges of about
   :data:`~bevperc.evaluation.workers.RANGE_BYTES` after a sample's list of boxes (``}]`` or ``[]``
   followed by ``,``).
3. **Decoding** (a worker per range): the range is cut into pieces of about :data:`_PIECE_BYTES`
   (same cuts, :func:`piece_ranges`), and msgspec decodes each piece in one call as a JSON object
   ``{token: [box, ...]}`` into structs (:func:`decode_piece`: types, lengths, integers and the class
   and attribute names checked; every number it returns is finite; a sample listed twice stays two
   entries, in file order). The non-standard ``NaN`` literal (NaN velocities, which the devkit
   allows) is first overwritten with the string ``"N"`` (same length: offsets hold, see
   :func:`for_msgspec`), which is accepted only in ``velocity``, and only when the range has no
   ``"N"`` of its own. If a piece does not decode or validate, the range is read member by member
   (:func:`scan_members`): each member is a JSON key and a list of boxes, the list ends at the first
   ``}]`` and msgspec decodes it; a list msgspec does not take (null, Infinity, numbers beyond float
   range, wrong types, NaN elsewhere, a ``}]`` inside a string) is decoded by the json module from the
   original bytes, as the stream reader would.

If a range does not scan as complete members (invalid JSON, or a cut inside a string:
:class:`ScanError`), the whole file goes to the stream reader, which raises its JSON error or reads
it. A successful scan is a proof of validity: each range is a sequence of complete members, so their
concatenation is too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Union

import msgspec

from bevperc.data.classes import ATTRIBUTE_NAMES, DETECTION_NAMES
from bevperc.evaluation.columns import reused_buffer

_WS = rb"[ \t\n\r]*"
_META = rb"(\{[^{}]*\})"
_HEAD_META_FIRST = re.compile(rb"\A" + _WS + rb'\{' + _WS + rb'"meta"' + _WS + rb":" + _WS + _META + _WS + rb","
                              + _WS + rb'"results"' + _WS + rb":" + _WS + rb"\{")
_HEAD_RESULTS_FIRST = re.compile(rb"\A" + _WS + rb"\{" + _WS + rb'"results"' + _WS + rb":" + _WS + rb"\{")
_TAIL_META_FIRST = re.compile(rb"\}" + _WS + rb"\}" + _WS + rb"\Z")
_TAIL_RESULTS_FIRST = re.compile(rb"\}" + _WS + rb"," + _WS + rb'"meta"' + _WS + rb":" + _WS + _META + _WS
                                 + rb"\}" + _WS + rb"\Z")


class _Boundary:
    """Where a range may end: after a list of boxes (``}]`` or ``[]``, any whitespace inside) and before
    a comma; ``search`` is ``re.Pattern.search`` of ``(?:}WS]|[WS])(?P<cut>)WS,``, found as the earlier of
    its two branches: each starts with a literal byte, which the re module finds much faster than
    it tries the alternation at every byte."""

    close = re.compile(rb"\}" + _WS + rb"\](?P<cut>)" + _WS + rb",")
    empty = re.compile(rb"\[" + _WS + rb"\](?P<cut>)" + _WS + rb",")

    def search(self, data: bytes, pos: int = 0) -> re.Match | None:
        close = self.close.search(data, pos)
        empty = self.empty.search(data, pos, close.start() if close is not None else len(data))
        return empty or close


BOUNDARY = _Boundary()
_KEY = re.compile(_WS + rb'("(?:[^"\\]|\\.)*")' + _WS + rb":" + _WS, re.DOTALL)
_EMPTY_LIST = re.compile(rb"\[" + _WS + rb"\]")
_LIST_END = re.compile(rb"\}" + _WS + rb"\]")
_SEPARATOR = re.compile(_WS + rb",")
_REST_IS_SPACE = re.compile(_WS + rb"\Z")
_JSON = json.JSONDecoder()


class Box(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A box with the 8 fields of the result format and no other (what nearly every file has)."""

    sample_token: str
    translation: tuple[float, float, float]
    size: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    velocity: tuple[float, float]
    detection_name: Literal[DETECTION_NAMES]
    detection_score: float
    attribute_name: Literal[ATTRIBUTE_NAMES + ("",)]


class _NanBox(Box, gc=False, forbid_unknown_fields=True):
    velocity: tuple[Union[float, Literal["N"]], Union[float, Literal["N"]]]  # "N": NaN (see for_msgspec)


class _FullBox(Box, gc=False, forbid_unknown_fields=False):
    """A box that may have the devkit's optional fields, and fields it ignores."""

    num_pts: int = -1
    ego_translation: Union[tuple[float, float, float], msgspec.UnsetType] = msgspec.UNSET


class _FullNanBox(_FullBox, gc=False, forbid_unknown_fields=False):
    velocity: tuple[Union[float, Literal["N"]], Union[float, Literal["N"]]]


class _Key:
    """The key of a member of ``results`` decoded by msgspec as a dict key: hashed by identity, so that
    a sample listed twice stays two entries of the dict (in file order)."""

    __slots__ = ("token",)

    def __init__(self, token: str):
        self.token = token


def _key_hook(type_: type, value: Any) -> Any:
    if type_ is _Key and isinstance(value, str):
        return _Key(value)
    raise NotImplementedError


def _decoders(box_types: tuple[type, type]) -> tuple[tuple, tuple]:
    """msgspec decoders of a list of boxes and of an object of lists ``{token: boxes}`` (a piece of a
    range), for boxes with the 8 fields only and for any box: tried in this order."""
    return (tuple(msgspec.json.Decoder(list[t]) for t in box_types),
            tuple(msgspec.json.Decoder(dict[_Key, list[t]], dec_hook=_key_hook) for t in box_types))


# [nan_ok]: whether "N" is read as a NaN velocity (see for_msgspec)
_LIST_DECODERS, _OBJECT_DECODERS = zip(_decoders((Box, _FullBox)), _decoders((_NanBox, _FullNanBox)))
_PIECE_BYTES = 1 << 19  # whole pieces: bytes decoded by one msgspec call, then turned into columns


class ScanError(Exception):
    """A byte range is not a sequence of complete ``"token": value`` members."""


# --------------------------------------------------------------------------- planning (this process)
@dataclass
class _Layout:
    meta: Any
    start: int  # byte offset of the members of "results"
    end: int  # byte offset of the brace closing "results"


def read_layout(path: Path, window: int = 1 << 16) -> _Layout | None:
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
class Member:
    token: str
    boxes: Any  # list of Box (until turned into columns), or what the json module decoded
    structs: bool  # boxes are msgspec structs
    start: int  # byte range of the value in the chunk
    end: int
    optional: bool = False  # structs of _FullBox (optional or unknown fields)


def for_msgspec(raw: bytes) -> tuple[bytes | bytearray, bool]:
    """What msgspec decodes the lists of a range from, and whether "N" is read as NaN: NaN literals
    overwritten by ``"N"`` (same length) for the decoders that read ``"N"`` in ``velocity`` as NaN;
    the original bytes and the decoders that take numbers only when the range has a ``"N"`` of its
    own (its lists with NaN then go to the json module)."""
    nan_at = []
    at = raw.find(b"N")  # a capital N is rare in a submission: this is a fast scan
    while at >= 0:
        if raw.startswith(b"NaN", at):
            nan_at.append(at)
        elif at > 0 and raw.startswith(b'"N"', at - 1):
            return raw, False
        at = raw.find(b"N", at + 1)
    if not nan_at:
        return raw, True
    patched = reused_buffer("patched", len(raw))
    patched[:] = raw
    for at in nan_at:
        patched[at:at + 3] = b'"N"'
    return patched, True


def piece_ranges(buf: bytes) -> list[tuple[int, int]]:
    """Byte ranges of about :data:`_PIECE_BYTES` that cover ``buf``, cut as the ranges are, but only
    after a list that is not empty (a cut inside a string makes a piece that does not decode)."""
    pieces, begin = [], 0
    while len(buf) - begin > 2 * _PIECE_BYTES:
        found = _Boundary.close.search(buf, begin + _PIECE_BYTES)
        if found is None:
            break
        pieces.append((begin, found.start("cut")))
        begin = found.end()
    pieces.append((begin, len(buf)))
    return pieces


def _first_decoded(decoders: tuple, text: bytes | memoryview) -> tuple[Any, bool]:
    """What the first of ``decoders`` that takes ``text`` decodes (None if none does), and whether
    that is the second (boxes of the _FullBox kind: a box has a field beyond the 8 of the format)."""
    for optional, decoder in enumerate(decoders):
        try:
            return decoder.decode(text), bool(optional)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
    return None, False


def _decode_boxes(msgspec_input: tuple[bytes | bytearray, bool], start: int, end: int) -> tuple[list | None, bool]:
    """msgspec structs of the list of boxes at [start, end) (None if msgspec does not take it), and
    whether they are _FullBox structs (a box has a field beyond the 8 of the format)."""
    data, nan_ok = msgspec_input
    return _first_decoded(_LIST_DECODERS[nan_ok], memoryview(data)[start:end])


def decode_piece(msgspec_input: tuple[bytes | bytearray, bool], begin: int, end: int) -> tuple[dict | None, bool]:
    """The members at [begin, end) (a piece, :func:`piece_ranges`) decoded by one msgspec call as a JSON object
    ``{token: boxes}`` (keys with the token, hashed by identity; None if msgspec does not take it), and
    whether the boxes are _FullBox structs."""
    data, nan_ok = msgspec_input
    return _first_decoded(_OBJECT_DECODERS[nan_ok], b"".join((b"{", memoryview(data)[begin:end], b"}")))


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
    raise ScanError


def _member_value(raw: bytes, msgspec_input: tuple[bytes | bytearray, bool], token: str, start: int) -> Member:
    empty = _EMPTY_LIST.match(raw, start)
    if empty is not None:
        return Member(token, [], True, start, empty.end())
    close = _LIST_END.search(raw, start) if raw.startswith(b"[", start) else None
    if close is not None:
        boxes, optional = _decode_boxes(msgspec_input, start, close.end())
        if boxes is not None:
            return Member(token, boxes, True, start, close.end(), optional)
    value, end = _decode_json(raw, start)
    return Member(token, value, False, start, end)


def scan_members(raw: bytes, msgspec_input: tuple[bytes | bytearray, bool] | None = None) -> Iterator[Member]:
    """The members of a range of ``results``, decoded, in order; raises :class:`ScanError` (after
    the members before the problem). ``msgspec_input``: :func:`for_msgspec` of ``raw``."""
    if _REST_IS_SPACE.match(raw):
        return
    msgspec_input = msgspec_input or for_msgspec(raw)
    pos = 0
    while True:
        key = _KEY.match(raw, pos)
        if key is None:
            raise ScanError
        try:
            token = json.loads(key.group(1))
        except ValueError:
            raise ScanError from None
        member = _member_value(raw, msgspec_input, token, key.end())
        yield member
        separator = _SEPARATOR.match(raw, member.end)
        if separator is not None:
            pos = separator.end()
        elif _REST_IS_SPACE.match(raw, member.end):
            return
        else:
            raise ScanError


def _scan(raw: bytes) -> list[Member]:
    """The members of a range of ``results``, decoded; raises :class:`ScanError`."""
    return list(scan_members(raw))
