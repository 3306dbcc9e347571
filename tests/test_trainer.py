"""bevperc.training in one process: schedules, NaN/inf skipping, EMA, logging, TensorBoard, sampler.

The model is the real toy conv net of tests/helpers/toy_train.py trained for a few steps.
"""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from bevperc.training import TrainConfig, Trainer, sample_rng, write_run_info
from bevperc.training.checkpoint import check_plain, load_checkpoint
from bevperc.training.distributed import ResumableDistributedSampler, cpu_has_bfloat16
from bevperc.training.ema import ModelEMA
from bevperc.training.logging import close_logger, setup_logger
from bevperc.training.schedule import build_scheduler, lr_factor
from bevperc.utils.config import ConfigError, from_dict
from helpers.toy_train import ToyQuadrants, assert_same, build_trainer, parse_args


@pytest.fixture(autouse=True)
def _one_thread_and_release_log_files():
    # One intra-op thread: the toy model is tiny and the CI CPU is shared (2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    close_logger()


def _toy_args(work_dir, *extra: str):
    return parse_args(["--work-dir", str(work_dir), "--no-tensorboard", *extra])


def _snapshot(trainer: Trainer) -> dict:
    return copy.deepcopy({"model": trainer.model.state_dict(), "optimizer_state": trainer.optimizer.state_dict()["state"],
                          "extra": {k: v.state_dict() for k, v in trainer.extra_state.items()},
                          "ema": trainer.ema.state_dict() if trainer.ema else None})


def _batches(trainer: Trainer):
    return iter(trainer.make_loader(epoch=0))


# ----------------------------------------------------------------------------- schedules

def _lrs(cfg: TrainConfig, total: int) -> list[float]:
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(cfg, optimizer, total)
    values = []
    for _ in range(total):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_cosine_schedule_warms_up_then_anneals_to_min():
    cfg = TrainConfig(lr=1e-3, schedule="cosine", warmup_iters=10, warmup_ratio=0.1, min_lr_ratio=0.01)
    lrs = _lrs(cfg, 100)
    assert lrs[0] == pytest.approx(1e-4)                      # lr * warmup_ratio
    assert lrs[5] == pytest.approx(1e-4 + 0.9e-3 * 5 / 10)    # linear warm-up
    assert lrs[10] == pytest.approx(1e-3)                     # peak right after warm-up
    assert lrs[-1] == pytest.approx(1e-5)                     # lr * min_lr_ratio at the last iteration
    midpoint = 10 + (99 - 10) / 2
    assert lr_factor(cfg, midpoint, 100) == pytest.approx(0.01 + 0.99 * 0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))   # monotone after warm-up
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))    # strictly rising during warm-up


def test_step_schedule_drops_at_milestones():
    cfg = TrainConfig(lr=2e-3, schedule="step", warmup_iters=5, warmup_ratio=0.5, step_milestones=[0.5, 0.8],
                      step_gamma=0.1)
    lrs = _lrs(cfg, 100)
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(2e-3) and lrs[49] == pytest.approx(2e-3)
    assert lrs[50] == pytest.approx(2e-4) and lrs[79] == pytest.approx(2e-4)
    assert lrs[80] == pytest.approx(2e-5) and lrs[99] == pytest.approx(2e-5)


def test_onecycle_schedule_peaks_after_warmup():
    cfg = TrainConfig(lr=1e-3, schedule="onecycle", warmup_iters=20, onecycle_div_factor=25,
                      onecycle_final_div_factor=1e3)
    lrs = _lrs(cfg, 100)
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3) and int(np.argmax(lrs)) == 19
    assert lrs[-1] == pytest.approx(1e-3 / 25 / 1e3)


def test_trainer_follows_the_schedule_every_iteration(tmp_path):
    trainer, _, _ = build_trainer(_toy_args(tmp_path, "--epochs", "2", "--samples", "32", "--warmup-iters", "3"))
    history = trainer.fit()
    assert len(history["lr"]) == trainer.total_iters == 8
    expected = [trainer.cfg.lr * lr_factor(trainer.cfg, i, 8) for i in range(8)]
    assert history["lr"] == pytest.approx(expected, rel=1e-12)
    assert history["loss"][-1] < history["loss"][0]  # it learns


# ----------------------------------------------------------------------------- non-finite steps

def test_nan_loss_skips_the_step_and_leaves_weights_untouched(tmp_path):
    trainer, normaliser, _ = build_trainer(_toy_args(tmp_path, "--ema"))
    steps_seen = []
    trainer.after_step.append(steps_seen.append)
    batches = _batches(trainer)
    trainer.train_one_step(next(batches))
    before = _snapshot(trainer)

    honest_loss = trainer.compute_loss
    trainer.compute_loss = lambda model, batch: (honest_loss(model, batch)[0] * float("nan"), {})
    result = trainer.train_one_step(next(batches))
    assert result.skipped and result.skip_reason == "non-finite loss" and math.isnan(result.loss)
    assert_same(before, _snapshot(trainer))
    assert trainer.skipped_steps == 1 and trainer.history["skipped_steps"] == [2]
    assert steps_seen == [1]                                   # after_step hooks only run on applied steps
    assert all(p.grad is None for p in trainer.model.parameters())
    assert trainer.global_step == 2                            # the schedule still advanced

    trainer.compute_loss = honest_loss                         # and training carries on normally
    result = trainer.train_one_step(next(batches))
    assert not result.skipped and math.isfinite(result.loss)
    assert not torch.equal(before["model"]["regression.weight"], trainer.model.regression.weight)


def test_inf_loss_is_skipped_too(tmp_path):
    trainer, _, _ = build_trainer(_toy_args(tmp_path))
    batches = _batches(trainer)
    before = _snapshot(trainer)
    honest_loss = trainer.compute_loss
    trainer.compute_loss = lambda model, batch: (honest_loss(model, batch)[0] + float("inf"), {})
    assert trainer.train_one_step(next(batches)).skipped
    assert_same(before, _snapshot(trainer))


def test_non_finite_gradients_with_a_finite_loss_are_skipped(tmp_path):
    trainer, _, _ = build_trainer(_toy_args(tmp_path))
    batches = _batches(trainer)
    trainer.train_one_step(next(batches))
    before = _snapshot(trainer)
    honest_loss = trainer.compute_loss

    def poisoned_gradients(model, batch):
        loss, logs = honest_loss(model, batch)
        # sqrt(0) = 0 in the forward pass, but d sqrt/dx at 0 is inf and inf * 0 = nan in backward.
        return loss + torch.sqrt((model.regression.weight * 0.0).sum()), logs

    trainer.compute_loss = poisoned_gradients
    result = trainer.train_one_step(next(batches))
    assert math.isfinite(result.loss)
    assert result.skipped and result.skip_reason == "non-finite gradients" and math.isnan(result.grad_norm)
    assert_same(before, _snapshot(trainer))
    assert trainer.skipped_steps == 1


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_gradient_clipping_bounds_the_update(tmp_path):
    trainer, _, _ = build_trainer(_toy_args(tmp_path, "--grad-clip", "0.01"))
    clipped_norms = []
    original_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in trainer._all_params if p.grad is not None]
        clipped_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return original_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    result = trainer.train_one_step(next(_batches(trainer)))
    assert result.grad_norm > 0.01                          # the reported norm is the pre-clip one
    assert clipped_norms == [pytest.approx(0.01, rel=1e-4)]


# ----------------------------------------------------------------------------- EMA

def test_ema_tracks_weights_with_warmed_up_decay():
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.9)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)                      # decay = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.module.weight, 0.1 * start + 0.9 * model.weight)
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9
    assert torch.allclose(ema.module.weight, model.weight, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cpu_autocast_is_bfloat16_only_and_where_the_cpu_has_it(tmp_path, dtype):
    trainer, _, _ = build_trainer(_toy_args(tmp_path, "--amp", "--amp-dtype", dtype, "--epochs", "1", "--samples", "16"))
    expected = dtype == "bfloat16" and cpu_has_bfloat16()
    assert trainer.amp_enabled is expected and not trainer.scaler.is_enabled()
    log = (tmp_path / "train.log").read_text()
    assert ("mixed precision disabled" in log) is not expected
    trainer.fit()
    assert all(torch.all(torch.isfinite(p)) for p in trainer.model.parameters())
    assert trainer.skipped_steps == 0


# ----------------------------------------------------------------------------- sampler, seeding

def test_sampler_order_is_a_function_of_seed_and_epoch_and_can_start_mid_epoch():
    dataset = ToyQuadrants(10, augment=False)
    full = []
    for rank in range(2):
        sampler = ResumableDistributedSampler(dataset, num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(1)
        order = list(sampler)
        again = ResumableDistributedSampler(dataset, num_replicas=2, rank=rank, seed=3)
        again.set_epoch(1)
        assert list(again) == order                         # same (seed, epoch) -> same order
        again.set_epoch(2)
        assert list(again) != order                         # a new epoch reshuffles
        sampler.set_start(2)
        assert list(sampler) == order[2:] and len(sampler) == 3
        full += order
    assert sorted(full) == list(range(10))                  # ranks partition the epoch


def test_sample_rng_is_per_sample_and_reproducible():
    assert sample_rng(0, 1, 5).random() == sample_rng(0, 1, 5).random()
    draws = {sample_rng(0, e, i).random() for e in range(3) for i in range(50)}
    assert len(draws) == 150
    dataset = ToyQuadrants(4)
    dataset.set_epoch(2)
    first = dataset[3][0]
    dataset.set_epoch(3)
    assert not torch.equal(first, dataset[3][0])            # augmentation changes with the epoch
    dataset.set_epoch(2)
    assert torch.equal(first, dataset[3][0])                # and is reproducible


def test_validation_does_not_change_the_training_result(tmp_path):
    plain, _, _ = build_trainer(_toy_args(tmp_path / "plain", "--epochs", "2", "--samples", "24"))
    plain.fit()
    validated, _, _ = build_trainer(_toy_args(tmp_path / "val", "--epochs", "2", "--samples", "24", "--validate"))
    history = validated.fit()
    assert [entry["epoch"] for entry in history["val"]] == [0, 1]  # 0-based index of the finished epoch
    assert set(history["val"][0]) == {"epoch", "step", "train_seconds", "mse", "accuracy"}
    assert 0 < history["val"][0]["train_seconds"] <= history["val"][1]["train_seconds"]
    assert [entry["step"] for entry in history["val"]] == [validated.iters_per_epoch, 2 * validated.iters_per_epoch]
    assert_same(plain.model.state_dict(), validated.model.state_dict())


# ----------------------------------------------------------------------------- checkpoint contents, config

def test_check_plain_names_the_offending_entry():
    check_plain({"a": [torch.zeros(2), 1, 2.0, "x", None, (True,)], "b": {"c": torch.float32}})
    with pytest.raises(TypeError, match=r"checkpoint\.extra\.engine\.mean: numpy\.ndarray"):
        check_plain({"extra": {"engine": {"mean": np.zeros(3)}}})


def test_checkpoint_loads_with_weights_only(tmp_path):
    trainer, _, _ = build_trainer(_toy_args(tmp_path, "--epochs", "1", "--ema"))
    trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pth")   # torch.load(weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["iteration_in_epoch"] == 0
    assert state["config"]["batch_size"] == 8 and state["ema"]["updates"] == 6
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_train_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="TrainConfig.schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="TrainConfig.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(TrainConfig, {"epochz": 3})
    cfg = from_dict(TrainConfig, {"betas": [0.9, 0.99], "schedule": "onecycle"})
    assert cfg.betas == (0.9, 0.99)


# ----------------------------------------------------------------------------- logging, TensorBoard

def test_logger_writes_timestamped_train_log_on_rank_0_only(tmp_path):
    logger = setup_logger(tmp_path / "rank0", rank=0)
    logger.info("hello from rank 0")
    setup_logger(tmp_path / "rank1", rank=1).warning("rank 1 speaks")
    close_logger()
    text = (tmp_path / "rank0" / "train.log").read_text()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO \[bevperc\] hello from rank 0$", text, re.M)
    assert not (tmp_path / "rank1" / "train.log").exists()


def test_run_info_records_config_and_versions(tmp_path):
    write_run_info(tmp_path, TrainConfig(epochs=7), extra={"note": tmp_path})
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["config"]["epochs"] == 7 and info["versions"]["torch"] == torch.__version__
    assert set(info["git"]) == {"commit", "dirty"} and info["note"] == str(tmp_path)


def test_tensorboard_gets_losses_lr_speed_and_loss_engine_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = parse_args(["--work-dir", str(tmp_path), "--epochs", "1", "--validate"])
    trainer, _, _ = build_trainer(args)
    trainer.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/mse", "train/ce", "train/lr", "train/grad_norm", "train/samples_per_s",
                "train/skipped_steps", "normaliser/mean_0", "val/mse", "val/accuracy"}
    assert expected <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4, 6]
    log_text = (tmp_path / "train.log").read_text()
    assert "samples/s" in log_text and "saved checkpoint at step 6" in log_text


# ----------------------------------------------------------------------------- AMP

def test_amp_request_on_cpu_is_disabled_with_a_warning(tmp_path):
    trainer, _, _ = build_trainer(_toy_args(tmp_path, "--amp"))
    assert not trainer.amp_enabled and not trainer.scaler.is_enabled()
    assert "mixed precision disabled" in (tmp_path / "train.log").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (BEVPERC_TEST_CUDA=0 bash scripts/test.sh)")
@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_amp_on_cuda_trains_checkpoints_and_resumes(tmp_path, amp_dtype):
    args = _toy_args(tmp_path, "--device", "cuda", "--amp", "--amp-dtype", amp_dtype, "--epochs", "2", "--ema")
    crashed, _, _ = build_trainer(args)
    assert crashed.amp_enabled and crashed.scaler.is_enabled() == (amp_dtype == "float16")

    def crash(step: int) -> None:
        if step == 10:
            raise KeyboardInterrupt

    crashed.after_step.append(crash)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pth")
    assert state["progress"]["global_step"] == 8
    if amp_dtype == "float16":
        assert state["scaler"]["scale"] > 0
    else:
        assert state["scaler"] == {}
    resumed, _, _ = build_trainer(args)
    history = resumed.fit(resume=True)
    assert resumed.global_step == 12 and len(history["loss"]) == 12
    applied = [loss for loss in history["loss"] if math.isfinite(loss)]
    assert applied[-1] < applied[0]
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
    assert next(resumed.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("total_iters", [1, 2, 3, 12])
def test_onecycle_handles_runs_shorter_than_warmup(total_iters):
    """A short run (e.g. a smoke test) with warmup_iters > total iterations must not crash."""
    from bevperc.training.schedule import build_scheduler

    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    scheduler = build_scheduler(TrainConfig(schedule="onecycle", warmup_iters=50), optimizer, total_iters)
    rates = []
    for _ in range(total_iters):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(0 < r <= 1e-3 + 1e-12 for r in rates)


class _BlasThreadsSeen(torch.utils.data.Dataset):
    """Each sample: the thread count of numpy's BLAS pools in the process that loads it."""

    def __len__(self) -> int:
        return 1 << 20  # any index the toy run's sampler draws

    def __getitem__(self, index: int) -> torch.Tensor:
        from threadpoolctl import threadpool_info

        return torch.tensor([pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"])


def test_data_workers_run_numpy_blas_on_one_thread(tmp_path):
    # Beside a busy training step a multi-threaded BLAS pool makes each tiny np.linalg call take
    # milliseconds (bench/data_loading.py --blas); the trainer's workers get one thread, the caller keeps its pool.
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    trainer, _, _ = build_trainer(_toy_args(tmp_path, "--num-workers", "1"))
    trainer.train_dataset = _BlasThreadsSeen()
    with threadpool_limits(limits=2, user_api="blas"):  # as on a 2-core machine, whatever this one has
        before = blas_threads()
        seen = torch.cat(list(trainer.make_loader(0)))
        assert blas_threads() == before
    assert max(before) == 2  # the workers start from the caller's multi-threaded pool (fork)
    assert seen.numel() > 0 and seen.eq(1).all()
