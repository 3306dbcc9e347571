"""Distillation: zero weights == plain training bit for bit; engine tasks; resize alternative."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bevperc.gesture.config import DistillWeights
from bevperc.gesture.data import SyntheticGestureSpec, generate_synthetic_gestures
from bevperc.gesture.demo import run_configs
from bevperc.gesture.distill import (
    HEAD_MAP_PRIORS,
    TeacherLink,
    distill_student,
    feature_mimic_loss,
    heatmap_kl_loss,
    teacher_peak_count,
)
from bevperc.gesture.train import train_detector
from bevperc.losses.config import LossEngineConfig
from bevperc.models.centernet import StrideAlignmentError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a shared 2-core CPU one intra-op thread is several times faster than two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gestures")
    generate_synthetic_gestures(root, 12, 4, seed=1, spec=SyntheticGestureSpec(image_size=64))
    return root


def _configs(root: Path, **kw):
    cfgs = run_configs(root, epochs=2, input_size=32, batch_size=4, progress=False, **kw)
    return cfgs


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teachers(tiny_set: Path, tmp_path_factory) -> dict[str, Path]:
    cfgs = _configs(tiny_set)
    out = tmp_path_factory.mktemp("teachers")
    return {role: train_detector(dataclasses.replace(cfgs[role], optim=dataclasses.replace(cfgs[role].optim, epochs=1)),
                                 out / role) for role in ("teacher1", "teacher2", "teacher2_resize")}


@pytest.mark.parametrize("engine,warmup", [(LossEngineConfig(enabled=False), 0.0),
                                           (LossEngineConfig(enabled=False), 1.0),
                                           (LossEngineConfig(enabled=True, warmup_steps=2, affinity_steps=2,
                                                             condition_every=2, scale_warmup_steps=2), 0.0)])
def test_zero_distillation_weights_equal_plain_training(tiny_set: Path, teachers, tmp_path: Path, engine,
                                                         warmup) -> None:
    cfgs = _configs(tiny_set)
    optim = dataclasses.replace(cfgs["student"].optim, loss_engine=engine, warmup_epochs=warmup)
    plain = train_detector(dataclasses.replace(cfgs["student"], optim=optim), tmp_path / "plain")
    distill_cfg = dataclasses.replace(
        cfgs["distill"], optim=optim, weights=DistillWeights(0.0, 0.0, 0.0, 0.0),
        teacher1_checkpoint=str(teachers["teacher1"]), teacher2_checkpoint=str(teachers["teacher2"]))
    zero = distill_student(distill_cfg, tmp_path / "zero")
    a = torch.load(plain, weights_only=True)["model"]
    b = torch.load(zero, weights_only=True)["model"]
    assert _state_equal(a, b)
    # and a non-zero weight really changes the student
    kd = distill_student(dataclasses.replace(distill_cfg, weights=DistillWeights(1.0, 0.0, 0.0, 1.0)), tmp_path / "kd")
    assert not _state_equal(a, torch.load(kd, weights_only=True)["model"])


def test_gesture_training_settings_are_the_trainers_cosine_with_a_linear_warmup() -> None:
    """``OptimConfig`` -> the Trainer's ``TrainConfig``: every sample every epoch (10 samples, batch 4:
    3 iterations), ``warmup_epochs`` of linear warm-up rising as (step + 1) / (warmup + 1), never 0,
    then the Trainer's cosine to ``min_lr_ratio`` at the last step."""
    from bevperc.training.schedule import lr_factor
    from bevperc.gesture.config import OptimConfig
    from bevperc.gesture.train import trainer_config

    optim = OptimConfig(epochs=5, batch_size=4, lr=3e-3, weight_decay=1e-3, grad_clip=2.0, seed=7,
                        warmup_epochs=4 / 3, progress=False)
    cfg = trainer_config(optim, dataset_len=10)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.seed) == (5, 4, 3e-3, 1e-3, 2.0, 7)
    assert cfg.schedule == "cosine" and not cfg.drop_last and cfg.device == "cpu" and not cfg.progress_bar
    assert cfg.warmup_iters == 4
    factors = [lr_factor(cfg, step, 15) for step in range(15)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(cfg.min_lr_ratio)
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert trainer_config(dataclasses.replace(optim, warmup_epochs=0.0), 10).warmup_iters == 0


def test_distillation_resumes_to_the_uninterrupted_result_bit_for_bit(tiny_set: Path, teachers, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """A distillation with the loss engine on stops (an exception, as a crash) after step 5 of 9 with the newest
    checkpoint at step 4 (mid-epoch 2); ``resume=True`` continues from it: the Trainer's checkpoint (weights,
    optimizer, loss-engine state, RNG, per-step history) and model.pt equal the uninterrupted run's bit for bit."""
    import bevperc.gesture.train as gesture_train
    from bevperc.training.checkpoint import load_checkpoint
    from bevperc.training.trainer import Trainer
    from helpers.toy_train import assert_same

    settings = gesture_train.trainer_config
    monkeypatch.setattr(gesture_train, "trainer_config",
                        lambda optim, n: dataclasses.replace(settings(optim, n), checkpoint_every=2, tensorboard=False))
    cfgs = _configs(tiny_set)
    cfg = dataclasses.replace(cfgs["distill"], teacher1_checkpoint=str(teachers["teacher1"]),
                              teacher2_checkpoint=str(teachers["teacher2"]),
                              optim=dataclasses.replace(cfgs["distill"].optim, epochs=3, loss_engine=LossEngineConfig(
                                  enabled=True, first_weighting="fixed", warmup_steps=3, affinity_steps=3,
                                  condition_every=2, scale_warmup_steps=2)))
    reference = distill_student(cfg, tmp_path / "reference")

    class Crash(Exception):
        pass

    step = Trainer.train_one_step

    def crash_after_step_5(trainer: Trainer, batch):
        if trainer.global_step == 5:
            raise Crash
        return step(trainer, batch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_one_step", crash_after_step_5)
        with pytest.raises(Crash):
            distill_student(cfg, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pth")["progress"]["global_step"] == 4
    steps_run = []
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_one_step", lambda trainer, batch: steps_run.append(1) or step(trainer, batch))
        resumed = distill_student(cfg, tmp_path / "resumed", resume=True)
    assert len(steps_run) == 5  # steps 5..9 only
    assert "resumed from" in (tmp_path / "resumed" / "train.log").read_text()
    final = {name: load_checkpoint(tmp_path / name / "checkpoints" / "latest.pth") for name in ("reference", "resumed")}
    assert final["reference"]["progress"]["global_step"] == 9
    assert_same(final["reference"], final["resumed"])
    assert _state_equal(torch.load(reference, weights_only=True)["model"], torch.load(resumed, weights_only=True)["model"])


def _bench_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "distill.py"
    spec = importlib.util.spec_from_file_location("bench_distill", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_trains_only_the_base_runs_the_variants_need() -> None:
    bench = _bench_module()
    need = bench.needed_base_runs
    assert need(["kd_t2"]) == ["teacher2", "student"]
    assert need(["kd_t2_resize@engine"]) == ["teacher2", "teacher2_resize", "student"]
    assert need(["kd_both_full", "kd_t2"]) == ["teacher1", "teacher2", "student"]
    assert need(["kd_both_heads"], weights=(1.0, 0.0, 5.0, 1.0)) == ["teacher2", "student"]  # t1 heads weight 0
    assert need(list(bench.VARIANTS)) == list(bench.BASE_RUNS)


def test_bench_summary_uses_paired_differences_and_the_gap_of_the_seed_means() -> None:
    """Seed 1's gap is tiny (0.02): its per-seed G (-1.0) is noise, the goal uses G of the seed means."""
    bench = _bench_module()
    per_seed = {0: {"student": 0.50, "teacher2": 0.90, "kd_t2": 0.80, "kd_both_full": 0.86},
                1: {"student": 0.96, "teacher2": 0.98, "kd_t2": 0.97, "kd_both_full": 0.94}}
    seeds = [{"seed": s, "results": {k: {"mAP50": v, "mAP": v / 2} for k, v in r.items()}} for s, r in per_seed.items()]
    latency = {"student": {"input_size": 64, "params": 1, "latency_ms": 1.0}}
    table, markdown = bench.summarise(seeds, latency, ["fixed"], ["kd_t2", "kd_both_full"])
    full = table["kd_both_full"]
    assert full["G_mAP50"][0] == pytest.approx((0.9 + -1.0) / 2)  # per-seed G: 0.36/0.40 and -0.02/0.02
    assert full["G_of_means_mAP50"] == pytest.approx((0.90 - 0.73) / (0.94 - 0.73))
    assert full["delta_vs_student_mAP50"] == pytest.approx((0.17, 0.19))  # paired diffs +0.36 / -0.02
    assert full["seeds_better_than_student"] == 1 and not full["not_worse_every_seed"]
    goals = table["goals"]["fixed"]
    assert goals["G_full_mAP50"] == pytest.approx(full["G_of_means_mAP50"]) and goals["G_full_at_least_0.5"]
    assert goals["both_beat_teacher2_only"]  # 0.900 > 0.885
    assert "| kd_both_full | 0.900" in markdown and "1/2" in markdown


def test_full_distillation_tasks_and_engine_summary(tiny_set: Path, teachers, tmp_path: Path) -> None:
    cfgs = _configs(tiny_set)
    cfg = dataclasses.replace(cfgs["distill"], teacher1_checkpoint=str(teachers["teacher1"]),
                              teacher2_checkpoint=str(teachers["teacher2"]),
                              optim=dataclasses.replace(cfgs["distill"].optim, loss_engine=LossEngineConfig(
                                  enabled=True, warmup_steps=3, affinity_steps=3, condition_every=2,
                                  scale_warmup_steps=2)))
    distill_student(cfg, tmp_path / "kd")
    history = json.loads((tmp_path / "kd" / "history.json").read_text())
    tasks = set(history["tasks"])
    assert {f"kd_t1_feat_s{i}" for i in range(4)} <= tasks
    # teacher 2 (K=1): stage 0 does not align and has no task; stages 1..3 do
    assert "kd_t2_feat_s0" not in tasks and {f"kd_t2_feat_s{i}" for i in (1, 2, 3)} <= tasks
    assert {f"kd_t{t}_{m}" for t in (1, 2) for m in ("heatmap", "wh", "offset")} <= tasks
    assert {"det_heatmap", "det_wh", "det_offset"} <= tasks
    summary = json.loads((tmp_path / "kd" / "engine_summary.json").read_text())
    assert sorted(n for s in summary["task_sets"] for n in s) == sorted(tasks)
    assert history["aligned_stages"] == {"t1": [0, 1, 2, 3], "t2": [1, 2, 3]}


def test_resize_alternative_and_misaligned_teacher(tiny_set: Path, teachers, tmp_path: Path) -> None:
    cfgs = _configs(tiny_set)
    base = dataclasses.replace(cfgs["distill"], weights=DistillWeights(0.0, 0.0, 1.0, 1.0),
                               optim=dataclasses.replace(cfgs["distill"].optim, epochs=1,
                                                         loss_engine=LossEngineConfig(enabled=False)))
    distill_student(dataclasses.replace(base, teacher2_checkpoint=str(teachers["teacher2_resize"]),
                                        teacher2_align="resize"), tmp_path / "resize")
    tasks = json.loads((tmp_path / "resize" / "history.json").read_text())["tasks"]
    assert {f"kd_t2_feat_s{i}" for i in range(4)} <= set(tasks) and "kd_t2_offset" not in tasks
    # the resize teacher has the student's strides: using it stride-aligned must fail loudly
    with pytest.raises(StrideAlignmentError, match="stage_strides"):
        distill_student(dataclasses.replace(base, teacher2_checkpoint=str(teachers["teacher2_resize"])), tmp_path / "bad")


def test_distillation_losses_vanish_at_a_match() -> None:
    t = torch.randn(3, 5, 4, 4)
    assert torch.allclose(feature_mimic_loss(t, t), torch.zeros(3))
    assert torch.allclose(heatmap_kl_loss(t, t), torch.zeros(3), atol=1e-6)
    assert (heatmap_kl_loss(t + 1, t) > 0).all()


def test_heatmap_kd_is_per_object_and_ignores_matched_background() -> None:
    """Per-teacher-peak normalisation: the value does not shrink with the grid size (a per-cell
    mean did), and agreeing background cells add nothing (focal modulation)."""
    teacher = torch.full((1, 2, 8, 8), -6.0)
    teacher[0, 1, 3, 4] = 4.0  # one confident object
    student = teacher.clone()
    student[0, 1, 3, 4] = -1.0  # the student misses it
    small = heatmap_kl_loss(student, teacher)
    big_t = torch.full((1, 2, 32, 32), -6.0)
    big_s = big_t.clone()
    big_t[0, 1, 3, 4], big_s[0, 1, 3, 4] = 4.0, -1.0
    torch.testing.assert_close(heatmap_kl_loss(big_s, big_t), small)
    assert teacher_peak_count(teacher).tolist() == [1.0] and teacher_peak_count(torch.full_like(teacher, -6.0)).tolist() == [1.0]
    two = teacher.clone()
    two[0, 0, 6, 1] = 4.0
    assert teacher_peak_count(two).tolist() == [2.0]
    # a background mismatch counts far less than the same logit error on the object
    noisy_bg = teacher.clone()
    noisy_bg[0, 0, 0, 0] = -1.0
    assert heatmap_kl_loss(noisy_bg, teacher) < 0.1 * small


def test_teacher_weights_are_totals_split_over_tasks() -> None:
    link = TeacherLink("t2", None, 1, [1, 2, 3], False, 2, feature_weight=5.0, head_weight=2.0)  # type: ignore[arg-type]
    w = link.task_weights()
    assert sum(v for k, v in w.items() if "_feat_" in k) == pytest.approx(5.0)
    assert {k: v for k, v in w.items() if "_feat_" not in k} == {f"kd_t2_{m}": 2.0 * p for m, p in HEAD_MAP_PRIORS.items()}


def test_channel_normalised_feature_mimicry() -> None:
    """``norm="channel"`` (PKD): 1 - Pearson correlation per channel; scale- and shift-free per channel,
    so a low-energy teacher channel counts as much as a high-energy one."""
    torch.manual_seed(0)
    t = torch.randn(4, 6, 5, 5)
    assert torch.allclose(feature_mimic_loss(t, t, "channel"), torch.zeros(4), atol=1e-5)
    scaled = t * torch.tensor([100.0, 0.1, 1, 1, 3, 1]).view(1, 6, 1, 1) + 7.0
    assert torch.allclose(feature_mimic_loss(t, scaled, "channel"), torch.zeros(4), atol=1e-4)
    # an unrelated student: about 1 (uncorrelated), an anti-correlated one: 2
    assert 0.5 < float(feature_mimic_loss(torch.randn(4, 6, 5, 5), t, "channel").mean()) < 1.5
    assert torch.allclose(feature_mimic_loss(-t, t, "channel").mean(), torch.tensor(2.0), atol=1e-4)
    # one wrong low-energy channel costs as much under "channel" as a wrong high-energy one
    t2 = t * torch.tensor([10.0, 0.1, 1, 1, 1, 1]).view(1, 6, 1, 1)
    hi, lo = t2.clone(), t2.clone()
    hi[:, 0], lo[:, 1] = -hi[:, 0], -lo[:, 1]
    torch.testing.assert_close(feature_mimic_loss(hi, t2, "channel").mean(), feature_mimic_loss(lo, t2, "channel").mean(),
                               rtol=1e-2, atol=0)
    assert feature_mimic_loss(hi, t2).mean() > 100 * feature_mimic_loss(lo, t2).mean()
    with pytest.raises(ValueError, match="feature norm"):
        feature_mimic_loss(t, t, "bogus")


def test_object_region_weights_mimicry_towards_teacher_detections() -> None:
    from bevperc.gesture.distill import object_cell_weight

    heat = torch.full((1, 2, 16, 16), -8.0)
    heat[0, 1, 4, 4] = 6.0
    w = object_cell_weight(heat, (8, 8))
    assert w.shape == (1, 8, 8) and float(w[0, 2, 2]) == pytest.approx(1.1, abs=1e-5) \
        and float(w.min()) == pytest.approx(0.1, abs=0.01)
    t = torch.randn(1, 3, 8, 8)
    far, near = t.clone(), t.clone()
    far[0, :, 7, 7] += 5.0  # error far from the object
    near[0, :, 2, 2] += 5.0  # the same error on it
    assert feature_mimic_loss(near, t, "global", w) > 5 * feature_mimic_loss(far, t, "global", w)


def test_shipped_gesture_configs_are_the_presets_and_distil_with_the_documented_engine_settings() -> None:
    """configs/gesture_*.yaml parse (unknown keys are rejected) and restate, field by field, what
    ``gesture.demo.run_configs`` builds from ``gesture/presets.py`` (data under data/gestures, 30
    epochs), so the YAMLs cannot drift from the presets; the distillation config adds only the
    teacher checkpoints and an engine schedule to the engine's defaults, so the command a
    user copies from the README (or docs/gesture.md) runs what was measured."""
    from bevperc.gesture.config import DistillConfig, GestureDataConfig, GestureTrainConfig
    from bevperc.gesture.demo import data_configs
    from bevperc.utils.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    expected = run_configs("data/gestures", epochs=30)
    for name in ("student", "teacher1", "teacher2", "teacher2_resize"):
        assert load_config(GestureTrainConfig, root / f"gesture_{name}.yaml") == expected[name], name
    assert load_config(GestureDataConfig, root / "gesture_test_data.yaml") == data_configs("data/gestures")[1]
    distill = load_config(DistillConfig, root / "gesture_distill.yaml")
    engine = distill.optim.loss_engine
    schedule = {k: getattr(LossEngineConfig(), k) for k in ("warmup_steps", "affinity_steps", "regroup_every",
                                                              "condition_every")}
    assert dataclasses.replace(engine, **schedule) == LossEngineConfig()  # nothing else is set
    assert distill == dataclasses.replace(
        expected["distill"], teacher1_checkpoint="work_dirs/gesture/teacher1/model.pt",
        teacher2_checkpoint="work_dirs/gesture/teacher2/model.pt",
        optim=dataclasses.replace(expected["distill"].optim, loss_engine=engine))
