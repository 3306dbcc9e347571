"""bevperc: pure-PyTorch camera bird's-eye-view perception.

Package layout (by role):
    bevperc.geometry    frames, boxes, projections; THE box convention
    bevperc.data        info files, datasets, augmentation
    bevperc.models      backbone, neck, lift/splat, BEV encoder, heads, gesture detectors
    bevperc.losses      the task-set balanced loss engine and detection losses
    bevperc.training      training loop, checkpoints, distributed helpers
    bevperc.evaluation  nuScenes evaluation (devkit and fast exact evaluator)
    bevperc.gesture     gesture detection with dual-teacher distillation
    bevperc.viz         figures of what the model sees
"""

__version__ = "0.1.0"
