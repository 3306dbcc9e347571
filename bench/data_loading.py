"""Data-loading throughput of the training dataset: samples/s for 0, 1, 2 DataLoader workers.

    .venv/bin/python bench/data_loading.py --dataroot data/nuscenes-synthetic --split mini_train \
        --input-size 256 704 --batches 20
    .venv/bin/python bench/data_loading.py ... --workers 0 --cache    # + the decoded-image cache, side by side

Each setting runs in the same process one after the other on the same samples (first
epoch of a fixed seed), with full training augmentation; the first batch (worker
start-up) is excluded from the timing. With ``--cache`` every setting is measured with JPEG
decoding and with a filled image cache (``data.image_cache``), alternately; with 0 workers the
CPU seconds per sample are the pipeline's whole cost. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from bevperc.data import DataConfig, NuScenesBEVDataset, collate_bev
from bevperc.models.config import BEVGridConfig


def measure(dataset: NuScenesBEVDataset, workers: int, batch_size: int, batches: int) -> tuple[float, float]:
    """(samples/s, this process's CPU seconds per sample)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_bev,
                        persistent_workers=False)
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets = {}
    for cached in (False, True) if args.cache else (False,):
        cfg = DataConfig(dataroot=args.dataroot, version=args.version, input_size=tuple(args.input_size),
                         gt_range=BEVGridConfig().bounds, load_depth=args.depth, image_cache=cached)
        datasets["image cache" if cached else "JPEG decoding"] = NuScenesBEVDataset(cfg, args.split, train=True)
    if args.cache:  # fill the cache with every sample the measurement reads
        measure(datasets["image cache"], 0, args.batch_size, args.batches)
    print(f"| workers | images | samples/s ({args.input_size[0]}x{args.input_size[1]}, 6 cameras, depth maps: "
          f"{args.depth}) | CPU s / sample (this process) |")
    print("|---|---|---|---|")
    for workers in args.workers:
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in datasets}
        for _ in range(args.rounds):
            for name, dataset in datasets.items():
                results[name].append(measure(dataset, workers, args.batch_size, args.batches))
        for name, values in results.items():
            rate = sorted(v[0] for v in values)[len(values) // 2]
            cpu = sorted(v[1] for v in values)[len(values) // 2]
            print(f"| {workers} | {name} | {rate:.1f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
