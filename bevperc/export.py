"""``python -m bevperc.export``: export a model to ONNX (standard operators only), checked by onnxruntime.

BEV detector (``configs/*.yaml`` + a training checkpoint)::

    python -m bevperc.export --config configs/demo_cpu.yaml --checkpoint work/checkpoints/latest.pth --out bev.onnx
    python -m bevperc.export --config configs/demo_cpu.yaml --checkpoint K --out bev_calib.onnx --calibration inputs

Gesture detectors (the checkpoints of ``python -m bevperc.gesture``)::

    python -m bevperc.export --gesture --checkpoint work_dirs/gesture/student_kd/model.pt --out student.onnx

The BEV graph (``bevperc.models.exportable.ExportableBEVDetector``) takes ``images``
``[B, 6, 3, H, W]`` (normalised, as ``bevperc.data`` makes them) and, with ``--calibration
inputs``, ``intrinsics`` ``[B, 6, 3, 3]``, ``ego_from_camera`` ``[B, 6, 4, 4]`` and ``image_aug``
``[B, 6, 3, 3]``; with ``--calibration fixed-rig`` (default) the rig of ``--rig`` is folded into
the graph as constant pooling indices. Outputs: ``"<group>.<branch>"`` ``[B, c, ny, nx]`` and
``"depth"`` ``[B, 6, D, h, w]``, the keys of ``BEVDetector.forward``; decode them with
``bevperc.inference.OnnxBEVDetector`` (``python -m bevperc.eval --config C --onnx model.onnx``).

Before the file lands at ``--out`` (atomically) the command checks it: ``onnx.checker``, no
operator outside the standard ONNX domain, and onnxruntime vs PyTorch on real inputs -- samples
of the config's dataset, the real nuScenes keyframe in ``../shared/data/nuscenes-real-sample``
when present, else the nominal rig with random images -- printing the max abs difference of
every output; any above ``--atol`` (1e-4) fails the export. The numbers go to ``<out>.check.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from bevperc.config import Config
from bevperc.data.dataset import NuScenesBEVDataset, collate_bev, prepare_image
from bevperc.data.infos import CAMERA_NAMES
from bevperc.inference import ONNX_METADATA_PREFIX, OnnxBEVDetector, load_detector
from bevperc.models.detector import BEVDetector
from bevperc.models.exportable import CALIBRATION_INPUTS, CALIBRATION_MODES, ExportableBEVDetector
from bevperc.utils.config import to_dict
from bevperc.utils.io import atomic_write, atomic_write_json

DEFAULT_REAL_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nuscenes-real-sample"
DEFAULT_OPSET = 17
MIN_OPSET = 16
"""ScatterElements with ``reduction="add"``; below 16 torch exports scatter_add as an overwrite (wrong sums)."""
DEFAULT_ATOL = 1e-4


class ExportCheckError(RuntimeError):
    """onnxruntime and PyTorch disagree beyond the tolerance, or the graph uses a non-standard operator."""


# --------------------------------------------------------------------------- inputs: rigs and check samples
def dataset_batch(cfg: Config, split: str, indices: Sequence[int]) -> dict[str, Any]:
    """Samples ``indices`` of ``split`` through the test-time data pipeline, collated (``bevperc.data`` batch)."""
    dataset = NuScenesBEVDataset(cfg.data, split, train=False)
    missing = [i for i in indices if not 0 <= i < len(dataset)]
    if missing:
        raise ValueError(f"{dataset.info_path}: no sample {missing} (the split has {len(dataset)})")
    return collate_bev([dataset[i] for i in indices])


def _batch_from_images(images: list[Image.Image], intrinsics: np.ndarray, ego_from_camera: np.ndarray, cfg: Config,
                       token: str, global_from_ego: np.ndarray) -> dict[str, Any]:
    """A one-sample model batch from 6 original camera images and their calibration (identity ``bev_aug``)."""
    prepared = [prepare_image(image, image.size, None, cfg.data) for image in images]
    return {
        "images": torch.stack([image for image, _ in prepared])[None],
        "intrinsics": torch.tensor(intrinsics, dtype=torch.float32)[None],
        "ego_from_camera": torch.tensor(ego_from_camera, dtype=torch.float32)[None],
        "image_aug": torch.tensor(np.stack([aug for _, aug in prepared]), dtype=torch.float32)[None],
        "bev_aug": torch.eye(4)[None],
        "global_from_ego": torch.tensor(global_from_ego, dtype=torch.float64)[None],
        "sample_token": [token],
    }


def info_sample_batch(root: str | Path, cfg: Config) -> dict[str, Any]:
    """The keyframe of an mmdet3d-style ``root/sample_info.json`` (e.g. the real nuScenes sample) as a model batch."""
    from bevperc.viz.samples import load_info_sample

    sample = load_info_sample(root)
    images = [Image.fromarray(image) for image in sample.images]
    return _batch_from_images(images, sample.intrinsics, sample.ego_from_camera, cfg, sample.sample_token,
                              sample.extra["global_from_ego"])


def nominal_batch(cfg: Config, seed: int = 0) -> dict[str, Any]:
    """The nominal nuScenes rig (calibration of the synthetic world, from a real log) with random 1600x900 images."""
    from bevperc.synthetic.rig import camera_intrinsics, ego_from_camera

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (900, 1600, 3), dtype=np.uint8)) for _ in CAMERA_NAMES]
    return _batch_from_images(images, np.stack([camera_intrinsics(c) for c in CAMERA_NAMES]),
                              np.stack([ego_from_camera(c) for c in CAMERA_NAMES]), cfg, "nominal", np.eye(4))


def rig_from(source: str, cfg: Config, split: str, index: int) -> dict[str, torch.Tensor]:
    """``{"intrinsics": [N, 3, 3], "ego_from_camera": [N, 4, 4], "image_aug": [N, 3, 3]}`` of a rig source.

    ``source``: ``"dataset"`` (sample ``index`` of ``split``), ``"nominal"`` (``nominal_batch``) or a
    folder holding an mmdet3d-style ``sample_info.json``.
    """
    if source == "dataset":
        batch = dataset_batch(cfg, split, [index])
    elif source == "nominal":
        batch = nominal_batch(cfg)
    elif (Path(source) / "sample_info.json").is_file():
        batch = info_sample_batch(source, cfg)
    else:
        raise FileNotFoundError(f"--rig {source}: not 'dataset', 'nominal', or a folder with sample_info.json")
    return {key: batch[key][0] for key in CALIBRATION_INPUTS}


def check_batches(cfg: Config, split: str, index: int, real_sample: Path | None) -> dict[str, dict[str, Any]]:
    """Named inputs for the onnxruntime check: two dataset samples (batch 2: a dynamic batch axis), the real keyframe."""
    batches: dict[str, dict[str, Any]] = {}
    if Path(cfg.data.info_path(split)).is_file():
        dataset = NuScenesBEVDataset(cfg.data, split, train=False)
        picks = [i for i in (index, index + 1) if i < len(dataset)]
        batches[f"{split}{picks}"] = collate_bev([dataset[i] for i in picks])
    if real_sample is not None and (real_sample / "sample_info.json").is_file():
        batches["nuscenes-real-sample"] = info_sample_batch(real_sample, cfg)
    if not batches:
        batches["nominal rig, random images"] = nominal_batch(cfg)
    return batches


# --------------------------------------------------------------------------- export and check
def standard_domain_ops(model_proto: Any) -> list[str]:
    """Sorted operator types of the graph; raises ``ExportCheckError`` for any node or opset outside the ONNX domain."""
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model_proto.graph.node if n.domain not in ("", "ai.onnx")})
    custom += [f"opset_import {o.domain}" for o in model_proto.opset_import if o.domain not in ("", "ai.onnx")]
    if custom:
        raise ExportCheckError(f"graph uses operators outside the standard ONNX domain: {custom}")
    return sorted({n.op_type for n in model_proto.graph.node})


def onnx_metadata(cfg: Config, rig: dict[str, torch.Tensor] | None, checkpoint: str | Path | None = None) -> dict[str, str]:
    """The metadata ``OnnxBEVDetector`` reads: calibration mode, model config, the baked rig (and the source checkpoint)."""
    metadata = {f"{ONNX_METADATA_PREFIX}calibration": "fixed-rig" if rig is not None else "inputs",
                f"{ONNX_METADATA_PREFIX}model_config": json.dumps(to_dict(cfg.model))}
    if rig is not None:
        metadata[f"{ONNX_METADATA_PREFIX}rig"] = json.dumps({key: value.tolist() for key, value in rig.items()})
    if checkpoint is not None:
        metadata[f"{ONNX_METADATA_PREFIX}checkpoint"] = str(checkpoint)
    return metadata


def write_detector_onnx(model: BEVDetector, path: str | Path, rig: dict[str, torch.Tensor] | None, metadata: dict[str, str],
                        opset: int = DEFAULT_OPSET) -> ExportableBEVDetector:
    """Trace ``ExportableBEVDetector(model, rig)`` into ``path`` (batch axis dynamic), add ``metadata``, run ``onnx.checker``."""
    import onnx

    wrapper = ExportableBEVDetector(model.eval(), rig).eval()
    height, width = model.view_transformer.view_cfg.input_size
    args: tuple[torch.Tensor, ...] = (torch.zeros(1, wrapper.cameras, 3, height, width),)
    if rig is None:
        args += tuple(torch.eye(n)[None, None].repeat(1, wrapper.cameras, 1, 1) for n in (3, 4, 3))
    names = wrapper.input_names + wrapper.output_names
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python ints from shapes: the dims are fixed by the config
        torch.onnx.export(wrapper, args, str(path), input_names=wrapper.input_names, output_names=wrapper.output_names,
                          dynamic_axes={name: {0: "batch"} for name in names}, opset_version=opset, dynamo=False)
    model_proto = onnx.load(str(path))
    for key, value in metadata.items():
        model_proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model_proto, full_check=True)
    onnx.save(model_proto, str(path))
    return wrapper


def as_the_graph_sees_it(runner: OnnxBEVDetector, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with a fixed-rig graph's baked calibration in place of its own (which that graph ignores)."""
    batch = dict(batch)
    for key, value in runner.rig.items():
        batch[key] = value.expand_as(batch[key])
    return batch


@torch.no_grad()
def compare_with_torch(model: BEVDetector, runner: OnnxBEVDetector, batch: dict[str, Any]) -> dict[str, float]:
    """Max abs difference of every output between onnxruntime and ``model.forward`` on ``batch``."""
    batch = as_the_graph_sees_it(runner, batch)
    expected = model.eval()(batch)
    got = runner(batch)
    return {name: float((got[name] - expected[name]).abs().max()) for name in runner.output_names}


@torch.no_grad()
def float64_gaps(model: BEVDetector, runner: OnnxBEVDetector, batch: dict[str, Any]) -> dict[str, float]:
    """Max abs distance (over outputs) of PyTorch float32 and of onnxruntime from a float64 PyTorch forward.

    The scale of float32 rounding on this input: a deep network's float32 outputs are only this
    close to the exact result, whichever runtime computes them.
    """
    batch = as_the_graph_sees_it(runner, batch)
    exact = copy.deepcopy(model).double().eval()(
        {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()})
    runs = {"torch float32": model.eval()(batch), "onnxruntime": runner(batch)}
    return {label: max(float((out[name].double() - exact[name]).abs().max()) for name in runner.output_names)
            for label, out in runs.items()}


def format_differences(diffs: dict[str, dict[str, float]], atol: float) -> str:
    """One row per output, one column per check input; ``!`` marks a value above ``atol``."""
    inputs = list(diffs)
    outputs = list(next(iter(diffs.values())))
    width = max(len(name) for name in outputs)
    lines = [f"{'max |onnxruntime - torch|':<{width}}  " + "  ".join(f"{name:>26}" for name in inputs)]
    for output in outputs:
        cells = [f"{diffs[i][output]:>25.2e}{'!' if not diffs[i][output] <= atol else ' '}" for i in inputs]
        lines.append(f"{output:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def export_detector(cfg: Config, checkpoint: str | Path, out: str | Path, calibration: str = "fixed-rig",
                    rig_source: str = "dataset", split: str | None = None, index: int = 0,
                    real_sample: Path | None = DEFAULT_REAL_SAMPLE, opset: int = DEFAULT_OPSET,
                    atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Export the detector of ``cfg`` + ``checkpoint`` to ``out`` and check it; returns the report.

    Raises ``ExportCheckError`` (and writes nothing at ``out``) when a check fails.
    """
    import onnx

    if calibration not in CALIBRATION_MODES:
        raise ValueError(f"calibration: expected one of {CALIBRATION_MODES}, got {calibration!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset}: the BEV pooling needs opset >= {MIN_OPSET} (ScatterElements with reduction)")
    split = split or cfg.data.val_split
    model = load_detector(cfg, checkpoint)
    rig = rig_from(rig_source, cfg, split, index) if calibration == "fixed-rig" else None
    metadata = onnx_metadata(cfg, rig, checkpoint)
    batches = check_batches(cfg, split, index, real_sample)
    report: dict[str, Any] = {"onnx": str(out), "calibration": calibration, "opset": opset, "atol": atol,
                              "rig": rig_source if rig is not None else None}

    def write_and_check(tmp: str) -> None:
        started = time.perf_counter()
        wrapper = write_detector_onnx(model, tmp, rig, metadata, opset)
        report["export_s"] = round(time.perf_counter() - started, 2)
        report["operators"] = standard_domain_ops(onnx.load(tmp, load_external_data=False))
        report["inputs"], report["outputs"] = wrapper.input_names, wrapper.output_names
        report["splatted_points_per_sample"] = wrapper.num_points
        runner = OnnxBEVDetector(tmp, cfg.model)
        report["max_abs_diff"] = {name: compare_with_torch(model, runner, batch) for name, batch in batches.items()}
        report["size_mb"] = round(Path(tmp).stat().st_size / 2**20, 2)
        print(format_differences(report["max_abs_diff"], atol))
        bad = {i: {o: f"{v:.1e}" for o, v in d.items() if not v <= atol} for i, d in report["max_abs_diff"].items()}
        bad = {i: d for i, d in bad.items() if d}
        if bad:
            name = next(iter(bad))
            gaps = float64_gaps(model, runner, batches[name])
            raise ExportCheckError(
                f"{out}: onnxruntime differs from PyTorch beyond atol={atol}: {bad}. For scale, on {name} PyTorch "
                f"float32 is up to {gaps['torch float32']:.1e} and onnxruntime up to {gaps['onnxruntime']:.1e} from a "
                "float64 PyTorch forward (a bigger --atol is justified only if those are alike). Nothing written")

    atomic_write(out, write_and_check)
    atomic_write_json(Path(out).with_suffix(".check.json"), report)
    return report


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bevperc.export", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint (.pth / gesture model.pt)")
    parser.add_argument("--out", type=Path, required=True, help="path of the .onnx file")
    parser.add_argument("--config", type=Path, help="BEV detector: the run config YAML of the checkpoint")
    parser.add_argument("--gesture", action="store_true", help="export a gesture detector checkpoint instead (no --config)")
    parser.add_argument("--calibration", choices=CALIBRATION_MODES, default="fixed-rig",
                        help="fixed-rig: the rig folded into the graph; "
                             "inputs: intrinsics, ego_from_camera, image_aug are graph inputs")
    parser.add_argument("--rig", default="dataset",
                        help="fixed-rig: 'dataset' (sample --index of --split), 'nominal' (nuScenes rig), "
                             "or a folder with sample_info.json")
    parser.add_argument("--split", default=None, help="dataset split for the rig and the check (default: data.val_split)")
    parser.add_argument("--index", type=int, default=0, help="dataset sample for the rig and the check")
    parser.add_argument("--real-sample", type=Path, default=DEFAULT_REAL_SAMPLE,
                        help="folder with the real nuScenes keyframe for the check (skipped when absent)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max abs difference allowed per output")
    parser.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    return parser


def _export_gesture(args: argparse.Namespace) -> dict[str, Any]:
    from bevperc.gesture.export import export_onnx

    report = export_onnx(args.checkpoint, args.out, opset=args.opset, atol=args.atol)
    print(json.dumps(report["max_abs_diff"]))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gesture == (args.config is not None):
        parser.error("give --config (BEV detector) or --gesture, one of them")
    started = time.perf_counter()
    try:
        if args.gesture:
            report = _export_gesture(args)
        else:
            from bevperc.config import load_run_config

            if not args.config.is_file():
                raise FileNotFoundError(f"--config {args.config}: no such file")
            cfg = load_run_config(args.config, args.overrides)
            report = export_detector(cfg, args.checkpoint, args.out, args.calibration, args.rig, args.split, args.index,
                                     args.real_sample, args.opset, args.atol)
    except ExportCheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # ConfigError, DataError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{report['onnx']}  (checked: max abs diff <= {report['atol']:g})  {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
