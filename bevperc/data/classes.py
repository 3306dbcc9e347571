"""The nuScenes detection classes: both class orders, the category -> class map, attributes, groups.

The one home of these names; the model, the data pipeline, the evaluation and the benchmarks
import them from here. Two class orders exist and both are needed:

* ``DETECTION_CLASSES``: the model's order (CenterPoint / mmdet3d ``class_names``): heatmap
  channels, ``gt_labels`` and ``labels`` of decoded detections index it;
* ``DETECTION_NAMES``: the devkit's order (``nuscenes.eval.detection.constants``): the fast
  evaluator's ``class_index`` columns index it.

The devkit's constants are repeated here so that nothing imports the devkit at import time;
tests/test_fast_eval.py checks that they equal the devkit's.
"""

from __future__ import annotations

# The 10 detection classes in the model's order (CenterPoint / mmdet3d nuScenes configs).
DETECTION_CLASSES: tuple[str, ...] = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)
CLASS_INDEX = {name: i for i, name in enumerate(DETECTION_CLASSES)}

# The same 10 classes in the devkit's order (nuscenes.eval.detection.constants.DETECTION_NAMES).
DETECTION_NAMES: tuple[str, ...] = (
    "car", "truck", "bus", "trailer", "construction_vehicle",
    "pedestrian", "motorcycle", "bicycle", "traffic_cone", "barrier",
)
DETECTION_NAME_INDEX: dict[str, int] = {name: i for i, name in enumerate(DETECTION_NAMES)}

# nuscenes.eval.detection.constants.ATTRIBUTE_NAMES
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing",
    "cycle.with_rider", "cycle.without_rider",
    "vehicle.moving", "vehicle.parked", "vehicle.stopped",
)
# nuscenes.eval.detection.utils.detection_name_to_rel_attributes
CLASS_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "pedestrian": ("pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing"),
    "bicycle": ("cycle.with_rider", "cycle.without_rider"),
    "motorcycle": ("cycle.with_rider", "cycle.without_rider"),
    "car": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "bus": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "construction_vehicle": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "trailer": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "truck": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "barrier": (),
    "traffic_cone": (),
}

# nuscenes.eval.detection.utils.category_to_detection_name: the general nuScenes categories that
# count as a detection class (every other category, e.g. animals or bicycle racks, is no class).
CATEGORY_TO_DETECTION_NAME: dict[str, str] = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}

# Standard CenterPoint / BEVDet class groups (one heatmap head per group).
STANDARD_CLASS_GROUPS: tuple[tuple[str, ...], ...] = (
    ("car",),
    ("truck", "construction_vehicle"),
    ("bus", "trailer"),
    ("barrier",),
    ("motorcycle", "bicycle"),
    ("pedestrian", "traffic_cone"),
)

# Attribute assigned to a detection when the model predicts none (the usual choice of
# CenterPoint/BEVDet submissions): moving vs stopped decided by speed.
DEFAULT_ATTRIBUTES = {
    "car": "vehicle.parked",
    "truck": "vehicle.parked",
    "construction_vehicle": "vehicle.parked",
    "bus": "vehicle.moving",
    "trailer": "vehicle.parked",
    "barrier": "",
    "motorcycle": "cycle.without_rider",
    "bicycle": "cycle.without_rider",
    "pedestrian": "pedestrian.standing",
    "traffic_cone": "",
}
MOVING_ATTRIBUTES = {
    "car": "vehicle.moving",
    "truck": "vehicle.moving",
    "construction_vehicle": "vehicle.moving",
    "bus": "vehicle.moving",
    "trailer": "vehicle.moving",
    "motorcycle": "cycle.with_rider",
    "bicycle": "cycle.with_rider",
    "pedestrian": "pedestrian.moving",
}
MOVING_SPEED_THRESHOLD = 0.2  # m/s, as in CenterPoint's submission code


def attribute_for(name: str, speed: float) -> str:
    """The attribute name a submission gives a detection of class ``name`` moving at ``speed``."""
    if speed > MOVING_SPEED_THRESHOLD and name in MOVING_ATTRIBUTES:
        return MOVING_ATTRIBUTES[name]
    return DEFAULT_ATTRIBUTES[name]


def class_index(name: str, where: str = "") -> int:
    """Index of a detection class; a clear error for unknown names."""
    try:
        return CLASS_INDEX[name]
    except KeyError:
        raise ValueError(
            f"{where + ': ' if where else ''}unknown class name {name!r}; expected one of {list(DETECTION_CLASSES)}"
        ) from None
