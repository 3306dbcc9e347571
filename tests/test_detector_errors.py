"""bench/detector_errors.py: the matching and the split of a centre error into radial and tangential."""

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from detector_errors import error_rows, matched_pairs, summarise  # noqa: E402


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
    rows = error_rows(pred, gt)
    np.testing.assert_allclose(rows["radial"], [1.0, 0.0], atol=1e-12)  # along +y for the first, -x for the second
    np.testing.assert_allclose(np.abs(rows["tangential"]), [0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(rows["yaw"], [math.pi, 0.2], atol=1e-12)
    np.testing.assert_allclose(rows["velocity"], [1.0, 0.0])
    summary = summarise(rows)
    assert summary["matched"] == 2 and summary["flipped_share"] == 0.5
    assert summary["zero_velocity_error_mean"] == 2.5
    assert [band["matched"] for band in summary["position_by_range"]] == [1, 1]
