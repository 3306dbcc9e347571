"""Benchmark: dual-teacher cross-resolution distillation on the synthetic gesture set.

For each seed: train teacher 1, teacher 2 (stride-aligned, L=2, K=1), teacher 2 for the resize
alternative, and the plain student; then distil the student with

    t1 only (full) | t2 only (full, stride-aligned) | t2 only (full, maps resized)
    both, features only | both, heads only | both, full

each once with the fixed weighted sum of the tasks (``<variant>``) and once balanced by the loss
engine (``<variant>@engine``), and score everything with COCO mAP on the test split. Reports
mAP@0.5, mAP@[.5:.95] (mean +- std over seeds), the paired per-seed difference from the student
(+- s.e.), the gap closed G = (KD - student) / (teacher 2 - student) on the seed means (and per
seed, averaged), the issue's goals checked on the means, and
student/teacher parameters and CPU latency at each model's input size (batch 1, measured side by
side in this process with the same thread count). The "on" weights of a variant are the
``DistillWeights`` defaults (teacher 1: features 1, heads 1; teacher 2: features 5, heads 1).

    python bench/distill.py --jobs 2 --threads 1     # 8 seeds, 240 train images, 40 epochs (see Regime)
    python bench/distill.py --quick                  # smoke run: tiny set, 2 epochs, 1 seed

Regime: at 20 epochs the plain student was still mid-jump (learning the grating cue), so G was noise;
at 40 epochs (60 gave the same plateaus, bench/results/distill_probe_e40_regime.json) every run's
training loss has levelled off and every student fits its 240 training images. What still differs
between seeds is generalisation: whether a run learned the grating or memorised its images is decided
early, by the init and by float rounding. The plain student's test mAP@0.5 spans 0.56-0.97 over
seeds 0-7, and the same seed on another CPU can land on the other side (seed 0, teacher 2 only:
0.893 on one machine, 0.589 on another; both full: 0.655 vs 0.920). So one seed's row is a
coin toss: the default is 8 seeds, the table gives paired differences against the student with
their standard errors, and G of the seed means (a seed whose student nearly matches teacher 2
makes its own G a ratio of two noise terms). With 960 images the student reaches teacher 2 (no gap
left); a 2-epoch LR warm-up (--warmup-epochs) did not move seed 0. Only the base runs that the
selected --variants need are trained (student and teacher 2 always, for G); with --reuse, runs
already in --out with the same config are kept, so invocations can fill one table in stages.

Threads: each worker calls torch.set_num_threads(--threads, default 1); on this shared 2-core
CPU one thread per process is several times faster than two (less OpenMP spinning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = {
    # name: (teacher1 features, teacher1 heads, teacher2 features, teacher2 heads on?, teacher2 alignment)
    "kd_t1": (True, True, False, False, "stride"),
    "kd_t2": (False, False, True, True, "stride"),
    "kd_t2_resize": (False, False, True, True, "resize"),
    "kd_both_features": (True, False, True, False, "stride"),
    "kd_both_heads": (False, True, False, True, "stride"),
    "kd_both_full": (True, True, True, True, "stride"),
}
ENGINE_SUFFIX = "@engine"
BASE_RUNS = ("teacher1", "teacher2", "teacher2_resize", "student")
ALWAYS_RUN = ("teacher2", "student")  # the two ends of the gap G


def on_weights(weights: list[float] | tuple[float, ...] | None) -> Any:
    """The "on" teacher weights of the variants: ``--weights`` (T1F T1H T2F T2H) or ``DistillWeights()``."""
    from bevperc.gesture.config import DistillWeights

    return DistillWeights(*weights) if weights else DistillWeights()


def needed_base_runs(variants: list[str], weights: tuple[float, float, float, float] | None = None) -> list[str]:
    """The base runs the selected variants need, in BASE_RUNS order: student and teacher 2 always (G needs
    them), teacher 1 only if a variant gives it a non-zero weight, teacher2_resize only for a resize variant."""
    full = on_weights(weights)
    needed = set(ALWAYS_RUN)
    for name in variants:
        if name.split(ENGINE_SUFFIX)[0] not in VARIANTS:
            continue  # a base-run name
        t1f, t1h, t2f, t2h, align = VARIANTS[name.split(ENGINE_SUFFIX)[0]]
        if (t1f and full.teacher1_features > 0) or (t1h and full.teacher1_heads > 0):
            needed.add("teacher1")
        if align == "resize" and ((t2f and full.teacher2_features > 0) or (t2h and full.teacher2_heads > 0)):
            needed.add("teacher2_resize")
    return [r for r in BASE_RUNS if r in needed]


def parse_engine_options(items: list[str]) -> dict[str, Any]:
    """``["first_weighting=fixed", "lag_floor=0.3"]`` -> LossEngineConfig overrides (checked against its fields)."""
    from bevperc.losses.engine import LossEngineConfig
    from bevperc.utils.config import safe_load_yaml

    fields = {f.name for f in dataclasses.fields(LossEngineConfig)}
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--engine-option {item!r}: expected KEY=VALUE with KEY a LossEngineConfig field "
                             f"({', '.join(sorted(fields))})")
        options[key] = safe_load_yaml(value)
    return options


def run_seed(args: dict[str, Any]) -> dict[str, Any]:
    """Train + distil + evaluate every variant for one seed (runs in its own process)."""
    import torch

    torch.set_num_threads(args["threads"])
    from bevperc.gesture.config import DistillWeights
    from bevperc.gesture.data import GestureDataset
    from bevperc.gesture.demo import data_configs, run_configs
    from bevperc.gesture.distill import distill_student
    from bevperc.gesture.presets import loss_engine_for_steps
    from bevperc.gesture.evaluate import evaluate_model
    from bevperc.gesture.train import load_centernet, train_detector
    from bevperc.losses.config import LossEngineConfig

    seed = args["seed"]
    out = Path(args["out"]) / f"seed{seed}"
    cfgs = run_configs(args["data"], args["epochs"], seed=seed, progress=False, input_size=args["input_size"],
                       batch_size=args["batch_size"], lr=args["lr"], warmup_epochs=args.get("warmup_epochs", 0.0))
    train_cfg, test_cfg = data_configs(args["data"], args["input_size"])
    s = args["input_size"]
    train_set = GestureDataset(train_cfg, [s, 2 * s])
    train_small = GestureDataset(train_cfg, [s], records=train_set.records)
    train_big = GestureDataset(dataclasses.replace(train_cfg, input_size=2 * s), [2 * s], records=train_set.records)
    test_set = GestureDataset(test_cfg, [s, 2 * s])
    steps = args["epochs"] * math.ceil(len(train_set) / args["batch_size"])
    results: dict[str, Any] = {}
    ckpts: dict[str, Path] = {}
    timings: dict[str, float] = {}

    def score(name: str, path: Path, image_index: int) -> None:
        model, _ = load_centernet(path)
        results[name] = evaluate_model(model, test_set, image_index)
        print(f"[seed {seed}] {name}: mAP50={results[name]['mAP50']:.3f} mAP={results[name]['mAP']:.3f} "
              f"({timings[name]:.0f} s)", flush=True)

    reused: list[str] = []

    def run_or_reuse(name: str, cfg: Any, run_dir: Path, train: Any) -> Path:
        """``train()`` -> checkpoint, unless --reuse finds a finished run with this config in run_dir."""
        if args.get("reuse") and _same_run(cfg, run_dir):
            reused.append(name)  # same config, same data, same code: deterministic
            timings[name] = json.loads((run_dir / "history.json").read_text()).get("train_seconds", float("nan"))
            return run_dir / "model.pt"
        start = time.perf_counter()
        path = train()
        timings[name] = time.perf_counter() - start
        return path

    for role in needed_base_runs(args["variants"], args.get("weights")):
        dataset = train_big if role.startswith("teacher2") else train_small
        ckpts[role] = run_or_reuse(role, cfgs[role], out / role,
                                   lambda: train_detector(cfgs[role], out / role, dataset=dataset))
        score(role, ckpts[role], 1 if role.startswith("teacher2") else 0)
    full = on_weights(args.get("weights"))
    for mode in args["engine_modes"]:
        engine = (loss_engine_for_steps(steps, **args.get("engine_options", {})) if mode == "engine"
                  else LossEngineConfig(enabled=False))
        distill_optim = dataclasses.replace(cfgs["distill"].optim, loss_engine=engine)
        for variant, (t1f, t1h, t2f, t2h, align) in VARIANTS.items():
            name = variant + (ENGINE_SUFFIX if mode == "engine" else "")
            if name not in args["variants"]:
                continue
            weights = DistillWeights(full.teacher1_features * t1f, full.teacher1_heads * t1h,
                                     full.teacher2_features * t2f, full.teacher2_heads * t2h)
            cfg = dataclasses.replace(
                cfgs["distill"], optim=distill_optim, weights=weights, teacher2_align=align,
                feature_norm=args.get("feature_norm", "global"), feature_region=args.get("feature_region", "all"),
                teacher1_checkpoint=str(ckpts["teacher1"]) if "teacher1" in ckpts else None,
                teacher2_checkpoint=str(ckpts["teacher2_resize" if align == "resize" else "teacher2"]))
            run_dir = out / name.replace("@", "_")
            ckpts[name] = run_or_reuse(name, cfg, run_dir, lambda: distill_student(cfg, run_dir, dataset=train_set))
            score(name, ckpts[name], 0)
            summary = json.loads((run_dir / "engine_summary.json").read_text())
            results[name]["task_sets"] = summary.get("task_sets")
    return {"seed": seed, "results": results, "train_seconds": timings, "reused": reused}


def _same_run(cfg: Any, run_dir: Path) -> bool:
    """True when run_dir holds a finished run (model.pt) saved with exactly this config (its config.yaml
    loads to ``cfg``, old field spellings such as ``optim.engine`` included)."""
    from bevperc.utils.config import ConfigError, load_config

    if not (run_dir / "model.pt").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    try:
        return load_config(type(cfg), run_dir / "config.yaml") == cfg
    except ConfigError:
        return False


def measure_latency(input_size: int, threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """Parameters and median CPU latency (batch 1) of student / teachers, side by side."""
    import torch

    from bevperc.gesture.presets import student_config, teacher1_config, teacher2_config
    from bevperc.models.centernet import CenterNet, count_parameters

    torch.set_num_threads(threads)
    models = {"student": (student_config(), input_size), "teacher1": (teacher1_config(), input_size),
              "teacher2": (teacher2_config(2, 1), 2 * input_size),
              "teacher2_resize": (teacher2_config(2, 1, aligned=False), 2 * input_size)}
    built = {k: (CenterNet(cfg, 4).eval(), size) for k, (cfg, size) in models.items()}
    times: dict[str, list[float]] = {k: [] for k in built}
    with torch.no_grad():
        for _ in range(repeats):  # interleaved so load changes hit every model alike
            for name, (model, size) in built.items():
                image = torch.randn(1, 3, size, size)
                start = time.perf_counter()
                model(image)
                times[name].append(time.perf_counter() - start)
    return {k: {"params": count_parameters(built[k][0]), "input_size": built[k][1],
                "latency_ms": 1000 * statistics.median(v[2:] or v)} for k, v in times.items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (stdev / sqrt(n)); for paired per-seed differences."""
    mean, std = _mean_std(values)
    return mean, std / math.sqrt(len(values))


def run_names(engine_modes: list[str], variants: list[str] | None = None, base_runs: tuple[str, ...] = BASE_RUNS) -> list[str]:
    """Base runs, then the distilled variants of each engine mode (all, or those in ``variants``), in table order."""
    names = list(base_runs)
    for mode in engine_modes:
        names += [v + (ENGINE_SUFFIX if mode == "engine" else "") for v in VARIANTS]
    return [n for n in names if n in BASE_RUNS or variants is None or n in variants]


def check_goals(table: dict[str, Any], engine_modes: list[str]) -> dict[str, dict[str, Any]]:
    """The issue's goals on the seed means (mAP@0.5), per engine mode."""
    goals: dict[str, dict[str, Any]] = {}
    for mode in engine_modes:
        sfx = ENGINE_SUFFIX if mode == "engine" else ""

        def m(name: str) -> float:
            return table[name]["mAP50"][0] if name in table else float("nan")

        def have(*names: str) -> bool:
            return all(n + sfx in table for n in names)

        goals[mode] = {}
        if have("kd_both_full"):
            full = "kd_both_full" + sfx
            # G of the seed means: a seed whose student nearly matches teacher 2 (gap 0.02) makes its own
            # per-seed G a ratio of two noise terms, and the per-seed mean inherits that noise.
            goals[mode]["G_full_mAP50"] = table[full]["G_of_means_mAP50"]
            goals[mode]["G_full_at_least_0.5"] = table[full]["G_of_means_mAP50"] >= 0.5
            goals[mode]["full_not_worse_than_student"] = m(full) >= m("student")
            goals[mode]["full_not_worse_than_student_every_seed"] = table[full]["not_worse_every_seed"]
        if have("kd_both_full", "kd_t1", "kd_t2"):
            goals[mode]["both_beat_best_single_teacher"] = m("kd_both_full" + sfx) > max(m("kd_t1" + sfx), m("kd_t2" + sfx))
        elif have("kd_both_full", "kd_t2"):
            goals[mode]["both_beat_teacher2_only"] = m("kd_both_full" + sfx) > m("kd_t2" + sfx)
        if have("kd_t2", "kd_t2_resize"):
            goals[mode]["stride_aligned_beats_resize"] = m("kd_t2" + sfx) > m("kd_t2_resize" + sfx)
    return goals


def summarise(seed_results: list[dict[str, Any]], latency: dict[str, Any],
              engine_modes: list[str], variants: list[str] | None = None) -> tuple[dict[str, Any], str]:
    trained = [r for r in BASE_RUNS if all(r in s["results"] for s in seed_results)]
    names = run_names(engine_modes, variants, tuple(trained))
    table: dict[str, Any] = {}
    for name in names:
        row: dict[str, Any] = {}
        for metric in ("mAP50", "mAP"):
            vals = [r["results"][name][metric] for r in seed_results]
            row[metric] = _mean_std(vals)
            if name not in BASE_RUNS:
                gaps = []
                for r in seed_results:
                    base, top = r["results"]["student"][metric], r["results"]["teacher2"][metric]
                    gaps.append((r["results"][name][metric] - base) / (top - base) if top != base else float("nan"))
                row[f"G_{metric}"] = _mean_std(gaps)
                means = {k: statistics.fmean(r["results"][k][metric] for r in seed_results) for k in ("student", "teacher2")}
                denom = means["teacher2"] - means["student"]
                row[f"G_of_means_{metric}"] = (row[metric][0] - means["student"]) / denom if denom else float("nan")
        if name not in BASE_RUNS:
            row["not_worse_every_seed"] = all(r["results"][name]["mAP50"] >= r["results"]["student"]["mAP50"]
                                              for r in seed_results)
            diffs = [r["results"][name]["mAP50"] - r["results"]["student"]["mAP50"] for r in seed_results]
            row["delta_vs_student_mAP50"] = _mean_sem(diffs)
            row["seeds_better_than_student"] = sum(d > 0 for d in diffs)
        table[name] = row
    lines = ["| model / variant | mAP@0.5 | mAP@[.5:.95] | Δ mAP@0.5 vs student (paired ± s.e.) | seeds better | "
             "G of means (mAP@0.5 / mAP) | G per seed (mAP@0.5) |", "|---|---|---|---|---|---|---|"]
    for name in names:
        row = table[name]
        cells = [f"{row['mAP50'][0]:.3f} ± {row['mAP50'][1]:.3f}", f"{row['mAP'][0]:.3f} ± {row['mAP'][1]:.3f}"]
        if name not in BASE_RUNS:
            delta = row["delta_vs_student_mAP50"]
            cells += [f"{delta[0]:+.3f} ± {delta[1]:.3f}", f"{row['seeds_better_than_student']}/{len(seed_results)}",
                      f"{row['G_of_means_mAP50']:+.2f} / {row['G_of_means_mAP']:+.2f}",
                      f"{row['G_mAP50'][0]:+.2f} ± {row['G_mAP50'][1]:.2f}"]
        else:
            cells += ["", "", "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| model | input | parameters | CPU latency (ms, batch 1) | x student |", "|---|---|---|---|---|"]
    base = latency["student"]["latency_ms"]
    for name, info in latency.items():
        lines.append(f"| {name} | {info['input_size']}x{info['input_size']} | {info['params']:,} | "
                     f"{info['latency_ms']:.2f} | {info['latency_ms'] / base:.1f} |")
    goals = check_goals(table, engine_modes)
    lines += ["", "| goal (seed means, mAP@0.5) | " + " | ".join(engine_modes) + " |", "|---|" + "---|" * len(engine_modes)]
    keys = list(dict.fromkeys(k for m in engine_modes for k in goals[m]))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(
            "" if key not in goals[m] else f"{goals[m][key]:+.2f}" if isinstance(goals[m][key], float)
            else str(goals[m][key]) for m in engine_modes) + " |")
    per_seed = ["", "| mAP@0.5 per seed | " + " | ".join(str(r["seed"]) for r in seed_results) + " |",
                "|---|" + "---|" * len(seed_results)]
    for name in names:
        per_seed.append(f"| {name} | " + " | ".join(f"{r['results'][name]['mAP50']:.3f}" for r in seed_results) + " |")
    lines += per_seed
    table["goals"] = goals
    return table, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 48/16 images, 2 epochs, 1 seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--num-train", type=int, default=240)
    parser.add_argument("--num-test", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-epochs", type=float, default=0.0, help="linear LR warm-up before the cosine")
    parser.add_argument("--input-size", type=int, default=64, help="student input; teacher 2 sees 2x")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run as this many parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--grating-period", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="class-detail period in px at 256 px (default: SyntheticGestureSpec's 8.8-10.4)")
    parser.add_argument("--engine", choices=("fixed", "engine", "both"), default="both",
                        help="distil with the fixed weighted sum, the loss engine, or each (default)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="distil only these variants (names as in the table, e.g. kd_t2 kd_both_full@engine); "
                             f"default all of {', '.join(VARIANTS)} in each --engine mode")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a run (teacher, student or distilled variant) already in --out whose saved config is "
                             "identical (training is deterministic for a config, data seed, code and thread count), "
                             "so several invocations can fill one table")
    parser.add_argument("--weights", type=float, nargs=4, default=None, metavar=("T1F", "T1H", "T2F", "T2H"),
                        help="the 'on' teacher weights (teacher 1 features, heads, teacher 2 features, heads); "
                             "default DistillWeights()")
    parser.add_argument("--feature-norm", choices=("global", "channel"), default="global",
                        help="feature-mimicry normalisation (DistillConfig.feature_norm)")
    parser.add_argument("--feature-region", choices=("all", "objects"), default="all",
                        help="feature-mimicry cells (DistillConfig.feature_region)")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override one LossEngineConfig field of the @engine variants (repeatable; VALUE is YAML), "
                             "e.g. --engine-option first_weighting=fixed")
    parser.add_argument("--out", default="work_dirs/bench_distill")
    parser.add_argument("--data-dir", default=None,
                        help="where the synthetic set is written (default OUT/data); with the same --data-dir, "
                             "runs in another --out (base runs linked there) have identical configs, so --reuse "
                             "keeps them when comparing KD settings")
    args = parser.parse_args(argv)
    try:
        engine_options = parse_engine_options(args.engine_option)
    except ValueError as error:
        parser.error(str(error))
    if args.variants:
        known = set(run_names(["fixed", "engine"])) - set(BASE_RUNS)
        unknown = sorted(set(args.variants) - known)
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {sorted(known)}")
    if args.quick:
        args.num_train, args.num_test, args.epochs, args.seeds = 48, 16, 2, args.seeds[:1]
    out = Path(args.out)
    engine_modes = ["fixed", "engine"] if args.engine == "both" else [args.engine]
    from bevperc.gesture.data import SyntheticGestureSpec, cue_visibility, generate_synthetic_gestures
    from bevperc.utils.io import atomic_write_json

    data = Path(args.data_dir) if args.data_dir else out / "data"
    start = time.perf_counter()
    spec = SyntheticGestureSpec(image_size=2 * args.input_size)
    if args.grating_period:
        spec = dataclasses.replace(spec, grating_period=tuple(args.grating_period))
    generate_synthetic_gestures(data, args.num_train, args.num_test, args.data_seed, spec)
    jobs = [{"seed": s, "out": str(out), "data": str(data), "epochs": args.epochs, "input_size": args.input_size,
             "batch_size": args.batch_size, "lr": args.lr,
             "warmup_epochs": args.warmup_epochs, "threads": args.threads,
             "engine_modes": engine_modes, "reuse": args.reuse, "weights": args.weights,
             "feature_norm": args.feature_norm, "feature_region": args.feature_region,
             "engine_options": engine_options,
             "variants": args.variants or run_names(engine_modes)} for s in args.seeds]
    if args.jobs > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            seed_results = pool.map(run_seed, jobs)
    else:
        seed_results = [run_seed(job) for job in jobs]
    latency = measure_latency(args.input_size, args.threads, repeats=30 if args.quick else 100)
    table, markdown = summarise(seed_results, latency, engine_modes, args.variants)
    wall = time.perf_counter() - start
    print(markdown)
    print(f"\n{len(args.seeds)} seed(s), {args.num_train} train / {args.num_test} test images, {args.epochs} epochs, "
          f"student {args.input_size}px, teacher 2 {2 * args.input_size}px (L=2, K=1); wall {wall:.0f} s on this CPU")
    from bevperc.gesture.config import DistillConfig
    from bevperc.utils.config import to_dict

    kd_settings = {"weights": to_dict(on_weights(args.weights)), "engine_options": engine_options, "feature_norm": args.feature_norm,
                   "feature_region": args.feature_region, "heatmap_temperature": DistillConfig().heatmap_temperature}
    atomic_write_json(out / "results.json", {"args": vars(args), "kd_settings": kd_settings,
                                             "per_seed": seed_results, "summary": table,
                                             "latency": latency, "wall_seconds": wall, "markdown": markdown,
                                             "cue_visibility": cue_visibility(spec, args.input_size, 2 * args.input_size)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
