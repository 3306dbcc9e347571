"""nuScenes data: info files, the multi-camera dataset, augmentation (synthetic worlds: ``bevperc.synthetic``).

Exports are resolved lazily (PEP 562) so that light users — the fast evaluator reading the
split lists, the data tools — do not import torch through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BEVAugConfig": "bevperc.data.config",
    "DataConfig": "bevperc.data.config",
    "ImageAugConfig": "bevperc.data.config",
    "NuScenesBEVDataset": "bevperc.data.dataset",
    "collate_bev": "bevperc.data.dataset",
    "load_lidar_points": "bevperc.data.dataset",
    "CAMERA_NAMES": "bevperc.data.infos",
    "DataError": "bevperc.data.infos",
    "create_infos": "bevperc.data.infos",
    "load_infos": "bevperc.data.infos",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bevperc.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
