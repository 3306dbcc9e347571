"""Frames, rigid transforms, 3D boxes and camera projection: the one geometry module.

Frames (nuScenes)
-----------------
``global``  world frame of a log (map frame), metres, z up.
``ego``     vehicle frame at a sensor timestamp: x forward, y left, z up; origin at the
            rear-axle centre on the ground.
``lidar``   LIDAR_TOP frame (x right, y forward, z up in the real rig).
``camera``  OpenCV camera frame: x right, y down, z forward (optical axis).
``image``   pixel coordinates (u right, v down) of the full-resolution image.

Transforms are 4x4 homogeneous matrices named ``<to>_from_<from>``:
``ego_from_camera @ p_camera = p_ego``. Compose right to left:
``global_from_camera = global_from_ego @ ego_from_camera``.

The box convention (used everywhere in bevperc)
-----------------------------------------------
A box is a row of 9 numbers ``[x, y, z, w, l, h, yaw, vx, vy]``:

* ``x, y, z``: the geometric centre of the box (not the bottom face), metres;
* ``w, l, h``: width (extent along the box's left axis), length (along its heading),
  height; the order is the nuScenes ``wlh``;
* ``yaw``: heading angle in radians about +z, measured from +x of the frame the box is
  expressed in (counter-clockwise seen from above); the box's length axis points along
  ``(cos yaw, sin yaw)``;
* ``vx, vy``: velocity in m/s, expressed in the same frame as the centre.

Boxes for training live in the (augmented) ego frame; submissions are written in the
global frame, exactly as the nuScenes devkit expects (``translation`` = centre,
``size`` = wlh, ``rotation`` = quaternion w,x,y,z, ``velocity`` = vx, vy).

Corner order matches the devkit's ``Box.corners()``: corners 0-3 are the front face
(+l/2), 4-7 the rear face; 0,1,4,5 are the top (+h/2).

Everything here accepts NumPy arrays; functions marked (torch) also accept tensors. The module
does not import torch itself (the evaluation and the data tools use it without torch): a tensor
can only reach it once torch is imported.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

Array = Union[np.ndarray, "torch.Tensor"]

# Corner signs (along length, width, height) in the devkit's ``Box.corners()`` order: [3, 8].
CORNER_SIGNS = np.array([
    [1, 1, 1, 1, -1, -1, -1, -1],
    [1, -1, -1, 1, 1, -1, -1, 1],
    [1, 1, -1, -1, 1, 1, -1, -1],
], dtype=np.float64)


def _is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


# --------------------------------------------------------------------------- rotations
def quaternion_to_matrix(q_wxyz: Array) -> np.ndarray:
    """Unit quaternion ``(w, x, y, z)`` -> 3x3 rotation matrix (NumPy)."""
    w, x, y, z = (float(v) for v in q_wxyz)
    n = math.sqrt(w * w + x * x + y * y + z * z)
    if n == 0:
        raise ValueError("quaternion has zero norm")
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix -> unit quaternion ``(w, x, y, z)`` with ``w >= 0``."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * math.sqrt(trace + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def yaw_to_quaternion(yaw: float) -> np.ndarray:
    """Rotation by ``yaw`` about +z as quaternion ``(w, x, y, z)``."""
    return np.array([math.cos(yaw / 2.0), 0.0, 0.0, math.sin(yaw / 2.0)])


def quaternion_to_yaw(q_wxyz: Array) -> float:
    """Heading of a rotation: the angle of its rotated +x axis in the xy plane.

    Same definition as the devkit's ``quaternion_yaw`` (not the same rounding: for the devkit's
    exact numbers, use :func:`devkit_quaternion_yaws`).
    """
    rotated_x = quaternion_to_matrix(q_wxyz) @ np.array([1.0, 0.0, 0.0])
    return float(math.atan2(rotated_x[1], rotated_x[0]))


def devkit_quaternion_yaws(rotation: np.ndarray) -> np.ndarray:
    """Yaw ``[N]`` of quaternions ``[N, 4]`` (w, x, y, z), exactly as the devkit's ``quaternion_yaw(Quaternion(q))``.

    pyquaternion first divides q by ``sqrt(q . q)`` unless ``|1 - q . q| < 1e-14`` (so a quaternion
    whose ``q . q`` overflows becomes 0 and has yaw 0), then takes the angle of R @ (1, 0, 0). Used by
    the fast evaluator, whose numbers must equal the devkit's.
    """
    with np.errstate(over="ignore"):
        sum_sq = (rotation * rotation).sum(axis=1)
    norm = np.where(np.abs(1.0 - sum_sq) < 1e-14, 1.0, np.sqrt(sum_sq))
    q = rotation / np.where(norm > 0, norm, 1.0)[:, None]
    w, x, y, z = q.T
    return np.arctan2(2 * (x * y + w * z), w * w + x * x - y * y - z * z)


# --------------------------------------------------------------------------- transforms
def make_transform(rotation: Array, translation: Array) -> np.ndarray:
    """4x4 transform from a rotation (3x3 matrix or quaternion w,x,y,z) and translation."""
    rotation = np.asarray(rotation, dtype=np.float64)
    if rotation.shape == (4,):
        rotation = quaternion_to_matrix(rotation)
    if rotation.shape != (3, 3):
        raise ValueError(f"rotation must be a 3x3 matrix or a quaternion, got shape {rotation.shape}")
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = np.asarray(translation, dtype=np.float64).reshape(3)
    return transform


def invert_transform(transform: Array, rigid: bool = False) -> Array:
    """Inverse of a 4x4 affine transform ``(..., 4, 4)`` (torch; batched over leading dims).

    Exact for rigid frame changes and for BEV augmentations, which add scale and
    reflections (the 3x3 block is inverted, not transposed). ``rigid=True`` promises a
    rotation block and transposes it instead: cheaper, and the exact inverse of the
    rotation as written (the synthetic world's sensor frames use it).
    """
    if _is_tensor(transform):
        import torch

        linear = transform[..., :3, :3]
        linear_inv = linear.transpose(-1, -2) if rigid else torch.linalg.inv(linear)
        out = torch.zeros_like(transform)
        out[..., :3, :3] = linear_inv
        out[..., :3, 3:] = -linear_inv @ transform[..., :3, 3:]
        out[..., 3, 3] = 1
        return out
    transform = np.asarray(transform, dtype=np.float64)
    linear = transform[..., :3, :3]
    linear_inv = np.swapaxes(linear, -1, -2) if rigid else np.linalg.inv(linear)
    out = np.zeros_like(transform)
    out[..., :3, :3] = linear_inv
    out[..., :3, 3] = -(linear_inv @ transform[..., :3, 3:])[..., 0]
    out[..., 3, 3] = 1
    return out


def transform_points(transform: Array, points: Array) -> Array:
    """Apply a 4x4 transform to points ``(..., 3)`` (torch)."""
    return points @ transform[:3, :3].T + transform[:3, 3]


def transform_boxes(transform: Array, boxes: Array) -> Array:
    """Express boxes ``(N, 9)`` in another frame: ``boxes_b = transform_boxes(b_from_a, boxes_a)``.

    ``transform`` is a rigid frame change (ego/global/lidar) or a BEV augmentation: a
    rotation about z times a uniform scale, possibly with x/y reflections. Centres are
    transformed as points; the heading vector ``(cos yaw, sin yaw)`` is mapped by the
    2x2 xy block, which gives the new yaw under rotation *and* reflection; sizes are
    multiplied by the scale; velocities are mapped by the 2x2 block (a frame change
    adds no velocity: both frames are taken at one instant). Assumes the z axis is
    (close to) preserved, which holds for nuScenes ego/global/lidar frames up to small
    pitch/roll. (torch)
    """
    is_torch = _is_tensor(boxes)
    lib = sys.modules["torch"] if is_torch else np
    out = boxes.clone() if is_torch else np.array(boxes, dtype=np.float64, copy=True)
    if len(boxes) == 0:
        return out
    transform = transform.to(boxes) if is_torch else np.asarray(transform, dtype=np.float64)
    linear = transform[:3, :3]
    xy_block = linear[:2, :2]
    # Uniform scale of the transform (1 for rigid ones); |det| of the 3x3 block is s^3.
    scale = float(abs(np.linalg.det(np.asarray(linear.tolist())))) ** (1.0 / 3.0)
    out[:, 0:3] = boxes[:, 0:3] @ linear.T + transform[:3, 3]
    out[:, 3:6] = boxes[:, 3:6] * scale
    heading = lib.stack([lib.cos(boxes[:, 6]), lib.sin(boxes[:, 6])], -1) @ xy_block.T
    out[:, 6] = lib.arctan2(heading[:, 1], heading[:, 0])
    if boxes.shape[1] >= 9:
        out[:, 7:9] = boxes[:, 7:9] @ xy_block.T
    return out


# --------------------------------------------------------------------------- boxes
def box_corners(boxes: Array) -> Array:
    """Corners ``(N, 8, 3)`` of boxes ``(N, >=7)``, in the devkit's ``Box.corners()`` order (torch)."""
    is_torch = _is_tensor(boxes)
    lib = sys.modules["torch"] if is_torch else np
    centre, w, l, h, yaw = boxes[:, 0:3], boxes[:, 3], boxes[:, 4], boxes[:, 5], boxes[:, 6]
    if is_torch:
        sx, sy, sz = (lib.tensor(s, dtype=boxes.dtype, device=boxes.device) for s in CORNER_SIGNS)
    else:
        sx, sy, sz = CORNER_SIGNS
    local_x = l[:, None] / 2 * sx
    local_y = w[:, None] / 2 * sy
    local_z = h[:, None] / 2 * sz
    cos, sin = lib.cos(yaw)[:, None], lib.sin(yaw)[:, None]
    x = cos * local_x - sin * local_y + centre[:, 0:1]
    y = sin * local_x + cos * local_y + centre[:, 1:2]
    z = local_z + centre[:, 2:3]
    return lib.stack([x, y, z], -1)


def devkit_box_corners(translation: np.ndarray, size: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Corners ``[3, 8]`` of one box given as the devkit gives it (centre ``[3]``, ``wlh`` ``[3]``,
    quaternion ``[4]`` w, x, y, z), computed as ``nuscenes.utils.data_classes.Box.corners()`` does
    (pyquaternion's rotation matrix), so that the fast evaluator's numbers equal the devkit's."""
    from pyquaternion import Quaternion

    w, l, h = size
    corners = np.vstack((l / 2 * CORNER_SIGNS[0], w / 2 * CORNER_SIGNS[1], h / 2 * CORNER_SIGNS[2]))
    corners = np.dot(Quaternion(rotation).rotation_matrix, corners)
    return corners + np.asarray(translation).reshape(3, 1)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Boolean mask ``(N_boxes, N_points)``: which points ``(P, 3)`` lie inside each box.

    The points are sorted by x once; each box tests only the slice of points within the x-range of
    its footprint's bounding circle (two binary searches), so the cost is ~P log P plus the points
    near the boxes rather than P per box.
    """
    points = np.asarray(points, dtype=np.float64)[:, :3]
    boxes = np.asarray(boxes, dtype=np.float64)
    masks = np.zeros((len(boxes), len(points)), dtype=bool)
    order = np.argsort(points[:, 0], kind="stable")
    xs, ys, zs = (np.ascontiguousarray(points[order, k]) for k in range(3))
    for i, box in enumerate(boxes):
        reach = 0.5 * math.hypot(box[3], box[4])  # half-diagonal of the footprint
        first = int(np.searchsorted(xs, box[0] - reach, side="left"))
        last = int(np.searchsorted(xs, box[0] + reach, side="right"))
        dx, dy, dz = xs[first:last] - box[0], ys[first:last] - box[1], zs[first:last] - box[2]
        cos, sin = math.cos(box[6]), math.sin(box[6])
        inside = (np.abs(dx * cos + dy * sin) <= box[4] / 2) & (np.abs(-dx * sin + dy * cos) <= box[3] / 2) \
            & (np.abs(dz) <= box[5] / 2)
        masks[i, order[first:last][inside]] = True
    return masks


# --------------------------------------------------------------------------- cameras
def project_to_image(points_camera: Array, intrinsics: Array, eps: float = 1e-6) -> tuple[Array, Array]:
    """Pinhole projection of camera-frame points ``(..., 3)`` -> pixels ``(..., 2)`` and depth ``(...)``.

    Depth is the camera z; points with ``depth <= eps`` get non-finite pixels and must be
    masked by the caller. Same maths as the devkit's ``view_points(..., normalize=True)``. (torch)
    """
    depth = points_camera[..., 2]
    pixels_h = points_camera @ intrinsics[:3, :3].T
    pixels = pixels_h[..., :2] / pixels_h[..., 2:3]
    return pixels, depth


def camera_from_ego_points(points_ego: Array, ego_from_camera: Array) -> Array:
    """Ego-frame points ``(..., 3)`` -> camera frame ``(..., 3)`` (torch).

    ``ego_from_camera`` ``[4, 4]`` may include a BEV augmentation (scale, flips): it is inverted
    with :func:`invert_transform`, not transposed.
    """
    return transform_points(invert_transform(ego_from_camera), points_ego)


def pixels_from_ego_points(points_ego: Array, ego_from_camera: Array, pixels_from_camera: Array,
                           eps: float = 1e-6) -> tuple[Array, Array]:
    """Ego-frame points -> pixels and depth (camera z), in one or many cameras at once (torch).

    Args:
        points_ego: ``(..., P, 3)``.
        ego_from_camera: ``(..., 4, 4)``, possibly with a BEV augmentation (``bev_aug @ ego_from_camera``;
            inverted as a whole, not transposed).
        pixels_from_camera: ``(..., 3, 3)``: the intrinsics, possibly behind an image augmentation
            (``image_aug @ K``). The leading dims of both broadcast against the points', e.g. cameras
            ``[N, 1, 4, 4]`` with points ``[M, 9, 3]`` give ``[N, M, 9]``.
    Returns:
        pixels ``(..., P, 2)`` and depth ``(..., P)``. The pixels are divided by the depth clamped at
        ``eps``: points at or behind the camera get finite pixels, which the caller masks by depth.
    """
    if _is_tensor(points_ego):
        import torch

        camera_from_ego = torch.linalg.inv(ego_from_camera)
        camera = points_ego @ camera_from_ego[..., :3, :3].transpose(-1, -2) + camera_from_ego[..., None, :3, 3]
        depth = camera[..., 2]
        return (camera @ pixels_from_camera.transpose(-1, -2))[..., :2] / depth.clamp(min=eps)[..., None], depth
    camera_from_ego = np.linalg.inv(ego_from_camera)
    camera = points_ego @ np.swapaxes(camera_from_ego[..., :3, :3], -1, -2) + camera_from_ego[..., None, :3, 3]
    depth = camera[..., 2]
    return (camera @ np.swapaxes(pixels_from_camera, -1, -2))[..., :2] / np.maximum(depth, eps)[..., None], depth
