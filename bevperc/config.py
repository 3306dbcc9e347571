"""The one config object of a BEV detection run: data, model, loss engine, training, evaluation.

Each section is a dataclass declared next to the code it configures; follow the import to
find what a field does:

    data   -> bevperc.data.config.DataConfig
    model  -> bevperc.models.config.ModelConfig
    loss   -> bevperc.losses.engine.LossEngineConfig
    train  -> bevperc.training.config.TrainConfig
    eval   -> EvalConfig (below)

    cfg = load_run_config("configs/demo_cpu.yaml", ["train.epochs=2"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from bevperc.data.config import DataConfig
from bevperc.training.config import TrainConfig
from bevperc.losses.engine import LossEngineConfig
from bevperc.models.config import ModelConfig
from bevperc.utils.config import ConfigError, load_config


@dataclass
class EvalConfig:
    """Inference and evaluation settings."""

    evaluator: Literal["fast", "devkit"] = field(default="fast", metadata={"aliases": ["engine"]})
    """The evaluator of `python -m bevperc.eval`: 'fast' (bevperc's exact one) or 'devkit' (nuScenes
    DetectionEval); in-training validation always uses 'fast'. Old spelling: `engine`."""
    batch_size: int = 2
    num_workers: int = 2
    use_ema: bool = True
    """Evaluate the EMA weights when the checkpoint has them."""
    figures: int = 2
    """`bevperc.eval` draws this many best and worst samples (0: none)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossEngineConfig = field(default_factory=LossEngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # The network input size and the GT range are the model's: the data section takes them
        # (left out, None) or restates them, and then must agree.
        input_size, bounds = tuple(self.model.view.input_size), self.model.grid.bounds
        if self.data.input_size is not None and tuple(self.data.input_size) != input_size:
            raise ConfigError(
                f"data.input_size {tuple(self.data.input_size)} != model.view.input_size {input_size}: "
                "leave data.input_size out (it is the model's) or set both to the same (H, W)"
            )
        if self.model.view.depth_supervision and not self.data.load_depth:
            raise ConfigError("model.view.depth_supervision needs LiDAR depth in the batch: set data.load_depth: true")
        if self.data.gt_range is not None and tuple(self.data.gt_range) != bounds:
            raise ConfigError(
                f"data.gt_range {tuple(self.data.gt_range)} != model grid ranges {bounds} "
                "(x_min, y_min, z_min, x_max, y_max, z_max): GT outside the grid cannot be learned; "
                "leave data.gt_range out (it is the model's)"
            )
        self.data = dataclasses.replace(self.data, input_size=input_size, gt_range=bounds)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a run config from YAML plus ``section.field=value`` overrides."""
    return load_config(Config, path, overrides)
