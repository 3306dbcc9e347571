"""The fast submission reader (msgspec, byte ranges, worker processes) against the json-module reader.

Every value the fast path decodes must equal, bit for bit, what the plain ``json`` module reads
(``read_submission_stream``), and every invalid file must raise the same error, naming the same
sample, box and field: adversarial numbers (NaN, huge and tiny floats, numbers beyond float range,
integers beyond int64, the old NaN sentinel), non-normalised quaternions, layouts the fast path
leaves to the stream reader, and files cut into many ranges read by real worker processes.
"""

from __future__ import annotations

import json
import math
import operator
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bevperc.evaluation import submission_chunks, submission_scan
from bevperc.evaluation import workers as worker_pool
from bevperc.evaluation.columns import float_fields, struct_field_floats
from bevperc.evaluation.fast_eval import FastDetectionEval, load_ground_truth, to_jsonable
from bevperc.evaluation.ground_truth import _RECORD_BOUNDARY, annotation_range
from bevperc.evaluation.submission import (
    COLUMN_NAMES,
    PredictionBoxes,
    SubmissionError,
    read_submission,
    read_submission_stream,
)
from bevperc.evaluation.workers import byte_ranges, run_tasks
from bevperc.geometry import devkit_quaternion_yaws

META = '{"use_camera": true, "use_lidar": false, "use_radar": false, "use_map": false, "use_external": false}'
BOX = {"translation": "[1.5, -2.0, 0.5]", "size": "[1.0, 2.0, 1.5]", "rotation": "[1.0, 0.0, 0.0, 0.0]",
       "velocity": "[0.5, -0.5]", "detection_name": '"car"', "detection_score": "0.5",
       "attribute_name": '"vehicle.moving"'}
TOKENS = [f"{i:032x}" for i in range(1, 7)]


def _box(token: str, **fields: str) -> str:
    """The JSON text of one box: BOX with some fields replaced by raw JSON texts."""
    return "{" + ", ".join(f'"{k}": {v}' for k, v in {"sample_token": json.dumps(token), **BOX, **fields}.items()) + "}"


def _write(path: Path, results: list[tuple[str, list[str]]], meta_first: bool = True) -> Path:
    members = ", ".join(f"{json.dumps(token)}: [{', '.join(boxes)}]" for token, boxes in results)
    if meta_first:
        path.write_text('{"meta": ' + META + ', "results": {' + members + "}}")
    else:
        path.write_text('{"results": {' + members + '}, "meta": ' + META + "}")
    return path


def _fast(path: Path, tokens=None, workers: int = 1) -> PredictionBoxes | None:
    chunked = submission_chunks.read_chunked(path, tokens, 500, False, workers)
    if chunked is None:
        return None
    return PredictionBoxes.concatenate(chunked.sample_tokens, chunked.columns, chunked.meta)


def _msgspec_decoded_everything(path: Path) -> bool:
    """Whether the fast path decoded every list of boxes with msgspec (no json-module fallback)."""
    layout = submission_scan.read_layout(path)
    raw = path.read_bytes()[layout.start:layout.end]
    return all(m.structs for m in submission_scan._scan(raw))


def _whole_pieces_take(path: Path) -> bool:
    """Whether the range of the whole file decodes piece by piece (one msgspec call per piece, no
    member-by-member fallback)."""
    layout = submission_scan.read_layout(path)
    raw = path.read_bytes()[layout.start:layout.end]
    task = submission_chunks._ChunkOptions(str(path), 500, False, None, None)
    return submission_chunks._whole_pieces(task, raw, submission_scan.for_msgspec(raw)) is not None


def assert_same_boxes(a: PredictionBoxes, b: PredictionBoxes) -> None:
    """Same samples, meta and columns, bit for bit (-0.0 is not 0.0, NaN is NaN)."""
    assert a.sample_tokens == b.sample_tokens and a.meta == b.meta
    for name in COLUMN_NAMES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), (name, x, y)


def _outcome(read, path: Path):
    try:
        return read(path)
    except SubmissionError as error:
        return str(error)


def assert_fast_equals_stream(path: Path, tokens=None, workers: int = 1) -> PredictionBoxes | None:
    """The fast path (when it takes the file) and read_submission give the stream reader's columns,
    or its error."""
    stream = _outcome(lambda p: read_submission_stream(p, tokens), path)
    fast = _outcome(lambda p: _fast(p, tokens, workers), path)
    public = _outcome(lambda p: read_submission(p, tokens, workers=workers), path)
    for outcome in (fast, public):
        if isinstance(stream, str) or isinstance(outcome, str):
            assert outcome == stream or outcome is None
        elif outcome is not None:
            assert_same_boxes(outcome, stream)
    return fast


# --------------------------------------------------------------------------- adversarial values
ADVERSARIAL_VALID = {
    "translation": ["[1e308, -1e308, 1.7976931348623157e308]", "[1e-320, -1e-320, 5e-324]",
                    "[100000000000000000000, 1, -18446744073709551617]",
                    "[-1.2345678901234567e+308, -0.0, 0]", "[9007199254740993, 0.1000000000000000055511151231257827, 3]",
                    "[2.2250738585072011e-308, 2.4703282292062328e-324, 123456789012345678901234567890e-20]"],
    "size": ["[1e-320, 1e308, 5e-324]", "[1, 2, 3]"],
    "rotation": ["[1e160, 0.0, 0.0, 1e160]", "[1e-160, 0.0, 0.0, -1e-160]", "[2.5, 0.1, -0.2, 1.0]",
                 "[1.3e154, 1.3e154, 0, 0]"],
    "velocity": ["[NaN, NaN]", "[NaN, 1.0]", "[-1.2345678901234567e+308, NaN]", "[1e308, -1e-320]", "[-0.0, 0]"],
    "detection_score": ["0", "1", "5e-324", "1e-320", "0.9999999999999999", "1.0"],
    "num_pts": ["0", "-1", "9223372036854775807", "-9223372036854775808"],
    "ego_translation": ["[1e308, -1e-320, -1.2345678901234567e+308]"],
}


def test_adversarial_valid_values_decode_like_the_json_module(tmp_path):
    boxes = [_box(TOKENS[0], **{name: text}) for name, texts in ADVERSARIAL_VALID.items() for text in texts]
    path = _write(tmp_path / "adversarial.json", [(TOKENS[0], boxes), (TOKENS[1], [])])
    assert _msgspec_decoded_everything(path) and _whole_pieces_take(path)
    fast = assert_fast_equals_stream(path, TOKENS[:2])
    assert fast is not None and len(fast) == len(boxes)
    translation = fast.translation[:6]
    assert translation[3, 0] == -1.2345678901234567e+308  # the old NaN sentinel is a number like any other
    assert math.copysign(1.0, translation[3, 1]) == -1.0  # -0.0 stays -0.0
    assert translation[2].tolist() == [1e20, 1.0, -18446744073709551617.0]  # integers beyond int64 too
    assert np.isnan(fast.velocity).sum() == 4
    assert np.isnan(fast.velocity[:, 0]).sum() == 2
    assert fast.num_pts.tolist()[-5:-1] == [0, -1, 2 ** 63 - 1, -(2 ** 63)]


ADVERSARIAL_INVALID = [
    ("translation", "[1e400, 0, 0]", "field 'translation' must be finite, got [inf"),
    ("translation", "[1" + "0" * 400 + ", 0, 0]", "field 'translation' must be finite"),
    ("translation", "[NaN, 0, 0]", "field 'translation' must be finite, got [nan"),
    ("size", "[1.0, -1e-320, 1.0]", "field 'size' must be > 0"),
    ("size", "[NaN, 1, 1]", "field 'size' must be finite"),
    ("rotation", "[1e-170, 0, 0, 1e-170]", "'rotation' must be a quaternion (w, x, y, z) with non-zero norm"),
    ("rotation", "[Infinity, 0, 0, 0]", "field 'rotation' must be finite"),
    ("velocity", "[Infinity, 0]", "field 'velocity' must be finite or NaN, got [inf"),
    ("velocity", "[-1e400, 0]", "field 'velocity' must be finite or NaN, got [-inf"),
    ("velocity", "[null, 0]", "field 'velocity' must be a list of 2 numbers"),
    ("velocity", '["N", 0]', "field 'velocity' must be a list of 2 numbers, got ['N'"),
    ("velocity", '["1.5", 0]', "field 'velocity' must be a list of 2 numbers"),
    ("velocity", "[1" + "0" * 400 + ", 0]", "field 'velocity' must be finite or NaN"),
    ("detection_score", "NaN", "'detection_score' must be a number in [0, 1], got nan"),
    ("detection_score", "1e400", "'detection_score' must be a number in [0, 1], got inf"),
    ("detection_score", "1.0000000000000002", "'detection_score' must be a number in [0, 1]"),
    ("detection_name", '"NaN"', "field 'detection_name' is 'NaN'; expected one of"),
    # num_pts wording from #16 item 10 (tests/test_eval_values.py, tests/test_bad_inputs.py): the range is spelled out
    ("num_pts", "1e20", "optional field 'num_pts' must be an integer in [-2**63, 2**63), got 1e+20"),
    ("num_pts", "100000000000000000000", "optional field 'num_pts' must be an integer in [-2**63, 2**63), got 100000000000000000000"),
    ("num_pts", "9223372036854775808", "'num_pts' must be an integer in [-2**63, 2**63), got 9223372036854775808"),
    ("num_pts", "-9223372036854775809", "'num_pts' must be an integer in [-2**63, 2**63)"),
    ("num_pts", "NaN", "'num_pts' must be an integer in [-2**63, 2**63), got nan"),
    ("num_pts", "true", "'num_pts' must be an integer in [-2**63, 2**63), got True"),
    ("ego_translation", "null", "field 'ego_translation' must be a list of 3 numbers, got None"),
    ("ego_translation", "[NaN, 0, 0]", "field 'ego_translation' must be finite"),
]


@pytest.mark.parametrize("field, text, message", ADVERSARIAL_INVALID)
def test_adversarial_invalid_values_raise_the_json_readers_error(tmp_path, field, text, message):
    """Box 2 of the second sample is bad: the same error as the json reader, naming sample, box, field."""
    boxes = [_box(TOKENS[1]), _box(TOKENS[1]), _box(TOKENS[1], **{field: text}), _box(TOKENS[1])]
    path = _write(tmp_path / "bad.json", [(TOKENS[0], [_box(TOKENS[0])]), (TOKENS[1], boxes)])
    with pytest.raises(SubmissionError) as stream:
        read_submission_stream(path, TOKENS[:2])
    with pytest.raises(SubmissionError) as fast:
        _fast(path, TOKENS[:2])
    assert str(fast.value) == str(stream.value)
    assert str(fast.value).startswith(f"results[{TOKENS[1]!r}][2]: ") and message in str(fast.value)


_DIGITS = st.text("0123456789", min_size=1, max_size=25)


@st.composite
def number_text(draw) -> str:
    """JSON number texts: shortest reprs, long decimals near the float limits, and integers."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return repr(draw(st.floats(allow_nan=False, allow_infinity=False)))
    if kind == 1:
        sign = draw(st.sampled_from(["", "-"]))
        fraction = draw(st.one_of(st.just(""), _DIGITS.map(lambda d: "." + d)))
        exponent = draw(st.one_of(st.just(""), st.integers(-345, 330).map(lambda e: f"e{e:+d}")))
        return f"{sign}{int(draw(_DIGITS))}{fraction}{exponent}"
    return str(draw(st.integers(-(2 ** 70), 2 ** 70)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(number_text(), min_size=6, max_size=6))
def test_number_texts_decode_like_the_json_module(tmp_path, values):
    """Random number texts in translation and velocity: same floats, or the same error, as json."""
    box = _box(TOKENS[0], translation=f"[{values[0]}, {values[1]}, {values[2]}]",
               velocity=f"[{values[3]}, {values[4]}]", ego_translation=f"[{values[5]}, 0, 0]")
    path = _write(tmp_path / "numbers.json", [(TOKENS[0], [box, _box(TOKENS[0])])])
    assert_fast_equals_stream(path, TOKENS[:1])


def test_quaternion_yaw_normalises_as_the_devkit_does():
    """Scaled quaternions: the devkit divides by sqrt(q . q) (which overflows to inf for 1e160: yaw 0)."""
    from nuscenes.eval.common.utils import quaternion_yaw as devkit_yaw
    from pyquaternion import Quaternion

    base = np.array([[math.cos(0.6), 0.0, 0.0, math.sin(0.6)], [0.3, 0.1, -0.2, 0.9], [0.0, 0.0, 0.0, 1.0],
                     [math.cos(1.4), 0.05, 0.02, -math.sin(1.4)]])
    for scale in (1.0, 2.5, 1e-160, 1e160, 1e-150, 1e150, 1e-3):
        rotation = base * scale
        expected = [devkit_yaw(Quaternion(q)) for q in rotation]
        np.testing.assert_allclose(devkit_quaternion_yaws(rotation), expected, rtol=0, atol=1e-12, err_msg=str(scale))
    assert devkit_quaternion_yaws(base[:1] * 1e160)[0] == 0.0  # q / inf == 0 in the devkit too


# --------------------------------------------------------------------------- columns through msgpack
def _float_from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


_ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(0, 2 ** 64 - 1).map(_float_from_bits),  # any bits: NaN payloads, subnormals
                       # bytes a1 4e (how msgpack writes the string "N") inside the float
                       st.tuples(st.integers(0, 6), st.binary(min_size=6, max_size=6)).map(
                           lambda t: struct.unpack(">d", t[1][:t[0]] + b"\xa1\x4e" + t[1][t[0]:])[0]))


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


@settings(max_examples=80, deadline=None)
@given(records=st.lists(st.tuples(st.tuples(_ANY_FLOAT, _ANY_FLOAT, _ANY_FLOAT), st.tuples(_ANY_FLOAT, _ANY_FLOAT),
                                  _ANY_FLOAT), max_size=40))
def test_float_fields_are_the_bits_of_the_floats(records):
    """The msgpack columns equal the floats converted one by one, bit for bit (any bits)."""
    getter = operator.itemgetter(0, 1, 2)
    fast = float_fields(records, getter, (3, 2, 0))
    for index, width in enumerate((3, 2, 0)):
        reference = struct_field_floats(records, getter, index, width)
        assert fast[index].dtype == np.float64 and fast[index].shape == reference.shape
        assert _bits(fast[index]) == _bits(reference)


def test_float_fields_headers_and_other_values():
    """Arrays of >= 16 and >= 65536 records (longer msgpack headers); values that are not all floats
    (the layout does not hold) are converted one by one."""
    rng = np.random.default_rng(0)
    for n in (15, 16, 65535, 65536, 70000):
        values = rng.normal(size=(n, 4)) * 10.0 ** rng.integers(-300, 300, size=(n, 4))
        records = [(tuple(row[:3]), row[3]) for row in values.tolist()]
        translation, score = float_fields(records, operator.itemgetter(0, 1), (3, 0))
        assert _bits(translation) == _bits(values[:, :3]) and _bits(score) == _bits(values[:, 3])
    mixed = [((1.0, 2, 3.5), True), ((2 ** 70, -0.0, 1e-320), 0.5)]
    translation, score = float_fields(mixed, operator.itemgetter(0, 1), (3, 0))
    assert translation.tolist() == [[1.0, 2.0, 3.5], [2.0 ** 70, -0.0, 1e-320]] and score.tolist() == [1.0, 0.5]


@settings(max_examples=80, deadline=None)
@example(velocities=[(struct.unpack(">d", bytes([0x40, 0xA1, 0x4E, 1, 2, 3, 4, 5]))[0], "N"), ("N", "N"),
                     (1.5, struct.unpack(">d", bytes([0xA1, 0x4E, 0xA1, 0x4E, 0xA1, 0x4E, 0xA1, 0x4E]))[0]),
                     ("N", struct.unpack(">d", bytes([1, 2, 3, 4, 5, 6, 0xA1, 0x4E]))[0])] * 9)
@given(velocities=st.lists(st.tuples(st.one_of(st.just("N"), _ANY_FLOAT), st.one_of(st.just("N"), _ANY_FLOAT)),
                           max_size=60))
def test_velocities_read_n_as_nan(velocities):
    """"N" (a NaN velocity) anywhere, next to floats whose bytes look like msgpack's "N": NaN there,
    every other value bit for bit."""
    boxes = [submission_scan._NanBox(TOKENS[0], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0, 0.0), v, "car",
                                     0.5, "vehicle.moving") for v in velocities]
    flat = [value for v in velocities for value in v]
    reference = np.array([math.nan if value == "N" else value for value in flat], dtype=np.float64).reshape(-1, 2)
    assert _bits(submission_chunks._velocities(boxes)) == _bits(reference)


def test_velocities_of_many_boxes():
    """41294 = 0xa14e boxes: the msgpack header holds the bytes of "N" too; 70000 boxes (longer header)."""
    rng = np.random.default_rng(1)
    for n in (0xA14E, 70000):
        values = rng.normal(size=(n, 2))
        velocities = [tuple(v) for v in values.tolist()]
        for i in rng.choice(n, 50, replace=False).tolist():
            velocities[i] = ("N", velocities[i][1]) if i % 3 else ("N", "N")
            values[i, 0] = math.nan
            values[i, 1] = values[i, 1] if i % 3 else math.nan
        boxes = [submission_scan._NanBox(TOKENS[0], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0, 0.0), v,
                                         "car", 0.5, "vehicle.moving") for v in velocities]
        assert _bits(submission_chunks._velocities(boxes)) == _bits(values)


def test_pieces_cut_inside_strings_and_repeated_samples(tmp_path, monkeypatch):
    """Pieces of a few hundred bytes: cuts inside strings (a piece that does not decode: the
    member-by-member path reads the range), a sample listed twice inside a piece, optional and
    unknown fields in some members: the json reader's columns or error."""
    monkeypatch.setattr(submission_scan, "_PIECE_BYTES", 300)
    tricky = [_box(TOKENS[0], note='"a}], b"'), _box(TOKENS[0], velocity="[NaN, 2.5]")]
    optional = [_box(TOKENS[1], num_pts="7"), _box(TOKENS[1], ego_translation="[1.0, 2.0, 3.0]", note="[[1]]")]
    plain = [(token, [_box(token), _box(token, velocity="[1.5, NaN]")]) for token in TOKENS[2:]]
    path = _write(tmp_path / "tricky.json", [(TOKENS[0], tricky), (TOKENS[1], optional)] + plain)
    assert not _whole_pieces_take(path)
    assert_fast_equals_stream(path, TOKENS) is not None
    path = _write(tmp_path / "optional.json", [(TOKENS[1], optional)] + plain + [(TOKENS[0], [])])
    assert _whole_pieces_take(path)
    assert_fast_equals_stream(path, TOKENS) is not None
    bad = _box(TOKENS[2], size="[1.0, 0.0, 1.0]")
    for name, results, message in [
            ("repeated", plain[:2] + [plain[0]] + plain[2:], "listed twice"),
            ("bad, then repeated", [(TOKENS[2], [bad])] + plain[1:] + [plain[1]], "field 'size' must be > 0"),
            ("repeated, then bad", plain[:2] + [plain[1], (TOKENS[2], [bad])], "listed twice")]:
        path = _write(tmp_path / "case.json", results)
        with pytest.raises(SubmissionError) as stream:
            read_submission_stream(path)
        with pytest.raises(SubmissionError) as fast:
            _fast(path)
        assert str(fast.value) == str(stream.value) and message in str(stream.value), name


# --------------------------------------------------------------------------- layouts and fallbacks
def test_layouts_and_fallbacks(tmp_path):
    nan_boxes = [_box(TOKENS[0], velocity="[NaN, 1.0]"), _box(TOKENS[0])]
    results = [(TOKENS[0], nan_boxes), (TOKENS[1], [_box(TOKENS[1]), _box(TOKENS[1], velocity="[NaN, NaN]")]),
               (TOKENS[2], [])]
    reference = read_submission_stream(_write(tmp_path / "a.json", results), TOKENS[:3])

    def same(path: Path, fast_path_takes_it: bool) -> None:
        assert (_fast(path, TOKENS[:3]) is not None) == fast_path_takes_it
        assert_same_boxes(read_submission(path, TOKENS[:3]), reference)

    same(_write(tmp_path / "results_first.json", results, meta_first=False), True)
    indented = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "indented.json").write_text(json.dumps(indented, indent=2))
    same(tmp_path / "indented.json", True)
    (tmp_path / "extra.json").write_text(json.dumps(dict(indented, version="v1")))
    same(tmp_path / "extra.json", False)  # another layout: the stream reader
    # a '}]' in a string of an unknown field ends the msgspec text early: that list goes to json
    odd = [(TOKENS[0], [_box(TOKENS[0], note='"x}]y"', velocity="[NaN, 1.0]"), nan_boxes[1]])] + results[1:]
    same(_write(tmp_path / "odd.json", odd), True)
    # the string "N" of its own: NaN cannot be overwritten with "N" in that range, json reads those lists
    n_string = [(TOKENS[0], [_box(TOKENS[0], note='"N"', velocity="[NaN, 1.0]"), nan_boxes[1]])] + results[1:]
    same(_write(tmp_path / "n_string.json", n_string), True)


def test_json_errors_are_the_stream_readers(tmp_path):
    text = _write(tmp_path / "ok.json", [(t, [_box(t)]) for t in TOKENS]).read_text()
    for name, broken in [("truncated", text[:-30]), ("comma", text.replace("}]", "},]", 1)),
                         ("trailing", text + "x")]:
        path = tmp_path / f"{name}.json"
        path.write_text(broken)
        with pytest.raises(SubmissionError) as stream:
            read_submission_stream(path, TOKENS)
        with pytest.raises(SubmissionError) as fast:
            read_submission(path, TOKENS)
        assert str(fast.value) == str(stream.value)
        assert ("unexpected data after" if name == "trailing" else "invalid JSON") in str(fast.value)


# --------------------------------------------------------------------------- many ranges, worker processes
@pytest.fixture(scope="module")
def mini(tmp_path_factory, eval_bench):
    bench = eval_bench
    root = tmp_path_factory.mktemp("nuscenes")
    tokens = bench.write_synthetic_nuscenes(root, "v1.0-mini", "mini_val", samples_per_scene=12, gt_per_sample=25,
                                            seed=11)
    results = root / "results.json"
    bench.write_synthetic_submission(root, "v1.0-mini", tokens, results, preds_per_sample=50, seed=12)
    return root, tokens, results


@settings(max_examples=200, deadline=None)
@given(text=st.text("}][, \n\tab", max_size=40), pos=st.integers(0, 40))
def test_boundary_is_the_first_match_of_the_alternation(text, pos):
    alternation = re.compile(rb"(?:\}[ \t\n\r]*\]|\[[ \t\n\r]*\])(?P<cut>)[ \t\n\r]*,")
    data = text.encode()
    expected, found = alternation.search(data, pos), submission_scan.BOUNDARY.search(data, pos)
    assert (expected is None) == (found is None)
    if found is not None:
        assert ((found.start(), found.start("cut"), found.end())
                == (expected.start(), expected.start("cut"), expected.end()))


def test_ranges_in_worker_processes_give_the_stream_readers_columns(mini, tmp_path, monkeypatch):
    root, tokens, results = mini
    monkeypatch.setattr(worker_pool, "RANGE_BYTES", 8192)
    layout = submission_scan.read_layout(results)
    assert len(byte_ranges(results, layout.start, layout.end, submission_scan.BOUNDARY)) > 10
    reference = read_submission_stream(results, tokens)
    assert np.isnan(reference.velocity).any()
    for workers in (1, 2):
        assert_same_boxes(_fast(results, tokens, workers), reference)


def test_evaluation_does_not_depend_on_the_workers(mini, monkeypatch):
    """Filtering in the workers, by class, over many ranges: the metrics of the stream reader's boxes."""
    root, tokens, results = mini
    monkeypatch.setattr(worker_pool, "RANGE_BYTES", 8192)
    outcomes = []
    for workers in (1, 2):
        evaluator = FastDetectionEval(root, "v1.0-mini", "mini_val", workers=workers)
        outcomes.append(evaluator.evaluate_file(results))
    outcomes.append(evaluator.evaluate_predictions(read_submission_stream(results, tokens)))
    for other in outcomes[1:]:
        for result in (other, outcomes[0]):
            result.summary.pop("eval_time", None)
        assert json.dumps(to_jsonable(other.summary)) == json.dumps(to_jsonable(outcomes[0].summary))
        assert json.dumps(other.details()) == json.dumps(outcomes[0].details())
    assert 0.05 < outcomes[0].summary["mean_ap"] < 0.95
    assert {"sub_decode", "sub_validate", "pred_filter", "match", "accumulate"} <= set(outcomes[0].timings)


def test_first_problem_in_file_order_across_ranges(mini, tmp_path, monkeypatch):
    """An invalid box, a repeated sample, an unknown sample: whichever comes first in the file is
    raised, in any number of ranges and workers, as by the stream reader."""
    _, tokens, results = mini
    monkeypatch.setattr(worker_pool, "RANGE_BYTES", 4096)
    submission = json.loads(results.read_text())
    samples = list(submission["results"].items())
    bad_box = dict(samples[20][1][0], size=[1.0, 0.0, 1.0]) if samples[20][1] else None
    assert bad_box is not None

    def write(items) -> Path:
        members = ", ".join(f"{json.dumps(t)}: {json.dumps(b)}" for t, b in items)
        path = tmp_path / "case.json"
        path.write_text('{"meta": ' + json.dumps(submission["meta"]) + ', "results": {' + members + "}}")
        return path

    with_bad = samples[:20] + [(samples[20][0], [bad_box] + samples[20][1][1:])] + samples[21:]
    cases = {
        "bad box, then repeated sample": (with_bad + [samples[3]], "field 'size' must be > 0"),
        "repeated sample, then bad box": (with_bad[:10] + [samples[3]] + with_bad[10:], "listed twice"),
        "bad box, then unknown sample": (with_bad + [("f" * 32, [])], "field 'size' must be > 0"),
        "unknown sample": (samples + [("f" * 32, [])], "not in the evaluated split"),
    }
    for name, (items, message) in cases.items():
        path = write(items)
        with pytest.raises(SubmissionError) as stream:
            read_submission_stream(path, tokens)
        for workers in (1, 2):
            with pytest.raises(SubmissionError) as fast:
                read_submission(path, tokens, workers=workers)
            assert str(fast.value) == str(stream.value), name
        assert message in str(stream.value), name


def test_worker_tasks_come_back_in_order_and_errors_reach_the_caller():
    assert list(run_tasks(operator.add, 10, list(range(40)), workers=2)) == [10 + i for i in range(40)]
    with pytest.raises(ZeroDivisionError):
        list(run_tasks(operator.truediv, 1.0, [1.0, 2.0, 0.0, 4.0, 5.0, 6.0], workers=2))
    # the results still in flight were collected: the next run gets its own
    assert list(run_tasks(operator.mul, 3, list(range(9)), workers=2)) == [3 * i for i in range(9)]


def _assert_same_ground_truth(a, b) -> None:
    assert a.sample_tokens == b.sample_tokens
    assert a.ego_translation.tobytes() == b.ego_translation.tobytes()
    for columns_a, columns_b in ((a.boxes, b.boxes), (a.racks, b.racks)):
        for name, value in vars(columns_a).items():
            assert value.tobytes() == getattr(columns_b, name).tobytes(), name


def test_ground_truth_in_ranges_by_workers_is_the_same(mini, tmp_path, monkeypatch):
    """sample_annotation.json cut into many ranges, decoded by worker processes: the same GT as one
    range (which tests/test_fast_eval.py checks against the devkit's load_gt); a table that cannot be
    cut at record boundaries (a '}, {' in every record's strings) is read whole, with the same GT."""
    root = mini[0]
    reference = load_ground_truth(root, "v1.0-mini", "mini_val", workers=1)
    assert len(reference.boxes) > 300 and len(reference.racks.sample_index) > 0
    monkeypatch.setattr(worker_pool, "RANGE_BYTES", 4096)
    for n_workers in (1, 2):
        _assert_same_ground_truth(load_ground_truth(root, "v1.0-mini", "mini_val", workers=n_workers), reference)
    odd = tmp_path / "odd"
    shutil.copytree(root / "v1.0-mini", odd / "v1.0-mini")
    table = odd / "v1.0-mini" / "sample_annotation.json"
    table.write_text(json.dumps([dict(record, note="}, {") for record in json.loads(table.read_text())]))
    context = _annotation_context(odd)
    assert any(part is None for part in run_tasks(
        annotation_range, context, byte_ranges(table, 1, table.stat().st_size - 1, _RECORD_BOUNDARY), 2))
    _assert_same_ground_truth(load_ground_truth(odd, "v1.0-mini", "mini_val", workers=2), reference)


def _annotation_context(root: Path):
    from bevperc.evaluation import ground_truth

    table_dir = root / "v1.0-mini"
    samples = ground_truth._SplitSamples.read(table_dir, "mini_val")
    return ground_truth._AnnotationContext(
        path=str(table_dir / "sample_annotation.json"), table_row=samples.table_row, split_index=samples.split_index,
        kinds=ground_truth._instance_kinds(table_dir), attribute_index={})


def _string_and_compact_links(links: dict[str, list[str]]):
    from bevperc.evaluation.ground_truth import TokenLinks

    compact = TokenLinks.compact(links)
    assert compact is not None
    return links, compact


@pytest.mark.parametrize("weak_hash", [False, True])
def test_token_links_find_the_rows_a_dict_finds(monkeypatch, weak_hash):
    """prev/next rows from sorted hashes (TokenLinks) = from a dict of tokens: repeated tokens (the
    last row wins), empty links, tokens sharing a hash (a one-byte hash: every candidate compared)."""
    from bevperc.evaluation import ground_truth

    if weak_hash:
        monkeypatch.setattr(ground_truth.TokenLinks, "_keys",
                            staticmethod(lambda tokens: tokens[:, 0].astype(np.uint64)))
    rng = np.random.default_rng(3)
    tokens = [f"{x:032x}" for x in rng.integers(0, 2 ** 62, size=300)]
    tokens[10] = tokens[20] = tokens[250]  # repeated: the dict keeps the last
    pool = tokens + [""] * 60
    links = {"token": tokens, "prev": [pool[i] for i in rng.integers(0, len(pool), 300)],
             "next": [pool[i] for i in rng.integers(0, len(pool), 300)]}
    strings, compact = _string_and_compact_links(links)
    for name in ("prev", "next"):
        assert compact.rows(name).tolist() == ground_truth._link_rows(strings, name).tolist()
    joined = ground_truth.TokenLinks.join([ground_truth.TokenLinks.compact({k: v[:100] for k, v in links.items()}),
                                           ground_truth.TokenLinks.compact({k: v[100:] for k, v in links.items()})])
    assert joined.rows("prev").tolist() == compact.rows("prev").tolist()
    mixed = ground_truth.TokenLinks.join([compact, {"token": ["x"], "prev": [""], "next": [tokens[0]]}])
    assert isinstance(mixed, dict) and mixed["token"] == tokens + ["x"] and mixed["prev"] == links["prev"] + [""]


def test_token_links_unknown_neighbour_and_other_tokens():
    """An unknown prev/next: the same error from both joins; tokens of several lengths, non-ASCII or
    with NUL: the dict of strings."""
    from bevperc.evaluation import ground_truth

    links = {"token": ["a" * 32, "b" * 32, "c" * 32], "prev": ["", "a" * 32, "d" * 32], "next": ["b" * 32, "", ""]}
    translation, timestamps = np.zeros((3, 3)), np.arange(3) * 500_000
    messages = []
    for form in _string_and_compact_links(links):
        with pytest.raises(ValueError) as error:
            ground_truth._box_velocity(form, translation, timestamps, Path("sample_annotation.json"))
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert f"annotation {'d' * 32!r} (the prev of GT annotation {'c' * 32!r}" in messages[0]
    for tokens in (["a" * 32, "b" * 31], ["a" * 31 + "é", "b" * 32], ["a" * 31 + "\x00", "b" * 32], ["", "b"]):
        assert ground_truth.TokenLinks.compact({"token": tokens, "prev": ["", ""], "next": ["", ""]}) is None


def test_reused_buffer_keeps_its_memory_unless_viewed():
    from bevperc.evaluation.columns import reused_buffer

    first = reused_buffer("test", 1000)
    first[:] = b"x" * 1000
    assert len(first) == 1000 and reused_buffer("test", 900) is first and len(first) == 900
    assert reused_buffer("test", 1100) is first and len(first) == 1100
    view = memoryview(first)
    other = reused_buffer("test", 500)  # a view is alive: a new buffer
    assert other is not first and len(other) == 500 and len(view) == 1100
