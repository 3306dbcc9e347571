"""Execute every notebook in notebooks/ top to bottom on a real kernel (nbclient, kernel python3).

Inputs are given through environment variables (the notebooks' defaults would build their own):
BEVPERC_DATA_ROOT -> the tiny synthetic set shared with test_viz.py; BEVPERC_RUN_DIR -> a smoke
run (config, untrained checkpoint, real loss-engine summary); BEVPERC_GESTURE_DIR -> a tiny real
gesture distillation run. Any cell error fails the test.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# notebook -> the least number of figures it must show
MIN_FIGURES = {"01_dataset.ipynb": 6, "02_predictions.ipynb": 5, "03_loss_engine.ipynb": 1, "04_gestures.ipynb": 5}
EXPECTED = list(MIN_FIGURES)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The tiny synthetic set, in the same folder as test_viz.py's fixture (generated once per session)."""
    from bevperc.viz.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.getbasetemp() / "bevperc_viz_demo_data")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, demo_root) -> Path:
    from bevperc.viz.demo import NuScenesWorld, make_smoke_run

    return make_smoke_run(tmp_path_factory.mktemp("smoke_run"), NuScenesWorld(demo_root))


@pytest.fixture(scope="session")
def gesture_run(tmp_path_factory) -> Path:
    """A tiny real gesture distillation run (1 epoch per model on 32 synthetic images)."""
    from bevperc.viz.demo import ensure_demo_gesture_run

    return ensure_demo_gesture_run(tmp_path_factory.mktemp("gesture_run"))


def test_notebooks_are_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == EXPECTED
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: stored with outputs"


def test_the_notebooks_read_the_world_of_the_run(demo_root, smoke_run, tmp_path, monkeypatch):
    """The run's config.yaml names the world (scripts/demo.sh: a v1.0-trainval world, dataroot relative to the
    repository); $BEVPERC_DATA_ROOT, read as $BEVPERC_VERSION (default v1.0-mini), comes first."""
    from bevperc.config import load_run_config
    from bevperc.utils.config import save_config
    from bevperc.viz.demo import DEMO_CONFIG, NuScenesWorld, demo_world

    monkeypatch.delenv("BEVPERC_DATA_ROOT", raising=False)
    monkeypatch.delenv("BEVPERC_VERSION", raising=False)
    assert demo_world(smoke_run) == NuScenesWorld(demo_root)
    save_config(load_run_config(DEMO_CONFIG), tmp_path / "config.yaml")  # as bevperc.train saves it
    trainval = NuScenesWorld(REPO / "data" / "nuscenes-synthetic-trainval", "v1.0-trainval", "train", "val")
    assert demo_world(tmp_path) == trainval
    monkeypatch.setenv("BEVPERC_DATA_ROOT", str(demo_root))
    assert demo_world(tmp_path) == NuScenesWorld(demo_root)
    monkeypatch.setenv("BEVPERC_VERSION", "v1.0-trainval")
    assert demo_world(tmp_path) == NuScenesWorld(demo_root, "v1.0-trainval", "train", "val")


@pytest.mark.slow  # each notebook starts a kernel and imports torch; ~1 minute each on a loaded 2-core CPU
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_top_to_bottom(name, demo_root, smoke_run, gesture_run, tmp_path, monkeypatch):
    monkeypatch.setenv("BEVPERC_DATA_ROOT", str(demo_root))
    monkeypatch.setenv("BEVPERC_RUN_DIR", str(smoke_run))
    monkeypatch.setenv("BEVPERC_GESTURE_DIR", str(gesture_run))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on any error
    elapsed = time.perf_counter() - started
    images = sum(
        1 for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.outputs if "image/png" in output.get("data", {})
    )  # fmt: skip
    print(f"{name}: {elapsed:.1f} s, {images} figures")
    assert images >= MIN_FIGURES[name], f"{name}: expected >= {MIN_FIGURES[name]} figures in the outputs, got {images}"
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert not (demo_root / "bevperc_cache").exists()  # the shared world is only read (image cache off)
