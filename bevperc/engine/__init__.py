"""Model-agnostic training engine: ``Trainer`` (AdamW, schedules, clipping, AMP, EMA, DDP via
torchrun, atomic checkpoints, exact resume), its ``TrainConfig``, and seeding helpers.

    from bevperc.engine import Trainer, TrainConfig
    trainer = Trainer(model, compute_loss, train_dataset, cfg, work_dir, extra_state={"loss_engine": engine})
    history = trainer.fit(resume=args.resume)
"""

from bevperc.engine.config import TrainConfig
from bevperc.engine.distributed import DistInfo, cleanup_distributed, dist_info, init_distributed
from bevperc.engine.ema import ModelEMA
from bevperc.engine.logging import setup_logger, write_run_info
from bevperc.engine.seeding import sample_rng, sample_torch_generator, seed_process
from bevperc.engine.trainer import StepResult, Trainer, move_to_device

__all__ = [
    "DistInfo", "ModelEMA", "StepResult", "TrainConfig", "Trainer", "cleanup_distributed", "dist_info",
    "init_distributed", "move_to_device", "sample_rng", "sample_torch_generator", "seed_process",
    "setup_logger", "write_run_info",
]
