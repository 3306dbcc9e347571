"""Benchmark of the loss engine on a small detection-like multi-task problem (CPU, minutes).

Problem: a shared trunk (MLP) with one head per task. Tasks come in three groups that share
latent factors (like the box attributes of one class group): each group has a hidden
feature map ``h_g(x)``, every task of the group predicts a function of it, and a per-sample
nuisance shared by the group makes the same samples hard for all its tasks. Loss scales are
deliberately mismatched (1e-2 .. 1e2) and one task (``vel.x``) is intrinsically harder (a
high-frequency function), so it lags under equal weights. One planted task,
``vel.single_frame``, is unlearnable (its target is only the velocity group's per-sample
noise, like single-frame velocity on the BEV detector): its loss never drops, it correlates
with the velocity tasks and is grouped with them, and a naive lag rule gives it the most weight.
It is trained like every task but left out of worst task and Delta-m (no signal to score).
Methods: equal weights, the anchors as published (one set per task, raw losses), the engine
defaults (``default``: the raw losses with their fixed weights inside the sets, here all 1), the
previous defaults (``normalised``: every task divided by its recent loss, so the sets do not depend
on the raw scales) and, as an ablation, those without the learnability gate (``normalised_no_gate``,
the plain loss-ratio lag rule). ``bench/results/loss_engine.json`` was measured before issue 15:
its ``default`` rows are today's ``normalised``.

Metric per task: test error against the noise-free target (MSE; for the heatmap-like BCE
tasks, MSE of the predicted probability). Relative error of a multi-task run against
single-task training of the same architecture: ``100 * (err_mtl - err_stl) / err_stl``.
Reported per method (mean over seeds): worst task's relative error, Delta-m (mean relative
error over tasks), the shift of both when the ``car.offset`` loss is multiplied by 100, and the
step time relative to equal weights, measured side by side (methods interleaved in blocks
of steps in one process).

    .venv/bin/python bench/loss_engine.py --out bench/results/loss_engine.json --seeds 6

Threads: torch.set_num_threads(1) (the machine is shared; timings are ratios).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from bevperc.losses.engine import LossEngine, LossEngineConfig
from bevperc.utils.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    group: int
    kind: str        # "mse" or "bce"
    scale: float     # deliberate loss-scale mismatch
    frequency: float # higher = harder to fit
    learnable: bool = True  # False: the target has no signal (only the group's noise)


TASKS = [
    Task("car.heatmap", 0, "bce", 1.0, 1.0),
    Task("car.offset", 0, "mse", 1e-2, 1.0),
    Task("car.size", 0, "mse", 1e1, 1.0),
    Task("ped.heatmap", 1, "bce", 1e-1, 1.0),
    Task("ped.offset", 1, "mse", 1e2, 1.0),
    Task("vel.x", 2, "mse", 1e-2, 2.0),
    Task("vel.y", 2, "mse", 1.0, 1.0),
    # Planted unlearnable task, like single-frame velocity on the BEV detector: its target is the
    # velocity group's per-sample noise only, so its loss never drops, yet its per-sample losses
    # correlate with vel.x / vel.y and it is grouped with them.
    Task("vel.single_frame", 2, "mse", 1.0, 1.0, learnable=False),
]
NAMES = [t.name for t in TASKS]
METRIC_NAMES = [t.name for t in TASKS if t.learnable]
"""Tasks scored in worst task and Delta-m: an unlearnable task has no signal to be judged on
(its single-task error is just fitted noise); its role is to attract weight it cannot use."""
RESCALED_TASK = "car.offset"
INPUT_DIM, LATENT_DIM = 32, 8


def make_data(seed: int, num_train: int, num_test: int) -> dict[str, Tensor]:
    """Training pool and test set with planted groups; targets [S, T] noisy, clean [S, T]."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    num_groups = max(t.group for t in TASKS) + 1
    group_maps = torch.randn(num_groups, INPUT_DIM, LATENT_DIM, generator=generator) / math.sqrt(INPUT_DIM) * 1.5
    readouts = torch.randn(len(TASKS), LATENT_DIM, generator=generator)
    readouts = readouts / readouts.norm(dim=1, keepdim=True) * 1.2

    def sample(count: int) -> tuple[Tensor, Tensor, Tensor]:
        x = torch.randn(count, INPUT_DIM, generator=generator)
        hidden = torch.tanh(torch.einsum("sd,gdl->sgl", x, group_maps))             # [S, G, L]
        nuisance = torch.randn(count, num_groups, generator=generator) * (0.2 + 0.6 * torch.rand(count, num_groups, generator=generator))
        clean, noisy = [], []
        for i, task in enumerate(TASKS):
            signal = torch.sin(task.frequency * (hidden[:, task.group] @ readouts[i]) * 1.5)
            if not task.learnable:
                signal = torch.zeros_like(signal)
            noise = nuisance[:, task.group] + 0.1 * torch.randn(count, generator=generator)
            clean.append(signal)
            noisy.append(signal + noise)
        return x, torch.stack(clean, 1), torch.stack(noisy, 1)

    x, _, y = sample(num_train)
    x_test, clean_test, _ = sample(num_test)
    return {"x": x, "y": y, "x_test": x_test, "clean_test": clean_test}


class TrunkAndHeads(nn.Module):
    """Shared trunk + one small head per task (a detection network in miniature)."""

    def __init__(self, num_heads: int, width: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(INPUT_DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 1))
                                    for _ in range(num_heads)])

    def forward(self, x: Tensor) -> Tensor:
        """x [B, D] -> predictions [B, num_heads]."""
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], 1)


def per_sample_loss(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    """[B] per-sample loss (times the task's deliberate scale)."""
    if task.kind == "bce":
        return task.scale * F.binary_cross_entropy_with_logits(prediction, torch.sigmoid(2 * target), reduction="none")
    return task.scale * (prediction - target).square()


def task_error(task: Task, prediction: Tensor, clean: Tensor) -> float:
    if task.kind == "bce":
        return float((torch.sigmoid(prediction) - torch.sigmoid(2 * clean)).square().mean())
    return float((prediction - clean).square().mean())


NORMALISED = dict(first_weighting="normalise", loss_scale="recent", first_weight_temperature=0.25, lag_temperature=0.33,
                  lag_reference="initial", affinity_memory="window")
"""The engine's defaults until issue 15: first losses normalised by each task's recent loss."""


def method_configs(steps: int) -> dict[str, LossEngineConfig]:
    """The default engine and the anchors, each as published (raw losses, one set per task)."""
    anchor = dict(grouping="per_task", first_weighting="fixed", first_weight_temperature=0.0)
    schedule = dict(warmup_steps=100, affinity_steps=50, regroup_every=steps // 2, condition_every=25, history_length=25)
    return {
        "equal": LossEngineConfig(enabled=False),
        "uncertainty": LossEngineConfig(condition="uncertainty", condition_every=1, **anchor),
        "dwa": LossEngineConfig(condition="dwa", condition_every=25, history_length=25, **anchor),
        "famo": LossEngineConfig(condition="famo", condition_every=1, history_length=2, **anchor),
        # engine defaults; only the schedule is shortened to the bench's few hundred steps
        "default": LossEngineConfig(**schedule),
        # the defaults until issue 15 (what bench/results/loss_engine.json calls "default"): first losses
        # normalised by each task's recent loss, so the sets do not depend on the tasks' raw scales
        "normalised": LossEngineConfig(**NORMALISED, **schedule),
        # ablation: normalised without the learnability gate (the plain loss-ratio lag rule)
        "normalised_no_gate": LossEngineConfig(**NORMALISED, progress_windows=0, **schedule),
    }



class Run:
    """One training run (model, optimiser, engine) that can be advanced block by block."""

    def __init__(self, seed: int, data: dict[str, Tensor], task_ids: list[int], cfg: LossEngineConfig | None,
                 scales: dict[str, float], batch: int):
        torch.manual_seed(seed)
        self.model = TrunkAndHeads(len(task_ids)).to(data["x"].dtype)
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.task_ids = task_ids
        self.tasks = [dataclasses.replace(TASKS[i], scale=scales.get(TASKS[i].name, TASKS[i].scale)) for i in task_ids]
        self.names = [TASKS[i].name for i in task_ids]
        self.engine = LossEngine(self.names, cfg) if cfg is not None else None
        self.data = data
        self.batch = batch
        self.generator = torch.Generator().manual_seed(20_000 + seed)
        self.seconds = 0.0
        self.steps_done = 0
        self.block_seconds: list[float] = []
        self.combine_seconds = 0.0   # time inside the loss combination (engine forward + step, or the plain sum)

    def advance(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            index = torch.randint(0, self.data["x"].shape[0], (self.batch,), generator=self.generator)
            x, y = self.data["x"][index], self.data["y"][:, self.task_ids][index]
            predictions = self.model(x)
            per_sample = {n: per_sample_loss(t, predictions[:, j], y[:, j])
                          for j, (n, t) in enumerate(zip(self.names, self.tasks))}
            losses = {n: v.mean() for n, v in per_sample.items()}
            combine_start = time.perf_counter()
            if self.engine is None:
                total = sum(losses.values())
            else:
                total = self.engine(losses, per_sample)
            self.combine_seconds += time.perf_counter() - combine_start
            self.optimiser.zero_grad(set_to_none=True)
            total.backward()
            self.optimiser.step()
            if self.engine is not None:
                step_start = time.perf_counter()
                self.engine.step()
                self.combine_seconds += time.perf_counter() - step_start
        self.block_seconds.append(time.perf_counter() - start)
        self.seconds += self.block_seconds[-1]
        self.steps_done += steps

    @torch.no_grad()
    def errors(self) -> dict[str, float]:
        predictions = self.model(self.data["x_test"])
        clean = self.data["clean_test"][:, self.task_ids]
        return {n: task_error(t, predictions[:, j], clean[:, j]) for j, (n, t) in enumerate(zip(self.names, self.tasks))}


def compact_summary(summary: dict, every: int) -> dict:
    """Engine summary without its config, weight history kept every ``every`` steps (anchors
    that run their condition every step would otherwise store one entry per step)."""
    compact = {k: v for k, v in summary.items() if k != "config"}
    compact["weight_history"] = [e for e in summary["weight_history"] if e["step"] % every == 0]
    return compact


def relative_errors(errors: dict[str, float], single: dict[str, float]) -> dict[str, float]:
    return {n: 100.0 * (errors[n] - single[n]) / single[n] for n in errors}


def scored(relative: dict[str, float]) -> dict[str, float]:
    """The relative errors of the learnable tasks (those in worst task and Delta-m)."""
    return {n: relative[n] for n in METRIC_NAMES}


def run_bench(seeds: list[int], steps: int, batch: int, block: int, methods: list[str] | None = None,
              rescale_factor: float = 100.0, dtype: torch.dtype = torch.float32) -> dict:
    results: dict = {"config": {"seeds": seeds, "steps": steps, "batch": batch, "tasks": [dataclasses.asdict(t) for t in TASKS],
                                "rescaled_task": RESCALED_TASK, "rescale_factor": rescale_factor,
                                "dtype": str(dtype).removeprefix("torch."),
                                "scored_tasks": METRIC_NAMES},
                     "seeds": {}}
    configs = method_configs(steps)
    if methods is not None:
        unknown = sorted(set(methods) - set(configs))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(configs)}")
        configs = {m: cfg for m, cfg in configs.items() if m == "equal" or m in methods}
    timing: dict[str, list[float]] = {m: [] for m in configs}          # per run: total seconds per step
    direct: dict[str, list[float]] = {m: [] for m in configs}          # per run: extra combine time / equal step
    block_ratio: dict[str, list[float]] = {m: [] for m in configs}     # per block: time / equal's time
    progress = tqdm(total=len(seeds) * (len(TASKS) + 2 * len(configs)) * steps, unit="step", file=sys.stderr)
    for seed in seeds:
        data = {k: v.to(dtype) for k, v in make_data(seed, num_train=20_000, num_test=4_096).items()}
        single = {}
        for i, task in enumerate(TASKS):
            run = Run(seed, data, [i], LossEngineConfig(enabled=False), {}, batch)
            run.advance(steps)
            progress.update(steps)
            single.update(run.errors())
        seed_result = {"single_task_error": single, "methods": {}}
        for rescaled in (False, True):
            scales = {RESCALED_TASK: TASKS[NAMES.index(RESCALED_TASK)].scale * rescale_factor} if rescaled else {}
            runs = {m: Run(seed, data, list(range(len(TASKS))), cfg if m != "equal" else None, scales, batch)
                    for m, cfg in configs.items()}
            # Interleave the methods in blocks so their step times are measured side by side.
            for _ in range(0, steps, block):
                for run in runs.values():
                    run.advance(block)
                    progress.update(block)
            for method, run in runs.items():
                block_ratio[method] += [t / e for t, e in zip(run.block_seconds, runs["equal"].block_seconds)]
                direct[method].append((run.combine_seconds - runs["equal"].combine_seconds) / runs["equal"].seconds)
                errors = run.errors()
                relative = relative_errors(errors, single)
                score = scored(relative)
                entry = seed_result["methods"].setdefault(method, {})
                entry["rescaled" if rescaled else "original"] = {
                    "errors": errors, "relative": relative,
                    "worst": max(score.values()), "delta_m": statistics.fmean(score.values()),
                    "worst_task": max(score, key=score.get),
                    "seconds_per_step": run.seconds / run.steps_done,
                }
                if run.engine is not None and not rescaled:
                    entry["engine_summary"] = compact_summary(run.engine.summary(), block)
                timing[method].append(run.seconds / run.steps_done)
        results["seeds"][str(seed)] = seed_result
    progress.close()
    results["table"] = summarise(results, timing, block_ratio, direct)
    return results


def summarise(results: dict, timing: dict[str, list[float]], block_ratio: dict[str, list[float]],
              direct: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    table = {}
    equal_time = timing["equal"]
    for method in timing:
        per_seed = [results["seeds"][s]["methods"][method] for s in results["seeds"]]
        # worst task after averaging the per-task relative errors over seeds
        mean_relative = {n: statistics.fmean(p["original"]["relative"][n] for p in per_seed) for n in NAMES}
        mean_relative_rescaled = {n: statistics.fmean(p["rescaled"]["relative"][n] for p in per_seed) for n in NAMES}
        worst = max(scored(mean_relative).values())
        worst_name = max(scored(mean_relative), key=scored(mean_relative).get)
        # paired per-seed change of that task's error: its standard error says how much of the
        # shift is seed-to-seed (chaotic) variation rather than a systematic scale dependence
        paired = [p["rescaled"]["relative"][worst_name] - p["original"]["relative"][worst_name] for p in per_seed]
        paired_se = statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else float("nan")
        delta_m = statistics.fmean(scored(mean_relative).values())
        worst_rescaled = max(scored(mean_relative_rescaled).values())
        delta_m_rescaled = statistics.fmean(scored(mean_relative_rescaled).values())
        overhead = [100.0 * (t / e - 1.0) for t, e in zip(timing[method], equal_time)]
        table[method] = {
            "worst_task": max(scored(mean_relative), key=scored(mean_relative).get),
            "worst_rel_error_pct": worst,
            "worst_per_seed_mean_pct": statistics.fmean(p["original"]["worst"] for p in per_seed),
            "delta_m_pct": delta_m,
            "shift_worst_pts": abs(worst_rescaled - worst),
            "shift_worst_task_paired_se_pts": paired_se,
            "shift_delta_m_pts": abs(delta_m_rescaled - delta_m),
            "step_time_overhead_pct": statistics.median(overhead),
            "step_time_overhead_median_block_pct": 100.0 * (statistics.median(block_ratio[method]) - 1.0),
            "engine_time_overhead_pct": 100.0 * statistics.fmean(direct[method]),
            "relative_per_task_pct": mean_relative,
        }
    return table


def markdown(table: dict[str, dict]) -> str:
    lines = ["| method | worst task | worst rel. err. % | mean per-seed worst % | Delta-m % | "
             "shift worst (pts, rescaled) | its paired s.e. | shift Delta-m (pts) | step time vs equal: whole runs % | "
             "median block % | in-run engine time % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in table.items():
        lines.append(f"| {method} | {row['worst_task']} | {row['worst_rel_error_pct']:+.1f} | "
                     f"{row['worst_per_seed_mean_pct']:+.1f} | {row['delta_m_pct']:+.1f} | {row['shift_worst_pts']:.2f} | "
                     f"{row['shift_worst_task_paired_se_pts']:.2f} | {row['shift_delta_m_pts']:.2f} | {row['step_time_overhead_pct']:+.1f} | "
                     f"{row['step_time_overhead_median_block_pct']:+.1f} | {row['engine_time_overhead_pct']:+.2f} |")
    lines.append("")
    lines.append("| method | " + " | ".join(NAMES) + " |")
    lines.append("|---|" + "---|" * len(NAMES))
    for method, row in table.items():
        lines.append(f"| {method} | " + " | ".join(f"{row['relative_per_task_pct'][n]:+.1f}" for n in NAMES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON path")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--block", type=int, default=25, help="steps per interleaved timing block")
    parser.add_argument("--rescale-factor", type=float, default=100.0,
                        help=f"factor on the {RESCALED_TASK} loss for the shift measurement (1.00000095 = 1 + 2**-20 "
                             "measures the noise floor: a rounding-level change)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="float64 shrinks rounding differences ~1e9 times: a shift that remains is the method's "
                             "own dependence on the loss scale, not the chaotic growth of float32 rounding")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="subset of methods to run (equal is always run: it is the timing reference)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < args.block or args.steps % args.block:
        parser.error("--seeds >= 1 and --steps a multiple of --block are required")
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = run_bench(list(range(args.seeds)), args.steps, args.batch, args.block, args.methods,
                        args.rescale_factor, getattr(torch, args.dtype))
    results["wall_seconds"] = time.perf_counter() - start
    atomic_write_json(args.out, results)
    print(markdown(results["table"]))
    print(f"\n{args.seeds} seeds x {args.steps} steps, wall {results['wall_seconds']:.0f} s on this 2-core CPU; "
          f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
