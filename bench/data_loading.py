"""Data-loading throughput of the training dataset: samples/s for 0, 1, 2 DataLoader workers.

    .venv/bin/python bench/data_loading.py --dataroot data/nuscenes-synthetic --split mini_train \
        --input-size 256 704 --batches 20

Each setting runs in the same process one after the other on the same samples (first
epoch of a fixed seed), with full training augmentation; the first batch (worker
start-up) is excluded from the timing. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from bevperc.data import DataConfig, NuScenesBEVDataset, collate_bev


def measure(dataset: NuScenesBEVDataset, workers: int, batch_size: int, batches: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_bev,
                        persistent_workers=False)
    iterator = iter(loader)
    next(iterator)  # start-up
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        seen += batch["images"].shape[0]
    return seen / (time.perf_counter() - start)


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
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = DataConfig(dataroot=args.dataroot, version=args.version, input_size=tuple(args.input_size), load_depth=args.depth)
    dataset = NuScenesBEVDataset(cfg, args.split, train=True)
    print(f"| workers | samples/s ({args.input_size[0]}x{args.input_size[1]}, 6 cameras, depth maps: {args.depth}) |")
    print("|---|---|")
    for workers in args.workers:
        rate = measure(dataset, workers, args.batch_size, args.batches)
        print(f"| {workers} | {rate:.1f} |")


if __name__ == "__main__":
    main()
