"""End-to-end gesture demo on a small synthetic set (CPU, a few minutes).

synthetic HaGRID-format set -> train teacher 1, teacher 2 (L=2, K=1) and the plain student ->
distil the student from both teachers -> COCO mAP of every model -> detect on test images ->
ONNX export checked against onnxruntime. Each step's YAML config is written to ``<out>/configs``
so the same run can be repeated with the CLI.

The four trainings run in ``jobs`` worker processes (the teachers side by side, then the student
beside the distillation, which needs both teachers), each on ``threads`` threads. A run is seeded
from its config alone, so its result does not depend on ``jobs``.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

from bevperc.gesture.config import (
    DistillConfig,
    DistillWeights,
    GestureDataConfig,
    GestureTrainConfig,
    OptimConfig,
)
from bevperc.gesture.presets import loss_engine_for_steps, student_config, teacher1_config, teacher2_config
from bevperc.losses.config import LossEngineConfig
from bevperc.utils.config import save_config
from bevperc.utils.io import atomic_write_json


def data_configs(root: str | Path, input_size: int = 64) -> tuple[GestureDataConfig, GestureDataConfig]:
    """(train, test) data configs of a set written by ``generate_synthetic_gestures``."""
    root = Path(root)
    train = GestureDataConfig(annotations_dir=str(root / "annotations" / "train"), images_dir=str(root / "images"),
                              input_size=input_size)
    return train, dataclasses.replace(train, annotations_dir=str(root / "annotations" / "test"))


def run_configs(
    root: str | Path, epochs: int, seed: int = 0, scale: int = 2, stage_k: int = 1, input_size: int = 64,
    batch_size: int = 16, lr: float = 3e-3, progress: bool = True, warmup_epochs: float = 0.0, num_threads: int = 0,
) -> dict[str, Any]:
    """Train configs of student / teacher1 / teacher2 / teacher2_resize and a distillation template."""
    train_data, _ = data_configs(root, input_size)
    optim = OptimConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                        warmup_epochs=warmup_epochs, num_threads=num_threads)
    big_data = dataclasses.replace(train_data, input_size=scale * input_size)
    return {
        "student": GestureTrainConfig(model=student_config(), data=train_data, optim=optim, role="student"),
        "teacher1": GestureTrainConfig(model=teacher1_config(), data=train_data, optim=optim, role="teacher1"),
        "teacher2": GestureTrainConfig(model=teacher2_config(scale, stage_k), data=big_data, optim=optim, role="teacher2"),
        "teacher2_resize": GestureTrainConfig(model=teacher2_config(scale, stage_k, aligned=False), data=big_data,
                                              optim=optim, role="teacher2_resize"),
        "distill": DistillConfig(student=student_config(), data=train_data,
                                 optim=dataclasses.replace(optim, loss_engine=LossEngineConfig()),
                                 teacher2_scale=scale, teacher2_stage_k=stage_k, weights=DistillWeights()),
    }


def default_jobs() -> int:
    """Worker processes for the demo's trainings: the CPU cores this process may use, at most 2 (the
    teachers side by side; then the student beside the distillation)."""
    return min(2, len(os.sched_getaffinity(0)))  # as evaluation.workers.default_workers counts the cores


class _InProcess(Executor):
    """An executor that runs each task at once in the calling process (``jobs <= 1``)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(error)
        return future


def run_demo(out: str | Path, num_train: int = 240, num_test: int = 80, epochs: int = 40, seed: int = 0,
             jobs: int = 1, threads: int = 1) -> dict[str, Any]:
    """The whole pipeline at the regime of ``bench/distill.py`` (its set sizes, epochs and engine schedule), so
    the demo shows what the bench measured: distillation closing most of the gap between the plain student
    and teacher 2 (docs/gesture.md). The trainings run in ``jobs`` processes of ``threads`` threads each
    (``jobs > 1``: spawned workers, no progress bars). Returns the summary written to ``<out>/demo_summary.json``."""
    from bevperc.gesture.data import SyntheticGestureSpec, generate_synthetic_gestures
    from bevperc.gesture.detect import detect_folder
    from bevperc.gesture.distill import distill_student
    from bevperc.gesture.evaluate import evaluate_checkpoint
    from bevperc.gesture.export import export_onnx
    from bevperc.gesture.train import train_detector

    out = Path(out)
    data_root = out / "data"
    generate_synthetic_gestures(data_root, num_train, num_test, seed, SyntheticGestureSpec(image_size=128), progress=True)
    cfgs = run_configs(data_root, epochs, seed, progress=jobs <= 1, num_threads=threads)
    executor = (ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1
                else _InProcess())
    with executor:
        runs = {}
        for role in ("teacher1", "teacher2", "student"):
            save_config(cfgs[role], out / "configs" / f"{role}.yaml")
            runs[role] = executor.submit(train_detector, cfgs[role], out / "runs" / role)
        ckpts = {role: runs[role].result() for role in ("teacher1", "teacher2")}
        steps = epochs * math.ceil(num_train / cfgs["distill"].optim.batch_size)
        distill = dataclasses.replace(cfgs["distill"], teacher1_checkpoint=str(ckpts["teacher1"]),
                                      teacher2_checkpoint=str(ckpts["teacher2"]),
                                      optim=dataclasses.replace(cfgs["distill"].optim,
                                                                loss_engine=loss_engine_for_steps(steps)))
        save_config(distill, out / "configs" / "distill.yaml")
        student_kd = executor.submit(distill_student, distill, out / "runs" / "student_kd")
        ckpts["student"] = runs["student"].result()
        ckpts["student_kd"] = student_kd.result()
    _, test_data = data_configs(data_root)
    save_config(test_data, out / "configs" / "test_data.yaml")
    metrics = {name: evaluate_checkpoint(path, test_data) for name, path in ckpts.items()}
    detect_folder(ckpts["student_kd"], data_root / "images", out / "detections", score_threshold=0.3, pattern="test_*")
    export = export_onnx(ckpts["student_kd"], out / "student_kd.onnx")
    summary = {"mAP50": {k: round(v["mAP50"], 4) for k, v in metrics.items()},
               "mAP": {k: round(v["mAP"], 4) for k, v in metrics.items()},
               "onnx_max_abs_diff": export["max_abs_diff"], "out": str(out)}
    atomic_write_json(out / "demo_summary.json", summary)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The demo's result as a few readable lines: every model's COCO mAP, the plain student beside the distilled."""
    names = {"teacher1": "teacher 1 (64 px)", "teacher2": "teacher 2 (128 px)", "student": "student, plain (64 px)",
             "student_kd": "student, distilled (64 px)"}
    lines = [f"{'model':<28}{'mAP@0.5':>9}{'mAP':>8}"]
    lines += [f"{label:<28}{summary['mAP50'][key]:>9.3f}{summary['mAP'][key]:>8.3f}" for key, label in names.items()]
    gain = summary["mAP50"]["student_kd"] - summary["mAP50"]["student"]
    lines.append(f"distillation: {gain:+.3f} mAP@0.5 for the same 64 px student (one seed; 8 seeds: docs/gesture.md)")
    return "\n".join(lines)
