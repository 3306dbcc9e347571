"""Shared fixtures: one small synthetic nuScenes world per test session, with info files.

Generating and indexing a world costs seconds, so tests share one (read-only!). Tests
that modify data copy what they need into their own tmp_path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_SAMPLE_DIR = REPO_ROOT.parent / "shared" / "data" / "nuscenes-real-sample"

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A v1.0-mini synthetic world: the 10 mini scenes, 3 keyframes each, images and LiDAR."""
    from bevperc.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic") / "nuscenes"
    return Path(generate(root, version="v1.0-mini", seed=0, samples_per_scene=3, progress=False))


@pytest.fixture(scope="session")
def synthetic_infos(synthetic_root) -> dict[str, Path]:
    """Info files for mini_train and mini_val of :func:`synthetic_root`."""
    from bevperc.data.infos import create_infos

    return create_infos(synthetic_root, "v1.0-mini", ["mini_train", "mini_val"], progress=False)


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs (fast and steady on a shared 2-core CPU); afterwards the
    trainer's log files are released."""
    import torch

    from bevperc.training.logging import close_logger

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    close_logger()


@pytest.fixture(scope="session")
def eval_bench() -> ModuleType:
    """``bench/eval.py`` as a module: its synthetic nuScenes tables and submissions for evaluation tests."""
    spec = importlib.util.spec_from_file_location("bench_eval", REPO_ROOT / "bench" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def real_sample_dir() -> Path:
    """The one real nuScenes keyframe in ../shared (read in place; skip when absent)."""
    if not (REAL_SAMPLE_DIR / "sample_info.json").is_file():
        pytest.skip(f"real nuScenes sample not found at {REAL_SAMPLE_DIR}")
    return REAL_SAMPLE_DIR
