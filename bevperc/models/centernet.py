"""CenterNet-style detector family used for gesture detection and dual-teacher distillation.

One architecture, three roles (docs/methods.md, part B):

* the **student** (small widths) sees image 1 of size ``S x S``;
* **teacher 1** (wider/deeper) sees the same image;
* **teacher 2** sees image 2 of size ``L*S x L*S``; its stride at stage ``K`` is ``L`` times the
  student's, so from stage ``K`` on its maps have exactly the student's spatial shape
  (:func:`assert_stride_alignment` checks this by running both models on dummy inputs).

Layout of one detector::

    image [B,3,H,W]
      -> encoder: N stages; stage i = Conv2dNormActivation(stride s_i) + d_i torchvision BasicBlocks
      -> neck:    U upsampling steps (nearest x2 + conv) from the last stage, each adding a 1x1
                  lateral from the encoder stage of the same cumulative stride (FPN-lite)
      -> head:    M = 3 maps on the neck output: class heatmap logits [B,C,h,w],
                  box width/height [B,2,h,w] (in output-grid cells), centre offset [B,2,h,w]

``forward`` returns a :class:`FeatureSet`: the N stage maps and the M head maps.
Box geometry is expressed in output-grid cells, so teacher 2's wh/offset maps are directly
comparable with the student's (same grid) without rescaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock
from torchvision.ops import Conv2dNormActivation

from bevperc.models.heatmap import HEATMAP_INIT_BIAS


class StrideAlignmentError(ValueError):
    """Teacher 2's stage maps do not have the student's shape from stage K on."""


@dataclass
class DetectorConfig:
    """Architecture of one CenterNet-style detector (student or teacher).

    ``stage_widths``, ``stage_depths`` and ``stage_strides`` have one entry per encoder stage.
    ``neck_upsample_steps`` x2 upsamplings follow the last stage; the output stride is
    ``prod(stage_strides) / 2**neck_upsample_steps``.
    """

    stage_widths: list[int] = field(default_factory=lambda: [16, 24, 32, 48])
    stage_depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    stage_strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    neck_channels: int = 32
    neck_upsample_steps: int = 2
    head_channels: int = 32
    in_channels: int = 3

    def __post_init__(self) -> None:
        n = len(self.stage_widths)
        if n == 0:
            raise ValueError("stage_widths: need at least one encoder stage")
        if len(self.stage_depths) != n or len(self.stage_strides) != n:
            raise ValueError(
                f"stage_widths/stage_depths/stage_strides must have the same length, got "
                f"{len(self.stage_widths)}/{len(self.stage_depths)}/{len(self.stage_strides)}"
            )
        if any(s < 1 for s in self.stage_strides):
            raise ValueError(f"stage_strides must be >= 1, got {self.stage_strides}")
        if any(d < 0 for d in self.stage_depths):
            raise ValueError(f"stage_depths must be >= 0, got {self.stage_depths}")
        if not 0 <= self.neck_upsample_steps:
            raise ValueError(f"neck_upsample_steps must be >= 0, got {self.neck_upsample_steps}")
        if 2**self.neck_upsample_steps > math.prod(self.stage_strides):
            raise ValueError(
                f"neck_upsample_steps={self.neck_upsample_steps} upsamples past the input resolution "
                f"(total encoder stride {math.prod(self.stage_strides)})"
            )

    @property
    def num_stages(self) -> int:
        return len(self.stage_widths)

    def cumulative_strides(self) -> list[int]:
        """Stride of each stage's output relative to the input image."""
        out, acc = [], 1
        for s in self.stage_strides:
            acc *= s
            out.append(acc)
        return out

    @property
    def output_stride(self) -> float:
        """Input pixels per output-grid cell of the head maps."""
        return math.prod(self.stage_strides) / 2**self.neck_upsample_steps


def scaled_stride_config(cfg: DetectorConfig, scale: int, stage_k: int) -> DetectorConfig:
    """Copy of ``cfg`` whose stride at stage ``stage_k`` is multiplied by ``scale`` (teacher 2)."""
    if not 0 <= stage_k < cfg.num_stages:
        raise StrideAlignmentError(f"stage K={stage_k} out of range for {cfg.num_stages} stages")
    strides = list(cfg.stage_strides)
    strides[stage_k] *= scale
    return DetectorConfig(**{**cfg.__dict__, "stage_strides": strides})


class FeatureSet(NamedTuple):
    """Everything one detector forward produces.

    stages:  N tensors [B, C_i, H_i, W_i] (encoder stage outputs)
    heatmap: [B, num_classes, h, w] class-heatmap *logits*
    wh:      [B, 2, h, w] box width/height in output-grid cells
    offset:  [B, 2, h, w] sub-cell centre offset in cells, in [0, 1) when trained
    """

    stages: list[Tensor]
    heatmap: Tensor
    wh: Tensor
    offset: Tensor

    def head_maps(self) -> dict[str, Tensor]:
        return {"heatmap": self.heatmap, "wh": self.wh, "offset": self.offset}


def _downsample_kernel(stride: int) -> int:
    """Kernel of a stride-s conv that still sees every input pixel (3 for s<=2, s+1 above)."""
    return 3 if stride <= 2 else stride + 1


class Encoder(nn.Module):
    """N downsampling stages: ``Conv2dNormActivation`` (the stride) then ``BasicBlock`` s."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        stages = []
        c_in = cfg.in_channels
        for width, depth, stride in zip(cfg.stage_widths, cfg.stage_depths, cfg.stage_strides):
            k = _downsample_kernel(stride)
            layers: list[nn.Module] = [
                Conv2dNormActivation(c_in, width, kernel_size=k, stride=stride, padding=(k - 1) // 2)
            ]
            layers += [BasicBlock(width, width) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.stages = nn.ModuleList(stages)

    def forward(self, image: Tensor) -> list[Tensor]:
        """image [B,3,H,W] -> N maps [B, C_i, H/cs_i, W/cs_i] (cs_i: cumulative stride)."""
        feats = []
        x = image
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class Neck(nn.Module):
    """Upsample the last stage x2 per step, adding a 1x1 lateral from the same-stride stage.

    Laterals are chosen from the *relative* stride to the last stage, so teacher 2 (whose
    strides are L x the student's at stages >= K) uses the same stage indices as the student.
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        cum = cfg.cumulative_strides()
        self.reduce = Conv2dNormActivation(cfg.stage_widths[-1], cfg.neck_channels, kernel_size=1)
        self.lateral_stage: list[int] = []
        laterals, smooth = [], []
        for step in range(1, cfg.neck_upsample_steps + 1):
            target = cum[-1] / 2**step
            match = [i for i in range(cfg.num_stages - 1) if cum[i] == target]
            idx = match[-1] if match else -1
            self.lateral_stage.append(idx)
            laterals.append(
                nn.Conv2d(cfg.stage_widths[idx], cfg.neck_channels, 1) if idx >= 0 else nn.Identity()
            )
            smooth.append(Conv2dNormActivation(cfg.neck_channels, cfg.neck_channels, kernel_size=3))
        self.laterals = nn.ModuleList(laterals)
        self.smooth = nn.ModuleList(smooth)

    def forward(self, stages: Sequence[Tensor]) -> Tensor:
        """N stage maps -> [B, neck_channels, h, w] at the output stride."""
        x = self.reduce(stages[-1])
        for idx, lateral, smooth in zip(self.lateral_stage, self.laterals, self.smooth):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if idx >= 0:
                x = x + lateral(stages[idx])
            x = smooth(x)
        return x


def _head(c_in: int, c_mid: int, c_out: int, bias: float = 0.0) -> nn.Sequential:
    head = nn.Sequential(nn.Conv2d(c_in, c_mid, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c_mid, c_out, 1))
    nn.init.constant_(head[-1].bias, bias)
    return head


class CenterNet(nn.Module):
    """CenterNet-style detector; ``forward(image) -> FeatureSet``."""

    def __init__(self, cfg: DetectorConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.encoder = Encoder(cfg)
        self.neck = Neck(cfg)
        self.heatmap_head = _head(cfg.neck_channels, cfg.head_channels, num_classes, HEATMAP_INIT_BIAS)
        self.wh_head = _head(cfg.neck_channels, cfg.head_channels, 2)
        self.offset_head = _head(cfg.neck_channels, cfg.head_channels, 2)

    @property
    def output_stride(self) -> float:
        return self.cfg.output_stride

    def forward(self, image: Tensor) -> FeatureSet:
        """image [B,3,H,W] (normalised) -> FeatureSet (N stage maps + M=3 head maps)."""
        stages = self.encoder(image)
        neck = self.neck(stages)
        return FeatureSet(stages, self.heatmap_head(neck), self.wh_head(neck), self.offset_head(neck))


class ExportableCenterNet(nn.Module):
    """Wraps a CenterNet for deployment/ONNX: returns (heatmap probabilities, wh, offset)."""

    def __init__(self, model: CenterNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(image)
        return torch.sigmoid(out.heatmap), out.wh, out.offset


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def stage_shapes(cfg: DetectorConfig, input_size: int) -> list[tuple[int, int]]:
    """Spatial (H, W) of each stage map and, last, of the head maps for a square input."""
    model = CenterNet(cfg, num_classes=1).eval()
    out = model(torch.zeros(1, cfg.in_channels, input_size, input_size))
    return [tuple(f.shape[-2:]) for f in out.stages] + [tuple(out.heatmap.shape[-2:])]


def assert_stride_alignment(
    student: DetectorConfig,
    student_input: int,
    teacher2: DetectorConfig,
    teacher2_input: int,
    scale: int,
    stage_k: int,
) -> list[int]:
    """Check teacher 2 against the student; return the aligned stage indices (``K..N-1``).

    Requirements (docs/methods.md, part B): same number of stages; teacher-2 input = ``scale`` x student
    input; teacher-2 stride at stage K = ``scale`` x student stride there, others equal; and,
    checked by running both models, every stage map from K on and the head maps have the
    student's exact spatial shape. Raises :class:`StrideAlignmentError` naming the mismatch.
    """
    if scale < 1:
        raise StrideAlignmentError(f"scale L must be a positive integer, got {scale}")
    if student.num_stages != teacher2.num_stages:
        raise StrideAlignmentError(
            f"teacher 2 has {teacher2.num_stages} stages, student {student.num_stages}: need the same N"
        )
    if not 0 <= stage_k < student.num_stages:
        raise StrideAlignmentError(f"stage K={stage_k} out of range for {student.num_stages} stages")
    if teacher2_input != scale * student_input:
        raise StrideAlignmentError(
            f"teacher 2 input {teacher2_input} must be L*student input = {scale}*{student_input}"
        )
    for i, (s_t, s_s) in enumerate(zip(teacher2.stage_strides, student.stage_strides)):
        want = s_s * scale if i == stage_k else s_s
        if s_t != want:
            raise StrideAlignmentError(
                f"teacher 2 stage_strides[{i}]={s_t}, expected {want} (student stride {s_s}"
                f"{f' x L={scale} at stage K={stage_k}' if i == stage_k else ''}); "
                f"student strides {student.stage_strides}, teacher 2 strides {teacher2.stage_strides}"
            )
    if teacher2.neck_upsample_steps != student.neck_upsample_steps:
        raise StrideAlignmentError(
            f"teacher 2 neck_upsample_steps={teacher2.neck_upsample_steps} != student "
            f"{student.neck_upsample_steps}: head maps would not share the student's grid"
        )
    try:
        s_shapes = stage_shapes(student, student_input)
        t_shapes = stage_shapes(teacher2, teacher2_input)
    except RuntimeError as err:  # e.g. the neck cannot add laterals of mismatched size
        raise StrideAlignmentError(
            f"student input {student_input} / teacher 2 input {teacher2_input} do not divide by the "
            f"strides {student.stage_strides} / {teacher2.stage_strides}: {err}"
        ) from None
    for i in range(stage_k, student.num_stages + 1):
        if s_shapes[i] != t_shapes[i]:
            what = "head maps" if i == student.num_stages else f"stage {i} map"
            raise StrideAlignmentError(
                f"{what}: teacher 2 {t_shapes[i]} != student {s_shapes[i]} "
                f"(inputs {teacher2_input} vs {student_input}); choose input sizes divisible by the strides"
            )
    return list(range(stage_k, student.num_stages))


def _topk_peaks(heat: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """heat [B,C,h,w] probabilities -> scores, classes, ys, xs, each [B,k] (3x3 max-pool NMS)."""
    b, c, h, w = heat.shape
    keep = (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
    flat = (heat * keep).reshape(b, -1)
    k = min(k, flat.shape[1])
    scores, idx = flat.topk(k, dim=1)
    classes = torch.div(idx, h * w, rounding_mode="floor")
    pix = idx % (h * w)
    return scores, classes, torch.div(pix, w, rounding_mode="floor"), pix % w


@torch.no_grad()
def decode_centernet(
    heatmap: Tensor,
    wh: Tensor,
    offset: Tensor,
    output_stride: float,
    max_detections: int = 20,
    score_threshold: float = 0.05,
    heatmap_is_logits: bool = True,
) -> list[dict[str, Tensor]]:
    """Head maps -> per-image detections in input-image pixels.

    heatmap [B,C,h,w] (logits unless ``heatmap_is_logits=False``), wh [B,2,h,w] and
    offset [B,2,h,w] in grid cells. Returns B dicts: "boxes" [K,4] (x1,y1,x2,y2 pixels),
    "scores" [K], "labels" [K] int64, sorted by score, scores >= ``score_threshold``.
    """
    heat = torch.sigmoid(heatmap) if heatmap_is_logits else heatmap
    scores, classes, ys, xs = _topk_peaks(heat, max_detections)
    results = []
    for bi in range(heat.shape[0]):
        y, x = ys[bi], xs[bi]
        off = offset[bi, :, y, x]  # [2,K]
        size = wh[bi, :, y, x].clamp(min=0)
        cx = (x.to(heat.dtype) + off[0]) * output_stride
        cy = (y.to(heat.dtype) + off[1]) * output_stride
        bw, bh = size[0] * output_stride, size[1] * output_stride
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        keep = scores[bi] >= score_threshold
        results.append({"boxes": boxes[keep], "scores": scores[bi][keep], "labels": classes[bi][keep].long()})
    return results
