"""Kill-and-resume chains: SIGKILL a training again and again, resume each time, compare with no kills.

    .venv/bin/python bench/kill_resume.py --kills 10                 # one process
    .venv/bin/python bench/kill_resume.py --kills 10 --ddp           # torchrun, 2 gloo processes on the CPU

The training is tests/helpers/toy_train.py with the real loss engine (``--loss-engine``: per-sample
loss buffer, task grouping, second weights), EMA, validation and dropout, checkpoints every 3
iterations. A chain launches it, waits until it has trained a random 2-20 iterations past the
step it resumed from (so kills land anywhere: mid-step, mid-checkpoint-write, mid-validation),
SIGKILLs the launcher and every worker at once (torchrun starts each worker in its own session),
waits until they are gone, checks that every checkpoint file left behind loads
(``weights_only=True``), and resumes with ``--resume``; after ``--kills`` kills it
lets the run finish. The final checkpoint is compared, tensor by tensor, with an uninterrupted run's.
Prints a markdown table row.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bevperc.training.distributed import process_alive  # noqa: E402
from helpers.toy_train import assert_same, child_pids  # noqa: E402

TOY_TRAIN = REPO / "tests" / "helpers" / "toy_train.py"
ARGS = ["--loss-engine", "--ema", "--validate", "--dropout", "0.2", "--no-tensorboard", "--samples", "96",
        "--epochs", "16", "--checkpoint-every", "3", "--keep", "2"]
STEP = re.compile(r" step (\d+)/\d+ ")


def command(work_dir: Path, ddp: bool, *extra: str) -> list[str]:
    if ddp:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(TOY_TRAIN), "--work-dir", str(work_dir), *ARGS, "--batch-size", "4", *extra]
    return [sys.executable, str(TOY_TRAIN), "--work-dir", str(work_dir), *ARGS, *extra]


def launch(work_dir: Path, ddp: bool, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    log = open(work_dir.with_suffix(".log"), "ab")
    return subprocess.Popen(command(work_dir, ddp, *extra), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def logged_step(work_dir: Path, offset: int) -> int:
    """The newest training step in train.log after byte ``offset`` (0 when none)."""
    log = work_dir / "train.log"
    if not log.is_file():
        return 0
    with open(log, "rb") as handle:
        handle.seek(offset)
        steps = STEP.findall(handle.read().decode(errors="replace"))
    return int(steps[-1]) if steps else 0


def check_files(folder: Path) -> tuple[int, int, int]:
    """(checkpoints that load, checkpoints that do not, temporary files) in ``folder``."""
    good = bad = 0
    for path in folder.glob("*.pth"):
        try:
            torch.load(path, weights_only=True)
            good += 1
        except Exception:  # noqa: BLE001 - counting corrupt files is the point
            bad += 1
    return good, bad, len(list(folder.glob(".*.tmp")))


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a launched run and its workers together (a node failure), and wait until all are gone."""
    pids = [proc.pid, *child_pids(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(process_alive(pid) for pid in pids):
        time.sleep(0.01)


def chain(work_dir: Path, ddp: bool, kills: int, rng: random.Random) -> dict:
    stats = {"kills": 0, "corrupt": 0, "temporaries": 0}
    resume: tuple[str, ...] = ()
    while stats["kills"] < kills:
        offset = (work_dir / "train.log").stat().st_size if (work_dir / "train.log").is_file() else 0
        start = logged_step(work_dir, 0)
        target = start + rng.randint(2, 20)
        proc = launch(work_dir, ddp, *resume)
        while logged_step(work_dir, offset) < target and proc.poll() is None:
            time.sleep(0.01)
        if proc.poll() is not None:
            raise SystemExit(f"the run finished before kill {stats['kills'] + 1}; use more --epochs in ARGS")
        kill_job(proc)
        stats["kills"] += 1
        _, bad, tmp = check_files(work_dir / "checkpoints")
        stats["corrupt"] += bad
        stats["temporaries"] += tmp
        resume = ("--resume",)
    final = launch(work_dir, ddp, *resume)
    if final.wait() != 0:
        raise SystemExit(f"the last resume failed: see {work_dir.with_suffix('.log')}")
    stats["temporaries_left_at_end"] = check_files(work_dir / "checkpoints")[2]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--ddp", action="store_true", help="torchrun with 2 processes (gloo) instead of one")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bevperc_kill_resume_") as tmp:
        reference, killed = Path(tmp) / "reference", Path(tmp) / "killed"
        if launch(reference, args.ddp).wait() != 0:
            raise SystemExit(f"the reference run failed: see {reference.with_suffix('.log')}")
        stats = chain(killed, args.ddp, args.kills, random.Random(args.seed))
        expected = torch.load(reference / "checkpoints" / "latest.pth", weights_only=True)
        resumed = torch.load(killed / "checkpoints" / "latest.pth", weights_only=True)
        try:
            assert_same(expected, resumed)
            identical = "yes"
        except AssertionError as err:
            identical = f"no ({err})"
    mode = "DDP, 2 processes (gloo)" if args.ddp else "1 process"
    print("| mode | kills | corrupt checkpoints | temporary files left by a kill (removed by the next start) "
          "| final checkpoint bit-identical to no kills | wall time |")
    print("|---|---|---|---|---|---|")
    print(f"| {mode} | {stats['kills']} | {stats['corrupt']} | {stats['temporaries']} "
          f"({stats['temporaries_left_at_end']} at the end) | {identical} | {time.perf_counter() - started:.0f} s |")


if __name__ == "__main__":
    main()
