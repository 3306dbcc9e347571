"""The run config (``bevperc.config.Config``): shipped configs load, cross-section checks and string
choices fail at load time with a message naming the fields."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from bevperc.config import Config, load_run_config
from bevperc.losses.engine import LossEngineConfig
from bevperc.utils.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BEV_CONFIGS = ("demo_cpu.yaml", "bevdet_r50_256x704.yaml")


@pytest.mark.parametrize("name", BEV_CONFIGS)
def test_shipped_bev_configs_load(name: str) -> None:
    assert isinstance(load_run_config(CONFIGS / name), Config)


def test_depth_supervision_without_depth_labels_names_both_fields() -> None:
    """The check runs where the config is built (loading or in Python), not as a KeyError in the first
    training step."""
    pattern = r"model\.view\.depth_supervision.*data\.load_depth"
    with pytest.raises(ConfigError, match=pattern):
        load_run_config(CONFIGS / "demo_cpu.yaml", ["data.load_depth=false"])
    cfg = load_run_config(CONFIGS / "demo_cpu.yaml")
    assert cfg.model.view.depth_supervision and cfg.data.load_depth
    with pytest.raises(ConfigError, match=pattern):
        Config(data=dataclasses.replace(cfg.data, load_depth=False), model=cfg.model)
    off = load_run_config(CONFIGS / "demo_cpu.yaml", ["data.load_depth=false", "model.view.depth_supervision=false"])
    assert not off.data.load_depth


@pytest.mark.parametrize("field, value", [("condition", "magic"), ("grouping", "kmeans"), ("affinity", "iou"),
                                          ("clustering", "dbscan"), ("first_weighting", "learned"),
                                          ("loss_scale", "final"), ("lag_reference", "start")])
def test_loss_engine_choices_name_the_field_and_the_allowed_values(field: str, value: str) -> None:
    allowed = typing.get_args(typing.get_type_hints(LossEngineConfig)[field])
    with pytest.raises(ConfigError, match=rf"loss\.{field}: expected one of \[.*\], got '{value}'"):
        load_run_config(CONFIGS / "demo_cpu.yaml", [f"loss.{field}={value}"])
    with pytest.raises(ValueError, match=rf"LossEngineConfig\.{field}: expected one of \[.*\], got '{value}'") as error:
        LossEngineConfig(**{field: value})
    for choice in allowed:  # every allowed value is named, and accepted
        assert repr(choice) in str(error.value)
        assert getattr(LossEngineConfig(**{field: choice}), field) == choice
