"""Colours used by every bevperc figure: one colour per detection class, one per task set.

Class colours follow the hues of the nuScenes devkit's ``render`` palette (cars orange,
pedestrians blue, barriers grey, ...), brightened so they stay readable on camera images.
Everything is RGB in ``[0, 1]`` (matplotlib); :func:`class_color_uint8` gives 0-255.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bevperc.data.classes import DETECTION_CLASSES

# RGB in [0, 1], keyed by detection class (devkit hues).
CLASS_COLORS: dict[str, tuple[float, float, float]] = {
    "car": (1.00, 0.62, 0.00),  # orange
    "truck": (1.00, 0.39, 0.28),  # tomato
    "construction_vehicle": (0.91, 0.59, 0.48),  # dark salmon
    "bus": (1.00, 0.27, 0.00),  # orange red
    "trailer": (1.00, 0.55, 0.00),  # dark orange
    "barrier": (0.63, 0.63, 0.63),  # grey
    "motorcycle": (1.00, 0.24, 0.59),  # pink-red
    "bicycle": (0.86, 0.08, 0.24),  # crimson
    "pedestrian": (0.20, 0.55, 1.00),  # blue
    "traffic_cone": (0.18, 0.80, 0.30),  # green
}
UNKNOWN_CLASS_COLOR = (1.0, 1.0, 1.0)

GT_LINESTYLE = (0, (4, 3))
"""Ground truth is drawn dashed, predictions solid."""

EGO_COLOR = (0.1, 0.1, 0.1)


def class_color(label: int | str) -> tuple[float, float, float]:
    """RGB in [0, 1] of a class given by ``DETECTION_CLASSES`` index or name."""
    if isinstance(label, str):
        return CLASS_COLORS.get(label, UNKNOWN_CLASS_COLOR)
    index = int(label)
    if 0 <= index < len(DETECTION_CLASSES):
        return CLASS_COLORS[DETECTION_CLASSES[index]]
    return UNKNOWN_CLASS_COLOR


def class_color_uint8(label: int | str) -> tuple[int, int, int]:
    """RGB in 0..255 of a class."""
    return tuple(int(round(255 * c)) for c in class_color(label))  # type: ignore[return-value]


def class_colors(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """``(N, 3)`` RGB in [0, 1] for ``N`` class indices."""
    return np.array([class_color(int(label)) for label in np.asarray(labels).reshape(-1)], dtype=np.float64).reshape(
        -1, 3
    )


def set_colors(num_sets: int) -> list[tuple[float, float, float]]:
    """Distinct colours for ``num_sets`` task sets (tab10, then tab20)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_sets <= 10 else "tab20"]
    return [tuple(cmap(i % cmap.N)[:3]) for i in range(num_sets)]
