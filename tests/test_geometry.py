"""The one geometry module: transforms, the box convention, projections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyquaternion import Quaternion

from bevperc.geometry import (
    box_corners,
    invert_transform,
    camera_from_ego_points,
    make_transform,
    matrix_to_quaternion,
    pixels_from_ego_points,
    points_in_boxes,
    project_to_image,
    quaternion_to_matrix,
    quaternion_to_yaw,
    transform_boxes,
    transform_points,
    yaw_to_quaternion,
)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    return quaternion_to_matrix(q / np.linalg.norm(q))


def test_quaternion_matrix_round_trip_matches_pyquaternion():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        np.testing.assert_allclose(quaternion_to_matrix(q), Quaternion(q).rotation_matrix, atol=1e-12)
        back = matrix_to_quaternion(quaternion_to_matrix(q))
        np.testing.assert_allclose(back, q if q[0] >= 0 else -q, atol=1e-9)


def test_yaw_quaternion_agrees_with_devkit():
    from nuscenes.eval.common.utils import quaternion_yaw

    for yaw in np.linspace(-3.1, 3.1, 17):
        q = yaw_to_quaternion(yaw)
        assert quaternion_to_yaw(q) == pytest.approx(yaw, abs=1e-12)
        assert quaternion_yaw(Quaternion(q)) == pytest.approx(yaw, abs=1e-12)


def test_invert_transform_numpy_and_torch():
    rng = np.random.default_rng(1)
    transform = make_transform(random_rotation(rng), rng.normal(size=3))
    np.testing.assert_allclose(invert_transform(transform) @ transform, np.eye(4), atol=1e-12)
    t = torch.tensor(np.stack([transform, transform]))
    eye = invert_transform(t) @ t
    torch.testing.assert_close(eye, torch.eye(4, dtype=t.dtype).expand(2, 4, 4))
    # a rigid transform: the transposed rotation is its inverse too
    np.testing.assert_allclose(invert_transform(transform, rigid=True), invert_transform(transform), atol=1e-12)
    torch.testing.assert_close(invert_transform(t, rigid=True), invert_transform(t))


def test_box_corners_match_devkit_box():
    from nuscenes.utils.data_classes import Box

    rng = np.random.default_rng(2)
    boxes = np.concatenate(
        [rng.normal(size=(20, 3)) * 10, rng.uniform(0.5, 5, size=(20, 3)), rng.uniform(-np.pi, np.pi, (20, 1)), np.zeros((20, 2))],
        axis=1,
    )
    corners = box_corners(boxes)
    for box, ours in zip(boxes, corners):
        devkit = Box(box[:3], box[3:6], Quaternion(yaw_to_quaternion(box[6]))).corners().T
        np.testing.assert_allclose(ours, devkit, atol=1e-9)
    torch.testing.assert_close(box_corners(torch.tensor(boxes)), torch.tensor(corners))


@pytest.mark.parametrize("flip_x,flip_y", [(False, False), (True, False), (False, True), (True, True)])
def test_transform_boxes_is_consistent_with_corners_under_scale_and_flips(flip_x, flip_y):
    """A BEV augmentation moves the box exactly as it moves its 8 corners (as a set)."""
    rng = np.random.default_rng(3)
    boxes = np.concatenate(
        [rng.normal(size=(10, 3)) * 10, rng.uniform(0.5, 5, (10, 3)), rng.uniform(-np.pi, np.pi, (10, 1)), rng.normal(size=(10, 2))],
        axis=1,
    )
    angle, scale = 0.4, 1.05
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    bev_aug = np.eye(4)
    bev_aug[:3, :3] = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0]) @ (scale * rotation)
    moved = transform_boxes(bev_aug, boxes)
    expected_corners = transform_points(bev_aug, box_corners(boxes).reshape(-1, 3)).reshape(-1, 8, 3)
    got_corners = box_corners(moved)
    for got, expected in zip(got_corners, expected_corners):
        # same set of points (a reflection permutes the corner order)
        distances = np.linalg.norm(got[:, None] - expected[None], axis=-1)
        assert distances.min(axis=1).max() < 1e-9
    # velocity follows the xy block (rotation, scale and flips)
    np.testing.assert_allclose(moved[:, 7:9], boxes[:, 7:9] @ bev_aug[:2, :2].T, atol=1e-12)
    # the heading vector is the transformed heading direction
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], 1) @ bev_aug[:2, :2].T
    np.testing.assert_allclose(np.arctan2(heading[:, 1], heading[:, 0]), moved[:, 6], atol=1e-12)


def test_transform_boxes_round_trip_rigid():
    rng = np.random.default_rng(4)
    transform = make_transform(yaw_to_quaternion(1.3), [100.0, -50.0, 1.0])
    boxes = np.concatenate([rng.normal(size=(5, 3)), rng.uniform(1, 3, (5, 3)), rng.uniform(-3, 3, (5, 1)), rng.normal(size=(5, 2))], 1)
    back = transform_boxes(invert_transform(transform), transform_boxes(transform, boxes))
    np.testing.assert_allclose(back[:, :6], boxes[:, :6], atol=1e-9)
    np.testing.assert_allclose(np.cos(back[:, 6] - boxes[:, 6]), 1.0, atol=1e-9)
    np.testing.assert_allclose(back[:, 7:], boxes[:, 7:], atol=1e-9)


def test_projection_matches_devkit_view_points():
    from nuscenes.utils.geometry_utils import view_points

    intrinsics = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]])
    rng = np.random.default_rng(5)
    points = np.concatenate([rng.normal(size=(100, 2)) * 5, rng.uniform(1, 60, (100, 1))], 1)
    pixels, depth = project_to_image(points, intrinsics)
    np.testing.assert_allclose(pixels, view_points(points.T, intrinsics, normalize=True)[:2].T, atol=1e-9)
    np.testing.assert_allclose(depth, points[:, 2])



def test_pixels_from_ego_points_projects_into_many_cameras_at_once():
    """Per camera the same as camera_from_ego_points + project_to_image (with the image augmentation
    folded into the intrinsics), for NumPy and torch; camera leading dims broadcast against the points'."""
    rng = np.random.default_rng(7)
    intrinsics = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]])
    image_aug = np.array([[0.22, 0.0, -3.0], [0.0, 0.22, -70.0], [0, 0, 1]])
    cameras = np.stack([make_transform(random_rotation(rng), rng.normal(size=3)) for _ in range(3)])  # [N, 4, 4]
    points = rng.normal(size=(5, 4, 3)) * 20  # [M, P, 3]
    pixels, depth = pixels_from_ego_points(points, cameras[:, None], image_aug @ intrinsics)
    assert pixels.shape == (3, 5, 4, 2) and depth.shape == (3, 5, 4)
    for n in range(3):
        camera = camera_from_ego_points(points.reshape(-1, 3), cameras[n])
        expected, expected_depth = project_to_image(camera, image_aug @ intrinsics)
        np.testing.assert_allclose(depth[n].reshape(-1), expected_depth, rtol=1e-12, atol=1e-9)
        front = expected_depth > 1e-6
        np.testing.assert_allclose(pixels[n].reshape(-1, 2)[front], expected[front], rtol=1e-9)
        assert np.isfinite(pixels[n]).all()  # behind the camera: finite, masked by depth
    found, found_depth = pixels_from_ego_points(torch.from_numpy(points), torch.from_numpy(cameras[:, None]),
                                                torch.from_numpy(image_aug @ intrinsics))
    np.testing.assert_allclose(found.numpy(), pixels, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(found_depth.numpy(), depth, rtol=1e-12, atol=1e-9)


def test_points_in_boxes():
    boxes = np.array([[0, 0, 0, 2, 4, 2, math.pi / 2, 0, 0]], dtype=float)  # length along +y
    points = np.array([[0, 1.9, 0], [1.9, 0, 0], [0.9, 0, 0.9], [0, 0, 1.1]])
    np.testing.assert_array_equal(points_in_boxes(points, boxes)[0], [True, False, True, False])
