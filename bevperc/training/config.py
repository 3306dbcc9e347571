"""Training configuration (one dataclass; the coordinator nests it as ``train:``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    """Everything the model-agnostic :class:`bevperc.training.Trainer` needs to know.

    Sizes are per process: the global batch is ``batch_size * WORLD_SIZE``.
    Iteration counts (``warmup_iters``, ``log_every``, ``checkpoint_every``) count
    optimizer iterations, i.e. global batches.
    """

    epochs: int = 24
    batch_size: int = 4                 # samples per process (per GPU) per iteration
    num_workers: int = 4                # DataLoader worker processes per training process
    drop_last: bool = True              # every iteration sees a full global batch

    # AdamW
    lr: float = 2e-4                    # peak learning rate
    weight_decay: float = 1e-2          # applied to model parameters, never to extra_parameters
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    # Learning-rate schedule, stepped once per iteration (skipped steps included, so the
    # learning rate is a pure function of the iteration number).
    schedule: Literal["onecycle", "cosine", "step"] = "cosine"
    warmup_iters: int = 500             # linear warm-up (cosine/step); rising phase length (onecycle)
    warmup_ratio: float = 1.0 / 3.0     # warm-up starts at lr * warmup_ratio (cosine/step)
    min_lr_ratio: float = 1e-3          # cosine ends at lr * min_lr_ratio
    step_milestones: list[float] = field(default_factory=lambda: [0.75, 0.9])  # fractions of training
    step_gamma: float = 0.1             # lr multiplier at each milestone
    onecycle_div_factor: float = 25.0   # onecycle starts at lr / div_factor
    onecycle_final_div_factor: float = 1e4  # and ends at lr / (div_factor * final_div_factor)

    grad_clip: float = 35.0             # max global L2 grad norm; <= 0 disables clipping
    amp: bool = False                   # autocast (+ GradScaler for float16); on CPU: bfloat16, if the CPU has it
    amp_dtype: Literal["float16", "bfloat16"] = "float16"  # bfloat16 needs no GradScaler
    ema: bool = False                   # keep an exponential moving average of the weights
    ema_decay: float = 0.9999           # with warm-up: min(ema_decay, (1 + n) / (10 + n))

    seed: int = 0
    deterministic: bool = False         # torch.use_deterministic_algorithms, no cuDNN autotuning
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sync_bn: bool = False               # convert BatchNorm to SyncBatchNorm under DDP (CUDA)
    find_unused_parameters: bool = False  # DDP option for models with unused branches

    log_every: int = 20                 # iterations between log lines / TensorBoard points
    tensorboard: bool = True            # work_dir/tensorboard
    progress_bar: bool = True           # tqdm on rank 0
    checkpoint_every: int = 1000        # iterations between checkpoints (0: only at epoch ends)
    checkpoint_at_epoch_end: bool = True
    keep_checkpoints: int = 3           # numbered checkpoints kept besides latest.pth
    val_every: int = 1                  # epochs between validate() calls (0: never)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("num_workers", "warmup_iters", "checkpoint_every", "keep_checkpoints",
                        "val_every", "weight_decay", "seed")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.schedule not in ("onecycle", "cosine", "step"):
            raise ValueError(f"TrainConfig.schedule must be 'onecycle', 'cosine' or 'step', got {self.schedule!r}")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"TrainConfig.amp_dtype must be 'float16' or 'bfloat16', got {self.amp_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if any(not 0.0 < m < 1.0 for m in self.step_milestones):
            raise ValueError(f"TrainConfig.step_milestones are fractions of training in (0, 1), "
                             f"got {self.step_milestones}")
        self.betas = tuple(self.betas)  # YAML gives a list
