"""Benchmark: task weighting on the BEV detector (issue 15): the loss engine against fixed weights and anchors.

Every (method, seed) is one ``python -m bevperc.train`` run of the config (``bench/learning.py``'s
runner: same data, same schedule, ``--reuse`` keeps finished runs across invocations), differing only
in the ``loss`` overrides of :func:`method_overrides`. Seeds are the outer loop, so every method of a
seed finishes before the next seed starts.

From each run's last validation (the fast evaluator; the devkit's metrics) it records mAP, NDS and the
quality of every head task measured by the metric that task drives, per class group of the head:
heatmap -> AP (mean over the group's classes), offset and height -> ATE, size -> ASE, rotation ->
AOE, velocity -> AVE (mean over the group's classes where the devkit defines the error). A task's
relative gap in a run is its distance to the best value any method reached for it on that seed
(``(AP_best - AP) / AP_best``, ``(err - err_best) / err_best``); the run's worst task is its largest
gap. Writes ``bench/results/bev_task_weighting.json`` (metric values, so everything can be recomputed)
after every finished run, and prints the table of the ``--methods`` with paired per-seed differences from
``--reference``; ``--table`` trains nothing and prints that table from the runs recorded in ``--json``.

    python bench/task_weighting.py --config configs/demo_cpu.yaml --out work_dirs/task_weighting \\
        --seeds 0 1 2 --jobs 2 --threads 1 --reuse
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learning import _mean_sem, train_run  # noqa: E402
from loss_engine import NORMALISED  # noqa: E402

from bevperc.losses.config import LossEngineConfig  # noqa: E402

METHODS = ("fixed", "default", "window", "tasklag", "tasklag_long", "normalised", "famo", "uncertainty", "equal")
METHOD_FIELDS = ("grouping", "condition", "first_weighting", "loss_scale", "first_weight_temperature",
                 "lag_temperature", "lag_reference", "affinity_memory")
"""The ``loss`` fields that make the method (the schedule fields stay the config's)."""
VARIANTS = {"window": {"lag_reference": "grouping", "affinity_memory": "window"},
            "tasklag": {"first_weighting": "fixed_lag", "first_weight_temperature": 1.0}}
VARIANTS["tasklag_long"] = {**VARIANTS["tasklag"], "progress_windows": 30}
"""Methods that differ from the engine's default in the fields given (the default's value for the others)."""
METRIC_OF_BRANCH = {"heatmap": "AP", "offset": "ATE", "height": "ATE", "size": "ASE", "rotation": "AOE", "velocity": "AVE"}
"""The metric each head task drives; offset and height both drive ATE (one entry per group)."""
TP_ERROR_KEYS = {"ATE": "trans_err", "ASE": "scale_err", "AOE": "orient_err", "AVE": "vel_err"}
HIGHER_IS_BETTER = {"AP"}
UNLEARNABLE = {"AVE"}
"""Metrics a single keyframe cannot learn (velocity): the second worst-task column leaves them out, so that
noise in a task no method can learn does not decide which method lags least."""


def method_overrides(method: str, task_names: list[str]) -> list[str]:
    """Config overrides of a method; everything else (the engine's schedule too) comes from the config.

    ``fixed``: plain weighted sum with CenterPoint's nuScenes weights (heatmap 1, regression 0.25 x code
    weights, velocity 0.2 -> 0.05) and BEVDepth's depth weight 3 (``default_task_weights``);
    ``default``: the engine's own defaults (``LossEngineConfig()``: task sets clustered on the affinity of
    every window so far, the lag condition with its start kept from the first grouping, ...), whatever
    the config's ``loss:`` section says about the method; ``window``: the default until session 27,
    called ``default`` in the docs of sessions 23-26 (each grouping on its own affinity window, the
    lag's start reset at every regrouping: ``affinity_memory=window``, ``lag_reference=grouping``);
    ``tasklag``: the default, with the first weights moved inside each set by the
    gated per-task lag rule around the tuned weights (``first_weighting=fixed_lag``, temperature 1);
    ``tasklag_long``: tasklag with the learnability gate fitted over 30 condition calls instead of 6;
    ``normalised``:
    the engine's default until issue 15 (first losses normalised by each task's recent loss, lag rule
    at temperature 0.33 from the initial losses); ``famo`` / ``uncertainty``: the anchors as published,
    one set per task on the raw losses with the fixed weights as priors, updated every step;
    ``equal``: a plain sum, every weight 1.
    """
    anchor = ["loss.enabled=true", "loss.grouping=per_task", "loss.first_weighting=fixed",
              "loss.first_weight_temperature=0", "loss.condition_every=1"]
    if method == "fixed":
        return ["loss.enabled=false"]
    if method == "default":
        return ["loss.enabled=true", *(f"loss.{name}={getattr(LossEngineConfig(), name)}" for name in METHOD_FIELDS)]
    if method in VARIANTS:
        variant = VARIANTS[method]
        names = dict.fromkeys((*METHOD_FIELDS, *variant))
        return ["loss.enabled=true", *(f"loss.{name}={variant.get(name, getattr(LossEngineConfig(), name))}"
                                       for name in names)]
    if method == "normalised":
        return ["loss.enabled=true", "loss.grouping=cluster", "loss.condition=lag",
                *(f"loss.{name}={value}" for name, value in NORMALISED.items())]
    if method == "famo":
        return [*anchor, "loss.condition=famo", "loss.history_length=2"]
    if method == "uncertainty":
        return [*anchor, "loss.condition=uncertainty"]
    if method == "equal":
        weights = ", ".join(f"'{name}': 1.0" for name in task_names)
        return ["loss.enabled=false", f"loss.fixed_weights={{{weights}}}"]
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def task_metrics(summary: dict[str, Any], class_groups: list[list[str]]) -> dict[str, float]:
    """``"<group>.<metric>"`` -> value from a devkit ``metrics_summary.json``, per class group of the head."""
    tasks: dict[str, float] = {}
    for group in class_groups:
        name = "+".join(group)
        tasks[f"{name}.AP"] = statistics.fmean(summary["mean_dist_aps"][c] for c in group)
        for metric, key in TP_ERROR_KEYS.items():
            values = [summary["label_tp_errors"][c][key] for c in group]
            defined = [v for v in values if v == v]  # the devkit gives NaN where an error is undefined
            if defined:
                tasks[f"{name}.{metric}"] = statistics.fmean(defined)
    return tasks


def last_validation(work_dir: Path) -> dict[str, Any]:
    epochs = sorted((work_dir / "val").glob("epoch_*/metrics_summary.json"))
    if not epochs:
        raise RuntimeError(f"{work_dir}: no validation metrics under val/ (set train.val_every)")
    return json.loads(epochs[-1].read_text())


def relative_gaps(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (method, seed): task -> relative gap to the best value any method reached on that seed."""
    gaps: dict[tuple[str, int], dict[str, float]] = {}
    for seed in {run["seed"] for run in runs}:
        same_seed = [run for run in runs if run["seed"] == seed]
        for task in same_seed[0]["tasks"]:
            metric = task.rsplit(".", 1)[1]
            values = [run["tasks"][task] for run in same_seed]
            best = max(values) if metric in HIGHER_IS_BETTER else min(values)
            for run in same_seed:
                value = run["tasks"][task]
                gap = (best - value) / best if metric in HIGHER_IS_BETTER else (value - best) / best
                gaps.setdefault((run["method"], seed), {})[task] = gap if best > 0 else 0.0
    return gaps


def _seed_values(method: str, seeds: list[int], by_key: dict, gaps: dict) -> dict[str, list[float]]:
    """Per seed of a method: mAP, NDS, its worst task's gap and its worst learnable task's gap."""
    def learnable(seed: int) -> list[float]:
        return [gap for task, gap in gaps[method, seed].items() if task.rsplit(".", 1)[1] not in UNLEARNABLE]
    return {"mAP": [by_key[method, s]["mAP"] for s in seeds], "NDS": [by_key[method, s]["NDS"] for s in seeds],
            "worst_gap": [max(gaps[method, s].values()) for s in seeds],
            "worst_learnable_gap": [max(learnable(s)) for s in seeds]}


def summarise(runs: list[dict[str, Any]], reference: str = "default") -> list[dict[str, Any]]:
    """Per method: seed means of mAP, NDS and the worst task's gap, and paired differences (method -
    reference) over the seeds on which every method ran (the gaps need all methods of a seed)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    complete = sorted(s for s in {r["seed"] for r in runs} if {r["method"] for r in runs if r["seed"] == s} == set(methods))
    scored = [r for r in runs if r["seed"] in complete]
    gaps = relative_gaps(scored)
    by_key = {(r["method"], r["seed"]): r for r in scored}
    rows = []
    for method in methods:
        row: dict[str, Any] = {"method": method, "seeds": [s for s in complete if (method, s) in by_key]}
        if not row["seeds"]:
            continue
        values = _seed_values(method, row["seeds"], by_key, gaps)
        row |= {name: statistics.fmean(v) for name, v in values.items()}
        row["worst_task"] = [max(gaps[method, s], key=gaps[method, s].get) for s in row["seeds"]]
        row["gaps"] = {task: statistics.fmean(gaps[method, s][task] for s in row["seeds"]) for task in gaps[method, row["seeds"][0]]}
        if method != reference and all((reference, s) in by_key for s in row["seeds"]):
            ref = _seed_values(reference, row["seeds"], by_key, gaps)
            for name in values:
                row[f"delta_{name}"], row[f"sem_{name}"] = _mean_sem([a - b for a, b in zip(values[name], ref[name])])
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], reference: str = "default") -> None:
    print(f"| method | seeds | mAP | NDS | worst task gap | worst gap without AVE | Δ mAP vs {reference} | Δ NDS | "
          "Δ worst gap | Δ worst gap without AVE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        deltas = [f"{row[f'delta_{n}']:+.4f} ± {row[f'sem_{n}']:.4f}" if f"delta_{n}" in row else "–"
                  for n in ("mAP", "NDS", "worst_gap", "worst_learnable_gap")]
        print(f"| {row['method']} | {len(row['seeds'])} | {row['mAP']:.4f} | {row['NDS']:.4f} | "
              f"{row['worst_gap']:.3f} ({', '.join(sorted(set(row['worst_task'])))}) | "
              f"{row['worst_learnable_gap']:.3f} | " + " | ".join(deltas) + " |")


def recorded_runs(path: Path, config: str, overrides_of) -> dict[tuple[str, int], dict[str, Any]]:
    """Finished runs of an earlier invocation, from its results file: ``(method, seed)`` -> run, for the
    runs trained from the same config with the same overrides (the work dirs need not exist any more,
    so a bench can be completed over several sessions or machines). Other runs in the file are dropped."""
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    if record.get("config") != config:
        print(f"{path}: written for config {record.get('config')!r}, not {config!r}: not reused", flush=True)
        return {}
    kept, stale = {}, []
    for run in record.get("runs", []):
        if run.get("method") in METHODS and run.get("overrides") == overrides_of(run["method"]):
            kept[run["method"], run["seed"]] = run
        else:
            stale.append(f"{run.get('method')} seed {run.get('seed')}")
    if stale:
        print(f"{path}: not reused (other overrides): {', '.join(stale)}", flush=True)
    return kept


def trained_at(work_dir: Path) -> str | None:
    """The git commit of the code that trained a run (its ``run_info.json``; None if unknown)."""
    info = work_dir / "run_info.json"
    return (json.loads(info.read_text()).get("git") or {}).get("commit") if info.is_file() else None


def print_gap_table(rows: list[dict[str, Any]]) -> None:
    """Per task (rows) and method (columns): the mean relative gap to the best method of the seed."""
    if not rows:
        return
    print("| task | " + " | ".join(row["method"] for row in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for task in rows[0]["gaps"]:
        print(f"| {task} | " + " | ".join(f"{row['gaps'][task]:.3f}" for row in rows) + " |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="one work dir per method and seed below this folder")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of each training process")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs of the same config and overrides: those recorded in --json, and "
                             "finished work dirs under --out")
    parser.add_argument("--table", action="store_true",
                        help="train nothing: print the table of the --methods and --seeds recorded in --json")
    parser.add_argument("--reference", default="default", choices=METHODS,
                        help="the method the paired differences are taken from (default: default)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "bev_task_weighting.json"))
    parser.add_argument("overrides", nargs="*", help="overrides common to every run (e.g. data.dataroot=...)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bevperc.config import load_run_config
    from bevperc.models.detector import task_names
    from bevperc.utils.io import atomic_write_json

    args = parse_args(argv)
    cfg = load_run_config(args.config, args.overrides)
    names, class_groups = task_names(cfg.model), [list(g) for g in cfg.model.head.class_groups]
    out, runs = Path(args.out), []

    def overrides_of(method: str) -> list[str]:
        return [*args.overrides, *method_overrides(method, names)]

    recorded = recorded_runs(Path(args.json), args.config, overrides_of) if args.reuse or args.table else {}
    runs.extend(recorded.values())

    def one(method: str, seed: int) -> dict[str, Any]:
        if (method, seed) in recorded:
            return recorded[method, seed]
        work_dir = out / method / f"seed{seed}"
        train_run(args.config, work_dir, seed, overrides_of(method), args.threads, args.reuse)
        summary = last_validation(work_dir)
        return {"method": method, "seed": seed, "mAP": summary["mean_ap"], "NDS": summary["nd_score"],
                "AP": summary["mean_dist_aps"], "tasks": task_metrics(summary, class_groups),
                "overrides": overrides_of(method), "commit": trained_at(work_dir), "work_dir": str(work_dir)}

    def record(run: dict[str, Any]) -> None:
        if (run["method"], run["seed"]) in recorded:
            return
        runs.append(run)
        atomic_write_json(args.json, {"command": " ".join(["python bench/task_weighting.py", *sys.argv[1:]]),
                                      "config": args.config, "overrides": args.overrides,
                                      "methods": {m: method_overrides(m, names) for m in METHODS
                                                  if m in args.methods or any(r["method"] == m for r in runs)},
                                      "runs": sorted(runs, key=lambda r: (r["seed"], METHODS.index(r["method"])))}, indent=1)
        print(f"finished {run['method']} seed {run['seed']}: mAP {run['mAP']:.4f} NDS {run['NDS']:.4f}", flush=True)

    todo = [(method, seed) for seed in args.seeds for method in args.methods if (method, seed) not in recorded]
    if args.table:
        runs = [run for run in runs if run["seed"] in args.seeds]
        todo = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(one, method, seed) for method, seed in todo]
        for future in futures:
            record(future.result())
    rows = summarise([run for run in runs if run["method"] in args.methods], args.reference)
    print_table(rows, args.reference)
    print()
    print_gap_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
