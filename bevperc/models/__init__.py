"""Camera BEV detector (LSS/BEVDet + CenterPoint head)."""

from bevperc.models.backbone import ImageBackbone
from bevperc.models.bev_encoder import BEVEncoder
from bevperc.models.bev_pool import PoolPlan, PoolPlanCache, bev_pool, bev_pool_quickcumsum, make_pool_plan
from bevperc.models.centerpoint_head import BRANCHES, CenterPointHead, assign_targets
from bevperc.models.config import (
    BackboneConfig,
    BEVEncoderConfig,
    BEVGridConfig,
    DecodeConfig,
    HeadConfig,
    ModelConfig,
    NeckConfig,
    ViewTransformerConfig,
)
from bevperc.models.detector import BEVDetector, build_detector, default_task_weights, task_names
from bevperc.models.lift import LSSViewTransformer
from bevperc.models.neck import FPNNeck
from bevperc.models.postprocess import circle_nms, decode_detections, to_nuscenes_detections

__all__ = [
    "BEVDetector",
    "BEVEncoder",
    "BEVEncoderConfig",
    "BEVGridConfig",
    "BRANCHES",
    "BackboneConfig",
    "CenterPointHead",
    "DecodeConfig",
    "FPNNeck",
    "LSSViewTransformer",
    "HeadConfig",
    "ModelConfig",
    "NeckConfig",
    "PoolPlan",
    "PoolPlanCache",
    "ImageBackbone",
    "ViewTransformerConfig",
    "assign_targets",
    "bev_pool",
    "bev_pool_quickcumsum",
    "build_detector",
    "circle_nms",
    "decode_detections",
    "default_task_weights",
    "make_pool_plan",
    "task_names",
    "to_nuscenes_detections",
]
