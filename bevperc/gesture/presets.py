"""The reference model sizes (student, teacher 1, teacher 2 stride-aligned / resize) used by the
demo, the benchmark and configs/gesture_*.yaml, kept in one place so they cannot drift apart.

Student: 4 stages of stride 2 (output stride 4). Teacher 1: same strides, ~10x the parameters.
Teacher 2 (``L``, ``K``): the student's strides with stage K's stride multiplied by L, so from
stage K on its maps have the student's shape while it reads an L-times larger image.
The loss engine of a distillation run keeps its defaults with its schedule scaled to the run
(``loss_engine_for_steps``): the gesture runs are a few hundred steps, shorter than the default
warm-up and regrouping period.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bevperc.losses.config import LossEngineConfig
from bevperc.models.centernet import DetectorConfig, scaled_stride_config


def student_config() -> DetectorConfig:
    return DetectorConfig(stage_widths=[8, 16, 24, 32], stage_depths=[1, 1, 1, 1], stage_strides=[2, 2, 2, 2],
                          neck_channels=24, neck_upsample_steps=2, head_channels=24)


def teacher1_config() -> DetectorConfig:
    return DetectorConfig(stage_widths=[24, 48, 64, 96], stage_depths=[1, 2, 2, 1], stage_strides=[2, 2, 2, 2],
                          neck_channels=48, neck_upsample_steps=2, head_channels=48)


def teacher2_config(scale: int = 2, stage_k: int = 1, aligned: bool = True) -> DetectorConfig:
    """Teacher 2; ``aligned=False`` gives the resize-alternative teacher (student strides)."""
    base = DetectorConfig(stage_widths=[16, 32, 48, 64], stage_depths=[1, 1, 1, 1], stage_strides=[2, 2, 2, 2],
                          neck_channels=32, neck_upsample_steps=2, head_channels=32)
    return scaled_stride_config(base, scale, stage_k) if aligned else base


def loss_engine_for_steps(steps: int, **options: Any) -> LossEngineConfig:
    """The loss engine's defaults with its schedule scaled to a run of ``steps`` optimiser steps (the first
    grouping after a fifth of the run, one regrouping at half of it), then ``options`` (field overrides)."""
    warm = max(5, steps // 5)
    schedule = {"warmup_steps": warm, "affinity_steps": warm, "regroup_every": max(warm, steps // 2),
                "condition_every": max(2, min(10, steps // 20)), "scale_warmup_steps": max(2, min(10, warm // 2))}
    return dataclasses.replace(LossEngineConfig(), **{**schedule, **options})
