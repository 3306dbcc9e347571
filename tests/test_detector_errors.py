"""bench/detector_errors.py: the matching, the split of a centre error into radial and tangential, and the
radial error in image pixels."""

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from detector_errors import error_rows, matched_pairs, offset_errors, pixels_per_radial_metre, summarise  # noqa: E402

from bevperc.models.config import BEVGridConfig  # noqa: E402


def box(x, y, yaw=0.0, vx=0.0, vy=0.0):
    return [x, y, 0.0, 4.5, 1.9, 1.6, yaw, vx, vy]


def test_matching_is_greedy_best_score_first_one_gt_each_within_the_distance():
    gt = np.array([box(10, 0), box(13, 0), box(10, 0)])
    gt_sample = np.array([0, 0, 1])
    pred = np.array([box(10.2, 0), box(10.5, 0), box(30, 0), box(10, 1)])  # the third is 17 m from any GT
    score = np.array([0.5, 0.9, 0.8, 0.3])
    pred_rows, gt_rows = matched_pairs(pred, score, np.array([0, 0, 0, 1]), gt, gt_sample, 2, max_distance=4.0)
    # 0.9 takes the GT at 10 m; 0.5 falls back to the one at 13 m; the sample-1 prediction its own GT
    assert sorted(zip(pred_rows.tolist(), gt_rows.tolist())) == [(0, 1), (1, 0), (3, 2)]
    empty = matched_pairs(pred, score, np.zeros(4, dtype=np.int64), np.zeros((0, 9)), np.zeros(0, dtype=np.int64), 1, 4.0)
    assert [len(rows) for rows in empty] == [0, 0]


def test_errors_split_along_and_across_the_ray_and_flips_are_counted():
    gt = np.array([box(0, 20, yaw=0.3, vx=5.0), box(-10, 0, yaw=0.0)])
    pred = np.array([box(0.5, 21, yaw=0.3 + math.pi, vx=4.0), box(-10, 0.5, yaw=0.2)])
    rows = error_rows(pred, gt, np.array([2.0, 3.0]))
    np.testing.assert_allclose(rows["radial"], [1.0, 0.0], atol=1e-12)  # along +y for the first, -x for the second
    np.testing.assert_allclose(np.abs(rows["tangential"]), [0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(rows["yaw"], [math.pi, 0.2], atol=1e-12)
    np.testing.assert_allclose(rows["velocity"], [1.0, 0.0])
    summary = summarise(rows)
    assert summary["matched"] == 2 and summary["flipped_share"] == 0.5
    assert summary["zero_velocity_error_mean"] == 2.5
    assert [band["matched"] for band in summary["position_by_range"]] == [1, 1]
    near, far = summary["position_by_range"]  # 10 m (no radial error, 3 px/m) and 20 m (1 m, 2 px/m)
    assert (near["radial_median_abs_pixels"], far["radial_median_abs_pixels"]) == (0.0, 2.0)
    assert far["pixels_per_radial_metre_median"] == 2.0


def camera_looking_along(forward, right, height=1.5):
    """ego_from_camera [4, 4] of a camera at ``height`` m, optical axis along ego ``forward``, image x along
    ``right``, image y down."""
    transform = np.eye(4)
    transform[:3, :3] = np.stack([right, [0.0, 0.0, -1.0], forward], axis=1)
    transform[2, 3] = height
    return transform


def test_pixels_per_radial_metre_is_how_far_the_ground_point_moves_in_the_camera_that_sees_it():
    cameras = np.stack([camera_looking_along([1.0, 0, 0], [0, -1.0, 0]),   # front
                        camera_looking_along([-1.0, 0, 0], [0, 1.0, 0])])  # back
    focal, (height, width) = 100.0, (50, 100)
    intrinsics = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    gt = np.array([box(20, 0), box(-20, 0), box(0, 30)])
    gt[:, 2] = gt[:, 5] / 2  # standing on the ground, 1.5 m below the cameras
    moved = pixels_per_radial_metre(gt, cameras, np.stack([intrinsics] * 2), (height, width))
    # the ground point at depth d is focal * 1.5 / d pixels below the horizon
    expected = focal * 1.5 * (1 / 20 - 1 / 21)
    np.testing.assert_allclose(moved[:2], [expected, expected], rtol=1e-9)
    assert np.isnan(moved[2])  # beside the ego: in neither camera's image


def test_offset_errors_read_the_branch_at_the_gt_centre_cell():
    grid = BEVGridConfig(x_range=(-8.0, 8.0), y_range=(-8.0, 8.0), z_range=(-5.0, 3.0), cell_size=1.6)
    gt = np.array([box(1.2, -2.0), box(5.0, 5.0), box(20.0, 0.0)])  # the third is outside the grid
    offset = np.full((2, 10, 10), 0.5)
    # the first box: cx = 9.2 / 1.6 = 5.75, cy = 6 / 1.6 = 3.75, so cell (ix, iy) = (5, 3), target (0.75, 0.75);
    # the second: cell (8, 8), target (0.125, 0.125), where the branch says the cell centre
    offset[:, 3, 5] = [0.25, 0.75]
    predicted, centre = offset_errors(offset, gt, grid)
    np.testing.assert_allclose(predicted[:2], [(0.5 + 0.0) / 2, 0.375], atol=1e-6)
    np.testing.assert_allclose(centre[:2], [0.25, 0.375], atol=1e-6)
    assert np.isnan(predicted[2]) and np.isnan(centre[2])
