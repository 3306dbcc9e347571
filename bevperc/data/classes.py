"""The nuScenes detection classes, their category names, attributes and standard groups."""

from __future__ import annotations

# The 10 detection classes in the devkit's order (nuscenes.eval.detection.constants).
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
