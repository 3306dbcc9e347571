"""A battery of bad inputs through the real commands (``main(argv)`` of each CLI, in process).

Every kind must end in one of two ways: exit code 2 and a message naming the file or field (no
traceback, and no result file or temporary file left in the output folder), or a safe skip with a
warning and exit code 0 (complete outputs). The kinds and what each does are the table of the
docs/reliability.md, "The battery of bad inputs" (``python tests/test_bad_inputs.py`` prints it).

Shared, built once per module: a tiny info dir (4 mini_train samples) over the session's synthetic
world, a 2-step training run of the demo config, a tables-only nuScenes world with a valid
submission, and a small synthetic gesture set with an untrained detector checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from bevperc.viz.demo import DEMO_CONFIG, NuScenesWorld
from helpers.tiny_runs import REPO, hold_lock, linked_root, train_argv, write_infos

sys.path.insert(0, str(REPO / "data_tools"))


@dataclass
class World:
    root: Path            # the session's synthetic nuScenes world (read only)
    infos: Path           # info dir: 4 mini_train samples, all of mini_val
    run: Path             # a finished 2-step training run (checkpoints at steps 1 and 2)
    tables: Path          # a tables-only v1.0-mini world ...
    submission: dict      # ... and a valid submission for its mini_val
    gestures: Path        # synthetic gesture data (annotations/, images/) ...
    gesture_model: Path   # ... and an untrained student checkpoint for it


@pytest.fixture(scope="module")
def world(synthetic_root, synthetic_infos, tmp_path_factory) -> World:
    from bevperc.gesture.data import generate_synthetic_gestures
    from bevperc.gesture.presets import student_config
    from bevperc.gesture.train import save_centernet
    from bevperc.models.centernet import CenterNet
    from bevperc.train import main as train_main

    base = tmp_path_factory.mktemp("bad_inputs")
    infos = base / "infos"
    write_infos(Path(synthetic_infos["mini_train"]), infos, count=4)
    write_infos(Path(synthetic_infos["mini_val"]), infos)
    assert train_main(train_argv(base / "run", synthetic_root, infos, "train.checkpoint_every=1",
                                 "train.keep_checkpoints=2")) == 0
    spec = importlib.util.spec_from_file_location("bench_eval", REPO / "bench" / "eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tokens = bench.write_synthetic_nuscenes(base / "tables", "v1.0-mini", "mini_val", samples_per_scene=3,
                                            gt_per_sample=8, seed=7)
    bench.write_synthetic_submission(base / "tables", "v1.0-mini", tokens, base / "results.json", preds_per_sample=8,
                                     seed=8)
    generate_synthetic_gestures(base / "gestures", 8, 4, 0)
    model = save_centernet(base / "student.pt", CenterNet(student_config(), num_classes=4), ["grid_h", "grid_v",
                          "grid_d1", "grid_d2"], 64, "student")
    return World(synthetic_root, infos, base / "run", base / "tables", json.loads((base / "results.json").read_text()),
                 base / "gestures", model)


# ----------------------------------------------------------------------------- ways to break things
def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(128, 256)) * 8)
    return path


def _truncated_copy(source: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    return dest


# ----------------------------------------------------------------------------- python -m bevperc.train
def _train(w: World, t: Path, *overrides: str, infos: Path | None = None, root: Path | None = None) -> list[str]:
    return train_argv(t / "out", root or w.root, infos or w.infos, *overrides)


def _train_infos(w: World, t: Path, edit: Callable[[dict], None], *overrides: str, split: str = "mini_train",
                 root: Path | None = None) -> list[str]:
    infos = t / "infos"
    for name in ("mini_train", "mini_val"):
        write_infos(w.infos / f"bevperc_infos_{name}.json", infos, edit=edit if name == split else None)
    return _train(w, t, *overrides, infos=infos, root=root)


def _set_camera(path: str) -> Callable[[dict], None]:
    return lambda payload: payload["samples"][0]["cameras"]["CAM_FRONT"].__setitem__("path", path)


def _set_lidar(path: str) -> Callable[[dict], None]:
    return lambda payload: payload["samples"][0]["lidar"].__setitem__("path", path)


def _bad_file_root(w: World, t: Path, make: Callable[[Path], Path]) -> Path:
    """A linked copy of the world with one extra file ``bad/<name>`` made by ``make(root)``."""
    root = linked_root(w.root, t / "root")
    make(root)
    return root


def _front_image(w: World) -> Path:
    payload = json.loads((w.infos / "bevperc_infos_mini_train.json").read_text())
    return w.root / payload["samples"][0]["cameras"]["CAM_FRONT"]["path"]


def _copied_run(w: World, t: Path, damage: Callable[[Path], None] = lambda folder: None) -> Path:
    shutil.copytree(w.run, t / "out", copy_function=shutil.copy)
    (t / "out" / "checkpoints" / "latest.pth").unlink()
    shutil.copy(t / "out" / "checkpoints" / "iter_00000002.pth", t / "out" / "checkpoints" / "latest.pth")
    damage(t / "out" / "checkpoints")
    return t / "out"


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _held_lock(w: World, t: Path) -> list[str]:
    t.joinpath("out").mkdir()
    holder = hold_lock(t / "out")
    _HOLDERS.append(holder)
    return _train(w, t)


_HOLDERS: list = []


# ----------------------------------------------------------------------------- python -m bevperc.eval
def _eval(w: World, t: Path, results: Path, *extra: str, split: str = "mini_val", root: Path | None = None,
          evaluator: str = "fast") -> list[str]:
    return ["--results", str(results), "--dataroot", str(root or w.tables), "--version", "v1.0-mini", "--split", split,
            "--evaluator", evaluator, "--out", str(t / "out"), *extra]


def _submission(w: World, t: Path, change: Callable[[dict], None] | None = None, text: str | None = None) -> Path:
    submission = json.loads(json.dumps(w.submission))
    if change is not None:
        change(submission)
    return _text(t / "results.json", text if text is not None else json.dumps(submission))


def _first_box(field: str, value) -> Callable[[dict], None]:
    def change(submission: dict) -> None:
        boxes = next(b for b in submission["results"].values() if b)
        boxes[0][field] = value(boxes[0][field]) if callable(value) else value
    return change


def _broken_tables(w: World, t: Path, table: str) -> Path:
    root = t / "tables"
    shutil.copytree(w.tables / "v1.0-mini", root / "v1.0-mini")
    _garbage(root / "v1.0-mini" / f"{table}.json")
    return root


def _predict(w: World, t: Path, checkpoint: Path, *overrides: str) -> list[str]:
    return ["--config", str(DEMO_CONFIG), "--checkpoint", str(checkpoint), "--out", str(t / "out"), "--figures", "0",
            *NuScenesWorld(w.root).overrides(), f"data.info_dir={w.infos}", "data.input_size=[64,160]",
            "model.view.input_size=[64,160]", *overrides]


# ----------------------------------------------------------------------------- data_tools/create_infos.py
def _infos_root(w: World, t: Path, change: Callable[[Path], None] | None = None) -> Path:
    root = linked_root(w.root, t / "root")
    (root / "v1.0-mini").unlink()
    shutil.copytree(w.root / "v1.0-mini", root / "v1.0-mini")
    if change is not None:
        change(root / "v1.0-mini")
    return root


def _create_infos(w: World, t: Path, change: Callable[[Path], None] | None = None, *extra: str) -> list[str]:
    root = _infos_root(w, t, change)
    return ["--dataroot", str(root), "--version", "v1.0-mini", "--splits", "mini_val", "--out-dir", str(t / "out"),
            *extra]


def _edit_table(name: str, edit: Callable[[list], None]) -> Callable[[Path], None]:
    def change(tables: Path) -> None:
        records = json.loads((tables / f"{name}.json").read_text())
        edit(records)
        (tables / f"{name}.json").write_text(json.dumps(records))
    return change


def _rename_category(records: list) -> None:
    next(r for r in records if r["name"] == "vehicle.car")["name"] = "vehicle.kar"


def _first_camera_file(records: list, value: str) -> None:
    next(r for r in records if r["filename"].startswith("samples/CAM_"))["filename"] = value


# ----------------------------------------------------------------------------- python -m bevperc.gesture
TINY_GESTURE = {"stage_widths": [4, 8, 8, 8], "stage_depths": [0, 1, 0, 1], "neck_channels": 8, "head_channels": 8}


def _gesture_data(w: World, t: Path, change: Callable[[Path], None] | None = None) -> Path:
    data = t / "gestures"
    shutil.copytree(w.gestures, data)
    if change is not None:
        change(data)
    return data


def _gesture_train(w: World, t: Path, change: Callable[[Path], None] | None = None, **model) -> list[str]:
    data = _gesture_data(w, t, change)
    config = {"model": {**TINY_GESTURE, **model}, "optim": {"epochs": 1, "batch_size": 4, "progress": False},
              "data": {"annotations_dir": str(data / "annotations" / "train"), "images_dir": str(data / "images"),
                       "input_size": 32}}
    return ["train", "--config", str(_text(t / "gesture.yaml", yaml.safe_dump(config))), "--out", str(t / "out")]


def _edit_annotation(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Apply ``edit`` to the first non-empty annotation file."""
    def change(data: Path) -> None:
        for path in sorted((data / "annotations" / "train").glob("*.json")):
            annotations = json.loads(path.read_text())
            if annotations:
                edit(annotations)
                path.write_text(json.dumps(annotations))
                return
    return change


def _first_entry(annotations: dict) -> dict:
    return annotations[sorted(annotations)[0]]


def _rename_first_image(new_id: str) -> Callable[[dict], None]:
    def edit(annotations: dict) -> None:
        annotations[new_id] = annotations.pop(sorted(annotations)[0])
    return edit


def _truncate_an_image(data: Path) -> None:
    image = sorted((data / "images").rglob("*.png"))[0]
    _truncated_copy(image, image)


# ----------------------------------------------------------------------------- the kinds
@dataclass
class Kind:
    name: str
    command: str          # train | eval | viz | gesture | create_infos | synthetic
    behaviour: str        # for the table in docs/reliability.md
    argv: Callable[[World, Path], list[str]]
    expect: str           # regular expression the output must contain
    exit_code: int = 2


KINDS = [
    # --- training: config
    Kind("config file missing", "train", "error naming the file",
         lambda w, t: ["--config", str(t / "missing.yaml"), "--work-dir", str(t / "out")],
         r"config file not found: .*missing\.yaml"),
    Kind("config not YAML", "train", "error naming the file",
         lambda w, t: ["--config", str(_text(t / "c.yaml", "train: [1, 2\n")), "--work-dir", str(t / "out")],
         r"c\.yaml: not valid YAML"),
    Kind("config binary garbage", "train", "error naming the file",
         lambda w, t: ["--config", str(_garbage(t / "c.yaml")), "--work-dir", str(t / "out")],
         r"c\.yaml: not a text file"),
    Kind("unknown config key", "train", "error naming the key and the valid keys",
         lambda w, t: _train(w, t, "train.epochz=3"), r"unknown key\(s\) \['epochz'\].*'epochs'"),
    Kind("config value of the wrong type", "train", "error naming the field",
         lambda w, t: _train(w, t, "train.epochs=many"), r"train\.epochs: expected an integer, got 'many'"),
    Kind("config value out of range", "train", "error naming the field",
         lambda w, t: _train(w, t, "train.lr=-1e-3"), r"TrainConfig\.lr must be > 0, got -0\.001"),
    Kind("override without '='", "train", "error naming the override",
         lambda w, t: _train(w, t, "train.epochs"), r"override 'train\.epochs': expected dotted\.key=value"),
    # --- training: info files
    Kind("dataroot without info files", "train", "error naming the missing info file",
         lambda w, t: train_argv(t / "out", t / "nowhere"), r"nowhere/bevperc_infos_mini_train\.json: info file not found"),
    Kind("info file not JSON", "train", "error naming the file",
         lambda w, t: _train(w, t, infos=_text(t / "i" / "bevperc_infos_mini_train.json", "{").parent),
         r"bevperc_infos_mini_train\.json: not valid JSON"),
    Kind("info file binary garbage", "train", "error naming the file",
         lambda w, t: _train(w, t, infos=_garbage(t / "i" / "bevperc_infos_mini_train.json").parent),
         r"bevperc_infos_mini_train\.json: not a UTF-8 JSON text file"),
    Kind("info file of another split", "train", "error naming the file and field 'split'",
         lambda w, t: _train_infos(w, t, lambda p: p.__setitem__("split", "mini_val")),
         r"bevperc_infos_mini_train\.json: field 'split' is 'mini_val' but the config asks for 'mini_train'"),
    Kind("info file of another version", "train", "error naming the file and field 'nuscenes_version'",
         lambda w, t: _train_infos(w, t, lambda p: p.__setitem__("nuscenes_version", "v1.0-trainval")),
         r"field 'nuscenes_version' is 'v1.0-trainval' but the config asks for 'v1.0-mini'"),
    Kind("unknown class in an info file", "train", "error naming the file, sample and field",
         lambda w, t: _train_infos(w, t, lambda p: p["samples"][1]["gt"]["names"].__setitem__(0, "cat")),
         r"samples\[1\] \(token \w+\) field gt\.names has unknown class 'cat'"),
    Kind("non-finite GT box", "train", "error naming the file, sample and field",
         lambda w, t: _train_infos(w, t, lambda p: p["samples"][0]["gt"]["boxes"][0].__setitem__(0, math.nan)),
         r"samples\[0\] field gt\.boxes must be finite rows of 9 values"),
    Kind("info sample without cameras", "train", "error naming the file, sample and field",
         lambda w, t: _train_infos(w, t, lambda p: p["samples"][2].pop("cameras")),
         r"samples\[2\] lacks field 'cameras'"),
    # --- training: data files
    Kind("camera image missing", "train", "error naming the info file, sample, camera and image",
         lambda w, t: _train_infos(w, t, _set_camera("samples/CAM_FRONT/missing.jpg")),
         r"camera CAM_FRONT: image file not found: .*missing\.jpg"),
    Kind("truncated camera JPEG", "train", "error naming the image",
         lambda w, t: _train_infos(w, t, _set_camera("bad/front.jpg"), root=_bad_file_root(
             w, t, lambda r: _truncated_copy(_front_image(w), r / "bad" / "front.jpg"))),
         r"bad/front\.jpg: cannot read image \(image file is truncated"),
    Kind("camera file not an image", "train", "error naming the image",
         lambda w, t: _train_infos(w, t, _set_camera("bad/front.jpg"), root=_bad_file_root(
             w, t, lambda r: _text(r / "bad" / "front.jpg", "not an image"))),
         r"bad/front\.jpg: cannot read image \(cannot identify image file"),
    Kind("camera path leaving the dataroot", "train", "error naming the info file, sample and path",
         lambda w, t: _train_infos(w, t, _set_camera("../../../../etc/passwd")),
         r"camera CAM_FRONT: path '\.\./\.\./\.\./\.\./etc/passwd' leaves the dataroot"),
    Kind("absolute camera path", "train", "error naming the info file, sample and path",
         lambda w, t: _train_infos(w, t, _set_camera("/etc/passwd")), r"path '/etc/passwd' leaves the dataroot"),
    Kind("LiDAR file not whole points", "train", "error naming the file and its size",
         lambda w, t: _train_infos(w, t, _set_lidar("bad/sweep.bin"), "data.load_depth=true", root=_bad_file_root(
             w, t, lambda r: _text(r / "bad" / "sweep.bin", "x" * 1001))),
         r"bad/sweep\.bin: size 1001 bytes is not a whole number of points"),
    Kind("LiDAR path leaving the dataroot", "train", "error naming the info file, sample and path",
         lambda w, t: _train_infos(w, t, _set_lidar("/etc/passwd"), "data.load_depth=true"),
         r"lidar: path '/etc/passwd' leaves the dataroot"),
    # --- training: checkpoints, work dir, numbers
    Kind("resume from a checkpoint of another config", "train", "error naming the checkpoint",
         lambda w, t: train_argv(_copied_run(w, t), w.root, w.infos, "model.neck.out_channels=32", resume=True),
         r"checkpoints/latest\.pth: the weights do not fit the configured model \(.*size mismatch"),
    Kind("resume with a truncated latest.pth", "train", "warning; resumes from the newest intact iter_*.pth",
         lambda w, t: train_argv(_copied_run(w, t, lambda c: _truncate(c / "latest.pth")), w.root, w.infos,
                                 resume=True),
         r"resuming from .*iter_00000002\.pth, the newest intact checkpoint", 0),
    Kind("resume with every checkpoint damaged", "train", "error naming every checkpoint",
         lambda w, t: train_argv(_copied_run(w, t, lambda c: [_truncate(p) for p in c.iterdir()]), w.root, w.infos,
                                 resume=True),
         r"no checkpoint can be loaded: cannot load checkpoint .*latest\.pth.*iter_00000001\.pth"),
    Kind("work dir used by another training", "train", "error naming the holder's PID",
         _held_lock, r"is in use by another training run \(PID \d+ on "),
    Kind("NaN loss (lr 1e9)", "train", "warning per step; the step is skipped, training goes on",
         lambda w, t: _train(w, t, "train.lr=1e9"), r"non-finite loss .*step skipped, weights unchanged", 0),
    Kind("failing in-training validation", "train", "warning with the error; checkpoint kept, training goes on",
         lambda w, t: _train_infos(w, t, _set_camera("samples/CAM_FRONT/gone.jpg"), "train.val_every=1",
                                   split="mini_val"), r"validation after epoch 1 failed", 0),
    # --- evaluation
    Kind("results file missing", "eval", "error naming the file",
         lambda w, t: _eval(w, t, t / "missing.json"), r"missing\.json: the results file does not exist"),
    Kind("results file truncated", "eval", "error naming the file and position",
         lambda w, t: _eval(w, t, _submission(w, t, text=json.dumps(w.submission)[:-50])),
         r"results\.json: invalid JSON.*at character \d+"),
    Kind("results file binary garbage", "eval", "error naming the file",
         lambda w, t: _eval(w, t, _garbage(t / "results.json")), r"results\.json: not a UTF-8 JSON text file"),
    Kind("results without 'meta'", "eval", "error naming the field",
         lambda w, t: _eval(w, t, _submission(w, t, lambda s: s.pop("meta"))), r"no field 'meta'"),
    Kind("results missing a sample", "eval", "error naming the samples",
         lambda w, t: _eval(w, t, _submission(w, t, lambda s: s["results"].pop(next(iter(s["results"]))))),
         r"1 of the 6 samples of the split are missing from 'results'.*e\.g\. \['\w+'\]"),
    Kind("NaN box translation", "eval", "error naming sample, box and field",
         lambda w, t: _eval(w, t, _submission(w, t, _first_box("translation", [math.nan, 0.0, 0.0]))),
         r"results\['\w+'\]\[0\]: field 'translation' must be finite"),
    # A quaternion whose squared norm overflows (scaled by 1e160) is no longer a bad input: the devkit
    # accepts it and its normalisation gives yaw 0, and the fast evaluator scores it the same (#17;
    # tests/test_eval_values.py). The kind kept here is the other end: a squared norm that underflows to 0.
    Kind("quaternion norm underflowing to 0", "eval", "error naming sample, box and field",
         lambda w, t: _eval(w, t, _submission(w, t, _first_box("rotation", lambda q: [v * 1e-170 for v in q]))),
         r"\[0\]: field 'rotation' must be a quaternion \(w, x, y, z\) with non-zero norm"),
    Kind("num_pts beyond 64 bits", "eval", "error naming sample, box and field",
         lambda w, t: _eval(w, t, _submission(w, t, _first_box("num_pts", 10 ** 20))),
         r"\[0\]: optional field 'num_pts' must be an integer in \[-2\*\*63, 2\*\*63\)"),
    Kind("custom split, devkit evaluator", "eval", "error naming the split",
         lambda w, t: _eval(w, t, _submission(w, t), split="my_split", evaluator="devkit"),
         r"split 'my_split' is not a predefined nuScenes split"),
    Kind("split of another version", "eval", "error naming split and version",
         lambda w, t: _eval(w, t, _submission(w, t), split="val"), r"split 'val' is not compatible with .*v1\.0-mini"),
    Kind("binary garbage table, fast evaluator", "eval", "error naming the table",
         lambda w, t: _eval(w, t, _submission(w, t), root=_broken_tables(w, t, "sample")),
         r"sample\.json cannot be read"),
    Kind("binary garbage table, devkit evaluator", "eval", "error naming the table",
         lambda w, t: _eval(w, t, _submission(w, t), root=_broken_tables(w, t, "ego_pose"), evaluator="devkit"),
         r"ego_pose\.json: not a UTF-8 JSON text file"),
    Kind("checkpoint of another config", "eval", "error naming the checkpoint",
         lambda w, t: _predict(w, t, w.run / "checkpoints" / "latest.pth", "model.neck.out_channels=32"),
         r"latest\.pth: the weights do not fit the configured model"),
    Kind("checkpoint that is not one", "eval", "error naming the file",
         lambda w, t: _predict(w, t, _garbage(t / "model.pth")), r"cannot load checkpoint .*model\.pth"),
    # --- figures
    Kind("loss engine summary not JSON", "viz", "error naming the file",
         lambda w, t: ["--engine-summary", str(_text(t / "s.json", "{")), "--out", str(t / "out")],
         r"--engine-summary .*s\.json: not a JSON file"),
    Kind("loss engine summary missing", "viz", "error naming the file",
         lambda w, t: ["--engine-summary", str(t / "s.json"), "--out", str(t / "out")],
         r"No such file or directory: '.*s\.json'"),
    Kind("training curves from a non-checkpoint", "viz", "error naming the file",
         lambda w, t: ["--checkpoint", str(_garbage(t / "c.pth")), "--out", str(t / "out")],
         r"cannot load checkpoint .*c\.pth"),
    # --- gestures
    Kind("annotation folder missing", "gesture", "error naming the folder",
         lambda w, t: _gesture_train(w, t, lambda d: shutil.rmtree(d / "annotations")),
         r"annotations_dir .*annotations/train is not a directory"),
    Kind("annotation file binary garbage", "gesture", "error naming the file",
         lambda w, t: _gesture_train(w, t, lambda d: _garbage(d / "annotations" / "train" / "grid_h.json")),
         r"grid_h\.json: not valid JSON"),
    Kind("annotation box not normalised", "gesture", "error naming file, image and box",
         lambda w, t: _gesture_train(w, t, _edit_annotation(lambda a: _first_entry(a)["bboxes"].__setitem__(
             0, [10, 10, 50, 50]))), r"\w+\.json: image '\w+': bboxes\[0\]=.* is not normalised"),
    Kind("annotation label unknown", "gesture", "error naming file, image and label",
         lambda w, t: _gesture_train(w, t, _edit_annotation(lambda a: _first_entry(a)["labels"].__setitem__(
             0, "wave"))), r"labels\[0\]='wave' is neither a configured class"),
    Kind("image id leaving the images folder", "gesture", "error naming file and image id",
         lambda w, t: _gesture_train(w, t, _edit_annotation(_rename_first_image("../../../etc/passwd"))),
         r"\w+\.json: image id '\.\./\.\./\.\./etc/passwd' is not a plain file name"),
    Kind("truncated gesture image", "gesture", "error naming the image",
         lambda w, t: _gesture_train(w, t, _truncate_an_image), r"\.png: cannot read image"),
    Kind("gesture config unknown key", "gesture", "error naming the key",
         lambda w, t: _gesture_train(w, t, stage_widthz=[8]), r"unknown key\(s\) \['stage_widthz'\]"),
    Kind("detect with a truncated image", "gesture", "error naming the image",
         lambda w, t: ["detect", str(w.gesture_model), "--images", str(_gesture_data(w, t, _truncate_an_image)),
                       "--out", str(t / "out")], r"\.png: cannot read image"),
    Kind("export a non-checkpoint", "gesture", "error naming the file",
         lambda w, t: ["export", str(_garbage(t / "m.pt")), "--out", str(t / "out" / "m.onnx")],
         r"cannot load checkpoint .*m\.pt"),
    # --- info files from tables
    Kind("version folder missing", "create_infos", "error naming the folder",
         lambda w, t: _create_infos(w, t, lambda tables: shutil.rmtree(tables)),
         r"v1\.0-mini: table folder for version 'v1\.0-mini' not found"),
    Kind("table binary garbage", "create_infos", "error naming the table",
         lambda w, t: _create_infos(w, t, lambda tables: _garbage(tables / "sample.json")),
         r"sample\.json: not a UTF-8 JSON text file"),
    Kind("table record without a field", "create_infos", "error naming table, record and field",
         lambda w, t: _create_infos(w, t, _edit_table("ego_pose", lambda r: r[3].pop("rotation"))),
         r"ego_pose\.json: record 3 \(token '\w+'\) lacks field\(s\) \['rotation'\]"),
    Kind("unknown category", "create_infos", "warning with the category and the count; those objects dropped",
         lambda w, t: _create_infos(w, t, _edit_table("category", _rename_category)),
         r"annotations of categories that are not nuScenes categories were dropped \(\d+ of 'vehicle\.kar'\)", 0),
    Kind("unknown category, --strict", "create_infos", "error with the category and the count",
         lambda w, t: _create_infos(w, t, _edit_table("category", _rename_category), "--strict"),
         r"category\.json: split 'mini_val': \d+ annotations .* \(\d+ of 'vehicle\.kar'\)"),
    Kind("table file path leaving the dataroot", "create_infos", "error naming table, record and path",
         lambda w, t: _create_infos(w, t, _edit_table("sample_data", lambda r: _first_camera_file(r, "/etc/passwd"))),
         r"sample_data\.json: record \d+ \(token '\w+'\) field 'filename': path '/etc/passwd' leaves the dataroot"),
    Kind("unknown split", "create_infos", "error naming the split",
         lambda w, t: ["--dataroot", str(w.root), "--version", "v1.0-mini", "--splits", "my_split", "--out-dir",
                       str(t / "out")], r"unknown split 'my_split'"),
    # --- the synthetic world
    Kind("synthetic world into a non-empty folder", "synthetic", "error naming the folder",
         lambda w, t: ["--out", str(_text(t / "out" / "mine.txt", "keep").parent), "--quiet"],
         r"out.* not empty"),
]


def _main(command: str) -> Callable[[list[str]], int]:
    if command == "train":
        from bevperc.train import main
    elif command == "eval":
        from bevperc.eval import main
    elif command == "viz":
        from bevperc.viz.__main__ import main
    elif command == "gesture":
        from bevperc.gesture.__main__ import main
    elif command == "create_infos":
        from create_infos import main
    else:
        from synthetic_nuscenes import main
    return main


LOGS = {"train.log", "train.lock"}               # a failed command may append to these ...
RECORDS = LOGS | {"config.yaml", "run_info.json"}  # ... and create these (a training that started)


def _files(out: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} if out.is_dir() else {}


def _assert_nothing_partial(out: Path, before: dict[Path, tuple[int, int]], failed: bool) -> None:
    after = _files(out)
    assert not [p for p in after if p.name.endswith(".tmp")], f"temporary files left in {out}"
    if failed:
        changed = [p for p, stat in after.items() if p in before and before[p] != stat and p.name not in LOGS]
        created = [p for p in after if p not in before and p.name not in RECORDS]
        assert not changed + created, f"a failed command wrote {changed + created}"
    for path in after:
        if path.suffix == ".json":
            json.loads(path.read_text())  # complete
        elif path.suffix == ".pth" and path not in before:
            torch.load(path, weights_only=True)


@pytest.mark.parametrize("kind", KINDS, ids=[k.name.replace(" ", "_") for k in KINDS])
def test_bad_input(kind: Kind, world: World, tmp_path: Path, capsys, caplog) -> None:
    argv = kind.argv(world, tmp_path)
    before = _files(tmp_path / "out")
    try:
        torch.set_num_threads(1)
        code = _main(kind.command)(argv)
    finally:
        while _HOLDERS:
            holder = _HOLDERS.pop()
            holder.kill()
            holder.wait()
        from bevperc.training.logging import close_logger

        close_logger()
    captured = capsys.readouterr()
    log = tmp_path / "out" / "train.log"
    output = captured.err + captured.out + caplog.text + (log.read_text() if log.is_file() else "")
    assert code == kind.exit_code, output[-3000:]
    assert re.search(kind.expect, output, re.DOTALL), output[-3000:]
    assert "Traceback" not in captured.err
    _assert_nothing_partial(tmp_path / "out", before, failed=code != 0)


def test_the_battery_has_at_least_40_kinds_through_every_command() -> None:
    assert len(KINDS) >= 40 and len({k.name for k in KINDS}) == len(KINDS)
    assert {k.command for k in KINDS} == {"train", "eval", "viz", "gesture", "create_infos", "synthetic"}


def reliability_table() -> str:
    """The kind -> behaviour table of docs/reliability.md."""
    lines = ["| command | bad input | behaviour |", "|---|---|---|"]
    lines += [f"| {k.command} | {k.name} | {k.behaviour} (exit {k.exit_code}) |" for k in KINDS]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reliability_table())
