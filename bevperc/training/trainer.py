"""The model-agnostic training loop: AdamW, schedule, clipping, AMP, EMA, DDP, checkpoints, resume.

The trainer knows nothing about detection. It is given

* ``model``: an ``nn.Module`` (moved to the device and, under torchrun, wrapped in DDP);
* ``loss``, one of two things:

  - a :class:`~bevperc.losses.engine.LossEngine`, for a model with the task-model contract
    (:class:`~bevperc.training.task_loss.TaskModel`): ``outputs = model(batch)``,
    ``model.loss(outputs, batch) -> (task_losses {name: scalar}, per_sample {name: [B]})`` with the
    engine's task names. The step's loss is ``engine(task_losses, per_sample)``, each task is logged
    as ``task/<name>``, and the trainer owns the engine: it checkpoints it (extra state
    ``loss_engine``), optimises its parameters (as extra parameters, first) and calls
    ``engine.step()`` after every applied optimizer step (first of the ``after_step`` callbacks).
    The BEV detector and the gesture models train this way;
  - ``compute_loss(model, batch) -> (loss, logs)`` for anything else: ``loss`` a scalar tensor to
    minimise, ``logs`` a ``dict[str, float | Tensor]`` of scalars to log (same keys on every rank);
* ``train_dataset``: a map-style dataset (``len`` + ``__getitem__``); see
  :mod:`bevperc.training.seeding` for the augmentation-randomness rule that makes resume exact;
* ``extra_state``: objects with ``state_dict``/``load_state_dict`` saved in checkpoints
  (e.g. a running normaliser); ``nn.Module`` ones are moved to the device; any with a
  ``log_scalars(writer, step)`` method are asked to log to TensorBoard;
* ``extra_parameters``: parameters optimised besides the model's (e.g. learned loss
  weights). AdamW updates them without weight decay and, under DDP, the trainer averages
  their gradients over ranks itself (DDP only averages the wrapped model's gradients);
* ``after_step``: callbacks ``f(global_step)`` run after every *applied* optimizer step
  (e.g. a running normaliser's update);
* ``on_start``: callbacks ``f()`` run on rank 0 once training starts, after a resume succeeded
  (e.g. writing the run's config: a resume that fails leaves the work dir as it was);
* ``validate(model, epoch) -> dict``: run on every rank after every ``val_every`` epochs (and
  after the last) with the EMA model when EMA is on (else the bare model); ``epoch`` is the
  0-based index of the epoch just finished; rank 0 logs the numeric values, which go into
  ``history["val"]`` as ``{"epoch": e, "step": global_step, **metrics}``. The epoch-end
  checkpoint is written first (and rewritten with the result); a validation that raises is
  logged and training goes on; a run resumed between the two validates then.

Rank 0 holds :func:`bevperc.training.checkpoint.lock_work_dir` while it trains; a resume loads the
newest checkpoint that loads (``latest.pth``, else the newest intact ``iter_*.pth``, with a warning).

Where the parts live: what a checkpoint holds, its saving and its loading in
:mod:`bevperc.training.checkpoint` (``checkpoint_from_trainer``, ``load_trainer_state``); AdamW with
the extra-parameter group in :func:`bevperc.training.schedule.build_optimizer`; the device and the DDP
wrapper in :mod:`bevperc.training.distributed`; the log lines' running means in
:class:`bevperc.training.logging.LogWindow`.

One step (:meth:`Trainer.train_one_step`):
forward under autocast -> all-reduce ``[loss, non-finite flag, logs]`` -> skip everywhere if any
rank saw a non-finite loss -> backward (scaled) -> average extra-parameter grads -> unscale ->
clip -> all-reduce a non-finite-gradient flag -> skip everywhere or step -> EMA -> after_step ->
scheduler step (always: the learning rate is a function of the iteration number).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bevperc.training import checkpoint as ckpt
from bevperc.training.config import TrainConfig
from bevperc.training.distributed import (ResumableDistributedSampler, all_reduce_sum, any_rank, average_gradients,
                                        cpu_has_bfloat16, init_distributed, iterations_per_epoch, training_device,
                                        wrap_model)
from bevperc.training.ema import ModelEMA
from bevperc.training.logging import LogWindow, format_duration, setup_logger, write_run_info
from bevperc.training.schedule import build_optimizer, build_scheduler
from bevperc.training.seeding import loader_generator, preserved_rng_state, seed_process, seed_worker
from bevperc.training.task_loss import TaskLoss, engine_hooks
from bevperc.losses.engine import LossEngine

ComputeLoss = Callable[[nn.Module, Any], "tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]"]
Validate = Callable[[nn.Module, int], Mapping[str, Any]]


@dataclass
class StepResult:
    """What one call of :meth:`Trainer.train_one_step` did."""

    loss: float                  # loss averaged over ranks (non-finite when that caused the skip)
    logs: dict[str, float]       # compute_loss's scalars averaged over ranks
    grad_norm: float             # global grad L2 norm before clipping (nan if no backward ran)
    lr: float                    # learning rate of the first param group used by this step
    skipped: bool                # True when the weights were left unchanged
    skip_reason: str | None      # "non-finite loss" | "non-finite gradients" | "amp overflow" | None


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors inside dicts/lists/tuples moved to ``device``; everything else untouched."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


class Trainer:
    """Trains ``model`` with ``loss`` (a loss engine or a compute_loss) on ``train_dataset``; see the module docstring."""

    def __init__(self, model: nn.Module, loss: LossEngine | ComputeLoss, train_dataset: Dataset, cfg: TrainConfig,
                 work_dir: str | Path, *, collate_fn: Callable[[list], Any] | None = None,
                 extra_state: Mapping[str, Any] | None = None,
                 extra_parameters: Iterable[nn.Parameter] | None = None,
                 after_step: Sequence[Callable[[int], None]] | None = None,
                 on_start: Sequence[Callable[[], None]] | None = None,
                 validate: Validate | None = None) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.dist = init_distributed(cfg.device)
        self.device = training_device(cfg.device, self.dist)
        self.logger = setup_logger(self.work_dir, self.dist.rank)
        self.loss_engine = loss if isinstance(loss, LossEngine) else None
        if self.loss_engine is not None:
            extra_state, extra_parameters, after_step = engine_hooks(self.loss_engine, model, extra_state,
                                                                     extra_parameters, after_step)
            loss = TaskLoss(self.loss_engine)
        self.compute_loss: ComputeLoss = loss
        self.train_dataset = train_dataset
        self.collate_fn = collate_fn
        self.after_step = list(after_step or [])
        self.on_start = list(on_start or [])
        self.validate = validate
        self.extra_state = dict(extra_state or {})
        self._place_extra_state()

        self._configure_determinism()
        self._configure_precision()
        # model: the bare module (what checkpoints, EMA and validation use); train_model: what the forward runs
        self.model, self.train_model = wrap_model(model, self.device, self.dist, sync_bn=cfg.sync_bn,
                                                  find_unused_parameters=cfg.find_unused_parameters)
        model_params = [p for p in self.model.parameters() if p.requires_grad]
        self.extra_parameters = [p for p in (extra_parameters or []) if p.requires_grad]
        self.optimizer = build_optimizer(cfg, model_params, self.extra_parameters, self.device)
        self._all_params = model_params + self.extra_parameters
        self._configure_data()
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_iters)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema else None

        # Position: `iteration_in_epoch` batches of epoch `epoch` (0-based) are done.
        self.epoch = 0
        self.iteration_in_epoch = 0
        self.global_step = 0
        self.skipped_steps = 0          # non-finite loss or gradients (weights untouched)
        self.train_seconds = 0.0        # wall time spent in training epochs (validation excluded), over resumes
        self.amp_overflow_steps = 0     # fp16 GradScaler overflow steps (expected early on)
        self.history: dict[str, list] = {"loss": [], "lr": [], "grad_norm": [], "skipped_steps": [], "val": []}
        self._last_saved_step = -1
        self._writer = None
        self._buffer_backups: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup helpers

    def _place_extra_state(self) -> None:
        """Check that each extra state can be checkpointed; move the ``nn.Module`` ones to the device."""
        for name, obj in self.extra_state.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(f"extra_state[{name!r}]: {type(obj).__name__} has no state_dict/load_state_dict")
            if isinstance(obj, nn.Module):
                obj.to(self.device)

    def _configure_determinism(self) -> None:
        if self.cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _configure_precision(self) -> None:
        """``amp_enabled``, ``amp_dtype`` and the ``scaler`` (enabled for float16 AMP).

        On CUDA either type. On CPU only bfloat16 and only where the CPU computes in it
        (:func:`cpu_has_bfloat16`): elsewhere oneDNN emulates it, slower than float32.
        """
        self.amp_dtype = torch.float16 if self.cfg.amp_dtype == "float16" else torch.bfloat16
        self.amp_enabled = self.cfg.amp
        if self.cfg.amp and self.device.type == "cpu":
            if self.amp_dtype != torch.bfloat16:
                self.amp_enabled = False
                self.logger.warning("TrainConfig.amp=True with amp_dtype float16 on CPU: mixed precision disabled "
                                    "(CPU autocast here is bfloat16 only: set train.amp_dtype=bfloat16)")
            elif not cpu_has_bfloat16():
                self.amp_enabled = False
                self.logger.warning("TrainConfig.amp=True but this CPU has no bfloat16 instructions (avx512_bf16 / "
                                    "AMX): mixed precision disabled, training in float32")
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_enabled and self.amp_dtype == torch.float16)

    def _configure_data(self) -> None:
        """``dataset_len``, this rank's ``sampler``, ``iters_per_epoch`` and ``total_iters``."""
        cfg = self.cfg
        try:
            self.dataset_len = len(self.train_dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("train_dataset must be a map-style dataset with __len__") from None
        self.sampler = ResumableDistributedSampler(self.train_dataset, num_replicas=self.dist.world_size,
                                                   rank=self.dist.rank, seed=cfg.seed)
        self.iters_per_epoch = iterations_per_epoch(self.sampler.num_samples, cfg.batch_size, cfg.drop_last)
        if self.iters_per_epoch < 1:
            raise ValueError(f"train_dataset has {self.dataset_len} samples: fewer than one batch of "
                             f"{cfg.batch_size} per process x {self.dist.world_size} processes")
        self.total_iters = cfg.epochs * self.iters_per_epoch

    @property
    def global_batch_size(self) -> int:
        return self.cfg.batch_size * self.dist.world_size

    def make_loader(self, epoch: int, start_iteration: int = 0) -> DataLoader:
        """The DataLoader for ``epoch``, starting after ``start_iteration`` batches.

        Order from ``(seed, epoch)``; worker seeds from ``(seed, epoch, rank)``; the dataset
        gets ``set_epoch(epoch)`` first (before workers copy it) when it has that method.
        """
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(min(start_iteration * self.cfg.batch_size, self.sampler.num_samples))
        set_epoch = getattr(self.train_dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        return DataLoader(self.train_dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          num_workers=self.cfg.num_workers, collate_fn=self.collate_fn,
                          pin_memory=self.device.type == "cuda", drop_last=self.cfg.drop_last,
                          worker_init_fn=seed_worker, generator=loader_generator(self.cfg.seed, epoch, self.dist.rank),
                          persistent_workers=False)

    # ------------------------------------------------------------------ one step

    def train_one_step(self, batch: Any) -> StepResult:
        """Forward, backward and (unless a rank saw a non-finite value) one optimizer step.

        Collective under DDP: every rank must call it the same number of times.
        """
        if not self.model.training:
            self.train_model.train()
        lr = float(self.optimizer.param_groups[0]["lr"])
        batch = move_to_device(batch, self.device)
        self._backup_buffers()
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp_enabled):
            loss, logs = self.compute_loss(self.train_model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"compute_loss must return (scalar loss tensor, logs); got loss "
                             f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
        mean_loss, mean_logs, bad_loss_ranks = self._mean_over_ranks(loss, logs)
        if bad_loss_ranks > 0:
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_buffers()
            self.skipped_steps += 1
            self.logger.warning("step %d: non-finite loss (%s, %d of %d ranks): step skipped, weights unchanged "
                                "(%d skipped so far)", self.global_step + 1, mean_loss, bad_loss_ranks,
                                self.dist.world_size, self.skipped_steps)
            return self._finish_step(mean_loss, mean_logs, float("nan"), lr, "non-finite loss")

        self.scaler.scale(loss).backward()
        average_gradients(self.extra_parameters)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._all_params, max_norm=max_norm)
        grad_stats = torch.stack([grad_norm.detach().to(torch.float64).reshape(()),
                                  (~torch.isfinite(grad_norm.detach())).to(torch.float64).reshape(())])
        all_reduce_sum(grad_stats)
        grad_total, bad_grad_ranks = grad_stats.tolist()
        grad_norm_value = grad_total / self.dist.world_size
        if bad_grad_ranks > 0:
            reason = self._skip_non_finite_gradients(grad_norm_value)
            return self._finish_step(mean_loss, mean_logs, grad_norm_value, lr, reason)

        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        for callback in self.after_step:
            callback(self.global_step + 1)
        return self._finish_step(mean_loss, mean_logs, grad_norm_value, lr, None)

    def _mean_over_ranks(self, loss: torch.Tensor, logs: Mapping[str, float | torch.Tensor],
                         ) -> tuple[float, dict[str, float], int]:
        """``(loss, logs, ranks with a non-finite loss)``, the loss and logs averaged over ranks.

        One collective (and one device->host copy) carries the loss, a non-finite flag
        and the logged scalars; tensor logs stay on the device until then.
        """
        log_names = sorted(logs)
        loss_value = loss.detach().reshape(()).to(torch.float64)
        stats = torch.stack([loss_value, (~torch.isfinite(loss_value)).to(torch.float64),
                             *(self._log_scalar(logs[name], name) for name in log_names)])
        all_reduce_sum(stats)
        totals = stats.tolist()
        world = self.dist.world_size
        return totals[0] / world, {name: totals[2 + i] / world for i, name in enumerate(log_names)}, int(totals[1])

    def _skip_non_finite_gradients(self, grad_norm: float) -> str:
        """Drop this step's gradients; the skip reason: ``"amp overflow"`` (fp16: the scaler lowers the
        loss scale) or ``"non-finite gradients"`` (buffers restored, counted as a skipped step)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()  # lowers the loss scale; an fp16 overflow, not a bad batch
            self.amp_overflow_steps += 1
            self.logger.debug("step %d: fp16 overflow, loss scale now %g", self.global_step + 1,
                              self.scaler.get_scale())
            return "amp overflow"
        self._restore_buffers()
        self.skipped_steps += 1
        self.logger.warning("step %d: non-finite gradients (norm %s): step skipped, weights unchanged "
                            "(%d skipped so far)", self.global_step + 1, grad_norm, self.skipped_steps)
        return "non-finite gradients"

    def _log_scalar(self, value: float | torch.Tensor, name: str) -> torch.Tensor:
        """A logged value as a float64 0-d tensor on the training device."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"compute_loss logs[{name!r}]: expected a scalar, got a tensor of shape "
                                 f"{tuple(value.shape)}")
            return value.detach().reshape(()).to(self.device, torch.float64)
        try:
            return torch.tensor(float(value), dtype=torch.float64, device=self.device)
        except (TypeError, ValueError):
            raise ValueError(f"compute_loss logs[{name!r}]: expected a number, got {value!r}") from None

    @torch.no_grad()
    def _backup_buffers(self) -> None:
        """Copy the model's buffers (BatchNorm running stats...) aside before the forward pass.

        A batch that yields a non-finite loss has usually already fed NaN/inf into the
        running statistics during its forward pass; restoring them keeps a skipped step
        from poisoning the model. Buffers are small, so this costs a few memcpys.
        """
        backups = self._buffer_backups
        for name, buffer in self.model.named_buffers():
            backup = backups.get(name)
            if backup is None or backup.shape != buffer.shape or backup.dtype != buffer.dtype \
                    or backup.device != buffer.device:
                backups[name] = buffer.detach().clone()
            else:
                backup.copy_(buffer)

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        for name, buffer in self.model.named_buffers():
            buffer.copy_(self._buffer_backups[name])

    def _finish_step(self, loss: float, logs: dict[str, float], grad_norm: float, lr: float,
                     skip_reason: str | None) -> StepResult:
        with warnings.catch_warnings():
            # The schedule is indexed by iteration, skipped ones included, on purpose.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.global_step += 1
        self.history["loss"].append(loss)
        self.history["lr"].append(lr)
        self.history["grad_norm"].append(grad_norm)
        if skip_reason is not None and skip_reason != "amp overflow":
            self.history["skipped_steps"].append(self.global_step)
        return StepResult(loss, logs, grad_norm, lr, skip_reason is not None, skip_reason)

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> dict[str, list]:
        """Train until ``cfg.epochs`` are done; returns :attr:`history`.

        ``resume=True`` continues from ``work_dir/checkpoints/latest.pth`` (model, optimizer,
        scheduler, scaler, EMA, extra_state, RNG states, data position); with no checkpoint
        there it starts from scratch with a warning, so a preempted job can be relaunched with
        the same command. History keys: ``loss``, ``lr``, ``grad_norm`` (one entry per
        iteration), ``skipped_steps`` (1-based steps), ``val`` (one dict per validation:
        ``{"epoch": 0-based index, **numeric metrics}``).
        """
        with ckpt.lock_work_dir(self.work_dir) if self.dist.is_main else contextlib.nullcontext():
            return self._fit(resume)

    def _fit(self, resume: bool) -> dict[str, list]:
        resumed_from = self.resume_from_latest() if resume else None
        if resumed_from is None:
            seed_process(self.cfg.seed, self.dist.rank)
        if self.dist.is_main:
            ckpt.remove_stale_temporaries(self.work_dir)
            write_run_info(self.work_dir, self.cfg, extra={
                "world_size": self.dist.world_size, "global_batch_size": self.global_batch_size,
                "iters_per_epoch": self.iters_per_epoch, "total_iters": self.total_iters,
                "resumed_from": str(resumed_from) if resumed_from else None,
                "resumed_at_step": self.global_step})
            for callback in self.on_start:
                callback()
            if self.cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a killed run logged after its last checkpoint.
                self._writer = SummaryWriter(str(self.work_dir / "tensorboard"),
                                             purge_step=self.global_step if resumed_from else None)
        self._log_start(resumed_from)
        try:
            if resumed_from is not None and self._validation_missed():
                self._validate_and_save()
            while self.epoch < self.cfg.epochs:
                self._train_epoch()
            if self._last_saved_step != self.global_step:
                self.save_checkpoint()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self.logger.info("training done: %d steps, %d skipped (non-finite), %d fp16 overflow steps",
                         self.global_step, self.skipped_steps, self.amp_overflow_steps)
        return self.history

    def _log_start(self, resumed_from: Path | None) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        self.logger.info("training on %s x %d process(es): %d samples, %d iterations/epoch x %d epochs, "
                         "global batch %d, %d model parameters (+%d extra), amp=%s, ema=%s, schedule=%s",
                         self.device, self.dist.world_size, self.dataset_len, self.iters_per_epoch,
                         self.cfg.epochs, self.global_batch_size, n_params,
                         sum(p.numel() for p in self.extra_parameters),
                         self.cfg.amp_dtype if self.amp_enabled else "off", self.cfg.ema, self.cfg.schedule)
        if resumed_from is not None:
            self.logger.info("resumed from %s at epoch %d, iteration %d (step %d)", resumed_from,
                             self.epoch + 1, self.iteration_in_epoch, self.global_step)

    def _train_epoch(self) -> None:
        from tqdm import tqdm

        epoch = self.epoch
        loader = self.make_loader(epoch, self.iteration_in_epoch)
        bar = tqdm(total=self.iters_per_epoch, initial=self.iteration_in_epoch,
                   desc=f"epoch {epoch + 1}/{self.cfg.epochs}", dynamic_ncols=True,
                   disable=not (self.dist.is_main and self.cfg.progress_bar))
        window = LogWindow()
        last_time = time.perf_counter()
        try:
            for batch in loader:
                result = self.train_one_step(batch)
                self.iteration_in_epoch += 1
                now = time.perf_counter()
                window.add(result, now - last_time, self.global_batch_size)
                self.train_seconds += now - last_time
                last_time = now
                bar.update(1)
                if self.dist.is_main and self.cfg.progress_bar:
                    bar.set_postfix(loss=f"{result.loss:.4g}", lr=f"{result.lr:.3g}",
                                    sps=f"{window.samples_per_second():.1f}", refresh=False)
                if self.global_step % self.cfg.log_every == 0 or self.iteration_in_epoch == self.iters_per_epoch:
                    self._log_window(window)
                    window = LogWindow()
                mid_epoch = self.iteration_in_epoch < self.iters_per_epoch
                if mid_epoch and self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if not mid_epoch:
                    break
        finally:
            bar.close()
        # The epoch is complete: the position moves, the epoch-end checkpoint keeps the epoch's
        # work, then validation (RNG-neutral) runs and the checkpoint is rewritten with its result.
        self.epoch += 1
        self.iteration_in_epoch = 0
        last_epoch = self.epoch == self.cfg.epochs
        step_due = self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0
        if self.cfg.checkpoint_at_epoch_end or last_epoch or step_due:
            self.save_checkpoint()
        if self._validation_due(self.epoch):
            self._validate_and_save()

    def _validation_due(self, epochs_done: int) -> bool:
        return bool(self.validate is not None and self.cfg.val_every and epochs_done > 0
                    and (epochs_done % self.cfg.val_every == 0 or epochs_done == self.cfg.epochs))

    def _validation_missed(self) -> bool:
        """Resumed at an epoch end whose due validation is not in the history (killed before it ran)."""
        return (self.iteration_in_epoch == 0 and self._validation_due(self.epoch)
                and not any(entry["epoch"] == self.epoch - 1 for entry in self.history["val"]))

    def _validate_and_save(self) -> None:
        """Validate; on success rewrite this position's checkpoint so it holds the result. A validation
        error is logged (type and message) and training goes on (collective: every rank agrees)."""
        try:
            self.run_validation()
            failed = False
        except Exception as err:  # noqa: BLE001 - any failure of the user's validate(): log it, keep training
            self.logger.warning("validation after epoch %d failed (%s: %s); training goes on, the epoch's work is "
                                "in the checkpoint", self.epoch, type(err).__name__, err)
            self.train_model.train()
            failed = True
        if not any_rank(failed, self.device) and self._last_saved_step == self.global_step:
            self.save_checkpoint()

    def _log_window(self, window: LogWindow) -> None:
        if not self.dist.is_main or window.steps == 0:
            return
        remaining = self.total_iters - self.global_step
        eta = format_duration(window.seconds_per_step() * remaining)
        logs = window.mean_logs()
        log_text = " ".join(f"{name} {value:.4g}" for name, value in logs.items())
        self.logger.info("epoch %d/%d iter %d/%d step %d/%d | loss %.4f%s | lr %.3e | grad_norm %.3f | "
                         "%.1f samples/s | eta %s | skipped %d", self.epoch + 1, self.cfg.epochs,
                         self.iteration_in_epoch, self.iters_per_epoch, self.global_step, self.total_iters,
                         window.mean_loss(), f" ({log_text})" if log_text else "", window.last_lr,
                         window.mean_grad_norm(), window.samples_per_second(), eta, self.skipped_steps)
        writer = self._writer
        if writer is None:
            return
        step = self.global_step
        writer.add_scalar("train/loss", window.mean_loss(), step)
        for name, value in logs.items():
            writer.add_scalar(f"train/{name}", value, step)
        writer.add_scalar("train/lr", window.last_lr, step)
        writer.add_scalar("train/grad_norm", window.mean_grad_norm(), step)
        writer.add_scalar("train/samples_per_s", window.samples_per_second(), step)
        writer.add_scalar("train/skipped_steps", self.skipped_steps, step)
        if self.scaler.is_enabled():
            writer.add_scalar("train/amp_loss_scale", self.scaler.get_scale(), step)
        for obj in self.extra_state.values():
            log_scalars = getattr(obj, "log_scalars", None)
            if callable(log_scalars):
                log_scalars(writer, step)

    def run_validation(self) -> dict[str, Any]:
        """Call ``validate`` (all ranks) on the EMA model if any, else the bare model.

        Runs inside :func:`preserved_rng_state`, so validating never changes the training result.
        """
        assert self.validate is not None
        module = self.ema.module if self.ema is not None else self.model
        finished_epoch = self.epoch - 1  # 0-based index of the epoch just completed
        with preserved_rng_state():
            metrics = dict(self.validate(module, finished_epoch))
        self.train_model.train()
        numeric = {name: float(value) for name, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        # ``step``: the global step the validated weights were trained for (the x of a learning curve);
        # ``train_seconds``: the training wall time that took (validations excluded).
        self.history["val"].append({"epoch": finished_epoch, "step": self.global_step,
                                    "train_seconds": round(self.train_seconds, 3), **numeric})
        if self.dist.is_main:
            self.logger.info("validation after epoch %d: %s", self.epoch,
                             " ".join(f"{name} {value:.4g}" for name, value in numeric.items()) or metrics)
            if self._writer is not None:
                for name, value in numeric.items():
                    self._writer.add_scalar(f"val/{name}", value, self.global_step)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, rng_states: list[dict]) -> dict:
        """Everything a resume needs, as tensors and primitives (loads with weights_only=True);
        ``rng_states``: one per rank. Contents: :func:`~bevperc.training.checkpoint.checkpoint_from_trainer`."""
        return ckpt.checkpoint_from_trainer(self, rng_states)

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current position (collective; rank 0 writes, every rank raises if
        that fails): :func:`~bevperc.training.checkpoint.save_trainer_checkpoint`."""
        path = ckpt.save_trainer_checkpoint(self)
        self._last_saved_step = self.global_step
        return path

    def resume_from_latest(self) -> Path | None:
        """Load the newest intact checkpoint of the work dir (read by rank 0, broadcast to the others).

        ``latest.pth``, else the newest ``iter_*.pth`` that loads, with a warning naming what was
        skipped and what is used; a :class:`~bevperc.training.checkpoint.CheckpointError` when none loads.
        """
        return ckpt.resume_trainer(self)

    def load_state_dict(self, state: dict, source: str | Path = "<checkpoint>") -> None:
        """Restore a :meth:`state_dict` (same model, data and global batch size); a
        :class:`~bevperc.training.checkpoint.CheckpointError` naming ``source`` when it does not fit."""
        ckpt.load_trainer_state(self, state, source)
        self._last_saved_step = self.global_step
