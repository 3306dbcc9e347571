"""Small real runs of the commands on the session's synthetic world, and ways to break their input.

* :data:`TINY`: overrides that shrink ``configs/demo_cpu.yaml`` to a few seconds of CPU (point it at the
  session's v1.0-mini world with ``NuScenesWorld(root).overrides()``, as :func:`train_argv` does);
* :func:`linked_root`: a dataroot whose entries are symbolic links to a shared world's, so a test
  can add or replace a file without copying the world (bevperc confines paths textually, so
  links are fine);
* :func:`write_infos`: info files holding the first samples of a split, optionally edited;
* :func:`hold_lock`: another process holding a work dir's training lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from bevperc.viz.demo import DEMO_CONFIG, NuScenesWorld

REPO = Path(__file__).resolve().parents[2]

# A tiny variant of the demo config: small input, few steps, no workers, no TensorBoard.
TINY = [
    "data.input_size=[64,160]",
    "model.view.input_size=[64,160]",
    "train.epochs=1",
    "train.batch_size=2",
    "train.num_workers=0",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "train.progress_bar=false",
    "loss.warmup_steps=4",
    "loss.affinity_steps=4",
    "loss.condition_every=2",
]


def linked_root(source: Path, dest: Path) -> Path:
    """``dest`` with a symbolic link to every top-level entry of the dataroot ``source``."""
    dest.mkdir(parents=True)
    for entry in source.iterdir():
        (dest / entry.name).symlink_to(entry)
    return dest


def write_infos(source: Path, out_dir: Path, count: int | None = None,
                edit: Callable[[dict], None] | None = None) -> Path:
    """Copy the info file ``source`` into ``out_dir`` (same name), keeping its first ``count`` samples
    and applying ``edit(payload)``."""
    payload = json.loads(source.read_text())
    if count is not None:
        payload["samples"] = payload["samples"][:count]
    if edit is not None:
        edit(payload)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / source.name
    path.write_text(json.dumps(payload))
    return path


def train_argv(work_dir: Path, dataroot: Path, info_dir: Path | None = None, *overrides: str,
               resume: bool = False) -> list[str]:
    """Arguments of ``python -m bevperc.train`` for a tiny run on the v1.0-mini world at ``dataroot``, without
    validation (unless overridden)."""
    info = [f"data.info_dir={info_dir}"] if info_dir is not None else []
    return ["--config", str(DEMO_CONFIG), "--work-dir", str(work_dir), *(["--resume"] if resume else []),
            *NuScenesWorld(dataroot).overrides(), *info, *TINY, "train.tensorboard=false", "train.val_every=0",
            *overrides]


def hold_lock(work_dir: Path) -> subprocess.Popen:
    """A process that holds the training lock of ``work_dir`` until killed (returns once it holds it)."""
    code = ("import sys, time\n"
            "from bevperc.training.checkpoint import lock_work_dir\n"
            "with lock_work_dir(sys.argv[1]):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code, str(work_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc
