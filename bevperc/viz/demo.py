"""Small inputs for the notebooks and tests: a tiny synthetic nuScenes set with its info files.

:func:`ensure_demo_dataset` is idempotent: it generates only when ``root`` has no finished
set (``root/.bevperc_demo_ready`` names what was generated), so notebooks can call it every
time and tests can share one set between files through a common folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEMO_SPLITS = ("mini_train", "mini_val")
_READY = ".bevperc_demo_ready"


REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path.home() / ".cache" / "bevperc"
DEMO_OUT = REPO_ROOT / "outputs" / "demo"  # where scripts/demo.sh writes its run


def user_folder(variable: str) -> Path | None:
    """The folder named by environment variable ``variable``, or None when it is not set.

    A folder the user named must exist: a typo must not make a notebook generate data or train
    a model in a new folder of that name (FileNotFoundError naming the variable)."""
    value = os.environ.get(variable)
    if not value:
        return None
    if not Path(value).is_dir():
        raise FileNotFoundError(f"{variable}={value}: no such folder; fix the path, or unset {variable} to use "
                                f"the default")
    return Path(value)


def demo_data_root(default: str | Path | None = None) -> Path:
    """``$BEVPERC_DATA_ROOT``; else ``default``; else the demo set of ``scripts/demo.sh``
    (``data/nuscenes-synthetic``) when it is complete; else ``~/.cache/bevperc/demo-nuscenes``."""
    named = user_folder("BEVPERC_DATA_ROOT")
    if named is not None:
        return named
    if default is not None:
        return Path(default)
    shared = REPO_ROOT / "data" / "nuscenes-synthetic"
    if (shared / "dataset_info.json").is_file() and all((shared / f"bevperc_infos_{s}.json").is_file() for s in DEMO_SPLITS):
        return shared
    return CACHE_DIR / "demo-nuscenes"


def default_run_dir() -> Path:
    """``$BEVPERC_RUN_DIR``; else ``outputs/demo/train`` of ``scripts/demo.sh`` when finished; else the cache."""
    named = user_folder("BEVPERC_RUN_DIR")
    if named is not None:
        return named
    demo = DEMO_OUT / "train"
    return demo if (demo / "loss_engine.json").is_file() else CACHE_DIR / "demo-run"


def default_gesture_dir() -> Path:
    """``$BEVPERC_GESTURE_DIR``; else ``outputs/demo/gesture`` of ``scripts/demo.sh`` when finished; else the cache."""
    named = user_folder("BEVPERC_GESTURE_DIR")
    if named is not None:
        return named
    demo = DEMO_OUT / "gesture"
    return demo if (demo / "runs" / "student_kd" / "model.pt").is_file() else CACHE_DIR / "demo-gestures"


def ensure_demo_dataset(
    root: str | Path,
    num_scenes: int = 10,
    samples_per_scene: int = 2,
    render_scale: float = 0.25,
    seed: int = 0,
    workers: int = 1,
) -> Path:
    """A synthetic ``v1.0-mini`` set at ``root`` with ``bevperc_infos_{mini_train,mini_val}.json``.

    Uses an existing set when ``root`` already holds nuScenes tables and the info files
    (a real nuScenes root or one made by ``data_tools``); otherwise generates one with
    ``bevperc.data.synthetic_nuscenes.generate`` (10 scenes so that both mini splits have
    scenes; 2 keyframes each at 1/4 render scale take ~20 s of CPU).
    Returns ``root``.
    """
    from bevperc.data.infos import create_infos

    root = Path(root)
    infos = [root / f"bevperc_infos_{split}.json" for split in DEMO_SPLITS]
    if (root / _READY).is_file() or ((root / "v1.0-mini").is_dir() and all(p.is_file() for p in infos)):
        return root
    if (root / "v1.0-mini").is_dir():  # a nuScenes mini root without bevperc infos: only add them
        create_infos(root, "v1.0-mini", list(DEMO_SPLITS), progress=False)
        return root
    if root.is_dir() and any(root.iterdir()):
        raise FileExistsError(f"{root}: not empty and not a v1.0-mini nuScenes root; refusing to generate there")
    from bevperc.data.synthetic_nuscenes import generate

    generate(root, "v1.0-mini", seed=seed, progress=False, num_scenes=num_scenes, samples_per_scene=samples_per_scene,
             render_scale=render_scale, workers=workers, overwrite=True)  # fmt: skip
    create_infos(root, "v1.0-mini", list(DEMO_SPLITS), progress=False)
    marker = {"num_scenes": num_scenes, "samples_per_scene": samples_per_scene, "render_scale": render_scale, "seed": seed}
    (root / _READY).write_text(json.dumps(marker))
    return root


def ensure_demo_run(run_dir: str | Path, data_root: str | Path, epochs: int = 2) -> Path:
    """A tiny training run of ``configs/demo_cpu.yaml`` at ``run_dir`` (for notebooks that need a checkpoint).

    A few iterations only (``epochs`` over mini_train with batch 4): the weights are barely
    trained, but the run has everything a real one has: ``config.yaml``,
    ``checkpoints/latest.pth`` and ``loss_engine.json`` with task sets found by the engine
    (its warm-up is shortened to fit). Skipped when ``run_dir/loss_engine.json`` exists.
    """
    run_dir = Path(run_dir)
    if (run_dir / "loss_engine.json").is_file() and (run_dir / "checkpoints" / "latest.pth").is_file():
        return run_dir
    from bevperc.train import main as train_main

    config = REPO_ROOT / "configs" / "demo_cpu.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: the demo config is needed to make a demo run")
    overrides = [
        f"data.dataroot={Path(data_root)}", f"train.epochs={epochs}", "train.num_workers=0",
        "train.tensorboard=false", "train.progress_bar=false", "train.val_every=0", "train.checkpoint_every=0",
        "train.log_every=1", "train.warmup_iters=2",
        "loss.warmup_steps=3", "loss.affinity_steps=3", "loss.regroup_every=0", "loss.condition_every=1",
        "loss.scale_warmup_steps=1",
    ]  # fmt: skip
    code = train_main(["--config", str(config), "--work-dir", str(run_dir), "--no-validate", *overrides])
    if code != 0:
        raise RuntimeError(f"demo training run failed with exit code {code} (see {run_dir})")
    return run_dir


def make_smoke_run(run_dir: str | Path, data_root: str | Path, engine_steps: int = 120, seed: int = 0) -> Path:
    """A run folder with the layout of ``bevperc.train`` output, made in seconds, for tests and notebooks.

    * ``config.yaml``: ``configs/demo_cpu.yaml`` pointed at ``data_root``;
    * ``checkpoints/latest.pth``: the seeded, *untrained* detector (``{"model": state_dict}``);
    * ``loss_engine.json``: ``LossEngine.summary()`` of a real engine over the detector's real
      task names, stepped ``engine_steps`` times on toy per-sample losses (tasks of one class
      group share a latent factor, velocity tasks another one and decay slowly, so the engine
      should find a velocity set and its condition should lift it);
    * ``run_info.json`` with ``"kind": "smoke"`` so a notebook can say what it is showing.

    Real training is :func:`ensure_demo_run` (minutes on a CPU).
    """
    import dataclasses

    import numpy as np
    import torch
    import yaml

    from bevperc.config import load_run_config
    from bevperc.losses.engine import LossEngine
    from bevperc.models import build_detector, task_names
    from bevperc.utils.config import save_config
    from bevperc.utils.io import atomic_torch_save, atomic_write_json

    run_dir = Path(run_dir)
    if (run_dir / "run_info.json").is_file() and (run_dir / "loss_engine.json").is_file():
        return run_dir
    config = REPO_ROOT / "configs" / "demo_cpu.yaml"
    cfg = load_run_config(config, [f"data.dataroot={Path(data_root)}"])
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(seed)
    atomic_torch_save({"model": build_detector(cfg.model).state_dict()}, run_dir / "checkpoints" / "latest.pth")

    names = task_names(cfg.model)
    engine = LossEngine(names, dataclasses.replace(cfg.loss, warmup_steps=40, affinity_steps=30, regroup_every=0,
                                                   condition_every=5))  # fmt: skip
    rng = np.random.default_rng(seed)
    groups = sorted({name.split(".")[0] for name in names})
    for step in range(engine_steps):
        # One latent factor per class group, and one shared by all velocity tasks (motion
        # is hard in every group): the engine should find the groups plus a velocity set,
        # and its condition should lift the velocity set, whose loss falls slowest.
        latent = {key: rng.uniform(0.2, 1.0, size=8) for key in [*groups, "velocity"]}
        per_sample = {}
        for i, name in enumerate(names):
            group, branch = name.split(".", 1) if "." in name else (name, name)
            factor = latent["velocity"] if branch == "velocity" else latent.get(group, rng.uniform(0.2, 1.0, 8))
            decay = np.exp(-step / (600.0 if branch == "velocity" else 60.0))
            values = (factor + 0.15 * rng.uniform(size=8)) * decay * (1 + i % 3)
            per_sample[name] = torch.tensor(values, dtype=torch.float32)
        engine({name: value.mean() for name, value in per_sample.items()}, per_sample)
        engine.step()
    atomic_write_json(run_dir / "loss_engine.json", engine.summary())
    atomic_write_json(run_dir / "run_info.json", {"kind": "smoke", "note": "untrained weights; toy loss history",
                                                  "config": yaml.safe_load((run_dir / "config.yaml").read_text())["data"]})  # fmt: skip
    return run_dir


GESTURE_ROLES = ("teacher1", "teacher2", "student", "student_kd")


def ensure_demo_gesture_run(out: str | Path, num_train: int = 32, num_test: int = 8, epochs: int = 1, seed: int = 0) -> Path:
    """A tiny gesture distillation run in the layout of ``python -m bevperc.gesture demo --out OUT``.

    ``OUT/data`` (synthetic HaGRID-format set) and ``OUT/runs/<role>/model.pt`` for teacher 1,
    teacher 2 (2x image, stride-aligned), the plain student and the distilled student.
    Skipped when all four checkpoints exist (e.g. a real demo run). ~10 s of CPU with the defaults.
    """
    import dataclasses

    out = Path(out)
    checkpoints = {role: out / "runs" / role / "model.pt" for role in GESTURE_ROLES}
    if all(path.is_file() for path in checkpoints.values()):
        return out
    from bevperc.gesture.data import SyntheticGestureSpec, generate_synthetic_gestures
    from bevperc.gesture.demo import run_configs
    from bevperc.gesture.distill import distill_student
    from bevperc.gesture.train import train_detector

    generate_synthetic_gestures(out / "data", num_train, num_test, seed, SyntheticGestureSpec(image_size=128))
    cfgs = run_configs(out / "data", epochs, seed, progress=False)
    trained = {role: train_detector(cfgs[role], out / "runs" / role) for role in ("teacher1", "teacher2", "student")}
    distill = dataclasses.replace(cfgs["distill"], teacher1_checkpoint=str(trained["teacher1"]),
                                  teacher2_checkpoint=str(trained["teacher2"]))  # fmt: skip
    distill_student(distill, out / "runs" / "student_kd")
    return out
