"""CenterNet detector family: shapes for every stride setting, teacher-2 stride alignment, decoding."""

from __future__ import annotations

import pytest
import torch

from bevperc.gesture.presets import student_config, teacher1_config, teacher2_config
from bevperc.models.centernet import (
    CenterNet,
    DetectorConfig,
    StrideAlignmentError,
    assert_stride_alignment,
    decode_centernet,
    scaled_stride_config,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a shared 2-core CPU one intra-op thread is several times faster than two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "strides, size",
    [([2, 2, 2, 2], 64), ([2, 2, 2, 2], 96), ([1, 2, 2, 2], 32), ([2, 4, 2, 2], 128), ([2, 2, 4, 2], 128),
     ([2, 8, 2, 2], 256), ([4, 2, 2, 2], 128), ([2, 2, 2, 8], 256), ([2, 3, 2, 2], 96)],
)
def test_feature_set_shapes(strides: list[int], size: int) -> None:
    cfg = DetectorConfig(stage_widths=[4, 6, 8, 10], stage_depths=[1, 0, 1, 1], stage_strides=strides,
                         neck_channels=8, head_channels=8, neck_upsample_steps=2)
    out = CenterNet(cfg, num_classes=3)(torch.randn(2, 3, size, size))
    assert len(out.stages) == 4
    for feat, width, cum in zip(out.stages, cfg.stage_widths, cfg.cumulative_strides()):
        assert feat.shape == (2, width, size // cum, size // cum)
    grid = int(size / cfg.output_stride)
    assert out.heatmap.shape == (2, 3, grid, grid)
    assert out.wh.shape == (2, 2, grid, grid) and out.offset.shape == (2, 2, grid, grid)


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("stage_k", [0, 1, 2, 3])
def test_teacher2_aligned_maps_have_student_shape(scale: int, stage_k: int) -> None:
    student = student_config()
    teacher2 = teacher2_config(scale, stage_k)
    assert teacher2.stage_strides[stage_k] == scale * student.stage_strides[stage_k]
    aligned = assert_stride_alignment(student, 64, teacher2, scale * 64, scale, stage_k)
    assert aligned == list(range(stage_k, 4))
    s_out = CenterNet(student, 4)(torch.randn(1, 3, 64, 64))
    t_out = CenterNet(teacher2, 4)(torch.randn(1, 3, 64 * scale, 64 * scale))
    for i in range(4):
        if i >= stage_k:
            assert t_out.stages[i].shape[-2:] == s_out.stages[i].shape[-2:]
        else:  # stages before K do not align (L times larger): the distiller skips them
            assert t_out.stages[i].shape[-1] == scale * s_out.stages[i].shape[-1]
    for name in ("heatmap", "wh", "offset"):
        assert t_out.head_maps()[name].shape == s_out.head_maps()[name].shape


def test_bad_teacher2_config_raises() -> None:
    student = student_config()
    good = teacher2_config(2, 1)
    with pytest.raises(StrideAlignmentError, match=r"stage_strides\[1\]=2, expected 4"):
        assert_stride_alignment(student, 64, teacher2_config(2, 1, aligned=False), 128, 2, 1)
    with pytest.raises(StrideAlignmentError, match="must be L\\*student input"):
        assert_stride_alignment(student, 64, good, 192, 2, 1)
    with pytest.raises(StrideAlignmentError, match=r"stage_strides\[2\]"):
        assert_stride_alignment(student, 64, scaled_stride_config(good, 2, 2), 128, 2, 1)
    with pytest.raises(StrideAlignmentError, match="stages"):
        assert_stride_alignment(student, 64, DetectorConfig(stage_widths=[8, 8, 8], stage_depths=[1, 1, 1],
                                                            stage_strides=[2, 4, 2]), 128, 2, 1)
    # strides right but the input is not divisible: the dry run catches the shape mismatch
    with pytest.raises(StrideAlignmentError, match="teacher 2"):
        assert_stride_alignment(student, 36, good, 72, 2, 1)


def test_decode_recovers_planted_boxes() -> None:
    grid, stride = 16, 4.0
    heat = torch.full((1, 3, grid, grid), -10.0)
    wh = torch.zeros(1, 2, grid, grid)
    off = torch.zeros(1, 2, grid, grid)
    planted = [(1, 5, 3, 4.0, 6.0, 0.25, 0.5), (2, 10, 12, 2.0, 3.0, 0.0, 0.75)]  # cls, y, x, w, h, ox, oy
    for cls, y, x, w, h, ox, oy in planted:
        heat[0, cls, y, x] = 3.0
        wh[0, :, y, x] = torch.tensor([w, h])
        off[0, :, y, x] = torch.tensor([ox, oy])
    det = decode_centernet(heat, wh, off, stride, max_detections=5, score_threshold=0.5)[0]
    assert det["labels"].tolist() == [1, 2]
    for box, (cls, y, x, w, h, ox, oy) in zip(det["boxes"], planted):
        cx, cy = (x + ox) * stride, (y + oy) * stride
        expected = torch.tensor([cx - w * stride / 2, cy - h * stride / 2, cx + w * stride / 2, cy + h * stride / 2])
        torch.testing.assert_close(box, expected)
    assert torch.allclose(det["scores"], torch.sigmoid(torch.tensor([3.0, 3.0])))


def test_decode_suppresses_non_peaks() -> None:
    heat = torch.full((1, 1, 8, 8), -10.0)
    heat[0, 0, 3, 3] = 2.0
    heat[0, 0, 3, 4] = 1.5  # neighbour of a stronger peak: removed by the 3x3 max-pool NMS
    det = decode_centernet(heat, torch.ones(1, 2, 8, 8), torch.zeros(1, 2, 8, 8), 4.0, score_threshold=0.1)[0]
    assert len(det["scores"]) == 1


def test_teachers_are_bigger_than_student() -> None:
    n = lambda cfg: sum(p.numel() for p in CenterNet(cfg, 4).parameters())  # noqa: E731
    assert n(teacher1_config()) > 5 * n(student_config())
    assert n(teacher2_config()) > n(student_config())
