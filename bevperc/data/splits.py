"""The devkit's scene splits, read without importing the devkit.

``nuscenes.utils.splits`` imports the whole ``nuscenes`` package (seconds of CPU) just to hand
out lists of scene names. The evaluator and the synthetic generator need only the lists, so we
read them from the installed devkit's ``splits.py`` source with ``ast.literal_eval``: the same
lists, whatever devkit version is installed. Falls back to the import if the file's shape changes.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

SPLIT_NAMES = ("train", "val", "test", "mini_train", "mini_val", "train_detect", "train_track")


@functools.lru_cache(maxsize=1)
def scene_splits() -> dict[str, tuple[str, ...]]:
    """Split name -> scene names, identical to ``nuscenes.utils.splits.create_splits_scenes()``."""
    try:
        spec = importlib.util.find_spec("nuscenes")
        path = Path(spec.submodule_search_locations[0]) / "utils" / "splits.py"  # type: ignore[union-attr]
        lists: dict[str, list[str]] = {}
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    lists[node.targets[0].id] = list(ast.literal_eval(node.value))
                except ValueError:
                    pass  # computed lists (e.g. train = sorted(set(...))) are rebuilt below
        # as in the devkit: train is the union of the detection and tracking train scenes
        lists["train"] = sorted(set(lists["train_detect"] + lists["train_track"]))
        return {name: tuple(lists[name]) for name in SPLIT_NAMES}
    except (AttributeError, KeyError, OSError, SyntaxError, TypeError):
        from nuscenes.utils.splits import create_splits_scenes

        splits = create_splits_scenes()
        return {name: tuple(splits[name]) for name in SPLIT_NAMES}
