"""Data-loading throughput of the training dataset: samples/s for 0, 1, 2 DataLoader workers.

    .venv/bin/python bench/data_loading.py --dataroot data/nuscenes-synthetic --split mini_train \
        --input-size 256 704 --batches 20
    .venv/bin/python bench/data_loading.py ... --workers 0 --cache    # + the decoded-image cache, side by side

    .venv/bin/python bench/data_loading.py ... --workers 0 1 --blas --beside-training --json bench/results/blas_threads.json

Each setting runs in the same process one after the other on the same samples (first
epoch of a fixed seed), with full training augmentation; the first batch (worker
start-up) is excluded from the timing. With ``--cache`` every setting is measured with JPEG
decoding and with a filled image cache (``data.image_cache``), alternately; with 0 workers the
CPU seconds per sample are the pipeline's whole cost. With ``--blas`` every setting is measured
with numpy's BLAS on its default thread pool and on one thread (``bevperc.utils.threads``; the
trainer's data workers use one), alternately, and a 3x3 ``np.linalg.inv`` is timed in this process
both ways. ``--beside-training`` runs a training-like load meanwhile (a second process doing conv
forward/backward on ``--training-threads`` torch threads), as the training step runs beside its
data workers, and reports that load's steps/s during each measurement: what the loading costs the
training. Prints a markdown table (and ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader

from bevperc.data import DataConfig, NuScenesBEVDataset, collate_bev
from bevperc.models.config import BEVGridConfig
from bevperc.utils.io import atomic_write_json
from bevperc.utils.threads import init_data_worker


def measure(dataset: NuScenesBEVDataset, workers: int, batch_size: int, batches: int,
            one_blas_thread: bool = False) -> tuple[float, float]:
    """(samples/s, this process's CPU seconds per sample); ``one_blas_thread``: numpy's BLAS on one thread
    in the workers (or in this process with 0 workers), else its default pool."""
    if one_blas_thread and workers == 0:
        with threadpool_limits(limits=1, user_api="blas"):
            return measure(dataset, workers, batch_size, batches)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_bev,
                        persistent_workers=False, worker_init_fn=init_data_worker if one_blas_thread else None)
    iterator = iter(loader)
    next(iterator)  # start-up
    start, cpu = time.perf_counter(), time.process_time()
    seen = 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        seen += batch["images"].shape[0]
    return seen / (time.perf_counter() - start), (time.process_time() - cpu) / seen


def inverse_microseconds(repeats: int = 200) -> float:
    """Median microseconds of one ``np.linalg.inv`` of a 3x3 matrix (the data pipeline's typical BLAS call)."""
    matrix = np.eye(3) + 0.1 * np.random.default_rng(0).random((3, 3))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.linalg.inv(matrix)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def _training_load(threads: int, stop: Any, steps: Any) -> None:
    torch.set_num_threads(threads)
    conv = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 32, 3, padding=1))
    images = torch.randn(4, 32, 64, 176)
    while not stop.is_set():
        conv(images).square().mean().backward()
        with steps.get_lock():
            steps.value += 1


@contextlib.contextmanager
def training_load(threads: int) -> Iterator[Any]:
    """A second process busy with conv forward/backward steps on ``threads`` torch threads while the block
    runs; yields its step counter (a ``multiprocessing.Value``)."""
    ctx = multiprocessing.get_context("spawn")
    stop, steps = ctx.Event(), ctx.Value("q", 0)
    process = ctx.Process(target=_training_load, args=(threads, stop, steps), daemon=True)
    process.start()
    time.sleep(3.0)  # past its start-up
    try:
        yield steps
    finally:
        stop.set()
        process.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", default="data/nuscenes-synthetic")
    parser.add_argument("--version", default="v1.0-mini")
    parser.add_argument("--split", default="mini_train")
    parser.add_argument("--input-size", type=int, nargs=2, default=(256, 704))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--depth", action="store_true", help="also build LiDAR depth maps")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", action="store_true", help="also measure with the decoded-image cache (filled first)")
    parser.add_argument("--rounds", type=int, default=1, help="measurements of each setting, alternating")
    parser.add_argument("--blas", action="store_true",
                        help="measure every setting with numpy's default BLAS pool and with one BLAS thread, alternately")
    parser.add_argument("--beside-training", action="store_true", help="a training-like load in a second process meanwhile")
    parser.add_argument("--training-threads", type=int, default=2, help="torch threads of that load")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    with training_load(args.training_threads) if args.beside_training else contextlib.nullcontext() as load:
        rows, inverse = run(args, load)
    print(f"| workers | images | numpy BLAS | samples/s ({args.input_size[0]}x{args.input_size[1]}, 6 cameras, depth "
          f"maps: {args.depth}) | CPU s / sample (this process) | training-like load, steps/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        load_rate = "-" if row["load_steps_per_s"] is None else f"{row['load_steps_per_s']:.2f}"
        print(f"| {row['workers']} | {row['images']} | {row['blas']} | {row['samples_per_s']:.2f} "
              f"| {row['cpu_s_per_sample']:.3f} | {load_rate} |")
    if inverse:
        print("3x3 np.linalg.inv in this process, median microseconds: "
              + ", ".join(f"{name} {value:.1f}" for name, value in inverse.items()))
    if args.json:
        atomic_write_json(args.json, {"command": "python bench/data_loading.py " + " ".join(sys.argv[1:]),
                                      "rows": rows, "inverse_3x3_us": inverse,
                                      "training_threads": args.training_threads if args.beside_training else None})


def run(args: argparse.Namespace, load: Any = None) -> tuple[list[dict], dict[str, float]]:
    """The table's rows (medians over the rounds) and the median 3x3-inverse time per BLAS setting; ``load``:
    the step counter of a training-like load running meanwhile (its steps/s go into each row)."""
    torch.set_num_threads(1)
    datasets = {}
    for cached in (False, True) if args.cache else (False,):
        cfg = DataConfig(dataroot=args.dataroot, version=args.version, input_size=tuple(args.input_size),
                         gt_range=BEVGridConfig().bounds, load_depth=args.depth, image_cache=cached)
        datasets["image cache" if cached else "JPEG decoding"] = NuScenesBEVDataset(cfg, args.split, train=True)
    if args.cache:  # fill the cache with every sample the measurement reads
        measure(datasets["image cache"], 0, args.batch_size, args.batches)
    blas_settings = {"default pool": False, "one thread": True} if args.blas else {"default pool": False}
    rows = []
    inverse: dict[str, list[float]] = {name: [] for name in blas_settings}
    for workers in args.workers:
        results: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {
            (name, blas): [] for name in datasets for blas in blas_settings}
        for _ in range(args.rounds):
            for (name, blas) in results:
                start, load_start = time.perf_counter(), load.value if load is not None else 0
                rate, cpu = measure(datasets[name], workers, args.batch_size, args.batches, blas_settings[blas])
                load_rate = None if load is None else (load.value - load_start) / (time.perf_counter() - start)
                results[(name, blas)].append((rate, cpu, load_rate))
            if args.blas:
                for blas, one in blas_settings.items():
                    with threadpool_limits(limits=1, user_api="blas") if one else contextlib.nullcontext():
                        inverse[blas].append(inverse_microseconds())
        for (name, blas), values in results.items():
            rows.append({"workers": workers, "images": name, "blas": blas, "rounds": [list(v) for v in values],
                         "samples_per_s": statistics.median(v[0] for v in values),
                         "cpu_s_per_sample": statistics.median(v[1] for v in values),
                         "load_steps_per_s": None if load is None else statistics.median(v[2] for v in values)})
    return rows, ({blas: statistics.median(v) for blas, v in inverse.items()} if args.blas else {})


if __name__ == "__main__":
    main()
