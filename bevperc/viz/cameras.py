"""Camera views: the six nuScenes images with ground-truth and predicted 3D boxes projected.

All functions are pure: they take NumPy arrays (or tensors, converted) in the bevperc box
convention ``[x, y, z, w, l, h, yaw, vx, vy]`` (ego frame), images, intrinsics ``K`` and
``ego_from_camera``; nothing here needs a model or a dataset.

Projection is ``bevperc.geometry``'s: ego points -> camera frame with
``camera_from_ego_points`` (the affine inverse of ``ego_from_camera``, so an ``ego_from_camera``
that already includes a BEV augmentation with flips/scale works too), then the pinhole ``K``
(``project_to_image``). When the
image was augmented (resize/crop/flip), pass the batch's ``image_aug`` and the effective
intrinsics ``image_aug @ K`` are used.

Box edges are clipped at the near plane (camera depth ``near`` = 0.1 m): an edge with both
ends behind it is dropped, an edge crossing it is cut where it crosses, so a box beside
the camera never smears a line across the whole image.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bevperc.data.classes import DETECTION_CLASSES
from bevperc.data.infos import CAMERA_NAMES
from bevperc.geometry import box_corners, camera_from_ego_points, project_to_image
from bevperc.viz.colors import GT_LINESTYLE, class_color

# The 2x3 figure layout: the batch order's front cameras (left to right), then its back cameras.
CAMERA_GRID: tuple[tuple[str, ...], ...] = (CAMERA_NAMES[:3], CAMERA_NAMES[3:])

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])

# Box edges as corner index pairs (devkit corner order: 0-3 front face, 4-7 rear face).
BOX_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 0),  # front face
    (4, 5), (5, 6), (6, 7), (7, 4),  # rear face
    (0, 4), (1, 5), (2, 6), (3, 7),  # sides
)  # fmt: skip
NEAR_PLANE_M = 0.1


# --------------------------------------------------------------------------- inputs
def as_numpy(value: Any, dtype: Any = np.float64) -> np.ndarray:
    """Tensor / list / array -> NumPy array (on CPU, detached)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def as_boxes(boxes: Any, name: str = "boxes") -> np.ndarray:
    """Boxes ``(N, >=7)`` as float64; an empty input gives ``(0, 9)``; a clear error otherwise."""
    if boxes is None:
        return np.zeros((0, 9))
    array = as_numpy(boxes)
    if array.size == 0:
        return np.zeros((0, 9))
    if array.ndim != 2 or array.shape[1] < 7:
        raise ValueError(f"{name}: expected boxes of shape (N, 9) [x, y, z, w, l, h, yaw, vx, vy], got {array.shape}")
    if array.shape[1] < 9:  # boxes without velocity: pad zeros
        array = np.concatenate([array, np.zeros((len(array), 9 - array.shape[1]))], 1)
    return array


def denormalize_imagenet(image_chw: Any) -> np.ndarray:
    """ImageNet-normalised ``(3, H, W)`` float image -> ``(H, W, 3)`` uint8 for display."""
    array = as_numpy(image_chw, np.float32)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected a normalised image of shape (3, H, W), got {array.shape}")
    rgb = array.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def to_display_image(image: Any, imagenet_normalized: bool | None = None) -> np.ndarray:
    """Any image layout -> ``(H, W, 3)`` uint8.

    Accepts ``(H, W, 3)`` uint8 or float in [0, 1], and ``(3, H, W)`` float. A ``(3, H, W)``
    float image is treated as ImageNet-normalised when ``imagenet_normalized`` is True, or
    when it is None and the image has negative values (what normalisation produces).
    """
    array = as_numpy(image, None)
    if array.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W, 3) or (3, H, W), got {array.shape}")
    channels_first = array.shape[0] == 3 and array.shape[-1] != 3
    if array.dtype == np.uint8:
        return array.transpose(1, 2, 0) if channels_first else array
    array = array.astype(np.float32)
    if channels_first:
        if imagenet_normalized or (imagenet_normalized is None and float(array.min()) < 0):
            return denormalize_imagenet(array)
        array = array.transpose(1, 2, 0)
    scale = 255.0 if float(array.max()) <= 1.0 + 1e-6 else 1.0
    return np.clip(array * scale + 0.5, 0, 255).astype(np.uint8)


def effective_intrinsics(intrinsics: Any, image_aug: Any | None = None) -> np.ndarray:
    """Intrinsics of the (augmented) image: ``image_aug @ K`` (``image_aug`` maps original to augmented pixels)."""
    k = as_numpy(intrinsics)[:3, :3]
    if image_aug is None:
        return k
    return as_numpy(image_aug)[:3, :3] @ k


# --------------------------------------------------------------------------- projection
def as_transform(ego_from_camera: Any) -> np.ndarray:
    """``ego_from_camera`` as a float64 ``(4, 4)`` array; a clear error for another shape."""
    matrix = as_numpy(ego_from_camera)
    if matrix.shape != (4, 4):
        raise ValueError(f"ego_from_camera: expected a 4x4 matrix, got {matrix.shape}")
    return matrix


def project_points(points_ego: Any, intrinsics: Any, ego_from_camera: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ego points ``(P, 3)`` -> pixels ``(P, 2)`` and camera depth ``(P,)``; pixels of points behind are NaN."""
    points_camera = camera_from_ego_points(as_numpy(points_ego)[:, :3], as_transform(ego_from_camera))
    with np.errstate(divide="ignore", invalid="ignore"):
        pixels, depth = project_to_image(points_camera, as_numpy(intrinsics)[:3, :3])
    pixels = np.where((depth > 1e-6)[:, None], pixels, np.nan)
    return pixels, depth


def project_box_centers(boxes: Any, intrinsics: Any, ego_from_camera: Any) -> tuple[np.ndarray, np.ndarray]:
    """Box centres ``(N, 9)`` -> pixels ``(N, 2)`` and depth ``(N,)`` (NaN pixels behind the camera)."""
    return project_points(as_boxes(boxes)[:, :3], intrinsics, ego_from_camera)


def clip_segments_to_near_plane(
    starts: np.ndarray, ends: np.ndarray, near: float = NEAR_PLANE_M
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip camera-frame segments ``(E, 3)``-``(E, 3)`` to depth ``z >= near``.

    Returns the clipped starts, ends and a keep mask ``(E,)``: segments entirely behind
    the plane are dropped; a crossing segment is cut at the point where ``z == near``.
    """
    z0, z1 = starts[:, 2], ends[:, 2]
    keep = (z0 > near) | (z1 > near)
    starts, ends = starts.copy(), ends.copy()
    crossing = keep & ((z0 <= near) | (z1 <= near))
    if crossing.any():
        t = (near - z0[crossing]) / (z1[crossing] - z0[crossing])
        cut = starts[crossing] + t[:, None] * (ends[crossing] - starts[crossing])
        start_behind = z0[crossing] <= near
        s, e = starts[crossing], ends[crossing]
        s[start_behind] = cut[start_behind]
        e[~start_behind] = cut[~start_behind]
        starts[crossing], ends[crossing] = s, e
    return starts, ends, keep


def project_box_edges(
    boxes: Any, intrinsics: Any, ego_from_camera: Any, near: float = NEAR_PLANE_M, heading: bool = True
) -> list[np.ndarray]:
    """Pixel segments of each box's 12 edges (plus a heading tick), clipped at the near plane.

    Args:
        boxes: ``(N, 9)`` ego-frame boxes.
        intrinsics: ``(3, 3)`` of the image drawn on (use :func:`effective_intrinsics` for augmented images).
        ego_from_camera: ``(4, 4)``.
        heading: add the bottom segment from the box centre to the front face centre.

    Returns:
        A list of ``N`` arrays ``(E_i, 2, 2)`` (segment, endpoint, uv); ``E_i == 0`` for a box
        wholly behind the camera.
    """
    boxes = as_boxes(boxes)
    k = as_numpy(intrinsics)[:3, :3]
    out: list[np.ndarray] = []
    if len(boxes) == 0:
        return out
    corners = camera_from_ego_points(box_corners(boxes).reshape(-1, 3), as_transform(ego_from_camera)).reshape(-1, 8, 3)
    index_a = [a for a, _ in BOX_EDGES]
    index_b = [b for _, b in BOX_EDGES]
    for box_corners_camera in corners:
        starts, ends = box_corners_camera[index_a], box_corners_camera[index_b]
        if heading:
            bottom_centre = box_corners_camera[[2, 3, 6, 7]].mean(0)
            front_bottom = box_corners_camera[[2, 3]].mean(0)
            starts = np.vstack([starts, bottom_centre])
            ends = np.vstack([ends, front_bottom])
        starts, ends, keep = clip_segments_to_near_plane(starts, ends, near)
        starts, ends = starts[keep], ends[keep]
        if len(starts) == 0:
            out.append(np.zeros((0, 2, 2)))
            continue
        uv_start, _ = project_to_image(starts, k)
        uv_end, _ = project_to_image(ends, k)
        out.append(np.stack([uv_start, uv_end], 1))
    return out


def boxes_visible_in_image(
    boxes: Any, intrinsics: Any, ego_from_camera: Any, image_size: tuple[int, int], near: float = NEAR_PLANE_M
) -> np.ndarray:
    """``(N,)`` bool: any corner of the box in front of the camera and inside the image ``(width, height)``."""
    boxes = as_boxes(boxes)
    if len(boxes) == 0:
        return np.zeros(0, dtype=bool)
    corners = box_corners(boxes).reshape(-1, 3)
    pixels, depth = project_points(corners, intrinsics, ego_from_camera)
    width, height = image_size
    inside = (
        (depth > near)
        & (pixels[:, 0] >= 0)
        & (pixels[:, 0] < width)
        & (pixels[:, 1] >= 0)
        & (pixels[:, 1] < height)
    )
    return inside.reshape(-1, 8).any(1)


# --------------------------------------------------------------------------- drawing
def draw_boxes_on_axes(
    ax: Axes,
    boxes: Any,
    labels: Any,
    intrinsics: Any,
    ego_from_camera: Any,
    image_size: tuple[int, int],
    scores: Any | None = None,
    dashed: bool = False,
    linewidth: float = 1.5,
    show_text: bool = True,
    near: float = NEAR_PLANE_M,
) -> int:
    """Draw projected 3D boxes on an image axes; returns how many boxes were drawn.

    Args:
        boxes: ``(N, 9)`` ego-frame boxes; labels: ``(N,)`` class indices; scores: ``(N,)`` or None.
        image_size: ``(width, height)`` of the image under the axes; boxes with no corner in it are skipped.
        dashed: True for ground truth.
    """
    boxes = as_boxes(boxes)
    if len(boxes) == 0:
        return 0
    labels = as_numpy(labels, np.int64).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f"labels: expected {len(boxes)} labels for {len(boxes)} boxes, got {len(labels)}")
    score_values = None if scores is None else as_numpy(scores).reshape(-1)
    visible = boxes_visible_in_image(boxes, intrinsics, ego_from_camera, image_size, near)
    edges = project_box_edges(boxes[visible], intrinsics, ego_from_camera, near)
    width, height = image_size
    drawn = 0
    for segments, box_index in zip(edges, np.flatnonzero(visible)):
        if len(segments) == 0:
            continue
        color = class_color(int(labels[box_index]))
        ax.add_collection(
            LineCollection(
                segments,
                colors=[color],
                linewidths=linewidth,
                linestyles=GT_LINESTYLE if dashed else "solid",
            )
        )
        drawn += 1
        if show_text and score_values is not None:
            # Label at the highest on-screen endpoint, kept inside the image.
            points = segments.reshape(-1, 2)
            finite = points[np.isfinite(points).all(1)]
            top = finite[np.argmin(finite[:, 1])]
            u = float(np.clip(top[0], 0, width - 1))
            v = float(np.clip(top[1] - 3, 10, height - 1))
            name = DETECTION_CLASSES[int(labels[box_index])] if 0 <= labels[box_index] < len(DETECTION_CLASSES) else "?"
            ax.text(
                u, v, f"{name} {score_values[box_index]:.2f}", color="black", fontsize=6,
                bbox=dict(facecolor=color, alpha=0.8, pad=0.5, linewidth=0),
                clip_on=True,
            )  # fmt: skip
    return drawn


def _grid_slots(camera_names: Sequence[str]) -> list[tuple[int, int]]:
    """Row/column of each camera in the 2x3 nuScenes layout (unknown names fill left to right)."""
    slots: list[tuple[int, int]] = []
    free = [(r, c) for r in range(2) for c in range(3)]
    for name in camera_names:
        slot = next(((r, c) for r, row in enumerate(CAMERA_GRID) for c, cam in enumerate(row) if cam == name), None)
        slots.append(slot if slot is not None else (-1, -1))
    for i, slot in enumerate(slots):
        if slot == (-1, -1):
            slots[i] = next(s for s in free if s not in slots)
    return slots


def legend_handles(labels: Sequence[int], with_gt: bool = True, with_pred: bool = True) -> list[Any]:
    """Legend entries: one patch per class present, plus GT-dashed / prediction-solid line samples."""
    handles: list[Any] = [
        Patch(color=class_color(int(i)), label=DETECTION_CLASSES[int(i)]) for i in sorted(set(int(i) for i in labels))
    ]
    if with_gt:
        handles.append(Line2D([], [], color="k", linestyle=GT_LINESTYLE, label="ground truth"))
    if with_pred:
        handles.append(Line2D([], [], color="k", linestyle="solid", label="prediction"))
    return handles


def scored_predictions(pred_boxes: Any | None, pred_scores: Any | None, pred_labels: Any | None,
                        score_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted boxes ``(K, 9)``, labels ``(K,)`` and scores ``(K,)`` (1 when not given) scoring at least
    ``score_threshold``."""
    boxes = as_boxes(pred_boxes, "pred_boxes")
    labels = np.zeros(0, np.int64) if pred_labels is None else as_numpy(pred_labels, np.int64).reshape(-1)
    scores = np.ones(len(boxes)) if pred_scores is None else as_numpy(pred_scores).reshape(-1)
    if len(boxes):
        keep = scores >= score_threshold
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    return boxes, labels, scores


def _draw_camera_cell(ax: Axes, image: np.ndarray, name: str, intrinsics: np.ndarray, ego_from_camera: np.ndarray,
                      gt: tuple[np.ndarray, np.ndarray], pred: tuple[np.ndarray, np.ndarray, np.ndarray],
                      count_pred: bool) -> None:
    """One camera image ``(H, W, 3)`` with GT (boxes ``(M, 9)``, labels ``(M,)``) dashed and predictions
    (boxes, labels, scores) solid, titled with the camera name and the boxes drawn (predictions: if
    ``count_pred``)."""
    h, w = image.shape[:2]
    ax.imshow(image)
    drawn_gt = draw_boxes_on_axes(ax, gt[0], gt[1], intrinsics, ego_from_camera, (w, h), dashed=True)
    drawn_pred = draw_boxes_on_axes(ax, pred[0], pred[1], intrinsics, ego_from_camera, (w, h), scores=pred[2])
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    counts = f"GT {drawn_gt}" + (f", pred {drawn_pred}" if count_pred else "")
    ax.set_title(f"{name}  ({counts})", fontsize=9)


def plot_camera_views(
    images: Any,
    intrinsics: Any,
    ego_from_camera: Any,
    gt_boxes: Any | None = None,
    gt_labels: Any | None = None,
    pred_boxes: Any | None = None,
    pred_scores: Any | None = None,
    pred_labels: Any | None = None,
    camera_names: Sequence[str] = CAMERA_NAMES,
    image_aug: Any | None = None,
    score_threshold: float = 0.3,
    title: str | None = None,
    width_inches: float = 18.0,
    imagenet_normalized: bool | None = None,
) -> Figure:
    """The six cameras in the nuScenes 2x3 layout with GT (dashed) and predicted (solid, scored) boxes.

    Args:
        images: ``(N_cam, H, W, 3)`` uint8, or ``(N_cam, 3, H, W)`` float (ImageNet-normalised
            batch images are detected by their negative values) or a list of such images.
        intrinsics: ``(N_cam, 3, 3)`` of the original cameras; ``image_aug`` ``(N_cam, 3, 3)`` when the
            images were augmented (the batch's ``image_aug``).
        ego_from_camera: ``(N_cam, 4, 4)`` (for batch boxes in the augmented ego frame pass
            ``bev_aug @ ego_from_camera``).
        gt_boxes / pred_boxes: ``(M, 9)`` ego-frame boxes; labels ``(M,)``; pred_scores ``(M,)``.
        camera_names: name of each image, placing it in the layout.
        score_threshold: predictions below it are not drawn.

    Returns:
        A matplotlib Figure (not attached to pyplot; save it with ``fig.savefig``).
    """
    display = [to_display_image(image, imagenet_normalized) for image in images]
    num_cameras = len(display)
    intrinsics = as_numpy(intrinsics).reshape(-1, 3, 3)
    ego_from_camera = as_numpy(ego_from_camera).reshape(-1, 4, 4)
    if len(intrinsics) != num_cameras or len(ego_from_camera) != num_cameras:
        raise ValueError(
            f"intrinsics/ego_from_camera: expected {num_cameras} cameras, got {len(intrinsics)} / {len(ego_from_camera)}"
        )
    image_aug_arr = None if image_aug is None else as_numpy(image_aug).reshape(-1, 3, 3)
    gt = (as_boxes(gt_boxes, "gt_boxes"),
          np.zeros(0, np.int64) if gt_labels is None else as_numpy(gt_labels, np.int64).reshape(-1))
    pred = scored_predictions(pred_boxes, pred_scores, pred_labels, score_threshold)

    height, width = display[0].shape[:2]
    rows = 2 if num_cameras > 3 else 1
    cell_w = width_inches / 3
    # Margins in inches: the suptitle on top, the (up to 2-row) legend below.
    top_in, bottom_in = (0.65 if title else 0.35), 0.5
    fig_height = rows * (cell_w * height / width + 0.3) + top_in + bottom_in
    fig = Figure(figsize=(width_inches, fig_height))
    axes = fig.subplots(rows, 3, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    names = list(camera_names)[:num_cameras] + [f"camera {i}" for i in range(len(camera_names), num_cameras)]
    for cam, (row, col) in enumerate(_grid_slots(names)):
        if row >= rows:
            continue
        k = effective_intrinsics(intrinsics[cam], None if image_aug_arr is None else image_aug_arr[cam])
        _draw_camera_cell(axes[row, col], display[cam], names[cam], k, ego_from_camera[cam], gt, pred,
                          count_pred=pred_boxes is not None)
    handles = legend_handles(np.concatenate([gt[1], pred[1]]), with_gt=len(gt[0]) > 0, with_pred=pred_boxes is not None)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.005, right=0.995, top=1 - top_in / fig_height, bottom=bottom_in / fig_height,
                        wspace=0.01, hspace=0.3 / (cell_w * height / width))
    return fig
