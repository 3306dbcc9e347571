"""ONNX export of the BEV detector (``python -m bevperc.export``): both calibration modes, onnx.checker,
standard operators only, onnxruntime vs PyTorch within 1e-3 (gesture models 1e-4) and as close to a float64
forward as PyTorch float32, and the same scores through ``bevperc.eval``.

The detector is the demo config with random weights whose BatchNorm statistics come from real
samples (``helpers.detectors.calibrate_batchnorm``), so its head maps vary by O(1) over the grid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bevperc.config import load_run_config
from bevperc.export import ExportCheckError, dataset_batch, export_detector, float64_gaps, main, rig_from
from bevperc.inference import OnnxBEVDetector, load_detector
from bevperc.models import build_detector
from bevperc.models.bev_pool import bev_pool, bev_pool_onnx, make_pool_plan, ray_of_point
from bevperc.models.config import BEVGridConfig
from bevperc.models.exportable import rig_batch
from bevperc.models.lift import inverse_3x3
from bevperc.utils.config import save_config
from bevperc.utils.io import atomic_torch_save
from bevperc.viz.demo import DEMO_CONFIG, NuScenesWorld
from helpers.detectors import calibrate_batchnorm

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = REPO.parent / "shared" / "data" / "nuscenes-real-sample"
ATOL = 1e-4
# The demo detector (RegNetX-400MF backbone): float32 rounding alone puts PyTorch ~3e-4 from a float64
# forward on this model, so no float32 runtime meets 1e-4; the export is checked at 1e-3, as docs/detector.md's
# "The check" (Deploy (ONNX)) advises at R50 size, and onnxruntime must be about as exact as PyTorch float32.
BEV_ATOL = 1e-3


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(synthetic_root, synthetic_infos, tmp_path_factory) -> dict:
    """Demo config on the session's synthetic world, its YAML file and a BN-calibrated random checkpoint."""
    folder = tmp_path_factory.mktemp("export")
    # decode.score_threshold 0.3: tens of boxes per sample, far from the 500-box cap
    cfg = load_run_config(DEMO_CONFIG, [*NuScenesWorld(synthetic_root).overrides(), "model.decode.score_threshold=0.3"])
    save_config(cfg, folder / "config.yaml")
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_detector(cfg.model), [dataset_batch(cfg, "mini_train", [0, 7]),
                                                             dataset_batch(cfg, "mini_train", [14, 21])])
    checkpoint = atomic_torch_save({"model": model.state_dict()}, folder / "latest.pth")
    return {"cfg": cfg, "config": folder / "config.yaml", "checkpoint": checkpoint, "dir": folder}


@pytest.fixture(scope="module")
def exported(demo) -> dict[str, dict]:
    """Both modes exported (and checked) once: mode -> the command's report."""
    return {mode: export_detector(demo["cfg"], demo["checkpoint"], demo["dir"] / f"{mode}.onnx", mode,
                                  real_sample=REAL_SAMPLE, atol=BEV_ATOL)
            for mode in ("fixed-rig", "inputs")}


# --------------------------------------------------------------------------- exportable pieces
def test_inverse_3x3_matches_linalg_inv():
    generator = torch.Generator().manual_seed(0)
    matrices = torch.randn(50, 3, 3, generator=generator, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    np.testing.assert_allclose(inverse_3x3(matrices), torch.linalg.inv(matrices), rtol=0, atol=1e-12)


def test_onnx_pool_equals_fast_pool_with_plan_ids_and_with_a_dummy_cell():
    """Plan ids (fixed rig) and every point with out-of-grid ones sent to the dummy cell (calibration inputs)."""
    generator = torch.Generator().manual_seed(0)
    grid = BEVGridConfig(x_range=(-2.0, 2.0), y_range=(-3.0, 3.0), z_range=(-1.0, 1.0), cell_size=1.0)
    batch, cams, bins, height, width, channels = 2, 2, 3, 2, 3, 4
    depth = torch.rand(batch, cams, bins, height, width, generator=generator, dtype=torch.float64).softmax(2)
    context = torch.randn(batch, cams, height, width, channels, generator=generator, dtype=torch.float64)
    points = (torch.rand(batch, cams, bins, height, width, 3, generator=generator, dtype=torch.float64) - 0.5) * 6
    expected = bev_pool(depth, context, make_pool_plan(points, grid))
    cells = grid.num_y * grid.num_x
    # same geometry for both samples: a one-sample plan, broadcast over the batch
    shared = points[:1].expand_as(points)
    plan = make_pool_plan(shared[:1], grid)
    got = bev_pool_onnx(depth, context, plan.point_ids[None], plan.ray_ids[None], plan.cell_ids[None], grid.num_y, grid.num_x)
    torch.testing.assert_close(got, bev_pool(depth, context, make_pool_plan(shared, grid)), rtol=0, atol=1e-12)
    # per-sample geometry, every point kept
    from bevperc.models.bev_pool import voxel_index

    cell, valid = voxel_index(points.reshape(1, -1, 3), grid)
    assert not valid.all() and valid.any()
    cell_ids = torch.where(valid, cell, torch.full_like(cell, cells)).reshape(batch, -1)
    all_points = torch.arange(cams * bins * height * width)
    got = bev_pool_onnx(depth, context, all_points[None], ray_of_point(all_points, bins, height * width)[None], cell_ids,
                        grid.num_y, grid.num_x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the exported graphs
@pytest.mark.parametrize("mode", ["fixed-rig", "inputs"])
def test_export_passes_checker_uses_standard_ops_and_matches_pytorch(exported, demo, mode):
    report = exported[mode]
    path = Path(report["onnx"])
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"} and proto.opset_import[0].version == 17
    scatters = [n for n in proto.graph.node if n.op_type.startswith("Scatter")]
    assert [n.op_type for n in scatters] == ["ScatterElements"]  # not ScatterND: see the next test
    assert {a.name: a.s for a in scatters[0].attribute if a.name == "reduction"} == {"reduction": b"add"}
    ops = {n.op_type for n in proto.graph.node}
    # fixed rig: the geometry is folded into constants; calibration inputs: computed in the graph
    assert ("Floor" in ops) == (mode == "inputs") and ("Einsum" in ops) == (mode == "inputs")
    inputs = [i.name for i in proto.graph.input]
    assert inputs == (["images"] if mode == "fixed-rig" else ["images", "intrinsics", "ego_from_camera", "image_aug"])
    model = load_detector(demo["cfg"], demo["checkpoint"])
    batch = dataset_batch(demo["cfg"], "mini_val", [0])
    with torch.no_grad():
        expected = model(batch)
    # BEVDetector.forward's keys in eval mode, in order: the image head's logits too (decode.direction_from_image)
    outputs = list(expected)
    assert "image_heatmap" in outputs and [o.name for o in proto.graph.output] == outputs
    assert float(expected["car+truck+bus+trailer+construction_vehicle.heatmap"].std()) > 0.1  # not a flat map
    # the command's own check: a batch of 2 dataset samples (dynamic batch axis) and the real keyframe
    assert list(report["max_abs_diff"])[0] == "mini_val[0, 1]"
    assert ("nuscenes-real-sample" in report["max_abs_diff"]) == (REAL_SAMPLE / "sample_info.json").is_file()
    for diffs in report["max_abs_diff"].values():
        assert set(diffs) == set(outputs) and max(diffs.values()) <= BEV_ATOL
    gaps = float64_gaps(model, OnnxBEVDetector(path, demo["cfg"].model), dataset_batch(demo["cfg"], "mini_val", [0, 1]))
    assert gaps["onnxruntime"] <= 2 * gaps["torch float32"], gaps
    assert json.loads(path.with_suffix(".check.json").read_text())["max_abs_diff"] == report["max_abs_diff"]


def test_onnxruntime_results_are_identical_run_to_run_on_two_threads(exported, demo):
    """onnxruntime's multi-threaded CPU ScatterND(add) races on repeated indices (it gave 0.1 errors once in
    ~20 runs here); the exported ScatterElements(add) must give bit-identical outputs every time."""
    runner = OnnxBEVDetector(exported["inputs"]["onnx"], demo["cfg"].model, threads=2)
    batch = dataset_batch(demo["cfg"], "mini_val", [3])
    first = runner(batch)
    for _ in range(20):
        assert all(torch.equal(value, first[name]) for name, value in runner(batch).items())


def test_fixed_rig_graph_holds_the_pytorch_pool_plan_as_constants(exported, demo):
    cfg = demo["cfg"]
    model = build_detector(cfg.model)
    plan = make_pool_plan(model.view_transformer.geometry(rig_batch(rig_from("dataset", cfg, "mini_val", 0))), cfg.model.grid)
    proto = onnx.load(exported["fixed-rig"]["onnx"])
    tensors = [*proto.graph.initializer, *(a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute)]
    constants = [onnx.numpy_helper.to_array(t) for t in tensors if t.data_type == onnx.TensorProto.INT64]
    for ids in (plan.point_ids, plan.ray_ids, plan.cell_ids):
        assert any(c.size == ids.numel() and np.array_equal(c.reshape(-1), ids.numpy()) for c in constants)
    assert exported["fixed-rig"]["splatted_points_per_sample"] == plan.point_ids.numel()


def test_calibration_inputs_are_used_and_a_fixed_rig_reports_its_deviation(exported, demo, caplog):
    cfg = demo["cfg"]
    model = load_detector(cfg, demo["checkpoint"])
    runner = OnnxBEVDetector(exported["inputs"]["onnx"], cfg.model)
    batch = dataset_batch(cfg, "mini_val", [2])
    moved = dict(batch, ego_from_camera=batch["ego_from_camera"].clone())
    moved["ego_from_camera"][..., 0, 3] += 2.0  # every camera 2 m further forward
    with torch.no_grad():
        expected, before = model(moved), model(batch)
    got = runner(moved)
    name = "pedestrian.heatmap"
    assert max(float((got[k] - expected[k]).abs().max()) for k in got) <= BEV_ATOL
    assert float((got[name] - before[name]).abs().max()) > 0.1  # the graph followed the new calibration
    fixed = OnnxBEVDetector(exported["fixed-rig"]["onnx"], cfg.model)
    with caplog.at_level(logging.WARNING, logger="bevperc.inference"):
        fixed(moved)
    assert fixed.max_rig_deviation > 1.5 and "differs from the baked rig" in caplog.text


def test_onnx_submission_scores_the_same_as_pytorch_through_eval(exported, demo, capsys):
    """Same boxes (to 1 mm) and same metrics through ``python -m bevperc.eval --onnx``.

    Random weights score mAP 0 either way, so the box-level match is what has teeth here.
    """
    from bevperc.eval import main as eval_main

    common = ["--config", str(demo["config"]), "--split", "mini_val", "--evaluator", "fast", "--figures", "0"]
    out = {kind: demo["dir"] / f"eval_{kind}" for kind in ("torch", "onnx")}
    assert eval_main([*common, "--checkpoint", str(demo["checkpoint"]), "--out", str(out["torch"])]) == 0
    assert eval_main([*common, "--onnx", exported["inputs"]["onnx"], "--out", str(out["onnx"])]) == 0
    results = {k: json.loads((v / "results_mini_val.json").read_text())["results"] for k, v in out.items()}
    assert results["torch"].keys() == results["onnx"].keys() and len(results["torch"]) == 6
    total = 0
    for token, want in results["torch"].items():
        got = results["onnx"][token]
        assert len(got) == len(want)
        total += len(got)
        for box in got:  # each ONNX box is a PyTorch box of the same class (order may differ on near-ties)
            same = [w for w in want if w["detection_name"] == box["detection_name"]]
            distance = min(np.abs(np.subtract(w["translation"], box["translation"])).max() for w in same)
            assert distance < 1e-3
    assert total > 20
    # the same matches; TP errors (means of per-box errors of maps that agree within BEV_ATOL) within BEV_ATOL
    summaries = {k: json.loads((v / "metrics_summary.json").read_text()) for k, v in out.items()}
    assert abs(summaries["onnx"]["mean_ap"] - summaries["torch"]["mean_ap"]) <= 1e-6
    assert abs(summaries["onnx"]["nd_score"] - summaries["torch"]["nd_score"]) <= BEV_ATOL
    for metric, value in summaries["torch"]["tp_errors"].items():
        assert abs(summaries["onnx"]["tp_errors"][metric] - value) <= BEV_ATOL or (np.isnan(value) and np.isnan(
            summaries["onnx"]["tp_errors"][metric]))


# --------------------------------------------------------------------------- errors, atomic writes, gesture models
def test_export_cli_errors_name_the_file_or_field(exported, demo, tmp_path, capsys):
    base = ["--config", str(demo["config"]), "--out", str(tmp_path / "m.onnx")]
    assert main([*base, "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert f"checkpoint not found: {tmp_path / 'missing.pth'}" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(demo["checkpoint"]), "model.view.context_channels=16"]) == 2
    assert (f"{demo['checkpoint']}: the weights do not fit the configured model (Error(s) in loading state_dict for "
            "BEVDetector: size mismatch for view_transformer") in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(demo["checkpoint"]), "--rig", str(tmp_path)]) == 2
    assert "sample_info.json" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(demo["checkpoint"]), "--opset", "15"]) == 2  # scatter_add would overwrite
    assert "needs opset >= 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--checkpoint", str(demo["checkpoint"]), "--gesture"])
    other = load_run_config(demo["config"], ["model.grid.cell_size=0.8"])
    with pytest.raises(ValueError, match=r"grid\.cell_size: 1\.6 in the ONNX file, 0\.8 in the config"):
        OnnxBEVDetector(exported["inputs"]["onnx"], other.model)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxBEVDetector(tmp_path / "missing.onnx", demo["cfg"].model)
    assert not list(tmp_path.iterdir())


def test_a_failed_check_writes_nothing(demo, tmp_path):
    with pytest.raises(ExportCheckError, match="beyond atol=0") as failure:
        export_detector(demo["cfg"], demo["checkpoint"], tmp_path / "m.onnx", "fixed-rig", atol=0.0, real_sample=None)
    assert "from a float64 PyTorch forward" in str(failure.value)
    assert not list(tmp_path.iterdir())  # no .onnx, no temporary, no report


def test_gesture_models_export_through_the_same_command(tmp_path, capsys):
    from bevperc.gesture.presets import student_config
    from bevperc.gesture.train import save_centernet
    from bevperc.models.centernet import CenterNet

    torch.manual_seed(0)
    model = CenterNet(student_config(), num_classes=4).eval()
    checkpoint = save_centernet(tmp_path / "m.pt", model, list("abcd"), 64, "student")
    assert main(["--gesture", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "g.onnx")]) == 0
    report = json.loads((tmp_path / "g.check.json").read_text())
    assert max(report["max_abs_diff"].values()) <= ATOL
    onnx.checker.check_model(onnx.load(str(tmp_path / "g.onnx")))
