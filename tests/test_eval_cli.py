"""Submission validation (clear errors) and the ``python -m bevperc.eval`` CLI with both evaluators."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bevperc import eval as eval_cli
from bevperc.evaluation.submission import (
    JsonStream,
    SubmissionError,
    read_submission,
    submission_from_dict,
    validate_submission,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mini(tmp_path_factory, eval_bench):
    bench = eval_bench
    root = tmp_path_factory.mktemp("nuscenes")
    tokens = bench.write_synthetic_nuscenes(root, "v1.0-mini", "mini_val", samples_per_scene=10, gt_per_sample=20,
                                            seed=7)
    results = root / "results.json"
    bench.write_synthetic_submission(root, "v1.0-mini", tokens, results, preds_per_sample=40, seed=8)
    submission = json.loads(results.read_text())
    return root, tokens, results, submission


def _first_box_sample(submission: dict) -> str:
    return next(t for t, boxes in submission["results"].items() if boxes)


# --------------------------------------------------------------------------- validation
def test_valid_submission_streamed_equals_in_memory(mini):
    _, tokens, results, submission = mini
    streamed = read_submission(results, tokens)
    in_memory = submission_from_dict(submission, tokens)
    json_module_only = read_submission(results, tokens, use_msgspec=False)
    for name in ("sample_index", "translation", "size", "rotation", "velocity", "class_index", "attribute_index",
                 "score", "num_pts"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(json_module_only, name))
    assert streamed.sample_tokens == list(submission["results"])
    assert len(streamed) == sum(len(b) for b in submission["results"].values())
    for name in ("sample_index", "translation", "size", "rotation", "velocity", "class_index", "attribute_index",
                 "score", "num_pts"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(in_memory, name))
    assert np.isnan(streamed.velocity).any()  # NaN velocities are allowed, as by the devkit
    assert streamed.meta == submission["meta"]


def test_json_stream_with_tiny_chunks_decodes_like_json_load(mini):
    results, submission = mini[2], mini[3]
    with JsonStream(results, chunk_chars=7) as stream:
        decoded = {}
        for key in stream.object_items():
            if key == "results":
                decoded[key] = {token: stream.value() for token in stream.object_items()}
            else:
                decoded[key] = stream.value()
        assert stream.at_end()
    assert json.dumps(decoded) == json.dumps(submission)


def _mutated(submission: dict, mutate) -> dict:
    bad = copy.deepcopy(submission)
    mutate(bad)
    return bad


def _set_box(field, value, index=0):
    def mutate(sub):
        token = _first_box_sample(sub)
        if value is KeyError:
            del sub["results"][token][index][field]
        else:
            sub["results"][token][index][field] = value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set_box("translation", [1.0, 2.0]), r"field 'translation' must be a list of 3 numbers"),
    (_set_box("translation", [1.0, 2.0, float("nan")]), r"field 'translation' must be finite"),
    (_set_box("translation", ["1", 2.0, 3.0]), r"field 'translation' must be a list of 3 numbers"),
    (_set_box("size", [1.0, 0.0, 2.0]), r"field 'size' must be > 0"),
    (_set_box("rotation", [0.0, 0.0, 0.0, 0.0]), r"'rotation' must be a quaternion"),
    (_set_box("rotation", [1.0, 0.0, 0.0]), r"field 'rotation' must be a list of 4 numbers"),
    (_set_box("velocity", [1.0, 2.0, 3.0]), r"field 'velocity' must be a list of 2 numbers"),
    (_set_box("velocity", [float("inf"), 0.0]), r"field 'velocity' must be finite or NaN"),
    (_set_box("detection_name", "cat"), r"field 'detection_name' is 'cat'; expected one of"),
    (_set_box("detection_score", 1.5), r"'detection_score' must be a number in \[0, 1\]"),
    (_set_box("detection_score", float("nan")), r"'detection_score' must be a number in \[0, 1\]"),
    (_set_box("detection_score", True), r"'detection_score' must be a number in \[0, 1\]"),
    (_set_box("sample_token", "elsewhere"), r"field 'sample_token' is 'elsewhere' but the box is listed under"),
    (_set_box("velocity", KeyError), r"missing field\(s\) \['velocity'\]"),
    (_set_box("num_pts", 1.5), r"optional field 'num_pts' must be an integer"),
])
def test_box_errors_name_sample_index_and_field(mini, mutate, message):
    tokens, submission = mini[1], mini[3]
    bad = _mutated(submission, mutate)
    token = _first_box_sample(bad)
    with pytest.raises(SubmissionError, match=message) as info:
        validate_submission(bad, tokens)
    assert f"results[{token!r}][0]" in str(info.value)


def test_attribute_must_fit_the_class(mini):
    tokens, submission = mini[1], mini[3]

    def set_first(name, attr):
        def mutate(sub):
            box = sub["results"][_first_box_sample(sub)][0]
            box["detection_name"], box["attribute_name"] = name, attr
        return mutate

    with pytest.raises(SubmissionError, match=r"'pedestrian.moving', not valid for class 'car'"):
        validate_submission(_mutated(submission, set_first("car", "pedestrian.moving")), tokens)
    with pytest.raises(SubmissionError, match=r"not valid for class 'barrier'; expected one of \[''\]"):
        validate_submission(_mutated(submission, set_first("barrier", "vehicle.moving")), tokens)
    empty_car = _mutated(submission, set_first("car", ""))
    with pytest.raises(SubmissionError, match=r"attribute_name' is '', not valid for class 'car'"):
        validate_submission(empty_car, tokens)
    validate_submission(empty_car, tokens, allow_empty_attribute=True)
    validate_submission(_mutated(submission, set_first("traffic_cone", "")), tokens)


def test_sample_set_box_count_and_meta_errors(mini):
    tokens, submission = mini[1], mini[3]
    missing = _mutated(submission, lambda s: s["results"].pop(tokens[3]))
    with pytest.raises(SubmissionError, match=r"1 of the 20 samples of the split are missing") as info:
        validate_submission(missing, tokens)
    assert tokens[3] in str(info.value)
    extra = _mutated(submission, lambda s: s["results"].__setitem__("not-a-sample", []))
    with pytest.raises(SubmissionError, match=r"not in the evaluated split, e.g. \['not-a-sample'\]"):
        validate_submission(extra, tokens)

    def too_many(sub):
        token = _first_box_sample(sub)
        sub["results"][token] = sub["results"][token][:1] * 501
    with pytest.raises(SubmissionError, match=r"501 boxes; at most 500 boxes per sample"):
        validate_submission(_mutated(submission, too_many), tokens)
    with pytest.raises(SubmissionError, match=r"no field 'meta'"):
        validate_submission(_mutated(submission, lambda s: s.pop("meta")), tokens)
    with pytest.raises(SubmissionError, match=r"meta: field 'use_lidar' must be true or false"):
        validate_submission(_mutated(submission, lambda s: s["meta"].__setitem__("use_lidar", "no")), tokens)
    with pytest.raises(SubmissionError, match=r"missing field 'use_map'"):
        validate_submission(_mutated(submission, lambda s: s["meta"].pop("use_map")), tokens)
    with pytest.raises(SubmissionError, match=r"no field 'results'"):
        validate_submission({"meta": submission["meta"]}, tokens)


def test_file_level_errors(mini, tmp_path):
    tokens, submission = mini[1], mini[3]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(submission)[:-40])
    with pytest.raises(SubmissionError, match=r"invalid JSON.*at character"):
        read_submission(path, tokens)
    text = json.dumps(submission)
    token = tokens[0]
    duplicated = text[:-2] + f', {json.dumps(token)}: []' + "}}"
    path.write_text(duplicated)
    with pytest.raises(SubmissionError, match=rf"sample '{token}' is listed twice"):
        read_submission(path, tokens)
    with pytest.raises(SubmissionError, match="does not exist"):
        read_submission(tmp_path / "nope.json", tokens)


# --------------------------------------------------------------------------- CLI
def _run_cli(args: list[str]) -> int:
    return eval_cli.main([str(a) for a in args])


def test_cli_fast_and_devkit_give_the_same_metrics(mini, tmp_path, capsys):
    root, _, results, _ = mini
    common = ["--results", results, "--dataroot", root, "--version", "v1.0-mini", "--split", "mini_val"]
    assert _run_cli(common + ["--evaluator", "fast", "--out", tmp_path / "fast"]) == 0
    assert "NDS:" in capsys.readouterr().out
    assert _run_cli(common + ["--evaluator", "devkit", "--out", tmp_path / "devkit"]) == 0
    fast = json.loads((tmp_path / "fast" / "metrics_summary.json").read_text())
    devkit = json.loads((tmp_path / "devkit" / "metrics_summary.json").read_text())
    assert set(fast) == set(devkit)
    for key in ("mean_ap", "nd_score"):
        assert abs(fast[key] - devkit[key]) <= 1e-9
    for name, aps in devkit["label_aps"].items():
        for th, ap in aps.items():
            assert abs(fast["label_aps"][name][th] - ap) <= 1e-9
    for name, tps in devkit["label_tp_errors"].items():
        for metric, value in tps.items():
            other = fast["label_tp_errors"][name][metric]
            assert (math.isnan(value) and math.isnan(other)) or abs(other - value) <= 1e-9
    assert (tmp_path / "fast" / "metrics_details.json").is_file()
    assert not list((tmp_path / "fast").glob(".*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.slow  # renders the devkit's 25 PDF plots
def test_cli_module_entry_point_and_render(mini, tmp_path):
    root, _, results, _ = mini
    proc = subprocess.run([sys.executable, "-m", "bevperc.eval", "--results", str(results), "--dataroot", str(root),
                           "--version", "v1.0-mini", "--split", "mini_val", "--evaluator", "fast", "--render-curves",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "| car |" in proc.stdout
    assert (tmp_path / "plots" / "summary.pdf").is_file()
    assert (tmp_path / "plots" / "car_pr.pdf").is_file()


def test_cli_reports_an_invalid_submission(mini, tmp_path, capsys):
    root, tokens, _, submission = mini
    bad = _mutated(submission, _set_box("size", [1.0, -1.0, 1.0]))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    for evaluator in ("fast", "devkit"):
        code = _run_cli(["--results", path, "--dataroot", root, "--version", "v1.0-mini", "--split", "mini_val",
                         "--evaluator", evaluator, "--out", tmp_path / evaluator])
        assert code == 2
        err = capsys.readouterr().err
        assert "field 'size' must be > 0" in err and _first_box_sample(bad) in err


def test_cli_argument_errors(mini, tmp_path):
    root, _, results, _ = mini
    with pytest.raises(SystemExit):
        _run_cli(["--results", results, "--config", "x.yaml", "--checkpoint", "c.pt", "--dataroot", root,
                  "--out", tmp_path])
    with pytest.raises(SystemExit):
        _run_cli(["--config", "x.yaml", "--dataroot", root, "--out", tmp_path])


@pytest.mark.slow  # imports the model stack (torch)
def test_cli_config_checkpoint_errors_are_clear(mini, tmp_path, capsys):
    """--config/--checkpoint go through bevperc.inference.predict_split; a missing file is a clear error."""
    root = mini[0]
    args = ["--checkpoint", tmp_path / "missing.pt", "--dataroot", root, "--version", "v1.0-mini",
            "--split", "mini_val", "--out", tmp_path]
    if importlib.util.find_spec("bevperc.inference") is None:
        with pytest.raises(SystemExit, match=r"bevperc.inference.predict_split"):
            _run_cli(["--config", REPO / "configs" / "demo_cpu.yaml"] + args)
        return
    assert _run_cli(["--config", tmp_path / "missing.yaml"] + args) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
    assert _run_cli(["--config", REPO / "configs" / "demo_cpu.yaml"] + args) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_evaluate_submission_api_both_evaluators(mini, tmp_path):
    """The in-training entry point: a submission dict, GT kept in memory between calls."""
    from bevperc.evaluation import _EVALUATORS, evaluate_submission

    root, _, _, submission = mini
    fast = evaluate_submission(submission, root, "v1.0-mini", "mini_val", out_dir=tmp_path / "fast")
    again = evaluate_submission(submission, root, "v1.0-mini", "mini_val")
    assert len([k for k in _EVALUATORS if k[0] == str(Path(root).resolve())]) == 1
    devkit = evaluate_submission(submission, root, "v1.0-mini", "mini_val", out_dir=tmp_path / "devkit",
                                 evaluator="devkit")
    assert fast["nd_score"] == again["nd_score"]
    assert abs(fast["nd_score"] - devkit["nd_score"]) <= 1e-9 and abs(fast["mean_ap"] - devkit["mean_ap"]) <= 1e-9
    assert (tmp_path / "fast" / "metrics_summary.json").is_file()
    assert (tmp_path / "devkit" / "results_mini_val.json").is_file()
