"""Kill-and-resume equivalence, atomic checkpoints, restored loss-engine-like state.

The toy training of tests/helpers/toy_train.py (conv net with BatchNorm + dropout, EMA,
validation, learned task weights, a running-mean loss normaliser, flip+noise augmentation
from per-sample generators) runs in subprocesses:

* a reference run goes uninterrupted (18 iterations, 3 epochs of 6);
* two runs (0 and 2 DataLoader workers) hang after iteration 10, where the newest
  checkpoint is from iteration 8 (mid-epoch 2), and are SIGKILLed, then resumed with
  ``--resume``; their final checkpoints must equal the reference's bit for bit (weights,
  optimizer, EMA, loss-engine state, RNG states, per-iteration loss history);
* one run has its file-size limit lowered after iteration 9 so the next checkpoint write
  fails in the kernel (EFBIG): latest.pth must stay the iteration-8 one, intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bevperc.training.checkpoint import load_checkpoint
from bevperc.training.logging import close_logger
from helpers.toy_train import assert_same, build_trainer, parse_args

REPO = Path(__file__).resolve().parents[1]
TOY_TRAIN = REPO / "tests" / "helpers" / "toy_train.py"
COMMON = ["--ema", "--validate", "--dropout", "0.2", "--checkpoint-every", "4", "--keep", "2", "--no-tensorboard"]
STALL_STEP = 10       # the killed runs hang after this iteration ...
CHECKPOINT_STEP = 8   # ... when the newest checkpoint is this one (epoch 2, iteration 2 of 6)
TIMEOUT_S = 240


def launch(work_dir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    log = open(work_dir.with_suffix(".log"), "ab")
    return subprocess.Popen([sys.executable, str(TOY_TRAIN), "--work-dir", str(work_dir), *COMMON, *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_for(proc: subprocess.Popen, work_dir: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"toy training in {work_dir} did not finish in {TIMEOUT_S}s; log:\n{log_text(work_dir)}")


def log_text(work_dir: Path) -> str:
    path = work_dir.with_suffix(".log")
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run everything once, in parallel where possible (2 rounds of subprocesses)."""
    root = tmp_path_factory.mktemp("resume")
    dirs = {name: root / name for name in ("reference", "killed_w0", "killed_w2", "failed_write")}
    procs = {
        "reference": launch(dirs["reference"]),
        "killed_w0": launch(dirs["killed_w0"], "--stall-after-step", str(STALL_STEP)),
        "killed_w2": launch(dirs["killed_w2"], "--num-workers", "2", "--stall-after-step", str(STALL_STEP)),
        "failed_write": launch(dirs["failed_write"], "--fail-writes-after-step", "9"),
    }
    before_resume = {}
    for name in ("killed_w0", "killed_w2"):
        marker = dirs[name] / "stalled"
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():
            if procs[name].poll() is not None or time.monotonic() > deadline:
                procs[name].kill()
                pytest.fail(f"{name} never reached iteration {STALL_STEP}; log:\n{log_text(dirs[name])}")
            time.sleep(0.1)
        os.kill(procs[name].pid, signal.SIGKILL)  # a real kill: no handlers, no cleanup
        assert procs[name].wait(timeout=60) == -signal.SIGKILL
        before_resume[name] = load_checkpoint(dirs[name] / "checkpoints" / "latest.pth")["progress"]
    resumes = {name: launch(dirs[name], "--resume", *(["--num-workers", "2"] if name == "killed_w2" else []))
               for name in ("killed_w0", "killed_w2")}
    codes = {"reference": wait_for(procs["reference"], dirs["reference"]),
             "failed_write": wait_for(procs["failed_write"], dirs["failed_write"]),
             **{name: wait_for(proc, dirs[name]) for name, proc in resumes.items()}}
    return {"dirs": dirs, "codes": codes, "before_resume": before_resume}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["killed_w0", "killed_w2"])
def test_killed_run_resumes_to_the_same_result_bit_for_bit(runs, name):
    dirs, codes = runs["dirs"], runs["codes"]
    assert codes["reference"] == 0, log_text(dirs["reference"])
    assert codes[name] == 0, log_text(dirs[name])
    # The kill came after iteration 10 while the newest checkpoint was mid-epoch at iteration 8.
    progress = dict(runs["before_resume"][name])
    assert progress.pop("train_seconds") > 0
    assert progress == {"epoch": 1, "iteration_in_epoch": 2, "global_step": CHECKPOINT_STEP, "skipped_steps": 0,
                        "amp_overflow_steps": 0}
    assert f"at epoch 2, iteration 2 (step {CHECKPOINT_STEP})" in log_text(dirs[name])

    reference = load_checkpoint(dirs["reference"] / "checkpoints" / "latest.pth")
    resumed = load_checkpoint(dirs[name] / "checkpoints" / "latest.pth")
    assert reference["progress"]["global_step"] == 18
    if name == "killed_w2":  # the worker count is not part of the result
        assert resumed["config"].pop("num_workers") == 2
        reference["config"].pop("num_workers")
    assert_same(reference, resumed)
    assert len(resumed["history"]["loss"]) == 18 and len(resumed["history"]["val"]) == 3
    assert resumed["extra"]["normaliser"]["count"] == 18


@pytest.mark.slow
def test_failed_checkpoint_write_leaves_previous_latest_intact(runs):
    work_dir = runs["dirs"]["failed_write"]
    assert runs["codes"]["failed_write"] != 0
    log = log_text(work_dir)
    assert "writing the checkpoint at step 12 failed" in log, log
    folder = work_dir / "checkpoints"
    assert not list(folder.glob(".*.tmp")), "a failed write left a temporary file behind"
    latest = load_checkpoint(folder / "latest.pth")
    assert latest["progress"]["global_step"] == CHECKPOINT_STEP
    assert_same(latest, load_checkpoint(folder / f"iter_{CHECKPOINT_STEP:08d}.pth"))
    assert sorted(p.name for p in folder.iterdir()) == ["iter_00000006.pth", "iter_00000008.pth", "latest.pth"]


# ----------------------------------------------------------------------------- in-process resume

class SimulatedCrash(RuntimeError):
    pass


def _crash_at(step: int):
    def hook(current: int) -> None:
        if current == step:
            raise SimulatedCrash(f"crash after step {step}")
    return hook


def _args(work_dir: Path, *extra: str):
    return parse_args(["--work-dir", str(work_dir), "--no-tensorboard", "--epochs", "2", "--dropout", "0.2",
                       "--checkpoint-every", "4", *extra])


def test_resume_restores_the_loss_engine_state(tmp_path, one_thread):
    """A running-mean normaliser (plain object with state_dict) is restored, and it matters."""
    try:
        reference, reference_normaliser, _ = build_trainer(_args(tmp_path / "reference"))
        reference.fit()

        crashed, _, _ = build_trainer(_args(tmp_path / "crashed"))
        crashed.after_step.append(_crash_at(10))
        with pytest.raises(SimulatedCrash):
            crashed.fit()

        resumed, normaliser, task_weights = build_trainer(_args(tmp_path / "crashed"))
        assert normaliser.count == 0 and torch.equal(normaliser.mean, torch.ones(2, dtype=torch.float64))
        saved = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "latest.pth")
        resumed.resume_from_latest()
        assert normaliser.count == 8 and torch.equal(normaliser.mean, saved["extra"]["normaliser"]["mean"])
        assert torch.equal(task_weights.log_vars.detach(), saved["extra"]["task_weights"]["log_vars"])
        resumed.fit(resume=True)
        assert normaliser.count == reference_normaliser.count == 12
        assert torch.equal(normaliser.mean, reference_normaliser.mean)
        assert_same(reference.model.state_dict(), resumed.model.state_dict(), "model")

        # Control: resuming without restoring the normaliser gives a different model.
        forgetful, _, task_weights = build_trainer(_args(tmp_path / "crashed"))
        forgetful.extra_state.pop("normaliser")
        forgetful.load_state_dict(saved, source="iteration-8 checkpoint")
        forgetful.fit()
        assert not torch.equal(reference.model.regression.weight, forgetful.model.regression.weight)
    finally:
        close_logger()


def test_resume_with_no_checkpoint_starts_from_scratch(tmp_path, one_thread):
    try:
        trainer, _, _ = build_trainer(_args(tmp_path, "--epochs", "1", "--samples", "16"))
        history = trainer.fit(resume=True)
        assert len(history["loss"]) == 2
        assert (tmp_path / "checkpoints" / "latest.pth").exists()
        assert "has no checkpoint: starting from scratch" in (tmp_path / "train.log").read_text()
    finally:
        close_logger()


def test_resume_refuses_a_different_global_batch(tmp_path, one_thread):
    try:
        first, _, _ = build_trainer(_args(tmp_path, "--epochs", "1", "--samples", "16"))
        first.fit()
        second, _, _ = build_trainer(_args(tmp_path, "--epochs", "1", "--samples", "16", "--batch-size", "4"))
        with pytest.raises(RuntimeError, match=r"global batch 8x1; this run has 16 samples and 4x1"):
            second.fit(resume=True)
    finally:
        close_logger()
