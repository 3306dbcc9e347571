"""Extreme but valid numbers in a results file: the fast evaluator reads them as the devkit does.

Each case writes a submission file and scores it with both evaluators through
``bevperc.evaluation.evaluate_submission`` (the fast evaluator streams the file; the devkit's
``DetectionEval`` reads it with the json module after bevperc's validation):

* a finite velocity equal to the streaming reader's NaN stand-in (-1.2345678901234567e+308) is a
  number, not NaN;
* quaternions scaled by 1e-160 (their squared norm is subnormal) give the yaw of the unit quaternion;
  scaled by 1e160 (squared norm overflows) they are scored as the devkit scores them: pyquaternion
  divides by the infinite norm, so the quaternion becomes 0 and its yaw 0;
* ``num_pts`` beyond 64 bits is a submission error, not an ``OverflowError``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bevperc.evaluation import evaluate_submission
from bevperc.evaluation.submission import SubmissionError, read_submission

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tables-only v1.0-mini root (mini_val, 8 samples) and a valid submission dict for it."""
    spec = importlib.util.spec_from_file_location("bench_eval", REPO / "bench" / "eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root = tmp_path_factory.mktemp("values")
    tokens = bench.write_synthetic_nuscenes(root, "v1.0-mini", "mini_val", samples_per_scene=4, gt_per_sample=10,
                                            seed=7)
    bench.write_synthetic_submission(root, "v1.0-mini", tokens, root / "results.json", preds_per_sample=15, seed=8)
    return root, tokens, json.loads((root / "results.json").read_text())


def _with_boxes(submission: dict, change) -> dict:
    changed = copy.deepcopy(submission)
    for boxes in changed["results"].values():
        for box in boxes:
            change(box)
    return changed


def _scores(world, submission: dict, tmp_path: Path, name: str) -> dict[str, dict]:
    root = world[0]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(submission))
    return {evaluator: evaluate_submission(path, root, "v1.0-mini", "mini_val",
                                           out_dir=tmp_path / f"{name}_{evaluator}", evaluator=evaluator)
            for evaluator in ("fast", "devkit")}


def _assert_same_metrics(fast: dict, devkit: dict) -> None:
    assert fast["nd_score"] == pytest.approx(devkit["nd_score"], abs=1e-12)
    assert fast["mean_ap"] == pytest.approx(devkit["mean_ap"], abs=1e-12)
    for metric, value in devkit["tp_errors"].items():
        other = fast["tp_errors"][metric]
        assert other == value or abs(other - value) <= 1e-9, (metric, other, value)


def test_a_finite_velocity_equal_to_the_nan_stand_in_is_a_number(world, tmp_path):
    sentinel = -1.2345678901234567e+308
    submission = _with_boxes(world[2], lambda box: box.__setitem__("velocity", [sentinel, 0.0]))
    path = tmp_path / "sentinel.json"
    path.write_text(json.dumps(submission))
    assert np.all(read_submission(path, world[1]).velocity[:, 0] == sentinel)
    scores = _scores(world, submission, tmp_path, "sentinel")
    assert math.isinf(scores["devkit"]["tp_errors"]["vel_err"])  # the devkit: a huge, finite velocity error
    _assert_same_metrics(scores["fast"], scores["devkit"])


def test_a_nan_velocity_next_to_the_stand_in_value_stays_nan(world, tmp_path):
    """NaN (allowed) and the stand-in number in one sample: each keeps its meaning."""
    submission = copy.deepcopy(world[2])
    token = next(t for t, boxes in submission["results"].items() if len(boxes) >= 2)
    submission["results"][token][0]["velocity"] = [float("nan"), float("nan")]
    submission["results"][token][1]["velocity"] = [-1.2345678901234567e+308, 1.0]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(submission))
    read = read_submission(path, world[1])
    first = read.sample_tokens.index(token)
    rows = np.flatnonzero(read.sample_index == first)
    assert np.isnan(read.velocity[rows[0]]).all()
    assert read.velocity[rows[1]].tolist() == [-1.2345678901234567e+308, 1.0]


def test_tiny_quaternions_give_the_unit_quaternion_yaw(world, tmp_path):
    tiny = _with_boxes(world[2], lambda box: box.__setitem__("rotation", [v * 1e-160 for v in box["rotation"]]))
    scores = _scores(world, tiny, tmp_path, "tiny")
    plain = _scores(world, world[2], tmp_path, "plain")
    _assert_same_metrics(scores["fast"], scores["devkit"])
    assert scores["fast"]["tp_errors"]["orient_err"] == pytest.approx(plain["fast"]["tp_errors"]["orient_err"],
                                                                      abs=1e-12)


def test_quaternions_whose_norm_overflows_have_yaw_0_as_in_the_devkit(world, tmp_path):
    """#16 item 10 made these a submission error; #17 scores them as the devkit does, and the merge keeps
    #17: the devkit itself accepts them (no check on the norm) and its normalisation (pyquaternion:
    q / sqrt(q . q) = q / inf = 0) gives yaw 0, so rejecting them would disagree with the reference."""
    from nuscenes.eval.common.utils import quaternion_yaw
    from pyquaternion import Quaternion

    huge = _with_boxes(world[2], lambda box: box.__setitem__("rotation", [v * 1e160 for v in box["rotation"]]))
    assert all(quaternion_yaw(Quaternion(box["rotation"])) == 0.0 for boxes in huge["results"].values()
               for box in boxes)
    scores = _scores(world, huge, tmp_path, "huge")
    _assert_same_metrics(scores["fast"], scores["devkit"])
    yaw_0 = _with_boxes(world[2], lambda box: box.__setitem__("rotation", [1.0, 0.0, 0.0, 0.0]))
    unit = _scores(world, yaw_0, tmp_path, "yaw_0")
    for evaluator in ("fast", "devkit"):
        assert scores[evaluator]["tp_errors"]["orient_err"] == pytest.approx(
            unit[evaluator]["tp_errors"]["orient_err"], abs=1e-12)


@pytest.mark.parametrize("value", [10 ** 20, -(10 ** 19), 2 ** 63])
def test_num_pts_beyond_64_bits_is_a_submission_error(world, tmp_path, value):
    submission = copy.deepcopy(world[2])
    token = next(t for t, boxes in submission["results"].items() if boxes)
    submission["results"][token][0]["num_pts"] = value
    path = tmp_path / "num_pts.json"
    path.write_text(json.dumps(submission))
    for use_msgspec in (True, False):
        with pytest.raises(SubmissionError, match=rf"results\['{token}'\]\[0\]: optional field 'num_pts' must be "
                                                  r"an integer in \[-2\*\*63, 2\*\*63\)"):
            read_submission(path, world[1], use_msgspec=use_msgspec)
