"""Benchmark: batch-1 latency of the BEV detector, PyTorch eager vs onnxruntime, side by side in one run.

Configs: ``configs/demo_cpu.yaml`` and ``configs/bevdet_r50_256x704.yaml`` (``backbone.pretrained=false``:
random weights; BatchNorm statistics calibrated on the input so activations, hence the numerical
comparison, are realistic -- latency does not depend on the weights). Input: the real nuScenes
keyframe in ``../shared/data/nuscenes-real-sample`` (its images and calibration) when present,
else the nominal nuScenes rig with random images.

Rows per config (one call each per round, rounds interleaved, median over ``--repeats``):

* ``torch eager (cached plan)``    ``BEVDetector.forward``, pooling plan cached (fixed cameras);
* ``torch eager (plan per call)``  the plan recomputed every call (calibration changing);
* ``onnxruntime CPU, fixed rig``   the ``python -m bevperc.export`` graph, rig folded in;
* ``onnxruntime CPU, calib inputs`` the graph with intrinsics/extrinsics/image_aug as inputs;
* on a CUDA machine: ``torch eager CUDA``, ``onnxruntime CUDA EP`` and ``onnxruntime TensorRT EP``
  (both modes, when onnxruntime has those providers); otherwise skipped with the reason printed.

onnxruntime times include feeding numpy inputs and fetching outputs (host memory), as a deployment
would; torch CPU times are the forward alone. Also recorded: the max abs difference of every output
(onnxruntime vs torch) on the input; for scale, how far torch float32 and onnxruntime each are from
a float64 torch forward (``bevperc.export.float64_gaps``); export time, file size.

    PYTHONPATH=. .venv/bin/python bench/export.py --threads 1 --repeats 5     # -> bench/results/export.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bevperc.config import Config, load_run_config  # noqa: E402
from bevperc.export import (DEFAULT_REAL_SAMPLE, compare_with_torch, float64_gaps, info_sample_batch,  # noqa: E402
                            nominal_batch, onnx_metadata, write_detector_onnx)
from bevperc.inference import OnnxBEVDetector  # noqa: E402
from bevperc.models import build_detector  # noqa: E402
from bevperc.models.detector import BEVDetector  # noqa: E402
from bevperc.models.exportable import CALIBRATION_INPUTS  # noqa: E402
from bevperc.utils.io import atomic_write_json  # noqa: E402
from helpers.detectors import calibrate_batchnorm  # noqa: E402

CONFIGS = {"demo_cpu": ["configs/demo_cpu.yaml"],
           "bevdet_r50_256x704": ["configs/bevdet_r50_256x704.yaml", "model.backbone.pretrained=false"]}
GPU_PROVIDERS = {"onnxruntime CUDA EP": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "onnxruntime TensorRT EP": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def bench_input(cfg: Config) -> tuple[dict[str, Any], str]:
    """One sample (batch 1) and what it is."""
    if (DEFAULT_REAL_SAMPLE / "sample_info.json").is_file():
        return info_sample_batch(DEFAULT_REAL_SAMPLE, cfg), "real nuScenes keyframe (images and calibration)"
    return nominal_batch(cfg), "nominal nuScenes rig, random images"


def export_both(model: BEVDetector, cfg: Config, batch: dict[str, Any], folder: Path) -> dict[str, dict[str, Any]]:
    """Both graphs of ``python -m bevperc.export`` for the input's rig: mode -> {path, export_s, onnx_mb}."""
    rig = {key: batch[key][0] for key in CALIBRATION_INPUTS}
    out = {}
    for mode, mode_rig in (("fixed-rig", rig), ("inputs", None)):
        path = folder / f"{mode}.onnx"
        started = time.perf_counter()
        write_detector_onnx(model, path, mode_rig, onnx_metadata(cfg, mode_rig))
        out[mode] = {"path": path, "export_s": round(time.perf_counter() - started, 1),
                     "onnx_mb": round(path.stat().st_size / 2**20, 1)}
    return out


def cpu_methods(model: BEVDetector, cfg: Config, batch: dict[str, Any], graphs: dict[str, dict[str, Any]],
                threads: int) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The CPU rows as zero-argument calls; the accuracy of the ONNX graphs (vs torch float32 and float64)."""
    runners = {mode: OnnxBEVDetector(g["path"], cfg.model, threads=threads) for mode, g in graphs.items()}
    accuracy = {"max_abs_diff_per_output": {mode: compare_with_torch(model, r, batch) for mode, r in runners.items()},
                "float64_gaps (fixed rig)": float64_gaps(model, runners["fixed-rig"], batch)}

    def eager(recompute_plan: bool) -> Callable[[], Any]:
        def call() -> Any:
            if recompute_plan:
                model.view_transformer.plan_cache.clear()
            with torch.no_grad():
                return model(batch)
        return call

    methods = {"torch eager (cached plan)": eager(False), "torch eager (plan per call)": eager(True),
               "onnxruntime CPU, fixed rig": lambda: runners["fixed-rig"](batch),
               "onnxruntime CPU, calib inputs": lambda: runners["inputs"](batch)}
    return methods, accuracy


def gpu_methods(model: BEVDetector, cfg: Config, batch: dict[str, Any], graphs: dict[str, dict[str, Any]],
                skipped: list[str]) -> dict[str, Callable[[], Any]]:
    """CUDA rows where a GPU and the onnxruntime providers exist; otherwise reasons appended to ``skipped``."""
    methods: dict[str, Callable[[], Any]] = {}
    if not torch.cuda.is_available():
        skipped.append("CUDA rows (torch eager CUDA, onnxruntime CUDA / TensorRT EP): no CUDA device on this machine")
        return methods
    gpu_model = build_detector(cfg.model).cuda().eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu_batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def eager() -> Any:
        with torch.no_grad():
            out = gpu_model(gpu_batch)
        torch.cuda.synchronize()
        return out

    methods["torch eager CUDA (cached plan)"] = eager
    available = ort.get_available_providers()
    for label, providers in GPU_PROVIDERS.items():
        if providers[0] not in available:
            skipped.append(f"{label}: onnxruntime here has no {providers[0]} (available: {available})")
            continue
        for mode, graph in graphs.items():
            try:
                runner = OnnxBEVDetector(graph["path"], cfg.model, providers=providers)
                runner(batch)
            except Exception as err:  # a provider that cannot build this graph: report, keep benchmarking
                skipped.append(f"{label}, {mode}: {type(err).__name__}: {str(err)[:200]}")
                continue
            methods[f"{label}, {mode}"] = (lambda r=runner: r(batch))
    return methods


def interleaved_medians(methods: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, dict[str, Any]]:
    """Median wall time (ms) per method over ``repeats`` rounds of one call each, after ``warmup`` calls each."""
    for call in methods.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, call in methods.items():
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: {"median_ms": round(statistics.median(t), 1), "ms": [round(v, 1) for v in t]} for name, t in times.items()}


def bench_config(name: str, args: list[str], repeats: int, threads: int, skipped: list[str]) -> dict[str, Any]:
    cfg = load_run_config(REPO / args[0], args[1:])
    batch, source = bench_input(cfg)
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_detector(cfg.model), [batch])
    with tempfile.TemporaryDirectory() as folder:
        graphs = export_both(model, cfg, batch, Path(folder))
        methods, accuracy = cpu_methods(model, cfg, batch, graphs, threads)
        methods.update(gpu_methods(model, cfg, batch, graphs, skipped))
        rows = interleaved_medians(methods, repeats)
    reference = rows["torch eager (cached plan)"]["median_ms"]
    for row in rows.values():
        row["vs_torch_cached"] = round(row["median_ms"] / reference, 3)
    diffs = accuracy["max_abs_diff_per_output"]
    return {"config": " ".join(args), "input": source, "rows": rows,
            "max_abs_diff": {mode: max(d.values()) for mode, d in diffs.items()}, **accuracy,
            "export": {mode: {k: v for k, v in g.items() if k != "path"} for mode, g in graphs.items()}}


def print_table(results: dict[str, Any]) -> None:
    for name, result in results["configs"].items():
        print(f"\n{name}  ({result['config']}; {result['input']})")
        for method, row in result["rows"].items():
            print(f"  {method:<42} {row['median_ms']:>9.1f} ms   x{row['vs_torch_cached']:.2f} of torch eager (cached plan)")
        print("  max |onnxruntime - torch| over outputs: " +
              ", ".join(f"{mode} {value:.1e}" for mode, value in result["max_abs_diff"].items()) +
              "; from a float64 forward: " +
              ", ".join(f"{label} {value:.1e}" for label, value in result["float64_gaps (fixed rig)"].items()))
    for reason in results["skipped"]:
        print(f"skipped: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "export.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skipped: list[str] = []
    started = time.perf_counter()
    results = {"command": "bench/export.py " + " ".join(sys.argv[1:]), "threads": args.threads, "repeats": args.repeats,
               "machine": {"cpu_count": __import__("os").cpu_count(), "processor": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "onnxruntime": ort.__version__,
                           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
               "configs": {name: bench_config(name, CONFIGS[name], args.repeats, args.threads, skipped)
                           for name in args.configs},
               "skipped": list(dict.fromkeys(skipped))}
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print_table(results)
    atomic_write_json(args.out, results)
    print(f"\n{results['wall_s']} s -> {args.out}")


if __name__ == "__main__":
    main()
