"""DDP (2 gloo processes on the CPU) under failure: kill and resume with the loss engine, orphaned workers.

* A 2-process torchrun run of the toy training with the real ``LossEngine`` (its per-sample loss
  buffer fills across the kill, and it regroups after it) hangs after iteration 10; its launcher
  is SIGKILLed, and its workers, stalled in a sleep where nothing but the watchdog can end them,
  must exit by themselves. Resumed from the iteration-8 checkpoint, the run's final checkpoint
  equals an uninterrupted 2-process run's bit for bit.
* Killing rank 0 of a job started without torchrun ends rank 1 within seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bevperc.training.checkpoint import load_checkpoint
from bevperc.training.distributed import process_alive
from helpers.toy_train import assert_same, child_pids

REPO = Path(__file__).resolve().parents[1]
TOY_TRAIN = REPO / "tests" / "helpers" / "toy_train.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
COMMON = ["--loss-engine", "--no-tensorboard", "--batch-size", "4", "--checkpoint-every", "4", "--keep", "2"]
TIMEOUT_S = 300


def _env() -> dict:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _launch(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env={**_env(), **env},
                            cwd=REPO, start_new_session=True)


def _wait_for_file(path: Path, procs: list[subprocess.Popen], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared; log:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)


def _wait(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"did not finish in {TIMEOUT_S}s; log:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.slow
def test_killed_launcher_ends_its_workers_and_ddp_resume_with_the_loss_engine_is_exact(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref_log, killed_log = tmp_path / "reference.log", tmp_path / "killed.log"
    ref = _launch([*TORCHRUN, str(TOY_TRAIN), "--work-dir", str(reference), *COMMON], ref_log)
    run = _launch([*TORCHRUN, str(TOY_TRAIN), "--work-dir", str(killed), *COMMON, "--stall-after-step", "10"],
                  killed_log)
    workers: list[int] = []
    try:
        _wait_for_file(killed / "stalled", [run], killed_log)
        workers = child_pids(run.pid)
        assert len(workers) == 2
        run.send_signal(signal.SIGKILL)  # the launcher only
        run.wait(timeout=60)
        assert _all_exit(workers), "the workers outlived their launcher"
        assert "its launcher (PID" in killed_log.read_text()
        before = load_checkpoint(killed / "checkpoints" / "latest.pth")
        assert before["progress"]["global_step"] == 8
        assert before["extra"]["loss_engine"]["_extra_state"]["samples"]["filled"] > 0  # recorded before the kill
        resumed = _launch([*TORCHRUN, str(TOY_TRAIN), "--work-dir", str(killed), *COMMON, "--resume"], killed_log)
        assert _wait(resumed, killed_log) == 0, killed_log.read_text()[-4000:]
        assert _wait(ref, ref_log) == 0, ref_log.read_text()[-4000:]
    finally:
        for pid in workers:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for proc in (ref, run):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    expected = load_checkpoint(reference / "checkpoints" / "latest.pth")
    engine = expected["extra"]["loss_engine"]["_extra_state"]
    assert expected["progress"]["global_step"] == 18 and engine["grouping_history"][0]["step"] == 12
    assert_same(expected, load_checkpoint(killed / "checkpoints" / "latest.pth"))


def _all_exit(pids: list[int], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while any(process_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_rank_1_exits_when_rank_0_dies(tmp_path):
    port = str(_free_port())
    ranks = [_launch([sys.executable, str(TOY_TRAIN), "--work-dir", str(tmp_path / "run"), "--no-tensorboard",
                      "--batch-size", "4", "--stall-after-step", "1"], tmp_path / f"rank{rank}.log", RANK=str(rank),
                     LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
             for rank in (0, 1)]
    try:
        _wait_for_file(tmp_path / "run" / "stalled", ranks, tmp_path / "rank1.log")
        time.sleep(0.5)  # both ranks are in the stall
        ranks[0].send_signal(signal.SIGKILL)
        assert ranks[1].wait(timeout=30) != 0, "rank 1 outlived rank 0"
        assert f"rank 0 (PID {ranks[0].pid}) exited" in (tmp_path / "rank1.log").read_text()
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
