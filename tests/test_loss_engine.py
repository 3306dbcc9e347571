"""Tests of the loss engine (task-set balanced multi-task training, docs/methods.md, part A)."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

from bevperc.losses.conditions import (
    DwaCondition,
    FamoCondition,
    LagCondition,
    ProgressGate,
    UncertaintyCondition,
)
from bevperc.losses.engine import LossEngine, LossEngineConfig

PLANTED_GROUPS = [0, 0, 0, 1, 1, 2, 2, 2]
TASKS = [f"task{i}" for i in range(len(PLANTED_GROUPS))]


def planted_losses(generator: torch.Generator, batch: int, scales: list[float]) -> dict[str, torch.Tensor]:
    """Per-sample losses [B] per task: tasks of one group share a latent 'difficulty' factor."""
    latent = torch.randn(batch, max(PLANTED_GROUPS) + 1, generator=generator)
    out = {}
    for i, group in enumerate(PLANTED_GROUPS):
        noise = torch.randn(batch, generator=generator)
        out[TASKS[i]] = torch.exp(0.8 * latent[:, group] + 0.35 * noise) * scales[i]
    return out


@pytest.mark.parametrize("clustering", ["agglomerative", "spectral"])
def test_planted_task_structure_is_recovered(clustering: str) -> None:
    scores = []
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        scales = (10.0 ** torch.empty(len(TASKS)).uniform_(-4, 4, generator=generator)).tolist()
        cfg = LossEngineConfig(warmup_steps=40, affinity_steps=40, clustering=clustering, max_sets=5)
        engine = LossEngine(TASKS, cfg)
        for _ in range(cfg.warmup_steps):
            per_sample = planted_losses(generator, 16, scales)
            engine({n: v.mean() for n, v in per_sample.items()}, per_sample)
            engine.step()
        labels = [next(j for j, s in enumerate(engine.task_sets) if n in s) for n in TASKS]
        scores.append(adjusted_rand_score(PLANTED_GROUPS, labels))
    assert min(scores) >= 0.9, scores


def test_regrouping_is_stable_and_labels_aligned() -> None:
    generator = torch.Generator().manual_seed(0)
    scales = [1.0] * len(TASKS)
    cfg = LossEngineConfig(warmup_steps=30, affinity_steps=30, regroup_every=30)
    engine = LossEngine(TASKS, cfg)
    first_sets = None
    for step in range(150):
        per_sample = planted_losses(generator, 16, scales)
        engine({n: v.mean() for n, v in per_sample.items()}, per_sample)
        engine.step()
        if step + 1 == 30:
            first_sets = engine.task_sets
    assert engine.task_sets == first_sets  # same structure -> no flip-flop, same set order
    assert sum(e["accepted"] for e in engine.grouping_history) == 1
    assert len(engine.grouping_history) == 5


def test_fixed_sets_are_kept() -> None:
    sets = [["task0", "task5"], ["task1", "task2", "task3"], ["task4", "task6", "task7"]]
    engine = LossEngine(TASKS, LossEngineConfig(fixed_sets=sets, warmup_steps=5))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        per_sample = planted_losses(generator, 8, [1.0] * 8)
        engine({n: v.mean() for n, v in per_sample.items()}, per_sample)
        engine.step()
    assert engine.task_sets == [["task0", "task5"], ["task1", "task2", "task3"], ["task4", "task6", "task7"]]
    with pytest.raises(ValueError, match="fixed_sets"):
        LossEngine(TASKS, LossEngineConfig(fixed_sets=[["task0"]]))


CONDITIONS = ["lag", "fixed", "uncertainty", "dwa", "famo"]


@pytest.mark.parametrize("condition", CONDITIONS)
def test_weights_on_simplex_under_extreme_scales(condition: str) -> None:
    """Loss scales 1e-8..1e8, zero losses and NaN/inf steps never break the weights."""
    names = ["tiny", "huge", "zeroish", "flaky", "plain"]
    cfg = LossEngineConfig(warmup_steps=10, affinity_steps=10, condition=condition, condition_every=1,
                           regroup_every=20)
    engine = LossEngine(names, cfg)
    generator = torch.Generator().manual_seed(0)
    for step in range(80):
        base = torch.rand(5, generator=generator) + 0.1
        values = base * torch.tensor([1e-8, 1e8, 1.0, 1.0, 1.0])
        if step % 3 == 0:
            values[2] = 0.0                          # no targets this batch
        if step % 7 == 0:
            values[3] = float("nan") if step % 2 else float("inf")
        if step % 11 == 0:
            values[:] = 0.0                          # everything zero at once
        params = torch.ones(5, requires_grad=True)
        losses = {n: params[i] * values[i] for i, n in enumerate(names)}
        per_sample = {n: values[i] * (1 + 0.1 * torch.randn(4, generator=generator)) for i, n in enumerate(names)}
        total = engine(losses, per_sample)
        assert torch.isfinite(total), step
        total.backward()
        assert torch.isfinite(params.grad).all()
        engine.step()
        weights = engine.second_weights
        assert torch.isfinite(weights).all() and (weights > 0).all(), (step, weights)
        assert weights.sum().item() == pytest.approx(len(weights), rel=1e-5)
    assert engine.last_nonfinite == [] or engine.last_nonfinite == ["flaky"]


def test_nonfinite_step_changes_no_weights_or_statistics() -> None:
    names = ["a", "b", "c"]
    engine = LossEngine(names, LossEngineConfig(grouping="per_task", condition_every=1))
    for step in range(15):
        engine({"a": torch.tensor(1.0 / (step + 1)), "b": torch.tensor(2.0), "c": torch.tensor(3.0)})
        engine.step()
    before = engine.state_dict()["_extra_state"]
    total = engine({"a": torch.tensor(float("nan")), "b": torch.tensor(2.0), "c": torch.tensor(3.0)})
    assert torch.isfinite(total)
    engine.step()
    assert engine.last_nonfinite == ["a"]
    after = engine.state_dict()["_extra_state"]
    history = engine.first_losses_history()
    assert torch.isnan(history[-1, 0]) and torch.isfinite(history[-1, 1:]).all()
    # the NaN task's statistics and weight stay where they were (others may move)
    assert torch.equal(before["initial_loss"], after["initial_loss"])
    assert after["second_weights"][0] >= before["second_weights"][0] * 0.5


def test_lag_condition_emphasises_lagging_set_scale_free() -> None:
    history = torch.tensor([[0.2, 0.9, 0.5]]).repeat(10, 1)
    initial = torch.ones(3)
    weights = LagCondition(temperature=0.5, smoothing=1.0, floor=0.1)(history, torch.ones(3),
                                                                      initial_first_losses=initial, step=10)
    assert weights.argmax() == 1 and weights.sum().item() == pytest.approx(3.0)
    scaled = LagCondition(temperature=0.5, smoothing=1.0, floor=0.1)(history * 1e6, torch.ones(3),
                                                                     initial_first_losses=initial * 1e6, step=10)
    assert torch.allclose(weights, scaled)
    assert (weights >= 0.1 - 1e-6).all()


def planted_set_losses(steps: int, seed: int = 0) -> torch.Tensor:
    """First losses [steps, 3] of three sets, 10 % multiplicative noise per step:
    0 learns fast, 1 learns slowly (lags), 2 is unlearnable (flat at its start: pure noise)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(steps, dtype=torch.float32)
    clean = torch.stack([0.97 ** t, 0.996 ** t, torch.ones(steps)], 1)
    return clean * torch.exp(0.1 * torch.randn(steps, 3, generator=generator))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lag_condition_favours_lagging_learnable_set_over_unlearnable_one(seed: int) -> None:
    k, steps = 10, 300
    history = planted_set_losses(steps, seed)
    initial = history[:k].mean(0)

    def final_weights(condition: LagCondition, history: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(3)
        for step in range(k, steps + 1, k):
            weights = condition(history[max(0, step - 5 * k):step], weights, initial_first_losses=initial, step=step)
        return weights

    gated = final_weights(LagCondition(window=k), history, initial)
    assert gated[1] > gated[2] and gated[1] > gated[0]
    assert gated.sum().item() == pytest.approx(3.0) and (gated > 0).all()
    # the plain loss-ratio rule (gate off) hands the unlearnable set the largest weight: the defect fixed here
    plain = final_weights(LagCondition(window=k, progress_windows=0), history, initial)
    assert plain.argmax() == 2
    # every quantity is a ratio or a log-difference: rescaling one set's loss changes nothing
    factor = torch.tensor([1.0, 1.0, 1e6])
    rescaled = final_weights(LagCondition(window=k), history * factor, initial * factor)
    assert torch.allclose(gated, rescaled, rtol=1e-4)


def test_progress_gate_separates_flat_from_moving_losses_and_round_trips() -> None:
    gate = ProgressGate(windows=6, threshold=4.0)
    assert np.array_equal(gate.gate(3), np.ones(3))                      # no evidence yet
    rng = np.random.default_rng(0)
    for call in range(8):
        noise = 0.02 * rng.normal(size=3)
        # falling, flat (noise only), rising (e.g. after losing weight): the rising one still responds
        gate.update(np.array([-0.1 * call, 0.0, 0.1 * call]) + noise, np.full(3, 0.02 ** 2))
    values = gate.gate(3)
    assert values[0] > 0.9 and values[2] > 0.9 and values[1] < 0.5
    assert gate.log_ratio.shape == (6, 3)                                # only the last `windows` records
    constant = ProgressGate()
    for _ in range(4):
        constant.update(np.zeros(1), np.zeros(1))                        # exactly constant loss
    assert constant.gate(1)[0] == 0.0
    buffer = io.BytesIO()
    torch.save(gate.state_dict(), buffer)                                # checkpoint-safe: tensors only
    buffer.seek(0)
    restored = ProgressGate()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert np.array_equal(restored.gate(3), values)
    with pytest.raises(ValueError, match="windows"):
        ProgressGate(windows=2)


def test_unlearnable_task_does_not_take_the_first_weight_of_its_set() -> None:
    names = ["fast", "lagging", "unlearnable", "other"]
    cfg = LossEngineConfig(fixed_sets=[["fast", "lagging", "unlearnable"], ["other"]], condition_every=10,
                           first_weighting="normalise")  # the first weights move only on normalised losses
    history = planted_set_losses(300)

    def first_weights(cfg: LossEngineConfig) -> dict[str, float]:
        engine = LossEngine(names, cfg)
        for step in range(300):
            engine({"fast": history[step, 0], "lagging": history[step, 1] * 1e-3,
                    "unlearnable": history[step, 2] * 1e3, "other": torch.tensor(1.0)})
            engine.step()
        return engine.first_weights

    weights = first_weights(cfg)
    assert weights["lagging"] > weights["unlearnable"] > weights["fast"]
    assert weights["fast"] + weights["lagging"] + weights["unlearnable"] == pytest.approx(3.0)  # mean 1
    # without the gate the unlearnable task takes most of its set's first weight (the defect fixed here)
    plain = first_weights(dataclasses.replace(cfg, progress_windows=0))
    assert plain["unlearnable"] > 1.5 > plain["lagging"]


def test_anchor_conditions_follow_published_rules() -> None:
    # Kendall: the fixed point of exp(-s) L + s is s = log L -> weights proportional to 1 / L.
    uncertainty = UncertaintyCondition(lr=0.05)
    losses = torch.tensor([[0.5, 2.0]])
    for _ in range(2000):
        weights = uncertainty(losses, torch.ones(2), initial_first_losses=torch.ones(2), step=0)
    assert weights[0] / weights[1] == pytest.approx(4.0, rel=1e-2)
    # DWA: w = N softmax(r / T), r = mean(t-1) / mean(t-2)
    dwa = DwaCondition(temperature=2.0, period=2)
    dwa(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.ones(2), initial_first_losses=torch.ones(2), step=2)
    weights = dwa(torch.tensor([[0.5, 1.0], [0.5, 1.0]]), torch.ones(2), initial_first_losses=torch.ones(2), step=4)
    expected = 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 2.0, 0)
    assert torch.allclose(weights, expected)
    # FAMO: the task whose log-loss decreased less gains weight; forward weights sum to N, scale free.
    famo = FamoCondition()
    weights = famo(torch.tensor([[1.0, 1.0], [0.5, 0.99]]), torch.ones(2), initial_first_losses=torch.ones(2), step=1)
    assert weights[1] > weights[0]
    effective = famo.effective_weights(torch.ones(2), torch.tensor([1e-3, 1e3]))
    assert effective.sum().item() == pytest.approx(2.0) and effective[0] > effective[1]


class SmallMultiTaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(x)
        return [head(features).squeeze(1) for head in self.heads]


def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=generator)
    targets = torch.stack([x[:, 0] * 2, x[:, 0] - x[:, 1], 100 * x[:, 2].sin(), 0.01 * x[:, 3] * x[:, 4]], 1)
    return x, targets


def train(engine: LossEngine | None, model: nn.Module, optimiser: torch.optim.Optimizer, steps: range,
          fixed: dict[str, float]) -> list[float]:
    names = ["a", "b", "c", "d"]
    totals = []
    for step in steps:
        x, targets = make_batch(step)
        outputs = model(x)
        per_sample = {n: (outputs[i] - targets[:, i]).square() for i, n in enumerate(names)}
        losses = {n: v.mean() for n, v in per_sample.items()}
        if engine is None:
            total = sum(fixed.get(name, 1.0) * losses[name] for name in names)
        else:
            total = engine(losses, per_sample)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        if engine is not None:
            engine.step()
        totals.append(total.item())
    return totals


def test_disabled_engine_equals_plain_fixed_weight_training_bit_for_bit() -> None:
    fixed = {"a": 0.5, "c": 0.01, "d": 3.0}
    runs = []
    for use_engine in (False, True):
        torch.manual_seed(0)
        model = SmallMultiTaskNet()
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine = LossEngine(["a", "b", "c", "d"], LossEngineConfig(enabled=False, fixed_weights=fixed)) \
            if use_engine else None
        totals = train(engine, model, optimiser, range(30), fixed)
        runs.append((totals, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("condition", ["lag", "famo", "uncertainty", "dwa"])
def test_state_dict_round_trip_resumes_identically(condition: str) -> None:
    names = ["a", "b", "c", "d"]
    cfg = LossEngineConfig(warmup_steps=8, affinity_steps=8, regroup_every=10, condition=condition,
                           condition_every=3, history_length=12)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, LossEngine]:
        torch.manual_seed(0)
        model = SmallMultiTaskNet()
        return model, torch.optim.Adam(model.parameters(), lr=1e-3), LossEngine(names, cfg)

    model, optimiser, engine = fresh()
    uninterrupted = train(engine, model, optimiser, range(40), {})
    reference = engine.summary()

    model, optimiser, engine = fresh()
    first = train(engine, model, optimiser, range(17), {})
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimiser.state_dict(), "engine": engine.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, optimiser, engine = fresh()
    model.load_state_dict(checkpoint["model"])
    optimiser.load_state_dict(checkpoint["optim"])
    engine.load_state_dict(checkpoint["engine"])
    second = train(engine, model, optimiser, range(17, 40), {})
    assert first + second == uninterrupted
    resumed = engine.summary()
    assert json.dumps(resumed) == json.dumps(reference)


def test_summary_is_json_and_log_scalars(tmp_path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    generator = torch.Generator().manual_seed(0)
    engine = LossEngine(TASKS, LossEngineConfig(warmup_steps=20, affinity_steps=20))
    for _ in range(25):
        per_sample = planted_losses(generator, 8, [1.0] * 8)
        engine({n: v.mean() for n, v in per_sample.items()}, per_sample)
        engine.step()
    summary = json.loads(json.dumps(engine.summary()))
    assert summary["task_names"] == TASKS and len(summary["second_weights"]) == len(summary["task_sets"]) > 1
    assert len(summary["affinity"]) == len(TASKS) and summary["weight_history"]
    last = summary["weight_history"][-1]  # the lag condition's set gates; first weights fixed: no task gates
    assert len(last["set_gates"]) == len(summary["task_sets"]) and all(0.0 <= g <= 1.0 for g in last["set_gates"])
    assert "task_gates" not in last
    writer = SummaryWriter(tmp_path)
    engine.log_scalars(writer, 25)
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss_engine/second_weight/set0", "loss_engine/set_gate/set0", f"loss_engine/task_weight/{TASKS[0]}"} <= tags
    assert events.Scalars("loss_engine/set_gate/set0")[0].value == pytest.approx(last["set_gates"][0])


def test_gradient_cosine_affinity_groups_tasks() -> None:
    """Tasks reading the same feature channels have aligned gradients and are grouped together."""
    names = ["x0", "x1", "y0", "y1"]
    cfg = LossEngineConfig(affinity="grad_cos", warmup_steps=6, affinity_steps=6, grad_affinity_every=1)
    engine = LossEngine(names, cfg)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        features = torch.randn(8, 4, generator=generator, requires_grad=True)
        losses = {"x0": features[:, :2].sum().square(), "x1": (2 * features[:, :2].sum()).square(),
                  "y0": features[:, 2:].sum().square(), "y1": (features[:, 2:].sum() + 1).square()}
        engine(losses, shared_features=features)
        engine.step()
    assert sorted(engine.task_sets) == [["x0", "x1"], ["y0", "y1"]]


def test_bad_input_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="LossEngineConfig.condition"):
        LossEngineConfig(condition="magic")
    engine = LossEngine(["a", "b"], LossEngineConfig())
    with pytest.raises(KeyError, match="missing \\['b'\\]"):
        engine({"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="fixed_weights"):
        LossEngine(["a"], LossEngineConfig(fixed_weights={"z": 1.0}))


def test_engine_is_exactly_invariant_to_power_of_two_loss_scaling() -> None:
    """With normalised first losses, scaling one task's loss by 2**8 changes nothing, bit for bit
    (grouping, weights, model)."""
    names = ["a", "b", "c", "d"]
    cfg = LossEngineConfig(warmup_steps=10, affinity_steps=10, regroup_every=10, condition_every=5,
                           history_length=10, first_weighting="normalise")
    runs = []
    for factor in (1.0, 256.0):
        torch.manual_seed(0)
        model = SmallMultiTaskNet()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        engine = LossEngine(names, cfg)
        for step in range(35):
            x, targets = make_batch(step)
            outputs = model(x)
            per_sample = {n: (outputs[i] - targets[:, i]).square() for i, n in enumerate(names)}
            per_sample["c"] = per_sample["c"] * factor
            total = engine({n: v.mean() for n, v in per_sample.items()}, per_sample)
            optimiser.zero_grad()
            total.backward()
            optimiser.step()
            engine.step()
        runs.append((engine.task_sets, engine.second_weights.clone(), [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][2], runs[1][2]))


def test_first_weights_follow_the_lagging_task_inside_a_set() -> None:
    names = ["fast", "slow", "other"]
    cfg = LossEngineConfig(fixed_sets=[["fast", "slow"], ["other"]], condition_every=5, first_weight_temperature=0.5,
                           first_weighting="normalise")
    engine = LossEngine(names, cfg)
    for step in range(60):
        engine({"fast": torch.tensor(0.99 ** (5 * step)), "slow": torch.tensor(0.999 ** step),
                "other": torch.tensor(1.0)})
        engine.step()
    weights = engine.first_weights
    assert weights["slow"] > 1.6 and weights["fast"] >= cfg.lag_floor / 2 - 1e-6
    assert weights["slow"] + weights["fast"] == pytest.approx(2.0)              # mean 1 inside the set
    assert weights["other"] == pytest.approx(1.0)


def test_fixed_lag_moves_pull_to_the_lagging_task_around_the_tuned_weights() -> None:
    """'fixed_lag': raw losses, first weights start at the tuned weights, the gated lag rule shifts pull
    inside a set towards the task that improved least since the reference, the set's total stays the
    tuned total, a flat (unlearnable) task is neither lifted by the floor nor given the set's weight;
    'fixed' keeps the tuned weights on the same losses."""
    names = ["fast", "slow", "flat", "other"]
    tuned = {"fast": 1.0, "slow": 0.25, "flat": 0.05, "other": 2.0}
    first_weights, history = {}, {}
    for weighting in ("fixed_lag", "fixed"):
        cfg = LossEngineConfig(fixed_sets=[["fast", "slow", "flat"], ["other"]], condition="fixed", condition_every=5,
                               warmup_steps=10, first_weight_temperature=1.0, first_weighting=weighting,
                               fixed_weights=tuned)
        engine = LossEngine(names, cfg)
        generator = torch.Generator().manual_seed(0)
        for step in range(120):
            losses = {"fast": 4.0 * 0.98 ** step, "slow": 0.997 ** step, "other": 3.0,
                      "flat": 3.0 * (1.0 + 0.05 * float(torch.randn((), generator=generator)))}
            total = engine({name: torch.tensor(value) for name, value in losses.items()})
            if step == 0:  # first weights = the tuned weights: the engine's loss is the fixed-weight sum
                assert float(total) == pytest.approx(sum(tuned[n] * v for n, v in losses.items()))
            engine.step()
        first_weights[weighting] = engine.first_weights
        history[weighting] = engine.weight_history
    weights = first_weights["fixed_lag"]
    gates = dict(zip(names, history["fixed_lag"][-1]["task_gates"]))  # recorded for the figure and TensorBoard
    assert gates["flat"] < 0.3 and gates["fast"] > 0.9 and gates["slow"] > 0.9
    assert "task_gates" not in history["fixed"][-1] and "set_gates" not in history["fixed"][-1]
    assert weights["fast"] + weights["slow"] + weights["flat"] == pytest.approx(1.3, rel=1e-5)
    assert weights["slow"] / tuned["slow"] > 1.8 * weights["fast"] / tuned["fast"]
    assert 0.5 < weights["flat"] / tuned["flat"] < 2.0
    assert weights["other"] == pytest.approx(2.0)
    assert first_weights["fixed"] == pytest.approx(tuned)


def _ddp_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(rank)            # every rank sees different data
    engine = LossEngine(TASKS, LossEngineConfig(warmup_steps=20, affinity_steps=20, condition_every=5))
    for _ in range(40):
        per_sample = planted_losses(generator, 8, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
        engine({n: v.mean() for n, v in per_sample.items()}, per_sample)
        engine.step()
    torch.save({"sets": engine.task_sets, "weights": engine.second_weights,
                "first": engine.first_weights}, f"{result_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes (torch + sklearn imports each)
def test_ranks_make_identical_decisions_under_ddp(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result.{rank}", weights_only=True) for rank in range(2)]
    assert results[0]["sets"] == results[1]["sets"] and len(results[0]["sets"]) > 1
    assert torch.equal(results[0]["weights"], results[1]["weights"])
    assert results[0]["first"] == results[1]["first"]


def test_tree_cut_matches_sklearn_fit_per_number_of_sets() -> None:
    from sklearn.cluster import AgglomerativeClustering

    from bevperc.losses.affinity import canonical_labels, cut_tree

    rng = np.random.default_rng(0)
    for _ in range(30):
        num = int(rng.integers(3, 10))
        points = rng.normal(size=(num, 3))
        distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
        children = AgglomerativeClustering(n_clusters=None, distance_threshold=0.0, compute_full_tree=True,
                                           metric="precomputed", linkage="average").fit(distance).children_
        for clusters in range(2, num):
            expected = AgglomerativeClustering(n_clusters=clusters, metric="precomputed",
                                               linkage="average").fit_predict(distance)
            assert (cut_tree(children, num, clusters) == canonical_labels(expected)).all()


def test_grouping_score_equals_sklearn_silhouette() -> None:
    from sklearn.metrics import silhouette_score

    from bevperc.losses.affinity import grouping_score

    rng = np.random.default_rng(1)
    for _ in range(50):
        num = int(rng.integers(3, 12))
        points = rng.normal(size=(num, 3))
        distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
        labels = rng.integers(0, int(rng.integers(2, num)), size=num)
        if not 2 <= len(set(labels.tolist())) <= num - 1:
            assert grouping_score(distance, labels) == -1.0
            continue
        expected = silhouette_score(distance, labels, metric="precomputed")
        assert grouping_score(distance, labels) == pytest.approx(expected, abs=1e-12)


def test_sample_buffer_standardises_each_step_and_keeps_the_newest_rows() -> None:
    """The buffer defers standardisation to read time; the rows must still be each step's own
    z-scores (per column, NaN-aware), newest ``capacity`` rows kept, across a state round trip."""
    from bevperc.losses.affinity import SampleLossBuffer, standardise_columns

    generator = torch.Generator().manual_seed(0)
    steps = [torch.randn(6, 3, generator=generator) * torch.tensor([1.0, 10.0, 100.0]) for _ in range(4)]
    steps[1][2, 1] = float("nan")                                # a missing value
    steps.append(torch.randn(4, 3, generator=generator))        # a smaller last batch
    buffer = SampleLossBuffer(3, capacity=20)
    for values in steps:
        buffer.add(values)
    expected = torch.cat([standardise_columns(v) for v in steps])[-20:]
    assert buffer.filled == 20
    state = buffer.state_dict()
    order = (torch.arange(20) + state["write_pos"]) % 20         # ring -> oldest first
    torch.testing.assert_close(state["rows"][order], expected, equal_nan=True)
    assert torch.isnan(expected[6 + 2 - 8, 1])                   # the NaN (row 8 of 28; the oldest 8 dropped)
    column = expected[-4:, 0]
    assert abs(float(column.mean())) < 1e-5 and abs(float(column.std(unbiased=False)) - 1) < 1e-4
    restored = SampleLossBuffer(3, capacity=20)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.correlation(min_pairs=2), buffer.correlation(min_pairs=2), equal_nan=True)
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        buffer.add(torch.zeros(5, 2))


@pytest.mark.parametrize("reference", ["initial", "grouping"])
def test_lag_reference_judges_progress_from_the_start_of_balancing(reference: str) -> None:
    """Task a falls 10x in the warm-up (like a focal heatmap loss calibrating its prior), then
    only 1 -> 0.8; task b falls 1 -> 0.6 in the warm-up, then 0.6 -> 0.3. Measured from step 0,
    a looks far ahead (ratio 0.08 vs 0.3) and the lag rule favours b; measured from the start of
    balancing, a is the one lagging (0.8 vs 0.5) and gets the larger weight."""
    cfg = LossEngineConfig(fixed_sets=[["a"], ["b"]], warmup_steps=20, condition_every=5, progress_windows=0,
                           first_weight_temperature=0.0, loss_scale="initial", lag_reference=reference)
    engine = LossEngine(["a", "b"], cfg)
    for step in range(120):
        if step < 20:
            a, b = 10.0 * (0.1 ** (step / 19)), 1.0 - 0.4 * step / 19
        else:
            a, b = 1.0 - 0.2 * (step - 20) / 99, 0.6 - 0.3 * (step - 20) / 99
        engine({"a": torch.tensor(a), "b": torch.tensor(b)})
        engine.step()
    weight_a, weight_b = engine.second_weights.tolist()
    assert (weight_a > weight_b) == (reference == "grouping"), (weight_a, weight_b)
    restored = LossEngine(["a", "b"], cfg)
    restored.load_state_dict(engine.state_dict())
    torch.testing.assert_close(restored.initial_first_losses(), engine.initial_first_losses())


def weakly_planted_losses(generator: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    """Like ``planted_losses`` but the shared factor is weaker than each task's own noise (as the BEV tasks)."""
    latent = torch.randn(batch, max(PLANTED_GROUPS) + 1, generator=generator)
    return {name: torch.exp(0.4 * latent[:, group] + 0.8 * torch.randn(batch, generator=generator))
            for name, group in zip(TASKS, PLANTED_GROUPS)}


def test_cumulative_affinity_settles_weak_structure_that_each_window_misses() -> None:
    """With a weak shared factor one window of 20 steps x 4 samples is mostly noise: 'window' regroups on
    almost every window and ends on a near-random grouping; 'cumulative' adds the windows up, regroups a few
    times early and ends on the planted sets. The summed affinity survives a checkpoint."""
    results = {}
    for memory in ("window", "cumulative"):
        accepted, agreement = [], []
        for seed in range(4):
            generator = torch.Generator().manual_seed(seed)
            cfg = LossEngineConfig(warmup_steps=20, affinity_steps=20, regroup_every=20, affinity_memory=memory)
            engine = LossEngine(TASKS, cfg)
            for _ in range(300):
                per_sample = weakly_planted_losses(generator, 4)
                engine({n: v.mean() for n, v in per_sample.items()}, per_sample)
                engine.step()
            accepted.append(sum(event["accepted"] for event in engine.grouping_history))
            labels = [next(j for j, s in enumerate(engine.task_sets) if n in s) for n in TASKS]
            agreement.append(adjusted_rand_score(PLANTED_GROUPS, labels))
        results[memory] = (max(accepted), min(accepted), float(np.mean(agreement)))
    assert results["cumulative"][0] <= 3 and results["window"][1] >= 10, results
    assert results["cumulative"][2] >= 0.8 and results["window"][2] <= 0.6, results
    restored = LossEngine(TASKS, cfg)
    restored.load_state_dict(engine.state_dict())
    grouping, original = restored._grouping, engine._grouping
    assert int(original.affinity_windows.max()) == 15  # every grouping of the run: the warm-up and 14 regroupings
    torch.testing.assert_close(grouping.affinity_total, original.affinity_total)
    torch.testing.assert_close(grouping.affinity_windows, original.affinity_windows)


@pytest.mark.parametrize("reference", ["grouping", "first_grouping"])
def test_first_grouping_reference_is_not_reset_by_a_regrouping(reference: str) -> None:
    """The planted groups change at step 60, so the regrouping at step 80 is accepted. With 'grouping' the lag
    rule starts anew from the losses there; with 'first_grouping' every task keeps its start from step 20.
    The affinity of the last window only, so that the swap shows at once."""
    cfg = LossEngineConfig(warmup_steps=20, affinity_steps=20, regroup_every=60, lag_reference=reference,
                           affinity_memory="window")
    engine = LossEngine(TASKS, cfg)
    generator = torch.Generator().manual_seed(0)
    swapped = [f"task{i}" for i in (0, 3, 5, 1, 6, 2, 4, 7)]  # planted sets {0, 3, 5}, {1, 6}, {2, 4, 7}
    for step in range(100):
        per_sample = planted_losses(generator, 16, [0.99 ** step] * len(TASKS))
        if step >= 60:
            per_sample = dict(zip(swapped, per_sample.values()))
        engine({n: v.mean() for n, v in per_sample.items()}, per_sample)
        engine.step()
        if step + 1 == 20:
            first_start = engine._stats.reference_loss.clone()
    assert [event["accepted"] for event in engine.grouping_history] == [True, True]
    kept = torch.equal(engine._stats.reference_loss, first_start)
    assert kept == (reference == "first_grouping")
