"""ONNX export vs onnxruntime, and a tiny end-to-end CLI run (synth -> train -> distill -> eval -> detect -> export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bevperc.gesture.__main__ import main
from bevperc.gesture.export import export_onnx
from bevperc.gesture.presets import student_config
from bevperc.gesture.train import save_centernet
from bevperc.models.centernet import CenterNet, decode_centernet


@pytest.fixture(autouse=True)
def _one_thread():
    # On a shared 2-core CPU one intra-op thread is several times faster than two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_onnx_export_matches_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = CenterNet(student_config(), num_classes=4).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    ckpt = save_centernet(tmp_path / "m.pt", model, ["a", "b", "c", "d"], 64, "student")
    report = export_onnx(ckpt, tmp_path / "m.onnx", atol=1e-4)
    assert max(report["max_abs_diff"].values()) < 1e-4
    # decoding the onnxruntime outputs gives the torch detections
    image = torch.randn(1, 3, 64, 64)
    heat, wh, off = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": image.numpy()})
    got = decode_centernet(torch.from_numpy(heat), torch.from_numpy(wh), torch.from_numpy(off), 4.0,
                            heatmap_is_logits=False, score_threshold=0.0)[0]
    with torch.no_grad():
        out = model(image)
    want = decode_centernet(out.heatmap, out.wh, out.offset, 4.0, score_threshold=0.0)[0]
    assert torch.equal(got["labels"], want["labels"])
    np.testing.assert_allclose(got["boxes"].numpy(), want["boxes"].numpy(), atol=1e-3)


def _write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_end_to_end(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--num-train", "8", "--num-test", "4", "--image-size", "64"]) == 0
    data_cfg = {"annotations_dir": str(data / "annotations" / "train"), "images_dir": str(data / "images"),
                "input_size": 32}
    optim = {"epochs": 1, "batch_size": 4, "progress": False}
    tiny = {"stage_widths": [4, 8, 8, 8], "stage_depths": [0, 1, 0, 1], "neck_channels": 8, "head_channels": 8}
    teacher2 = {**tiny, "stage_widths": [8, 8, 8, 8], "stage_strides": [2, 4, 2, 2]}
    runs = tmp_path / "runs"
    for role, model, size in (("student", tiny, 32), ("teacher1", {**tiny, "stage_widths": [8, 8, 16, 16]}, 32),
                              ("teacher2", teacher2, 64)):
        cfg = _write_yaml(tmp_path / f"{role}.yaml", {"model": model, "data": {**data_cfg, "input_size": size},
                                                      "optim": optim, "role": role})
        assert main(["train", "--config", cfg, "--out", str(runs / role)]) == 0
    # --resume of a finished run loads its last checkpoint, trains no further and rewrites the same model
    trained = torch.load(runs / "student" / "model.pt", weights_only=True)["model"]
    assert main(["train", "--config", str(tmp_path / "student.yaml"), "--out", str(runs / "student"), "--resume"]) == 0
    again = torch.load(runs / "student" / "model.pt", weights_only=True)["model"]
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
    assert (runs / "student" / "checkpoints" / "latest.pth").is_file() and (runs / "student" / "train.log").is_file()
    distill_cfg = _write_yaml(tmp_path / "distill.yaml", {
        "student": tiny, "data": data_cfg,
        "optim": {**optim, "loss_engine": {"enabled": True, "warmup_steps": 1, "affinity_steps": 1,
                                           "scale_warmup_steps": 1}},
        "teacher1_checkpoint": str(runs / "teacher1" / "model.pt"),
        "teacher2_checkpoint": str(runs / "teacher2" / "model.pt"), "teacher2_scale": 2, "teacher2_stage_k": 1})
    assert main(["distill", "--config", distill_cfg, "--out", str(runs / "kd"), "--set", "optim.epochs=2"]) == 0
    summary = json.loads((runs / "kd" / "engine_summary.json").read_text())
    assert "task_sets" in summary
    test_cfg = _write_yaml(tmp_path / "test.yaml", {**data_cfg, "annotations_dir": str(data / "annotations" / "test")})
    results = tmp_path / "eval.json"
    assert main(["eval", str(runs / "kd" / "model.pt"), str(runs / "teacher2" / "model.pt"),
                 "--data-config", test_cfg, "--json", str(results)]) == 0
    scores = json.loads(results.read_text())
    assert [s["input_size"] for s in scores] == [32, 64]
    assert all(0.0 <= s["mAP"] <= s["mAP50"] <= 1.0 for s in scores)
    assert main(["detect", str(runs / "kd" / "model.pt"), "--images", str(data / "images"),
                 "--out", str(tmp_path / "det"), "--score-threshold", "0.0"]) == 0
    detections = json.loads((tmp_path / "det" / "detections.json").read_text())
    assert len(detections) == 12 and len(list((tmp_path / "det").rglob("*.png"))) == 12
    assert all(set(d) == {"label", "score", "box_xyxy", "box_xywh_norm"} for v in detections.values() for d in v)
    assert main(["export", str(runs / "kd" / "model.pt"), "--out", str(tmp_path / "kd.onnx")]) == 0
    assert (tmp_path / "kd.onnx").is_file()


def test_cli_rejects_unknown_config_key(tmp_path: Path, capsys) -> None:
    cfg = _write_yaml(tmp_path / "bad.yaml", {"model": {"stage_widthz": [8]}})
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "o")]) == 2
    assert "stage_widthz" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.pt").exists()


def test_cli_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(cmd in text for cmd in ("synth", "train", "distill", "eval", "detect", "export", "demo"))


def test_demo_result_does_not_depend_on_its_worker_processes(tmp_path: Path) -> None:
    """The demo's four trainings in two spawned workers give exactly what they give one after another in
    this process: every model's weights and mAP (each run is seeded from its config alone)."""
    from bevperc.gesture.demo import run_demo
    from bevperc.training.checkpoint import load_checkpoint

    size = {"num_train": 16, "num_test": 8, "epochs": 2}
    inline = run_demo(tmp_path / "inline", **size, jobs=1)
    workers = run_demo(tmp_path / "workers", **size, jobs=2)
    assert inline["mAP50"] == workers["mAP50"] and inline["mAP"] == workers["mAP"]
    for role in ("teacher1", "teacher2", "student", "student_kd"):
        a, b = (load_checkpoint(tmp_path / run / "runs" / role / "model.pt")["model"] for run in ("inline", "workers"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role
    config = yaml.safe_load((tmp_path / "workers" / "configs" / "student.yaml").read_text())
    assert config["optim"]["num_threads"] == 1  # the threads each worker ran on, so the CLI repeats the run
