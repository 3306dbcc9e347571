"""Dataclass configs of the gesture area (loaded with ``bevperc.utils.config.load_config``).

Two run types:

* :class:`GestureTrainConfig` - train one detector (student, teacher 1 or teacher 2) on labels;
* :class:`DistillConfig` - distil a student from frozen teacher checkpoints.

Both share :class:`GestureDataConfig` (where the HaGRID-format data lives) and
:class:`OptimConfig` (the training settings), so plain student training and distillation with all
distillation weights at 0 run literally the same training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from bevperc.losses.config import LossEngineConfig
from bevperc.models.centernet import DetectorConfig

SYNTHETIC_CLASSES: list[str] = ["grid_h", "grid_v", "grid_d1", "grid_d2"]


@dataclass
class GestureDataConfig:
    """A HaGRID-format data set.

    ``annotations_dir`` holds one ``<class>.json`` per gesture class (HaGRID: ``ann_train_val/``
    or ``annotations/<split>/``); images are found as ``images_dir/<class>/<image_id>.<ext>``
    (also ``images_dir/train_val_<class>/...`` and ``images_dir/<image_id>.<ext>``).
    ``classes`` fixes the class order of the heatmap channels; boxes whose label is in
    ``ignored_labels`` (HaGRID's ``no_gesture`` free hands) are dropped, any other label not in
    ``classes`` is an error naming the file.
    """

    annotations_dir: str = "data/gestures/annotations/train"
    images_dir: str = "data/gestures/images"
    classes: list[str] = field(default_factory=lambda: list(SYNTHETIC_CLASSES))
    ignored_labels: list[str] = field(default_factory=lambda: ["no_gesture"])
    input_size: int = 64  # square network input (pixels); images are padded to square, resized
    max_images: int = 0  # 0 = all; else the first max_images (per sorted order), for quick runs
    cache_images: bool = True  # decode + resize once, keep uint8 tensors in memory
    hflip: bool = False  # off for the synthetic set: a flip turns one diagonal class into another


@dataclass
class OptimConfig:
    """Training settings shared by plain training and distillation (``gesture.train.trainer_config``
    turns them into the ``bevperc.training.Trainer``'s ``TrainConfig``)."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    warmup_epochs: float = 0.0  # linear LR warm-up before the cosine decay; 0 = plain cosine from step 0
    seed: int = 0
    num_workers: int = 0
    num_threads: int = 0  # 0 = torch default; >0 calls torch.set_num_threads
    device: Literal["auto", "cpu", "cuda"] = "cpu"  # the Trainer's device ("auto": CUDA when available)
    # First weights of the ordinary detection tasks (CenterNet: heatmap 1, size 0.1, offset 1).
    det_heatmap_weight: float = 1.0
    det_wh_weight: float = 0.1
    det_offset_weight: float = 1.0
    loss_engine: LossEngineConfig = field(default_factory=lambda: LossEngineConfig(enabled=False),
                                          metadata={"aliases": ["engine"]})
    """The loss engine over the run's tasks (old spelling: ``engine``). Its ``fixed_weights`` are the
    task weights (``det_*_weight`` above, ``DistillWeights``), so they must not be given here.
    Default: disabled, the fixed weighted sum; a YAML mapping starts from ``LossEngineConfig``'s
    own defaults (``enabled: true``)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss_engine.fixed_weights:
            raise ValueError("OptimConfig.loss_engine.fixed_weights: the first weights are the task weights "
                             "(det_*_weight, DistillWeights); leave fixed_weights empty")


@dataclass
class GestureTrainConfig:
    """Train one CenterNet detector on labels (a student or a teacher)."""

    model: DetectorConfig = field(default_factory=DetectorConfig)
    data: GestureDataConfig = field(default_factory=GestureDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    role: Literal["student", "teacher1", "teacher2", "teacher2_resize"] = "student"


@dataclass
class DistillWeights:
    """First weights of the distillation tasks; 0 removes the task (and its teacher) entirely.

    ``*_features`` is the total over the teacher's aligned stages (split equally among them);
    ``*_heads`` scales the head-map priors (heatmap 1, wh 0.1, offset 1). Why teacher 2's features
    get 5: docs/methods.md, part B.
    """

    teacher1_features: float = 1.0
    teacher1_heads: float = 1.0
    teacher2_features: float = 5.0
    teacher2_heads: float = 1.0


@dataclass
class DistillConfig:
    """Distil a student from frozen teacher 1 / teacher 2 checkpoints.

    ``teacher2_align``: ``"stride"`` (the method: teacher 2's stride at stage K is L x the
    student's, maps compared as they are from stage K on) or ``"resize"`` (the comparison
    alternative: a teacher 2 with the student's strides whose maps are interpolated onto the
    student grid). ``teacher2_scale`` is L, ``teacher2_stage_k`` is K.
    """

    student: DetectorConfig = field(default_factory=DetectorConfig)
    data: GestureDataConfig = field(default_factory=GestureDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(loss_engine=LossEngineConfig()))  # the engine's defaults
    teacher1_checkpoint: Optional[str] = None
    teacher2_checkpoint: Optional[str] = None
    teacher2_scale: int = 2
    teacher2_stage_k: int = 1
    teacher2_align: Literal["stride", "resize"] = "stride"
    weights: DistillWeights = field(default_factory=DistillWeights)
    heatmap_temperature: float = 1.0  # heatmaps compared as sigmoid(logits / T)
    feature_norm: Literal["global", "channel"] = "global"  # see distill.feature_mimic_loss
    feature_region: Literal["all", "objects"] = "all"  # "objects": mimicry weighted to teacher detections
