"""bench/task_weighting.py (issue 15): every method is a valid run config; task metrics, gaps and the table."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import task_weighting as tw  # noqa: E402

from bevperc.config import load_run_config  # noqa: E402
from bevperc.losses.config import LossEngineConfig  # noqa: E402
from bevperc.models.detector import default_task_weights, task_names  # noqa: E402

CONFIG = str(ROOT / "configs" / "demo_cpu.yaml")


@pytest.mark.parametrize("method", tw.METHODS)
def test_every_method_is_a_valid_config_of_its_kind(method):
    names = task_names(load_run_config(CONFIG).model)
    cfg = load_run_config(CONFIG, tw.method_overrides(method, names))
    if method == "fixed":  # the plain weighted sum with CenterPoint / BEVDepth weights (train.build_loss_engine)
        assert not cfg.loss.enabled and not cfg.loss.fixed_weights
        assert default_task_weights(cfg.model)["depth"] == 3.0
    elif method == "equal":
        assert not cfg.loss.enabled and cfg.loss.fixed_weights == dict.fromkeys(names, 1.0)
    elif method == "default":  # the engine's defaults, not the config's loss section
        defaults = LossEngineConfig()
        assert cfg.loss.enabled and all(getattr(cfg.loss, f) == getattr(defaults, f) for f in tw.METHOD_FIELDS)
        assert cfg.loss.condition == "lag" and cfg.loss.warmup_steps == load_run_config(CONFIG).loss.warmup_steps
    elif method == "window":  # the default before session 27: affinity of the last window, lag reset at regroupings
        expected = dataclasses.replace(LossEngineConfig(), lag_reference="grouping", affinity_memory="window")
        assert cfg.loss.enabled and all(getattr(cfg.loss, f) == getattr(expected, f) for f in tw.METHOD_FIELDS)
    elif method in tw.VARIANTS:  # the default with the per-task lag (+ a longer gate)
        expected = dataclasses.replace(LossEngineConfig(), first_weighting="fixed_lag", first_weight_temperature=1.0)
        if method == "tasklag_long":
            expected = dataclasses.replace(expected, progress_windows=30)
        assert cfg.loss.enabled and all(getattr(cfg.loss, f) == getattr(expected, f)
                                        for f in (*tw.METHOD_FIELDS, "progress_windows"))
    elif method == "normalised":
        assert (cfg.loss.first_weighting, cfg.loss.lag_temperature, cfg.loss.lag_reference) == ("normalise", 0.33, "initial")
    else:  # the anchors as published: one set per task, raw losses, every step
        assert cfg.loss.condition == method and cfg.loss.grouping == "per_task" and cfg.loss.condition_every == 1
    with pytest.raises(ValueError, match="unknown method"):
        tw.method_overrides("best", names)


def summary(ap: dict[str, float], errors: dict[str, dict[str, float]], mean_ap: float = 0.2, nds: float = 0.3) -> dict:
    return {"mean_ap": mean_ap, "nd_score": nds, "mean_dist_aps": ap,
            "label_tp_errors": {c: {tw.TP_ERROR_KEYS[m]: v for m, v in e.items()} for c, e in errors.items()}}


def test_task_metrics_average_each_group_where_the_devkit_defines_the_error():
    ap = {"car": 0.4, "truck": 0.2, "traffic_cone": 0.3, "barrier": 0.1}
    errors = {"car": {"ATE": 0.5, "ASE": 0.2, "AOE": 0.8, "AVE": 3.0},
              "truck": {"ATE": 0.7, "ASE": 0.4, "AOE": 1.0, "AVE": 1.0},
              "traffic_cone": {"ATE": 0.6, "ASE": 0.3, "AOE": math.nan, "AVE": math.nan},
              "barrier": {"ATE": 0.8, "ASE": 0.5, "AOE": 0.2, "AVE": math.nan}}
    tasks = tw.task_metrics(summary(ap, errors), [["car", "truck"], ["traffic_cone", "barrier"]])
    assert tasks["car+truck.AP"] == pytest.approx(0.3) and tasks["car+truck.AVE"] == pytest.approx(2.0)
    assert tasks["traffic_cone+barrier.AOE"] == pytest.approx(0.2)  # the cone's NaN left out
    assert "traffic_cone+barrier.AVE" not in tasks  # undefined for every class of the group


def test_gaps_worst_task_and_paired_differences():
    def run(method, seed, ap, aoe, nds):
        return {"method": method, "seed": seed, "mAP": ap, "NDS": nds, "tasks": {"g.AP": ap, "g.AOE": aoe}}

    runs = [run("default", 0, 0.40, 1.0, 0.30), run("fixed", 0, 0.50, 2.0, 0.31),
            run("default", 1, 0.30, 1.5, 0.28), run("fixed", 1, 0.30, 1.0, 0.29),
            run("famo", 1, 0.10, 1.0, 0.20)]  # seed 1 only: not every method ran seed 0
    gaps = tw.relative_gaps([r for r in runs if r["seed"] == 0])
    assert gaps["default", 0] == {"g.AP": pytest.approx(0.2), "g.AOE": 0.0}
    assert gaps["fixed", 0] == {"g.AP": 0.0, "g.AOE": pytest.approx(1.0)}
    rows = {row["method"]: row for row in tw.summarise(runs)}
    assert rows["default"]["seeds"] == [1] and rows["famo"]["seeds"] == [1]  # seed 0 lacks famo
    assert rows["default"]["worst_gap"] == pytest.approx(0.5) and rows["default"]["worst_task"] == ["g.AOE"]
    assert rows["famo"]["worst_gap"] == pytest.approx(2 / 3) and rows["famo"]["delta_mAP"] == pytest.approx(-0.2)
    two = {row["method"]: row for row in tw.summarise([r for r in runs if r["method"] != "famo"], reference="fixed")}
    assert two["default"]["seeds"] == [0, 1] and "delta_mAP" not in two["fixed"]  # without famo both seeds count
    assert two["default"]["delta_mAP"] == pytest.approx(-0.05) and two["default"]["delta_NDS"] == pytest.approx(-0.01)


def test_worst_learnable_gap_leaves_the_velocity_out():
    runs = [{"method": "default", "seed": 0, "mAP": 0.4, "NDS": 0.3, "tasks": {"g.AP": 0.4, "g.AVE": 3.0}},
            {"method": "fixed", "seed": 0, "mAP": 0.5, "NDS": 0.3, "tasks": {"g.AP": 0.5, "g.AVE": 1.0}}]
    rows = {row["method"]: row for row in tw.summarise(runs, reference="fixed")}
    assert rows["default"]["worst_gap"] == pytest.approx(2.0) and rows["default"]["worst_task"] == ["g.AVE"]
    assert rows["default"]["worst_learnable_gap"] == pytest.approx(0.2)  # the AP gap: AVE is not learnable
    assert rows["default"]["delta_worst_learnable_gap"] == pytest.approx(0.2)


def test_reuse_keeps_the_recorded_runs_of_the_same_config_and_overrides(tmp_path, capsys):
    def overrides_of(method):
        return ["data.dataroot=world", *tw.method_overrides(method, ["heatmap"])]

    runs = [{"method": "fixed", "seed": 0, "overrides": overrides_of("fixed")},
            {"method": "default", "seed": 0, "overrides": overrides_of("default")},
            {"method": "default", "seed": 1, "overrides": ["data.dataroot=elsewhere", *tw.method_overrides("default", [])]}]
    path = tmp_path / "bev_task_weighting.json"
    path.write_text(tw.json.dumps({"config": CONFIG, "runs": runs}))
    assert sorted(tw.recorded_runs(path, CONFIG, overrides_of)) == [("default", 0), ("fixed", 0)]
    assert "not reused (other overrides): default seed 1" in capsys.readouterr().out
    assert tw.recorded_runs(path, "configs/other.yaml", overrides_of) == {}
    assert tw.recorded_runs(tmp_path / "missing.json", CONFIG, overrides_of) == {}


def test_table_prints_the_recorded_runs_and_trains_nothing(tmp_path, capsys):
    """``--table``: the seeds asked for that are not in the file are left out, not trained."""
    names = task_names(load_run_config(CONFIG).model)
    tasks = {"car+truck+bus+trailer+construction_vehicle.AP": 0.2}

    def run(method, seed, mean_ap):
        return {"method": method, "seed": seed, "mAP": mean_ap, "NDS": 0.25, "tasks": tasks,
                "overrides": ["data.dataroot=world", *tw.method_overrides(method, names)]}

    path = tmp_path / "results.json"
    runs = [run("fixed", 0, 0.20), run("window", 0, 0.23), run("fixed", 1, 0.21), run("window", 1, 0.22)]
    path.write_text(tw.json.dumps({"config": CONFIG, "runs": runs}))
    argv = ["--config", CONFIG, "--out", str(tmp_path / "work"), "--json", str(path), "--methods", "fixed", "window",
            "--seeds", "0", "1", "2", "--reference", "fixed", "--table", "--", "data.dataroot=world"]
    assert tw.main(argv) == 0
    out = capsys.readouterr().out
    assert "| window | 2 | 0.2250 |" in out and "+0.0200 ± 0.0100" in out  # paired over seeds 0 and 1
    assert not (tmp_path / "work").exists() and tw.json.loads(path.read_text())["runs"] == runs
