"""Gesture figures: detections drawn on images, and student vs teacher heatmaps side by side.

Pure functions on arrays: images ``(H, W, 3)`` uint8 (or anything
:func:`bevperc.viz.cameras.to_display_image` takes), boxes ``(K, 4)`` ``x1, y1, x2, y2`` in
image pixels (what ``bevperc.models.centernet.decode_centernet`` returns), heatmaps
``(C, h, w)`` per detector (probabilities; pass ``logits=True`` for raw head outputs).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bevperc.viz.cameras import as_numpy, to_display_image
from bevperc.viz.colors import GT_LINESTYLE, set_colors


def gesture_colors(num_classes: int) -> list[tuple[float, float, float]]:
    """One colour per gesture class."""
    return set_colors(num_classes)


def draw_gesture_boxes(
    ax: Axes,
    boxes_xyxy: Any,
    labels: Any,
    class_names: Sequence[str],
    scores: Any | None = None,
    dashed: bool = False,
    score_threshold: float = 0.0,
    linewidth: float = 1.5,
) -> int:
    """Draw 2D boxes ``(K, 4)`` with class colours (and ``name score`` labels when scores are given)."""
    boxes = as_numpy(boxes_xyxy).reshape(-1, 4)
    labels = as_numpy(labels, np.int64).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f"labels: expected {len(boxes)} labels for {len(boxes)} boxes, got {len(labels)}")
    score_values = None if scores is None else as_numpy(scores).reshape(-1)
    colors = gesture_colors(len(class_names))
    drawn = 0
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if score_values is not None and score_values[i] < score_threshold:
            continue
        label = int(labels[i])
        color = colors[label % len(colors)] if colors else (1.0, 1.0, 1.0)
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth,
                      linestyle=GT_LINESTYLE if dashed else "solid")
        )  # fmt: skip
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = name if score_values is None else f"{name} {score_values[i]:.2f}"
        ax.text(x1, y1 - 1 if not dashed else y2 + 1, text, fontsize=6, color="black", va="bottom" if not dashed else "top",
                bbox=dict(facecolor=color, alpha=0.8, pad=0.4, linewidth=0), clip_on=True)  # fmt: skip
        drawn += 1
    return drawn


def plot_gesture_detections(
    images: Sequence[Any],
    detections: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    ground_truth: Sequence[Mapping[str, Any]] | None = None,
    score_threshold: float = 0.3,
    titles: Sequence[str] | None = None,
    columns: int = 4,
) -> Figure:
    """Grid of images with predicted boxes (solid, scored) and optional GT boxes (dashed).

    Args:
        images: list of images; detections: per image ``{"boxes": (K, 4), "scores": (K,), "labels": (K,)}``;
        ground_truth: per image ``{"boxes": (G, 4), "labels": (G,)}`` or None.
    """
    if len(detections) != len(images):
        raise ValueError(f"detections: expected one entry per image ({len(images)}), got {len(detections)}")
    columns = max(1, min(columns, len(images)))
    rows = int(np.ceil(len(images) / columns))
    fig = Figure(figsize=(3.2 * columns, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, (image, detection) in enumerate(zip(images, detections)):
        ax = axes.ravel()[i]
        display = to_display_image(image)
        ax.imshow(display)
        if ground_truth is not None:
            draw_gesture_boxes(ax, ground_truth[i]["boxes"], ground_truth[i]["labels"], class_names, dashed=True)
        kept = draw_gesture_boxes(
            ax, detection["boxes"], detection["labels"], class_names, detection.get("scores"), score_threshold=score_threshold
        )
        ax.set_xlim(0, display.shape[1])
        ax.set_ylim(display.shape[0], 0)
        ax.set_title(titles[i] if titles is not None else f"{kept} detections >= {score_threshold:.2f}", fontsize=8)
    return fig


def _heatmap_probabilities(heatmap: Any, logits: bool) -> np.ndarray:
    array = as_numpy(heatmap)
    if array.ndim == 4:  # [1, C, h, w] from a batch
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"heatmap: expected (C, h, w), got {array.shape}")
    return 1.0 / (1.0 + np.exp(-array)) if logits else array


def plot_student_teacher_heatmaps(
    image: Any,
    heatmaps: Mapping[str, Any],
    class_names: Sequence[str],
    logits: bool = False,
    classes_to_show: Sequence[int] | None = None,
    title: str | None = None,
) -> Figure:
    """Side by side: the input image and each model's class heatmaps, one row per class.

    Args:
        image: the student's input image.
        heatmaps: ordered ``{model name: (C, h, w)}``, e.g. ``{"student": s, "student (distilled)": d,
            "teacher 1": t1, "teacher 2 (2x image)": t2}``. Maps of different sizes are each
            stretched over the image extent, so cells line up spatially.
        classes_to_show: class indices for the rows (default: the 3 classes with the highest
            peak over all models).
    """
    if not heatmaps:
        raise ValueError("heatmaps: expected at least one model's heatmap")
    display = to_display_image(image)
    height, width = display.shape[:2]
    maps = {name: _heatmap_probabilities(value, logits) for name, value in heatmaps.items()}
    num_classes = next(iter(maps.values())).shape[0]
    for name, value in maps.items():
        if value.shape[0] != num_classes:
            raise ValueError(f"heatmaps[{name!r}]: {value.shape[0]} classes, expected {num_classes}")
    if classes_to_show is None:
        peaks = np.max([value.reshape(num_classes, -1).max(1) for value in maps.values()], axis=0)
        classes_to_show = list(np.argsort(-peaks)[: min(3, num_classes)])
    rows = len(classes_to_show)
    cols = 1 + len(maps)
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    last_image = None
    for r, class_index in enumerate(classes_to_show):
        axes[r, 0].imshow(display)
        axes[r, 0].set_ylabel(class_names[class_index] if class_index < len(class_names) else str(class_index), fontsize=9)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        if r == 0:
            axes[r, 0].set_title("input image", fontsize=9)
        for c, (name, value) in enumerate(maps.items(), start=1):
            ax = axes[r, c]
            ax.imshow(display, alpha=0.35)
            last_image = ax.imshow(value[class_index], cmap="inferno", vmin=0, vmax=1, alpha=0.8,
                                   extent=(0, width, height, 0), interpolation="nearest")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            if r == 0:
                h, w = value.shape[1:]
                ax.set_title(f"{name} ({w}x{h})", fontsize=9)
            ax.text(2, height - 3, f"max {value[class_index].max():.2f}", color="white", fontsize=7)
    if last_image is not None:
        fig.colorbar(last_image, ax=axes[:, -1], fraction=0.05, label="heatmap probability")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def heatmap_agreement(student: Any, teacher: Any, logits: bool = False) -> float:
    """Mean absolute difference between two ``(C, h, w)`` heatmaps after resizing the teacher to the student grid."""
    s = _heatmap_probabilities(student, logits)
    t = _heatmap_probabilities(teacher, logits)
    if s.shape != t.shape:
        rows = (np.arange(s.shape[1]) * t.shape[1] / s.shape[1]).astype(int)
        cols = (np.arange(s.shape[2]) * t.shape[2] / s.shape[2]).astype(int)
        t = t[:, rows][:, :, cols]
    return float(np.abs(s - t).mean())
