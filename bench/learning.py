"""Benchmark: learning curves of the BEV detector, one or more recipe variants over seeds.

Each run is ``python -m bevperc.train`` in its own process (the config, the variant's overrides,
``train.seed``), validating the val split with the fast evaluator (whose metrics equal the devkit's)
every ``train.val_every`` epochs. The curve of a run is its validation history: mAP, NDS, the
mean TP errors and every class's AP against optimizer steps, sample-iterations and training wall
time (validation excluded). Writes ``<out>/learning.json`` (every run's curve and final scores)
and ``<out>/learning_curves.png`` (mAP, NDS and car AP against sample-iterations and wall time,
the seed mean per variant), and prints a table of final scores with the paired per-seed
difference from the first variant (± its standard error).

    python bench/learning.py --config configs/demo_cpu.yaml --out work_dirs/learning \\
        --variant today "model.view.depth_supervision=false" --variant recipe "" --seeds 0 1 --reuse
    python bench/learning.py --config configs/demo_cpu.yaml --out work_dirs/long --seeds 0 \\
        --variant long "train.epochs=60 train.val_every=5"

``--reuse`` keeps runs whose work dir already holds a finished run of the same command (so a table
can be filled over several invocations); ``--jobs 2 --threads 1`` runs two at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CURVE_PANELS = (("mAP", "mAP"), ("NDS", "NDS"), ("AP/car", "car AP"))


def run_command(config: str, work_dir: Path, seed: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "bevperc.train", "--config", config, "--work-dir", str(work_dir), "--resume",
            f"train.seed={seed}", "train.progress_bar=false", *overrides]


def train_run(config: str, work_dir: Path, seed: int, overrides: list[str], threads: int, reuse: bool) -> dict[str, Any]:
    """Train one run (or reuse a finished one) and return its curve and final scores."""
    command = run_command(config, work_dir, seed, overrides)
    stamp = work_dir / "bench_command.json"
    done = reuse and stamp.is_file() and json.loads(stamp.read_text()) == command[1:]
    if not done:
        work_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with open(work_dir / "bench_stdout.log", "a") as log:  # --resume continues an interrupted run
            subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        stamp.write_text(json.dumps(command[1:]))
    return read_run(work_dir)


def read_run(work_dir: Path) -> dict[str, Any]:
    """The validation curve of a finished run, from its latest checkpoint's history."""
    from bevperc.training.checkpoint import load_checkpoint

    state = load_checkpoint(work_dir / "checkpoints" / "latest.pth")
    batch = state["data"]["batch_size"] * state["data"]["world_size"]
    curve = [dict(entry, samples=entry["step"] * batch) for entry in state["history"]["val"]]
    if not curve:
        raise RuntimeError(f"{work_dir}: the run has no validation (set train.val_every > 0)")
    last = curve[-1]
    return {"work_dir": str(work_dir), "curve": curve, "final": {k: v for k, v in last.items() if k != "epoch"},
            "samples_per_s": last["samples"] / last["train_seconds"] if last.get("train_seconds") else None}


def _mean_sem(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, sem


def summarise(results: dict[str, dict[int, dict[str, Any]]], metrics: tuple[str, ...] = ("mAP", "NDS", "AP/car")) -> list[dict]:
    """Per variant: seed mean of the final metrics, and the paired difference from the first variant."""
    variants = list(results)
    reference = results[variants[0]]
    rows = []
    for name in variants:
        runs = results[name]
        row: dict[str, Any] = {"variant": name, "seeds": sorted(runs)}
        for metric in metrics:
            values = [run["final"].get(metric, float("nan")) for run in runs.values()]
            row[metric] = statistics.fmean(values)
            paired = [runs[s]["final"][metric] - reference[s]["final"][metric] for s in runs if s in reference]
            if name != variants[0] and paired:
                row[f"delta {metric}"], row[f"sem {metric}"] = _mean_sem(paired)
        row["train_seconds"] = statistics.fmean(run["final"]["train_seconds"] for run in runs.values())
        row["samples_per_s"] = statistics.fmean(run["samples_per_s"] for run in runs.values())
        rows.append(row)
    return rows


def print_table(rows: list[dict], metrics: tuple[str, ...] = ("mAP", "NDS", "AP/car")) -> None:
    header = ["variant", "seeds", *metrics, *(f"Δ {m} (± s.e.)" for m in metrics), "train s", "samples/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        deltas = [f"{row[f'delta {m}']:+.4f} ± {row[f'sem {m}']:.4f}" if f"delta {m}" in row else "" for m in metrics]
        cells = [row["variant"], str(len(row["seeds"])), *(f"{row[m]:.4f}" for m in metrics), *deltas,
                 f"{row['train_seconds']:.0f}", f"{row['samples_per_s']:.2f}"]
        print("| " + " | ".join(cells) + " |")


def plot_curves(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    """mAP, NDS and car AP against sample-iterations (top) and training wall time (bottom), seed means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(CURVE_PANELS), figsize=(5 * len(CURVE_PANELS), 7.5), squeeze=False)
    for name, runs in results.items():
        curves = [run["curve"] for run in runs.values()]
        length = min(len(curve) for curve in curves)
        for column, (metric, label) in enumerate(CURVE_PANELS):
            values = [statistics.fmean(c[i].get(metric, float("nan")) for c in curves) for i in range(length)]
            for row, x_key, x_label in ((0, "samples", "sample-iterations"), (1, "train_seconds", "training wall time (s)")):
                xs = [statistics.fmean(c[i][x_key] for c in curves) for i in range(length)]
                axes[row][column].plot(xs, values, marker="o", label=f"{name} ({len(curves)} seeds)")
                axes[row][column].set_xlabel(x_label)
                axes[row][column].set_ylabel(label)
                axes[row][column].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("BEV detector learning curves (val split, fast evaluator = devkit metrics)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="one work dir per variant and seed below this folder")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"),
                        help="a variant: its name and its config overrides in one string (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of each training process")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of the same command")
    parser.add_argument("overrides", nargs="*", help="overrides common to every variant")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = args.variant or [["default", ""]]
    out = Path(args.out)
    # seed by seed, so that with --jobs 2 the variants of a seed train side by side (paired wall times)
    jobs = [(name, seed, out / name / f"seed{seed}", [*args.overrides, *shlex.split(overrides)])
            for seed in args.seeds for name, overrides in variants]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {(name, seed): pool.submit(train_run, args.config, work_dir, seed, overrides, args.threads, args.reuse)
                   for name, seed, work_dir, overrides in jobs}
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for (name, seed), future in futures.items():
        results.setdefault(name, {})[seed] = future.result()
    rows = summarise(results)
    print_table(rows)
    payload = {"config": args.config, "common_overrides": args.overrides, "variants": dict(map(tuple, variants)),
               "table": rows, "runs": {name: {str(s): r for s, r in runs.items()} for name, runs in results.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(payload, indent=1))
    plot_curves(results, out / "learning_curves.png")
    print(f"wrote {out / 'learning.json'} and {out / 'learning_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
