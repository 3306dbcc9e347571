"""Model-agnostic training: ``Trainer`` (AdamW, schedules, clipping, AMP, EMA, DDP via
torchrun, atomic checkpoints, exact resume), its ``TrainConfig``, and seeding helpers.

    from bevperc.training import Trainer, TrainConfig
    # model: forward(batch) and loss(outputs, batch) -> (task_losses, per_sample) (TaskModel)
    trainer = Trainer(model, loss_engine, train_dataset, cfg, work_dir, validate=validate)
    history = trainer.fit(resume=args.resume)
"""

from bevperc.training.config import TrainConfig
from bevperc.training.distributed import DistInfo, cleanup_distributed, dist_info, init_distributed
from bevperc.training.ema import ModelEMA
from bevperc.training.logging import setup_logger, write_run_info
from bevperc.training.seeding import sample_rng, sample_torch_generator, seed_process
from bevperc.training.task_loss import TaskModel
from bevperc.training.trainer import StepResult, Trainer, move_to_device

__all__ = [
    "DistInfo", "ModelEMA", "StepResult", "TaskModel", "TrainConfig", "Trainer", "cleanup_distributed", "dist_info",
    "init_distributed", "move_to_device", "sample_rng", "sample_torch_generator", "seed_process",
    "setup_logger", "write_run_info",
]
