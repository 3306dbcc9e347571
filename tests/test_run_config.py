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
BEV_CONFIGS = tuple(sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("gesture_")))


def test_bev_configs_found() -> None:
    assert {"demo_cpu.yaml", "bevdet_r50_256x704.yaml"} <= set(BEV_CONFIGS)


@pytest.mark.parametrize("name", BEV_CONFIGS)
def test_shipped_bev_configs_load(name: str) -> None:
    assert isinstance(load_run_config(CONFIGS / name), Config)


@pytest.mark.parametrize("name", BEV_CONFIGS)
def test_data_input_size_and_gt_range_are_the_models(name: str) -> None:
    """Every shipped config gets the network input size and the GT range from the model, whether its
    data section leaves them out or restates them."""
    smaller = "model.view.input_size=[64,160]"
    for overrides in ([], [smaller], ["data.input_size=[64,160]", smaller]):  # as shipped; another model size; restated
        cfg = load_run_config(CONFIGS / name, overrides)
        grid = cfg.model.grid
        assert cfg.data.input_size == tuple(cfg.model.view.input_size)
        assert cfg.data.gt_range == (grid.x_range[0], grid.y_range[0], grid.z_range[0],
                                     grid.x_range[1], grid.y_range[1], grid.z_range[1])
    assert load_run_config(CONFIGS / name, [smaller]).data.input_size == (64, 160)


def test_data_values_that_disagree_with_the_model_name_both_fields() -> None:
    with pytest.raises(ConfigError, match=r"data\.input_size \(64, 160\) != model\.view\.input_size \(128, 352\)"):
        load_run_config(CONFIGS / "demo_cpu.yaml", ["data.input_size=[64,160]"])
    with pytest.raises(ConfigError, match=r"data\.gt_range .* != model grid ranges"):
        load_run_config(CONFIGS / "demo_cpu.yaml", ["data.gt_range=[-40,-40,-5,40,40,3]"])
    with pytest.raises(ConfigError, match=r"data\.gt_range .* != model grid ranges"):
        load_run_config(CONFIGS / "demo_cpu.yaml", ["model.grid.x_range=[-40,40]",
                                                     "data.gt_range=[-51.2,-51.2,-5,51.2,51.2,3]"])
    moved = load_run_config(CONFIGS / "demo_cpu.yaml", ["model.grid.x_range=[-40,40]"])
    assert moved.data.gt_range == (-40.0, -51.2, -5.0, 40.0, 51.2, 3.0)


def test_a_data_config_on_its_own_must_set_the_models_values() -> None:
    from bevperc.data import DataConfig, NuScenesBEVDataset

    with pytest.raises(ValueError, match=r"data\.input_size and data\.gt_range not set"):
        NuScenesBEVDataset(DataConfig(dataroot="nowhere"), "mini_train", train=False)


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


# ----------------------------------------------------------------------------- old spellings of renamed fields


def test_old_spelling_of_a_renamed_field_loads_as_the_field(tmp_path: Path) -> None:
    """``eval.engine`` (now ``eval.evaluator``) and the gesture ``optim.engine`` (now ``optim.loss_engine``,
    typed) load to the same config as the new spelling, in files, mappings and overrides."""
    from bevperc.gesture.config import DistillConfig
    from bevperc.utils.config import from_dict, load_config

    new = CONFIGS / "demo_cpu.yaml"
    old = tmp_path / "old.yaml"
    old.write_text(new.read_text().replace("\n  evaluator: devkit\n", "\n  engine: devkit\n"))
    assert "engine: devkit" in old.read_text()
    assert load_run_config(old) == load_run_config(new) and load_run_config(new).eval.evaluator == "devkit"
    # an override in either spelling replaces the file's value in either spelling
    for path in (old, new):
        for key in ("eval.engine", "eval.evaluator"):
            assert load_run_config(path, [f"{key}=fast"]) == load_run_config(new, ["eval.evaluator=fast"])
    assert from_dict(Config, {"eval": {"engine": "devkit"}}).eval.evaluator == "devkit"

    gesture_new = CONFIGS / "gesture_distill.yaml"
    gesture_old = tmp_path / "gesture_old.yaml"
    gesture_old.write_text(gesture_new.read_text().replace("\n  loss_engine:\n", "\n  engine:\n"))
    distill = load_config(DistillConfig, gesture_new)
    assert isinstance(distill.optim.loss_engine, LossEngineConfig) and distill.optim.loss_engine.enabled
    assert load_config(DistillConfig, gesture_old) == distill
    assert (load_config(DistillConfig, gesture_old, ["optim.loss_engine.lag_temperature=0.5"])
            == load_config(DistillConfig, gesture_new, ["optim.engine.lag_temperature=0.5"]))


def test_old_and_new_spelling_together_is_an_error(tmp_path: Path) -> None:
    from bevperc.gesture.config import DistillConfig
    from bevperc.utils.config import load_config

    both = tmp_path / "both.yaml"
    both.write_text((CONFIGS / "demo_cpu.yaml").read_text().replace("\n  evaluator: devkit\n",
                                                                       "\n  evaluator: devkit\n  engine: fast\n"))
    with pytest.raises(ConfigError, match=r"both\.yaml: eval: both 'engine' \(the old spelling\) and 'evaluator' "
                                          r"are given for EvalConfig\.evaluator; keep only 'evaluator'"):
        load_run_config(both)
    gesture = tmp_path / "gesture.yaml"
    gesture.write_text("optim:\n  engine: {enabled: false}\n  loss_engine: {enabled: false}\n")
    with pytest.raises(ConfigError, match=r"optim: both 'engine' .* and 'loss_engine' are given"):
        load_config(DistillConfig, gesture)


def test_gesture_loss_engine_takes_its_first_weights_from_the_task_weights() -> None:
    """The typed ``optim.loss_engine`` has no place for ``fixed_weights``: the task weights are they."""
    from bevperc.gesture.config import DistillConfig
    from bevperc.utils.config import load_config

    with pytest.raises(ConfigError, match=r"OptimConfig\.loss_engine\.fixed_weights: the first weights are the task"):
        load_config(DistillConfig, CONFIGS / "gesture_distill.yaml", ["optim.loss_engine.fixed_weights={det_wh: 2.0}"])


def test_eval_cli_engine_flag_is_the_old_spelling_of_evaluator() -> None:
    from bevperc.eval import build_parser

    for flag in ("--evaluator", "--engine"):
        assert build_parser().parse_args(["--results", "r.json", "--out", "o", flag, "devkit"]).evaluator == "devkit"
