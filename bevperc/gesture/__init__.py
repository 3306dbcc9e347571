"""Gesture detection with dual-teacher, cross-resolution distillation (docs/methods.md, part B).

Modules (imported lazily by the CLI, ``python -m bevperc.gesture``):
    config    dataclass configs (GestureTrainConfig, DistillConfig, GestureDataConfig, OptimConfig)
    data      HaGRID-format loader, synthetic HaGRID-format generator, CenterNet targets
    train     plain training of a student/teacher; GestureTask, what bevperc.training.Trainer trains for both
    distill   the student's distillation from frozen teacher 1 / teacher 2 via the loss engine
    evaluate  COCO mAP (pycocotools)
    detect    detection on an image folder (annotated images + JSON)
    export    ONNX export checked numerically against onnxruntime
    presets   the reference student / teacher sizes;  demo: the end-to-end demo
The detector family itself is ``bevperc.models.centernet``.
"""
