"""Options of the synthetic world, its scene names, and the determinism helpers.

Everything is deterministic per seed: tokens are MD5 hashes of seed/version/names
(:func:`make_token`), and all random draws come from per-scene generators
(:func:`scene_rng`), so results do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


@dataclass
class SyntheticConfig:
    """Options of the synthetic world (all have CLI flags in data_tools/synthetic_nuscenes.py)."""

    version: str = "v1.0-mini"  # "v1.0-mini" (the 10 mini scenes) or "v1.0-trainval" (the 150 val scenes [+700 train])
    seed: int = 0
    samples_per_scene: int = 40  # keyframes per scene (2 Hz)
    num_scenes: Optional[int] = None  # keep only the first N scenes of the version (None: all)
    include_train: bool = False  # trainval: also generate the 700 train scenes
    train_scenes: Optional[int] = None  # trainval: only the first N train scenes (implies include_train)
    val_scenes: Optional[int] = None  # trainval: only the first N val scenes
    split: Optional[str] = None  # keep only the scenes of this devkit split (e.g. "mini_val": a held-out world)
    objects_per_sample: float = 40.0  # target mean number of annotations within 50 m of the ego per sample
    images: bool = True  # render and write the camera JPEGs
    lidar: bool = True  # ray cast and write the LIDAR_TOP point clouds
    render_scale: float = 0.5  # render at this fraction of 1600x900, then resize (bilinear)
    jpeg_quality: int = 90
    annotation_radius: float = 60.0  # m (xy, from the ego): instances within it are annotated
    bicycle_racks: bool = True  # add a few static_object.bicycle_rack annotations
    workers: int = 2  # processes (one scene per task)
    overwrite: bool = False

    def validate(self) -> None:
        """Clear errors for bad option values."""
        if self.version not in ("v1.0-mini", "v1.0-trainval"):
            raise ValueError(f"version must be 'v1.0-mini' or 'v1.0-trainval', got {self.version!r}")
        if self.samples_per_scene < 2:
            raise ValueError(f"samples_per_scene must be >= 2, got {self.samples_per_scene}")
        if self.num_scenes is not None and self.num_scenes < 1:
            raise ValueError(f"num_scenes must be >= 1 or None, got {self.num_scenes}")
        allowed = {"v1.0-mini": ("mini_train", "mini_val"), "v1.0-trainval": ("train", "val")}[self.version]
        if self.split is not None and self.split not in allowed:
            raise ValueError(f"split must be one of {allowed} for {self.version}, got {self.split!r}")
        for name in ("train_scenes", "val_scenes"):
            count = getattr(self, name)
            if count is not None and (self.version != "v1.0-trainval" or count < 0):
                raise ValueError(f"{name} is a count >= 0 of v1.0-trainval scenes, got {count} for {self.version}")
        if self.split == "train" and not self.has_train_scenes:
            raise ValueError("split='train' of v1.0-trainval needs include_train=True or train_scenes")
        if not 0.05 <= self.render_scale <= 1.0:
            raise ValueError(f"render_scale must be in [0.05, 1], got {self.render_scale}")
        if self.objects_per_sample < 0:
            raise ValueError(f"objects_per_sample must be >= 0, got {self.objects_per_sample}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")

    @property
    def has_train_scenes(self) -> bool:
        return self.include_train or self.train_scenes is not None


def devkit_splits() -> dict[str, list[str]]:
    """Scene-name lists of the installed devkit (see :mod:`bevperc.data.splits`)."""
    from bevperc.data.splits import scene_splits

    return {name: list(scene_splits()[name]) for name in ("train", "val", "mini_train", "mini_val")}


def scene_names_for(cfg: SyntheticConfig) -> list[str]:
    """The real scene names of the version (devkit splits), in generation order."""
    splits = devkit_splits()
    if cfg.version == "v1.0-mini":
        names = splits["mini_train"] + splits["mini_val"]
    else:
        names = splits["val"][: cfg.val_scenes] + (splits["train"][: cfg.train_scenes] if cfg.has_train_scenes else [])
    if cfg.split is not None:
        names = [name for name in names if name in set(splits[cfg.split])]
    if cfg.num_scenes is not None:
        names = names[: cfg.num_scenes]
    return names


def make_token(*parts: Any) -> str:
    """Deterministic 32-hex-digit token (the nuScenes token format) from its parts."""
    return hashlib.md5("|".join(str(p) for p in parts).encode()).hexdigest()


def scene_rng(seed: int, scene_name: str, stream: str = "world") -> np.random.Generator:
    """Independent generator per (seed, scene, stream): results do not depend on workers."""
    digest = hashlib.md5(f"{seed}|{scene_name}|{stream}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
