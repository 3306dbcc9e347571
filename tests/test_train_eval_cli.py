"""The commands users type, end to end on the synthetic world: train, resume, evaluate, figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bevperc.viz.demo import NuScenesWorld
from helpers.tiny_runs import TINY

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_train_resume_eval_figures(synthetic_root, synthetic_infos, tmp_path):
    work = tmp_path / "run"
    overrides = [*NuScenesWorld(synthetic_root).overrides(), *TINY]
    # with in-training validation by the fast evaluator after the epoch
    run(["-m", "bevperc.train", "--config", "configs/demo_cpu.yaml", "--work-dir", str(work), "train.val_every=1", *overrides])
    val = json.loads((work / "val" / "epoch_001" / "metrics_summary.json").read_text())
    assert 0.0 <= val["nd_score"] <= 1.0
    assert "validation after epoch 1: mAP" in (work / "train.log").read_text()
    latest = work / "checkpoints" / "latest.pth"
    state = torch.load(latest, weights_only=True)
    steps = state["progress"]["global_step"]
    assert steps == 12  # 24 mini_train samples / batch 2, one epoch
    engine = json.loads((work / "loss_engine.json").read_text())
    tasks = [t for group in engine["task_sets"] for t in group]
    assert len(engine["task_sets"]) >= 2 and "pedestrian.heatmap" in tasks  # task sets found and saved
    assert (work / "config.yaml").is_file() and (work / "train.log").is_file()
    assert any((work / "tensorboard").iterdir())

    # resuming a finished run is a no-op that leaves the weights alone
    run(["-m", "bevperc.train", "--config", "configs/demo_cpu.yaml", "--work-dir", str(work), "--resume", "--no-validate", *overrides])
    again = torch.load(latest, weights_only=True)
    assert again["progress"]["global_step"] == steps
    for name, value in state["model"].items():
        assert torch.equal(value, again["model"][name]), name

    out = tmp_path / "eval"
    result = run(["-m", "bevperc.eval", "--config", "configs/demo_cpu.yaml", "--checkpoint", str(latest),
                  "--evaluator", "devkit", "--out", str(out), "--figures", "1", *overrides])
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert 0.0 <= summary["mean_ap"] <= 1.0 and "nd_score" in summary
    assert "NDS" in result.stdout
    submission = json.loads((out / "results_mini_val.json").read_text())
    infos = json.loads(Path(synthetic_infos["mini_val"]).read_text())
    assert set(submission["results"]) == {s["token"] for s in infos["samples"]}
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert any(name.startswith("worst_00_") for name in figures) and any(name.startswith("best_00_") for name in figures)


def test_train_rejects_unknown_config_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bevperc.train", "--config", "configs/demo_cpu.yaml", "--work-dir", str(tmp_path), "train.epochz=3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "unknown key(s) ['epochz']" in result.stderr and "'epochs'" in result.stderr
