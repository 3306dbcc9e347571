"""Dual-teacher, cross-resolution distillation of the gesture student (docs/methods.md, part B).

Per training step (image 1 = student resolution S, image 2 = L*S):

1. student(image 1)   -> first feature set  (N stage maps + M=3 head maps)
2. teacher1(image 1)  -> second feature set (frozen)
3. teacher2(image 2)  -> third feature set  (frozen; stride at stage K is L x the student's)
4. distillation tasks (each a task of the loss engine):
   * ``kd_t1_feat_s{i}`` for every stage i (N "first parameters"), ``kd_t2_feat_s{i}`` for
     the aligned stages i >= K ("third parameters"). Stages i < K of teacher 2 are L times
     larger than the student's and are *skipped* (they do not align; resizing them would be the
     alternative this method replaces). Loss: MSE between ``adapter(student map)`` and the
     teacher map, divided by the teacher map's mean square (scale-free across stages/teachers);
     the adapter is a learned 1x1 conv where channel counts differ, identity otherwise.
   * ``kd_t{1,2}_{heatmap,wh,offset}`` (M "second"/"fourth parameters"): heatmaps compared as
     probabilities, KL(sigmoid(teacher/T) || sigmoid(student/T)) per cell and class, focal-
     modulated by |p_s - p_t|^2 and summed per teacher peak (the focal label loss's scale; see
     ``heatmap_kl_loss``); size/offset maps L1 weighted by the teacher's confidence (max class
     probability per cell).
   * first weights: a teacher's feature weight is the total over its stages, its head weight
     scales the CenterNet map priors heatmap 1 / wh 0.1 / offset 1 (``TeacherLink.task_weights``).
   * plus the ordinary detection tasks ``det_heatmap``, ``det_wh``, ``det_offset`` on labels.
5. ``LossEngine`` groups the tasks into sets and balances them; its summary is saved with the run.
   Distillation runs it with the engine's defaults (raw terms x the priors above inside a set,
   lag measured from each set's formation), the same as the BEV detector; why: docs/methods.md.

A weight of 0 removes a task (a teacher with both weights 0 is not even loaded, a teacher
whose features are not distilled gets no adapters). With all distillation weights 0 the run is
``train.train_detector`` bit for bit: the student is built from the same seed first,
teachers/adapters are built under a forked RNG, and the training is ``train.fit`` of a
``train.GestureTask`` without teachers.

``teacher2_align="resize"`` is the comparison alternative: a teacher 2 with the student's strides
sees image 2 and its maps are bilinearly resized (antialiased) onto the student grid; all stages
are then compared, wh is divided by L and the offset map (whose meaning does not survive
resampling) is not distilled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevperc.gesture.config import DistillConfig
from bevperc.gesture.data import GestureDataset
from bevperc.gesture.train import (
    GestureTask,
    det_task_weights,
    fit,
    gesture_loss_engine,
    load_centernet,
    save_run,
)
from bevperc.models.centernet import (
    CenterNet,
    FeatureSet,
    StrideAlignmentError,
    assert_stride_alignment,
    stage_shapes,
)
from bevperc.utils.config import save_config, to_dict


HEAD_MAP_PRIORS: dict[str, float] = {"heatmap": 1.0, "wh": 0.1, "offset": 1.0}
"""Relative first weights of the head-map distillation tasks (the CenterNet detection priors)."""


@dataclass
class TeacherLink:
    """How one frozen teacher is compared with the student.

    name: "t1" or "t2"; image_index: which batch image it sees (0 = S, 1 = L*S);
    stages: student stage indices with a feature task; resize: interpolate its maps onto the
    student grid (and divide wh by ``scale``); weights of its feature and head tasks; adapters
    (student stage -> teacher channels, only while features are distilled); the loss settings
    of the run (``DistillConfig.heatmap_temperature``, ``feature_norm``, ``feature_region``).
    """

    name: str
    model: CenterNet
    image_index: int
    stages: list[int]
    resize: bool
    scale: int
    feature_weight: float
    head_weight: float
    head_maps: tuple[str, ...] = ("heatmap", "wh", "offset")
    adapters: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    temperature: float = 1.0
    feature_norm: str = "global"
    feature_region: str = "all"

    def losses(self, student_out: FeatureSet, teacher_out: FeatureSet) -> dict[str, Tensor]:
        """Per-sample [B] losses of this teacher's tasks (``distillation_losses``)."""
        return distillation_losses(student_out, teacher_out, self, self.temperature, self.feature_norm,
                                   self.feature_region)

    def task_weights(self) -> dict[str, float]:
        """First weights (engine priors / fixed weights) of this teacher's tasks.

        ``feature_weight`` is the total over the aligned stages (split equally), and
        ``head_weight`` scales the CenterNet map priors (heatmap 1, wh 0.1, offset 1, as the
        detection tasks). Why: with one full weight per task, 4 stage terms + 3 map terms per
        teacher outweighed the 3 detection tasks ~14:2.1 and, in an engine set, diluted the
        label loss to a 1/7 share of its set.
        """
        weights = {}
        if self.feature_weight > 0:
            weights.update({f"kd_{self.name}_feat_s{i}": self.feature_weight / len(self.stages) for i in self.stages})
        if self.head_weight > 0:
            weights.update({f"kd_{self.name}_{m}": self.head_weight * HEAD_MAP_PRIORS[m] for m in self.head_maps})
        return weights


# ----------------------------------------------------------------------------- losses


FEATURE_NORMS = ("global", "channel")


def _standardise_channels(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Each channel to zero mean / unit variance over the batch and the spatial cells (PKD's norm)."""
    dims = (0, 2, 3)
    mean = x.mean(dim=dims, keepdim=True)
    std = x.var(dim=dims, keepdim=True, unbiased=False).add(eps).sqrt()
    return (x - mean) / std


def feature_mimic_loss(student_map: Tensor, teacher_map: Tensor, norm: str = "global",
                       cell_weight: Tensor | None = None) -> Tensor:
    """Feature-mimicry loss per sample [B] of [B,C,H,W] maps (student map already adapted).

    ``norm="global"``: MSE divided by the teacher map's mean square, ``mean (s-t)^2 / mean t^2``
    (one scale per map; a few high-energy channels - colour, clutter edges - dominate it).
    ``norm="channel"``: both maps standardised per channel over batch and cells (as in PKD,
    Cao et al. 2022), then ``mean (s-t)^2 / 2``, i.e. ``1 - Pearson correlation`` per channel,
    averaged: every teacher channel counts alike whatever its energy, the value lies in [0, 2]
    (about 1 for an untrained adapter), so a weight means the same at every stage and teacher.
    ``cell_weight`` [B,H,W] (optional): the squared error is averaged over cells with these
    weights instead of uniformly (normalisation statistics still use every cell).
    """
    if norm == "channel":
        sq = (_standardise_channels(student_map) - _standardise_channels(teacher_map)).pow(2).mean(1) / 2
    elif norm == "global":
        scale = teacher_map.pow(2).flatten(1).mean(1).clamp(min=1e-6)
        sq = (student_map - teacher_map).pow(2).mean(1) / scale.view(-1, 1, 1)
    else:
        raise ValueError(f"feature norm must be one of {FEATURE_NORMS}, got {norm!r}")
    if cell_weight is None:
        return sq.flatten(1).mean(1)
    return (sq * cell_weight).flatten(1).sum(1) / cell_weight.flatten(1).sum(1).clamp(min=1e-6)


def object_cell_weight(teacher_heat_logits: Tensor, size: tuple[int, int], floor: float = 0.1) -> Tensor:
    """[B,H,W] cell weights for feature mimicry on a stage grid: ``floor`` + the teacher's max class
    probability, area-resampled onto ``size`` (where the teacher sees a gesture, i.e. the class cue)."""
    prob = torch.sigmoid(teacher_heat_logits).amax(1, keepdim=True)
    if tuple(prob.shape[-2:]) != tuple(size):
        prob = F.interpolate(prob, size=size, mode="area") if prob.shape[-1] >= size[-1] else \
            F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
    prob = prob / prob.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1, 1)
    return floor + prob[:, 0]


def teacher_peak_count(teacher_logits: Tensor, threshold: float = 0.3) -> Tensor:
    """Per-sample [B] number of teacher detections: 3x3 local maxima of sigmoid(logits) >= threshold.

    The same peak rule as ``decode_centernet``; at least 1. It plays the role of the number of
    labelled centres in the CenterNet focal loss, so a heatmap term is "per object", not "per cell".
    """
    prob = torch.sigmoid(teacher_logits)
    peaks = (F.max_pool2d(prob, 3, stride=1, padding=1) == prob) & (prob >= threshold)
    return peaks.flatten(1).sum(1).clamp(min=1).to(teacher_logits.dtype)


def heatmap_kl_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, gamma: float = 2.0
) -> Tensor:
    """Per-sample [B] focal-modulated KL of the class probabilities, summed over cells, per teacher peak.

    student_logits, teacher_logits: [B,C,h,w]. Per cell and class, with p = sigmoid(logits / T):
    ``KL(Bernoulli(p_t) || Bernoulli(p_s)) * |p_s - p_t| ** gamma`` (the KL is computed as soft
    BCE minus the teacher entropy), summed and divided by the teacher's peak count
    (``teacher_peak_count``). It is 0 exactly at a match and > 0 otherwise.

    Why: a heatmap is ~1000 background cells per few objects. The plain mean over cells made
    the term ~1/300 of the focal label loss (no effect); a plain sum per object made the easy
    background dominate everything (it started at ~28 per object against 2-3 for the focal loss,
    and the student's own detection loss ended 6x worse). The CenterNet focal loss solves the same
    imbalance with ``p ** 2`` on negatives; ``|p_s - p_t| ** gamma`` is its soft-target form
    (as in the quality focal loss of GFL), so well-matched background cells stop counting.
    ``T ** 2`` keeps gradients comparable across temperatures.
    """
    s, t = student_logits / temperature, teacher_logits / temperature
    p_t = torch.sigmoid(t)
    bce = F.binary_cross_entropy_with_logits(s, p_t, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(t, p_t, reduction="none")
    modulation = (torch.sigmoid(s) - p_t).abs().pow(gamma) if gamma > 0 else 1.0
    kl = ((bce - entropy).clamp(min=0) * modulation).flatten(1).sum(1)
    return kl / teacher_peak_count(teacher_logits) * temperature**2


def confidence_weighted_l1(student_map: Tensor, teacher_map: Tensor, teacher_heat_logits: Tensor) -> Tensor:
    """Per-sample [B] L1 over [B,2,h,w] maps weighted by the teacher's max class probability."""
    weight = torch.sigmoid(teacher_heat_logits).amax(1)  # [B,h,w]
    per_cell = (student_map - teacher_map).abs().sum(1) * weight
    return per_cell.flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1e-6)


def _on_grid(teacher_map: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(teacher_map.shape[-2:]) == tuple(size):
        return teacher_map
    return F.interpolate(teacher_map, size=size, mode="bilinear", align_corners=False, antialias=True)


def distillation_losses(
    student_out: FeatureSet,
    teacher_out: FeatureSet,
    link: TeacherLink,
    temperature: float,
    feature_norm: str = "global",
    feature_region: str = "all",
) -> dict[str, Tensor]:
    """Per-sample [B] distillation task losses of one teacher (names as in ``link.task_weights``)."""
    per_sample: dict[str, Tensor] = {}
    if feature_region not in ("all", "objects"):
        raise ValueError(f"feature_region must be 'all' or 'objects', got {feature_region!r}")
    if link.feature_weight > 0:
        for i in link.stages:
            s_map = link.adapters[f"s{i}"](student_out.stages[i])
            t_map = _on_grid(teacher_out.stages[i], tuple(s_map.shape[-2:]))
            weight = None
            if feature_region == "objects":
                weight = object_cell_weight(teacher_out.heatmap, tuple(s_map.shape[-2:]))
            per_sample[f"kd_{link.name}_feat_s{i}"] = feature_mimic_loss(s_map, t_map, feature_norm, weight)
    if link.head_weight > 0:
        grid = tuple(student_out.heatmap.shape[-2:])
        t_heat = _on_grid(teacher_out.heatmap, grid)
        per_sample[f"kd_{link.name}_heatmap"] = heatmap_kl_loss(student_out.heatmap, t_heat, temperature)
        # Sizes are in grid cells; a resized teacher's cells are L times smaller.
        t_wh = _on_grid(teacher_out.wh, grid) / (link.scale if link.resize else 1)
        per_sample[f"kd_{link.name}_wh"] = confidence_weighted_l1(student_out.wh, t_wh, t_heat)
        if "offset" in link.head_maps:
            per_sample[f"kd_{link.name}_offset"] = confidence_weighted_l1(student_out.offset, teacher_out.offset, t_heat)
    return per_sample


# ----------------------------------------------------------------------------- set-up


def _make_adapters(student: CenterNet, teacher: CenterNet, stages: list[int]) -> nn.ModuleDict:
    """1x1 conv from student to teacher channels where they differ, identity where equal."""
    adapters = nn.ModuleDict()
    for i in stages:
        c_s, c_t = student.cfg.stage_widths[i], teacher.cfg.stage_widths[i]
        adapters[f"s{i}"] = nn.Conv2d(c_s, c_t, kernel_size=1) if c_s != c_t else nn.Identity()
    return adapters


def _freeze(model: CenterNet) -> CenterNet:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _check_classes(payload: dict, classes: list[str], path: str) -> None:
    if list(payload["classes"]) != list(classes):
        raise ValueError(f"{path}: teacher classes {payload['classes']} != student data.classes {classes}")


def _link(cfg: DistillConfig, student: CenterNet, teacher: CenterNet, stages: list[int], *, teacher2: bool,
          resize: bool = False) -> TeacherLink:
    """The frozen ``teacher`` (1, or 2 when ``teacher2``) linked to the student with ``cfg``'s weights
    and loss settings; adapters only while its features are distilled (no parameter left unused)."""
    w = cfg.weights
    feature_weight, head_weight = (w.teacher2_features, w.teacher2_heads) if teacher2 else \
        (w.teacher1_features, w.teacher1_heads)
    adapters = _make_adapters(student, teacher, stages) if feature_weight > 0 else nn.ModuleDict()
    return TeacherLink("t2" if teacher2 else "t1", _freeze(teacher), int(teacher2), stages, resize,
                       cfg.teacher2_scale if teacher2 else 1, feature_weight, head_weight,
                       head_maps=("heatmap", "wh") if resize else ("heatmap", "wh", "offset"), adapters=adapters,
                       temperature=cfg.heatmap_temperature, feature_norm=cfg.feature_norm,
                       feature_region=cfg.feature_region)


def _teacher1_link(cfg: DistillConfig, student: CenterNet) -> TeacherLink:
    if not cfg.teacher1_checkpoint:
        raise ValueError("teacher1_checkpoint: required while teacher-1 weights are non-zero")
    t1, payload = load_centernet(cfg.teacher1_checkpoint)
    _check_classes(payload, cfg.data.classes, cfg.teacher1_checkpoint)
    s_size = cfg.data.input_size
    if payload["input_size"] != s_size:
        raise ValueError(f"{cfg.teacher1_checkpoint}: teacher 1 input {payload['input_size']} != student {s_size}")
    if t1.cfg.num_stages != student.cfg.num_stages:
        raise ValueError(f"{cfg.teacher1_checkpoint}: teacher 1 has {t1.cfg.num_stages} stages, student {student.cfg.num_stages}")
    s_shapes, t_shapes = stage_shapes(student.cfg, s_size), stage_shapes(t1.cfg, s_size)
    if s_shapes[-1] != t_shapes[-1]:
        raise ValueError(f"{cfg.teacher1_checkpoint}: teacher 1 head grid {t_shapes[-1]} != student {s_shapes[-1]}")
    stages = [i for i in range(student.cfg.num_stages) if s_shapes[i] == t_shapes[i]]
    return _link(cfg, student, t1, stages, teacher2=False)


def _teacher2_link(cfg: DistillConfig, student: CenterNet) -> TeacherLink:
    if not cfg.teacher2_checkpoint:
        raise ValueError("teacher2_checkpoint: required while teacher-2 weights are non-zero")
    t2, payload = load_centernet(cfg.teacher2_checkpoint)
    _check_classes(payload, cfg.data.classes, cfg.teacher2_checkpoint)
    L, s_size = cfg.teacher2_scale, cfg.data.input_size
    if cfg.teacher2_align == "stride":
        stages = assert_stride_alignment(student.cfg, s_size, t2.cfg, payload["input_size"], L, cfg.teacher2_stage_k)
        return _link(cfg, student, t2, stages, teacher2=True)
    if payload["input_size"] != L * s_size:
        raise StrideAlignmentError(
            f"{cfg.teacher2_checkpoint}: teacher 2 input {payload['input_size']} != L*student = {L}*{s_size}")
    if t2.cfg.stage_strides != student.cfg.stage_strides:
        raise ValueError(
            f"{cfg.teacher2_checkpoint}: resize alignment expects the student's strides "
            f"{student.cfg.stage_strides}, got {t2.cfg.stage_strides}")
    return _link(cfg, student, t2, list(range(student.cfg.num_stages)), teacher2=True, resize=True)


def build_teacher_links(cfg: DistillConfig, student: CenterNet) -> list[TeacherLink]:
    """Load, check and freeze the teachers that have a non-zero weight; create adapters."""
    w = cfg.weights
    links: list[TeacherLink] = []
    if w.teacher1_features > 0 or w.teacher1_heads > 0:
        links.append(_teacher1_link(cfg, student))
    if w.teacher2_features > 0 or w.teacher2_heads > 0:
        links.append(_teacher2_link(cfg, student))
    return links


# ----------------------------------------------------------------------------- run


def distill_student(cfg: DistillConfig, out_dir: str | Path, dataset: GestureDataset | None = None,
                    resume: bool = False) -> Path:
    """Distil a student in the run directory ``out_dir`` (the layout of ``train.train_detector``'s,
    ``history.json`` adding the tasks and the aligned stages); returns its model.pt.

    ``resume=True`` continues from ``out_dir/checkpoints`` (a finished run just rewrites its outputs).
    """
    out = Path(out_dir)
    num_classes = len(cfg.data.classes)
    torch.manual_seed(cfg.optim.seed)  # the student first, from the seed, exactly as train_detector builds it
    student = CenterNet(cfg.student, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.optim.seed + 7919)  # adapters: own stream, student RNG untouched
        links = build_teacher_links(cfg, student)
    sizes = [cfg.data.input_size]
    if any(link.image_index == 1 for link in links):
        sizes.append(cfg.teacher2_scale * cfg.data.input_size)
    if dataset is None:
        dataset = GestureDataset(cfg.data, sizes, seed=cfg.optim.seed)
    elif dataset.input_sizes[: len(sizes)] != sizes:
        raise ValueError(f"dataset input sizes {dataset.input_sizes} do not start with the needed {sizes}")
    task_weights = det_task_weights(cfg.optim)
    for link in links:
        task_weights.update(link.task_weights())
    engine = gesture_loss_engine(task_weights, cfg.optim)
    task = GestureTask(student, num_classes, cfg.data.input_size, links)
    trainer = fit(task, engine, dataset, cfg.optim, out, resume, on_start=[lambda: save_config(cfg, out / "config.yaml")])
    return save_run(trainer, out, cfg.data.classes, cfg.data.input_size, "student_distilled",
                    {"distill_config": to_dict(cfg)},
                    {"tasks": task_weights, "aligned_stages": {link.name: link.stages for link in links}})


__all__ = ["distill_student", "build_teacher_links", "distillation_losses"]
