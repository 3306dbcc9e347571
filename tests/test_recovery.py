"""Nothing crashes a run, nothing is lost: NaN steps, failing validation, a locked work dir, damaged
checkpoints, a full disk; and inputs that used to be read wrong (YAML numbers, unknown categories,
notebook folders).

The bevperc.train runs train the real detector on 4 samples of the session's synthetic world
(2 steps); the engine-level cases use the toy training of tests/helpers/toy_train.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bevperc.config import load_run_config
from bevperc.training.checkpoint import load_checkpoint, lock_work_dir
from bevperc.train import main as train_main
from bevperc.viz.demo import DEMO_CONFIG
from helpers.tiny_runs import REPO, linked_root, train_argv, write_infos
from helpers.toy_train import assert_same, build_trainer, parse_args

TOY_TRAIN = REPO / "tests" / "helpers" / "toy_train.py"


@pytest.fixture(scope="module")
def tiny_infos(synthetic_infos, tmp_path_factory) -> Path:
    """An info dir: the first 4 mini_train samples (2 steps of batch 2) and all of mini_val."""
    out = tmp_path_factory.mktemp("tiny_infos")
    write_infos(Path(synthetic_infos["mini_train"]), out, count=4)
    write_infos(Path(synthetic_infos["mini_val"]), out)
    return out


def _toy_args(work_dir: Path, *extra: str):
    return parse_args(["--work-dir", str(work_dir), "--no-tensorboard", "--epochs", "2", "--checkpoint-every", "4",
                       "--keep", "2", *extra])


# ----------------------------------------------------------------------------- item 1: NaN loss, engine on
def test_a_nan_loss_with_the_loss_engine_on_skips_the_step(synthetic_root, tiny_infos, tmp_path, one_thread):
    work = tmp_path / "run"
    assert train_main(train_argv(work, synthetic_root, tiny_infos, "train.lr=1000000000.0")) == 0
    assert load_run_config(work / "config.yaml").loss.enabled
    log = (work / "train.log").read_text()
    assert "non-finite loss" in log and "step skipped, weights unchanged" in log
    state = load_checkpoint(work / "checkpoints" / "latest.pth")
    assert state["progress"]["global_step"] == 2 and state["progress"]["skipped_steps"] >= 1


# ----------------------------------------------------------------------------- item 3: failing validation
def test_a_failing_validation_is_logged_and_the_epoch_is_kept(synthetic_root, synthetic_infos, tmp_path, one_thread):
    def lose_an_image(payload: dict) -> None:
        payload["samples"][0]["cameras"]["CAM_FRONT"]["path"] = "samples/CAM_FRONT/missing.jpg"

    infos = tmp_path / "infos"
    write_infos(Path(synthetic_infos["mini_train"]), infos, count=4)
    write_infos(Path(synthetic_infos["mini_val"]), infos, edit=lose_an_image)
    work = tmp_path / "run"
    assert train_main(train_argv(work, synthetic_root, infos, "train.val_every=1", "train.epochs=2")) == 0
    log = (work / "train.log").read_text()
    assert log.count("validation after epoch") == 2 and "validation after epoch 1 failed" in log
    assert "missing.jpg" in log  # the traceback names the file
    state = load_checkpoint(work / "checkpoints" / "latest.pth")
    assert state["progress"]["global_step"] == 4 and state["history"]["val"] == []


class Killed(BaseException):
    """Stands for a SIGKILL between the epoch-end checkpoint and the validation."""


def test_a_run_killed_before_its_validation_validates_when_resumed(tmp_path, one_thread):
    reference, _, _ = build_trainer(_toy_args(tmp_path / "reference", "--validate"))
    reference.fit()
    killed, _, _ = build_trainer(_toy_args(tmp_path / "killed", "--validate"))

    def killed_while_validating(model, epoch):
        raise Killed()

    killed.validate = killed_while_validating
    with pytest.raises(Killed):
        killed.fit()
    epoch_end = load_checkpoint(tmp_path / "killed" / "checkpoints" / "latest.pth")
    assert epoch_end["progress"]["global_step"] == 6 and epoch_end["history"]["val"] == []  # the epoch is kept
    resumed, _, _ = build_trainer(_toy_args(tmp_path / "killed", "--validate"))
    resumed.fit(resume=True)
    assert [v["epoch"] for v in resumed.history["val"]] == [0, 1]
    assert_same(resumed.history["val"], reference.history["val"], "history.val")


# ----------------------------------------------------------------------------- item 4: work dir lock
def test_a_second_training_on_a_busy_work_dir_names_the_first(synthetic_root, tiny_infos, tmp_path, capsys):
    work = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, str(TOY_TRAIN), "--work-dir", str(work), "--no-tensorboard",
                              "--stall-after-step", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (work / "stalled").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first training did not start"
            time.sleep(0.1)
        assert train_main(train_argv(work, synthetic_root, tiny_infos)) == 2
        err = capsys.readouterr().err
        assert f"{work} is in use by another training run (PID {first.pid}" in err
        assert not (work / "config.yaml").exists()  # nothing of the first run was overwritten
        assert not (work / "checkpoints").exists()
    finally:
        first.kill()
        first.wait()


def test_a_forked_child_of_a_dead_trainer_does_not_hold_its_work_dir(tmp_path):
    """DataLoader workers (forked) outlive a SIGKILLed trainer by seconds: its resume must not find the dir locked."""

    code = ("import os, sys, time\n"
            "from bevperc.training.checkpoint import lock_work_dir\n"
            "with lock_work_dir(sys.argv[1]):\n"
            "    child = os.fork()\n"
            "    if child == 0:\n"
            "        time.sleep(60)\n"
            "        os._exit(0)\n"
            "    print(child, flush=True)\n"
            "    os._exit(0)  # dies holding the lock, like a killed trainer; the forked child lives on\n")
    work = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-c", code, str(work)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    child = int(parent.stdout.readline())
    try:
        assert parent.wait(timeout=60) == 0
        os.kill(child, 0)  # the child is still alive
        with lock_work_dir(work):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


# ----------------------------------------------------------------------------- item 6: damaged latest.pth
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, one_thread):
    work = tmp_path / "run"
    first, _, _ = build_trainer(_toy_args(work))
    first.fit()
    folder = work / "checkpoints"
    finished = load_checkpoint(folder / "latest.pth")
    assert sorted(p.name for p in folder.iterdir()) == ["iter_00000008.pth", "iter_00000012.pth", "latest.pth"]
    with open(folder / "latest.pth", "r+b") as handle:  # a hard link: iter_00000012.pth is truncated too
        handle.truncate(1000)
    resumed, _, _ = build_trainer(_toy_args(work))
    resumed.fit(resume=True)
    log = (work / "train.log").read_text()
    assert f"skipping a damaged checkpoint: cannot load checkpoint {folder / 'latest.pth'}" in log
    assert f"resuming from {folder / 'iter_00000008.pth'}, the newest intact checkpoint" in log
    assert_same(finished, load_checkpoint(folder / "latest.pth"))  # steps 9-12 redone exactly


# ----------------------------------------------------------------------------- item 11: full disk
def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs user and mount namespaces (unshare -rm) for a small tmpfs")
def test_a_full_disk_during_a_checkpoint_is_named_and_keeps_the_previous_one(tmp_path):
    work = tmp_path / "small_disk"
    work.mkdir()
    script = (f"mount -t tmpfs -o size=600k tmpfs {work} && "
              f"{sys.executable} {TOY_TRAIN} --work-dir {work} --no-tensorboard --checkpoint-every 2 --keep 2; "
              f"echo exit=$?; ls -a {work}/checkpoints")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, timeout=240).stdout
    assert "exit=0" not in out, out
    assert f"checkpoint at step 6 failed: [Errno 28] no space left on {work}/checkpoints while writing " \
           f"iter_00000006.pth" in out, out
    listing = out.rsplit("exit=", 1)[1].split()[1:]
    assert "latest.pth" in listing and not [name for name in listing if name.endswith(".tmp")], listing


# ----------------------------------------------------------------------------- item 12: YAML numbers
def test_numbers_without_a_dot_are_numbers_in_configs_and_overrides(tmp_path):
    cfg = load_run_config(DEMO_CONFIG, ["train.lr=1e-3", "train.weight_decay=1E-2", "train.eps=1e-9"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.eps) == (1e-3, 1e-2, 1e-9)
    path = tmp_path / "run.yaml"
    path.write_text(DEMO_CONFIG.read_text().replace("lr: 2.0e-3", "lr: 2e-3").replace("weight_decay: 1.0e-2",
                                                                                        "weight_decay: 1e-2"))
    assert "lr: 2e-3" in path.read_text()
    cfg = load_run_config(path, ["train.onecycle_final_div_factor=1e4", "data.version=v1.0-mini"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.onecycle_final_div_factor) == (2e-3, 1e-2, 1e4)
    assert cfg.data.version == "v1.0-mini"


# ----------------------------------------------------------------------------- item 8: unknown categories
def test_annotations_of_an_unknown_category_are_counted_in_a_warning(synthetic_root, synthetic_infos, tmp_path,
                                                                     caplog):
    sys.path.insert(0, str(REPO / "data_tools"))
    from create_infos import main as create_infos_main

    root = linked_root(synthetic_root, tmp_path / "root")
    (root / "v1.0-mini").unlink()
    shutil.copytree(synthetic_root / "v1.0-mini", root / "v1.0-mini")
    table = root / "v1.0-mini" / "category.json"
    table.write_text(table.read_text().replace('"vehicle.car"', '"vehicle.kar"'))
    cars = sum(s["gt"]["names"].count("car") for s in json.loads(Path(synthetic_infos["mini_train"]).read_text())["samples"])
    assert cars > 10
    out = tmp_path / "infos"
    assert create_infos_main(["--dataroot", str(root), "--version", "v1.0-mini", "--splits", "mini_train",
                              "--out-dir", str(out)]) == 0
    assert f"{cars} annotations of categories that are not nuScenes categories were dropped ({cars} of " \
           f"'vehicle.kar')" in caplog.text and str(table) in caplog.text
    written = json.loads((out / "bevperc_infos_mini_train.json").read_text())
    assert not any("car" in s["gt"]["names"] for s in written["samples"])


# ----------------------------------------------------------------------------- item 9: notebook folders
@pytest.mark.parametrize("variable, resolve", [("BEVPERC_DATA_ROOT", lambda demo: demo.demo_world().root),
                                               ("BEVPERC_RUN_DIR", lambda demo: demo.default_run_dir()),
                                               ("BEVPERC_GESTURE_DIR", lambda demo: demo.default_gesture_dir())])
def test_a_missing_folder_named_for_a_notebook_is_an_error(monkeypatch, tmp_path, variable, resolve):
    from bevperc.viz import demo

    monkeypatch.setenv(variable, str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match=rf"{variable}={tmp_path / 'typo'}: no such folder"):
        resolve(demo)
    assert not (tmp_path / "typo").exists()
    monkeypatch.setenv(variable, str(tmp_path))
    assert resolve(demo) == tmp_path
