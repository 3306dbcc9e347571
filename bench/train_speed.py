"""Training-step throughput of detector variants, measured side by side.

Every variant is a set of config overrides on one run config. Each measurement is a fresh
process (``--threads`` torch threads) that builds the variant's detector, loads one batch of the
train split through the real data pipeline, and times ``--steps`` full training steps (forward,
losses, backward, AdamW) on it after ``--warmup`` steps: model compute only, data loading
excluded (``bench/data_loading.py`` measures that). Variants run in turn, round after round
(A B C A B C ...), so a change in the machine's speed hits all of them alike; the table gives
each variant's median samples/s over the rounds and its median ratio to the first variant
within the same round.

    python bench/train_speed.py --config configs/demo_cpu.yaml --rounds 3 \\
        --variant today "model.backbone.name=resnet model.view.feature_stride=16" --variant recipe ""
    python bench/train_speed.py --config configs/demo_cpu.yaml --variant float32 "train.amp=false" \\
        --variant bfloat16 "train.amp=true train.amp_dtype=bfloat16"      # CPU autocast, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(config: str, overrides: list[str], steps: int, warmup: int, device: str = "cpu") -> dict[str, float]:
    """One process: samples/s of training steps of the variant on one real batch (and the peak GPU
    memory on CUDA); with the variant's ``train.amp`` the forward pass runs under autocast in its
    ``train.amp_dtype``."""
    import torch

    from bevperc.config import load_run_config
    from bevperc.data.dataset import NuScenesBEVDataset, collate_bev
    from bevperc.training.trainer import move_to_device
    from bevperc.models.detector import default_task_weights
    from bevperc.models.detector import build_detector

    cfg = load_run_config(config, overrides)
    amp = cfg.train.amp_dtype if cfg.train.amp else None
    dataset = NuScenesBEVDataset(cfg.data, cfg.data.train_split, train=True)
    batch = move_to_device(collate_bev([dataset[i % len(dataset)] for i in range(cfg.train.batch_size)]), torch.device(device))
    torch.manual_seed(0)
    model = build_detector(cfg.model).to(device).train()
    weights = default_task_weights(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=amp == "float16")
    cuda = device.startswith("cuda")

    def step() -> None:
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=getattr(torch, amp or "float32"),
                            enabled=amp is not None):
            task_losses, _ = model.loss(model(batch), batch)
            loss = sum(weights[name] * value for name, value in task_losses.items())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    result = {"samples_per_s": steps * cfg.train.batch_size / wall,
              "cpu_s_per_sample": (time.process_time() - cpu) / (steps * cfg.train.batch_size),
              "parameters": sum(p.numel() for p in model.parameters())}
    if cuda:
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), default=[],
                        help="a variant: its name and its config overrides in one string (repeatable, at least one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (adds the peak GPU memory)")
    parser.add_argument("--json", help="write the rounds and the table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, printed as JSON
    parser.add_argument("overrides", nargs="*", help="overrides common to every variant")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(args.config, [*args.overrides, *shlex.split(args.worker)], args.steps, args.warmup,
                                 args.device)))
        return 0
    if not args.variant:
        print("bench/train_speed.py: give at least one --variant NAME OVERRIDES", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rounds: list[dict[str, dict[str, float]]] = []
    for _ in range(args.rounds):
        results = {}
        for name, overrides in args.variant:
            command = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps), "--warmup",
                       str(args.warmup), "--device", args.device,
                       "--worker", overrides, *args.overrides]
            output = subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(output.strip().splitlines()[-1])
        rounds.append(results)
    reference = args.variant[0][0]
    table = []
    print(f"| variant | samples/s (median of {args.rounds}) | × {reference} (paired) | CPU s / sample | parameters |")
    print("|---|---|---|---|---|")
    for name, _ in args.variant:
        rates = [r[name]["samples_per_s"] for r in rounds]
        ratio = statistics.median(r[name]["samples_per_s"] / r[reference]["samples_per_s"] for r in rounds)
        cpu = statistics.median(r[name]["cpu_s_per_sample"] for r in rounds)
        row = {"variant": name, "samples_per_s": statistics.median(rates), "ratio": ratio, "cpu_s_per_sample": cpu,
               "parameters": rounds[0][name]["parameters"], "min": min(rates), "max": max(rates)}
        table.append(row)
        if "peak_gpu_memory_gib" in rounds[0][name]:
            row["peak_gpu_memory_gib"] = max(r[name]["peak_gpu_memory_gib"] for r in rounds)
        memory = f" | {row['peak_gpu_memory_gib']:.2f} GiB" if "peak_gpu_memory_gib" in row else ""
        print(f"| {name} | {row['samples_per_s']:.2f} ({row['min']:.2f}-{row['max']:.2f}) | {ratio:.2f} | {cpu:.3f} | "
              f"{row['parameters'] / 1e6:.2f} M{memory} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "threads": args.threads, "steps": args.steps,
                                               "device": args.device,
                                               "variants": dict(map(tuple, args.variant)), "rounds": rounds,
                                               "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
