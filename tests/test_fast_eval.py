"""The fast evaluator against the real nuScenes devkit (accumulate / calc_ap / calc_tp / DetectionEval).

Property-based (hypothesis) comparisons at the metric-data level on random GT/prediction sets, a
filter comparison with the real ``NuScenes`` class and ``filter_eval_boxes``, and an end-to-end run of
``DetectionEval`` vs the fast evaluator on a small generated nuScenes root. Every metric must agree to 1e-9.
"""

from __future__ import annotations

import json
import math

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bevperc.evaluation import fast_eval
from bevperc.evaluation.fast_eval import (
    BoxColumns,
    DetectionEvalConfig,
    FastDetectionEval,
    GroundTruth,
    MetricCurves,
    accumulate_class,
    calc_ap,
    calc_tp,
    filter_mask,
    load_ground_truth,
    summarize,
    to_jsonable,
)
from bevperc.data.classes import ATTRIBUTE_NAMES, CATEGORY_TO_DETECTION_NAME, CLASS_ATTRIBUTES, DETECTION_NAMES

from nuscenes.eval.common.config import config_factory
from nuscenes.eval.common.data_classes import EvalBoxes
from nuscenes.eval.common.utils import center_distance
from nuscenes.eval.detection import algo as devkit_algo
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.eval.detection.evaluate import DetectionEval

ATOL = 1e-9
CURVE_FIELDS = ("recall", "precision", "confidence", "trans_err", "vel_err", "scale_err", "orient_err", "attr_err")


def assert_close(a, b, where: str = "") -> None:
    """Nested dicts / floats equal to ATOL, NaN == NaN, same keys (float keys compared as str)."""
    if isinstance(a, dict):
        a_keys = {str(k): k for k in a}
        b_keys = {str(k): k for k in b}
        assert set(a_keys) == set(b_keys), f"{where}: keys {sorted(a_keys)} != {sorted(b_keys)}"
        for key in a_keys:
            assert_close(a[a_keys[key]], b[b_keys[key]], f"{where}.{key}")
    elif isinstance(a, (list, np.ndarray)):
        np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=0, atol=ATOL,
                                   equal_nan=True, err_msg=where)
    else:
        if isinstance(a, float) and math.isnan(a):
            assert isinstance(b, float) and math.isnan(b), f"{where}: {a} != {b}"
        else:
            assert a == b or abs(a - b) <= ATOL, f"{where}: {a} != {b}"


def test_constants_and_config_match_devkit():
    from nuscenes.eval.detection import constants
    from nuscenes.eval.detection.utils import category_to_detection_name, detection_name_to_rel_attributes

    assert list(DETECTION_NAMES) == constants.DETECTION_NAMES
    assert list(ATTRIBUTE_NAMES) == constants.ATTRIBUTE_NAMES
    assert list(fast_eval.TP_METRICS) == constants.TP_METRICS
    for name in DETECTION_NAMES:
        assert list(CLASS_ATTRIBUTES[name]) == detection_name_to_rel_attributes(name)
    for category, name in CATEGORY_TO_DETECTION_NAME.items():
        assert category_to_detection_name(category) == name
    assert category_to_detection_name("static_object.bicycle_rack") is None
    devkit_cfg = config_factory("detection_cvpr_2019")
    assert DetectionEvalConfig().to_dict() == devkit_cfg.serialize()
    assert DetectionEvalConfig().class_names == list(devkit_cfg.class_names)
    assert DetectionEvalConfig.from_dict(devkit_cfg.serialize()) == DetectionEvalConfig()


# --------------------------------------------------------------------------- random box sets
def _quaternion(yaw: float, tilt: tuple[float, float], scale: float) -> tuple[float, float, float, float]:
    q = np.array([math.cos(yaw / 2), tilt[0], tilt[1], math.sin(yaw / 2)])
    return tuple((scale * q).tolist())


coord = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -0.5, -1.0, -2.0]),
                  st.floats(-5, 5, allow_nan=False))
score = st.one_of(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), st.floats(0, 1, allow_nan=False))
velocity = st.one_of(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), st.just((math.nan, math.nan)),
                     st.just((0.0, 0.0)))
yaw = st.one_of(st.sampled_from([0.0, math.pi / 2, math.pi, -math.pi, 3.0]), st.floats(-math.pi, math.pi))
tilt = st.one_of(st.just((0.0, 0.0)), st.tuples(st.floats(-0.3, 0.3), st.floats(-0.3, 0.3)))
size = st.tuples(st.floats(0.1, 5), st.floats(0.1, 5), st.floats(0.1, 5))
# A few classes share most boxes (collisions); the others are often empty (classes without GT).
class_name = st.sampled_from(["car", "car", "barrier", "traffic_cone", "pedestrian", "bicycle", "truck"])


@st.composite
def box(draw, n_samples: int, is_gt: bool):
    name = draw(class_name)
    attrs = list(CLASS_ATTRIBUTES[name]) + [""]
    return dict(
        sample=draw(st.integers(0, n_samples - 1)),
        translation=(draw(coord), draw(coord), draw(st.sampled_from([0.0, 1.0]))),
        size=draw(size),
        rotation=_quaternion(draw(yaw), draw(tilt), draw(st.sampled_from([1.0, 2.5]))),
        velocity=draw(velocity),
        detection_name=name,
        attribute_name=draw(st.sampled_from(attrs)),
        detection_score=-1.0 if is_gt else draw(score),
    )


@st.composite
def box_sets(draw):
    n_samples = draw(st.integers(1, 4))
    gt = draw(st.lists(box(n_samples, True), max_size=25))
    pred = draw(st.lists(box(n_samples, False), max_size=30))
    order = draw(st.permutations(range(n_samples)))  # submission order of the samples
    return n_samples, gt, pred, order


def _devkit_boxes(boxes: list[dict], order: list[int]) -> EvalBoxes:
    eval_boxes = EvalBoxes()
    for s in order:
        eval_boxes.add_boxes(f"s{s}", [DetectionBox(sample_token=f"s{s}", translation=b["translation"], size=b["size"],
                                                    rotation=b["rotation"], velocity=b["velocity"], num_pts=5,
                                                    detection_name=b["detection_name"],
                                                    detection_score=b["detection_score"],
                                                    attribute_name=b["attribute_name"])
                                       for b in boxes if b["sample"] == s])
    return eval_boxes


def _columns(boxes: list[dict], order: list[int]) -> BoxColumns:
    ordered = [b for s in order for b in boxes if b["sample"] == s]  # EvalBoxes.all order
    n = len(ordered)

    def col(key, width=None):
        return np.array([b[key] for b in ordered], dtype=np.float64).reshape((n, width) if width else (n,))

    return BoxColumns(sample_index=np.array([b["sample"] for b in ordered], dtype=np.int64).reshape(n),
                      translation=col("translation", 3), size=col("size", 3), rotation=col("rotation", 4),
                      velocity=col("velocity", 2),
                      class_index=np.array([DETECTION_NAMES.index(b["detection_name"]) for b in ordered],
                                           dtype=np.int64).reshape(n),
                      attribute_index=np.array([ATTRIBUTE_NAMES.index(b["attribute_name"]) if b["attribute_name"]
                                                else -1 for b in ordered], dtype=np.int64).reshape(n),
                      score=col("detection_score"), num_pts=np.full(n, 5, dtype=np.int64))


def _devkit_evaluate(gt: EvalBoxes, pred: EvalBoxes):
    """The real ``DetectionEval.evaluate`` on already filtered boxes (its __init__ only loads and filters)."""
    evaluator = DetectionEval.__new__(DetectionEval)
    evaluator.cfg = config_factory("detection_cvpr_2019")
    evaluator.gt_boxes, evaluator.pred_boxes, evaluator.verbose = gt, pred, False
    return evaluator.evaluate()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(box_sets())
def test_accumulate_and_metrics_match_devkit(data):
    check_against_devkit(data)


@pytest.mark.slow  # the same property on 300 examples (~100 s on a busy 2-core CPU)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(box_sets())
def test_accumulate_and_metrics_match_devkit_many_examples(data):
    check_against_devkit(data)


def check_against_devkit(data) -> None:
    """Curves of every (class, threshold), AP, TP errors and the summary vs the devkit's functions."""
    n_samples, gt, pred, order = data
    gt_eb, pred_eb = _devkit_boxes(gt, range(n_samples)), _devkit_boxes(pred, order)
    gt_cols, pred_cols = _columns(gt, range(n_samples)), _columns(pred, order)
    cfg = DetectionEvalConfig()
    mine: dict = {}
    for name in DETECTION_NAMES:
        curves = accumulate_class(gt_cols, pred_cols, name, n_samples, cfg.dist_ths)
        for th in cfg.dist_ths:
            md = devkit_algo.accumulate(gt_eb, pred_eb, name, center_distance, th)
            ours = curves[th]
            mine[(name, th)] = ours
            for field_name in CURVE_FIELDS:
                assert_close(getattr(ours, field_name), getattr(md, field_name), f"{name}@{th}.{field_name}")
            assert ours.max_recall_ind == md.max_recall_ind
            assert_close(calc_ap(ours, 0.1, 0.1), devkit_algo.calc_ap(md, 0.1, 0.1), f"AP {name}@{th}")
            for metric in fast_eval.TP_METRICS:
                assert_close(calc_tp(ours, 0.1, metric), devkit_algo.calc_tp(md, 0.1, metric), f"{metric} {name}")
    metrics, _ = _devkit_evaluate(gt_eb, pred_eb)
    expected = metrics.serialize()
    ours = summarize(mine, cfg)
    for key in ("label_aps", "mean_dist_aps", "mean_ap", "label_tp_errors", "tp_errors", "tp_scores", "nd_score"):
        assert_close(ours[key], expected[key], key)


def test_score_ties_follow_devkit_order():
    """Equal scores: the devkit processes the later box first (sorted((v, i))[::-1])."""
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1, 0.9])
    expected = [i for (v, i) in sorted((v, i) for (i, v) in enumerate(scores.tolist()))][::-1]
    assert fast_eval.score_order(scores).tolist() == expected
    # Two predictions with equal scores at the same distance from one GT: the later one takes it.
    gt = [dict(sample=0, translation=(0.0, 0.0, 0.0), size=(1.0, 1.0, 1.0), rotation=(1.0, 0, 0, 0),
               velocity=(0.0, 0.0), detection_name="car", attribute_name="vehicle.moving", detection_score=-1.0)]
    pred = [dict(gt[0], translation=(0.3, 0.0, 0.0), detection_score=0.5, attribute_name="vehicle.moving"),
            dict(gt[0], translation=(-0.3, 0.0, 0.0), detection_score=0.5, attribute_name="vehicle.parked")]
    curves = accumulate_class(_columns(gt, [0]), _columns(pred, [0]), "car", 1, (2.0,))[2.0]
    md = devkit_algo.accumulate(_devkit_boxes(gt, [0]), _devkit_boxes(pred, [0]), "car", center_distance, 2.0)
    assert_close(curves.attr_err, md.attr_err)
    assert curves.attr_err[0] == 1.0  # the second (parked, wrong attribute) box matched


def test_barrier_orientation_period_and_nan_rules():
    gt = [dict(sample=0, translation=(0.0, 0.0, 0.0), size=(1.0, 1.0, 1.0), rotation=_quaternion(0.0, (0, 0), 1),
               velocity=(math.nan, math.nan), detection_name=name, attribute_name="", detection_score=-1.0)
          for name in ("barrier", "car", "traffic_cone")]
    pred = [dict(b, rotation=_quaternion(math.pi, (0, 0), 1), velocity=(1.0, 0.0), detection_score=0.8) for b in gt]
    cols = _columns(gt, [0]), _columns(pred, [0])
    mine = {}
    for name in DETECTION_NAMES:
        mine |= {(name, th): md for th, md in accumulate_class(*cols, name, 1, DetectionEvalConfig().dist_ths).items()}
    assert mine[("barrier", 2.0)].orient_err[-1] == pytest.approx(0.0, abs=1e-12)  # 180 deg flip is free
    assert mine[("car", 2.0)].orient_err[-1] == pytest.approx(math.pi)
    summary = summarize(mine, DetectionEvalConfig())
    assert math.isnan(summary["label_tp_errors"]["traffic_cone"]["orient_err"])
    assert math.isnan(summary["label_tp_errors"]["barrier"]["vel_err"])
    assert summary["label_tp_errors"]["car"]["vel_err"] == 1.0  # all-NaN GT velocities -> error 1
    metrics, _ = _devkit_evaluate(_devkit_boxes(gt, [0]), _devkit_boxes(pred, [0]))
    assert_close(summary["tp_errors"], metrics.serialize()["tp_errors"])
    assert_close(summary["nd_score"], metrics.nd_score)


def test_no_predictions_at_all():
    """No box in any sample: every class gets the devkit's ``no_predictions`` data (mAP 0)."""
    gt = [dict(sample=0, translation=(0.0, 0.0, 0.0), size=(1.0, 1.0, 1.0), rotation=(1.0, 0, 0, 0),
               velocity=(0.0, 0.0), detection_name="car", attribute_name="vehicle.moving", detection_score=-1.0)]
    cols = _columns(gt, [0, 1]), _columns([], [0, 1])
    mine = {}
    for name in DETECTION_NAMES:
        mine |= {(name, th): md for th, md in accumulate_class(*cols, name, 2, DetectionEvalConfig().dist_ths).items()}
    metrics, _ = _devkit_evaluate(_devkit_boxes(gt, [0, 1]), _devkit_boxes([], [0, 1]))
    summary = summarize(mine, DetectionEvalConfig())
    assert summary["mean_ap"] == 0.0
    assert_close(summary["nd_score"], metrics.nd_score)
    assert_close(mine[("car", 1.0)].serialize(), MetricCurves.no_predictions().serialize())


# --------------------------------------------------------------------------- with real tables
@pytest.fixture(scope="module")
def mini_root(tmp_path_factory, eval_bench):
    """A generated v1.0-mini root (mini_val: 2 scenes x 20 samples) and a submission for it."""
    bench = eval_bench
    root = tmp_path_factory.mktemp("nuscenes")
    tokens = bench.write_synthetic_nuscenes(root, "v1.0-mini", "mini_val", samples_per_scene=20, gt_per_sample=30,
                                            seed=3)
    results = root / "results.json"
    bench.write_synthetic_submission(root, "v1.0-mini", tokens, results, preds_per_sample=60, seed=4,
                                     empty_fraction=0.1)
    return root, tokens, results


@pytest.fixture(scope="module")
def nusc(mini_root):
    from nuscenes import NuScenes

    return NuScenes(version="v1.0-mini", dataroot=str(mini_root[0]), verbose=False)


def test_ground_truth_matches_devkit_load_gt(mini_root, nusc):
    from nuscenes.eval.common.loaders import add_center_dist, load_gt

    root, tokens, _ = mini_root
    gt = load_ground_truth(root, "v1.0-mini", "mini_val")
    assert len(gt.racks.sample_index) > 0  # the bike-rack filter is exercised
    devkit_gt = add_center_dist(nusc, load_gt(nusc, "mini_val", DetectionBox))
    assert gt.sample_tokens == devkit_gt.sample_tokens == tokens
    boxes = devkit_gt.all
    assert len(boxes) == len(gt.boxes)
    assert [gt.sample_tokens[i] for i in gt.boxes.sample_index] == [b.sample_token for b in boxes]
    np.testing.assert_array_equal(gt.boxes.translation, [b.translation for b in boxes])
    np.testing.assert_array_equal(gt.boxes.size, [b.size for b in boxes])
    np.testing.assert_array_equal(gt.boxes.rotation, [b.rotation for b in boxes])
    np.testing.assert_array_equal(gt.boxes.velocity, [b.velocity for b in boxes])  # NaN == NaN here
    assert np.isnan(gt.boxes.velocity).any()
    assert [DETECTION_NAMES[c] for c in gt.boxes.class_index] == [b.detection_name for b in boxes]
    assert [ATTRIBUTE_NAMES[a] if a >= 0 else "" for a in gt.boxes.attribute_index] == [b.attribute_name for b in boxes]
    np.testing.assert_array_equal(gt.boxes.num_pts, [b.num_pts for b in boxes])
    ego = gt.boxes.translation - gt.ego_translation[gt.boxes.sample_index]
    np.testing.assert_array_equal(ego, [b.ego_translation for b in boxes])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_filter_matches_devkit_filter_eval_boxes(mini_root, nusc, data):
    """Random boxes around each sample's ego pose (exactly at the class ranges too) and bicycles on
    the racks: the fast mask keeps exactly what ``filter_eval_boxes`` keeps."""
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes

    root, tokens, _ = mini_root
    gt = _cached_gt(root)
    racks = gt.racks
    cfg = DetectionEvalConfig()
    n = data.draw(st.integers(1, 40))
    boxes = []
    for _ in range(n):
        s = data.draw(st.integers(0, len(tokens) - 1))
        name = data.draw(st.sampled_from(DETECTION_NAMES))
        if name in ("bicycle", "motorcycle") and len(racks.sample_index) and data.draw(st.booleans()):
            r = data.draw(st.integers(0, len(racks.sample_index) - 1))
            s = int(racks.sample_index[r])
            offset = np.array([data.draw(st.floats(-5, 5)), data.draw(st.floats(-2, 2)), data.draw(st.floats(-1, 1))])
            translation = racks.translation[r] + offset
        else:
            limit = cfg.class_range[name]
            radius = data.draw(st.one_of(st.sampled_from([limit, limit - 1e-9, limit + 1e-9, 0.0]),
                                         st.floats(0, 1.3 * limit)))
            angle = data.draw(st.sampled_from([0.0, math.pi / 2, math.pi, 1.0]))
            translation = gt.ego_translation[s] + radius * np.array([math.cos(angle), math.sin(angle), 0.0])
            if angle == 0.0:  # exactly on the range limit along x
                translation = gt.ego_translation[s] + np.array([radius, 0.0, 0.5])
        num_pts = data.draw(st.sampled_from([-1, 0, 3]))
        boxes.append(dict(sample=s, translation=tuple(float(v) for v in translation), num_pts=num_pts,
                          detection_name=name))
    eval_boxes = EvalBoxes()
    for s, token in enumerate(tokens):
        eval_boxes.add_boxes(token, [DetectionBox(sample_token=token, translation=b["translation"], size=(1, 1, 1),
                                                  rotation=(1, 0, 0, 0), num_pts=b["num_pts"],
                                                  detection_name=b["detection_name"], detection_score=0.5,
                                                  attribute_name="") for b in boxes if b["sample"] == s])
    kept = filter_eval_boxes(nusc, add_center_dist(nusc, eval_boxes), config_factory("detection_cvpr_2019").class_range)
    ordered = [b for s in range(len(tokens)) for b in boxes if b["sample"] == s]
    cols = BoxColumns(sample_index=np.array([b["sample"] for b in ordered], dtype=np.int64),
                      translation=np.array([b["translation"] for b in ordered]).reshape(-1, 3),
                      size=np.ones((len(ordered), 3)), rotation=np.tile([1.0, 0, 0, 0], (len(ordered), 1)),
                      velocity=np.zeros((len(ordered), 2)),
                      class_index=np.array([DETECTION_NAMES.index(b["detection_name"]) for b in ordered]),
                      attribute_index=np.full(len(ordered), -1), score=np.full(len(ordered), 0.5),
                      num_pts=np.array([b["num_pts"] for b in ordered], dtype=np.int64))
    mask = filter_mask(cols, gt.ego_translation, gt.racks, cfg)
    assert [b.translation for b in kept.all] == [b["translation"] for b, k in zip(ordered, mask) if k]


_GT_CACHE: dict = {}


def _cached_gt(root) -> GroundTruth:
    if root not in _GT_CACHE:
        _GT_CACHE[root] = load_ground_truth(root, "v1.0-mini", "mini_val")
    return _GT_CACHE[root]


def test_end_to_end_matches_devkit_detection_eval(mini_root, nusc, tmp_path):
    """The whole pipeline (tables, validation, filtering, matching, metrics) vs the real DetectionEval."""
    from bevperc.evaluation.devkit_eval import run_devkit_eval

    root, _, results = mini_root
    expected = run_devkit_eval(results, root, "v1.0-mini", "mini_val", tmp_path / "devkit", nusc=nusc)
    result = FastDetectionEval(root, "v1.0-mini", "mini_val").evaluate_file(results)
    ours = to_jsonable(result.summary)
    for key in ("label_aps", "mean_dist_aps", "mean_ap", "label_tp_errors", "tp_errors", "tp_scores", "nd_score"):
        assert_close(ours[key], expected[key], key)
    assert ours["cfg"] == expected["cfg"]
    assert ours["meta"] == expected["meta"]
    details = json.loads((tmp_path / "devkit" / "metrics_details.json").read_text())
    assert_close(result.details(), details, "details")
    assert 0.05 < ours["mean_ap"] < 0.95  # a non-trivial submission


def test_ground_truth_cache_roundtrip(mini_root, tmp_path):
    root = mini_root[0]
    first = load_ground_truth(root, "v1.0-mini", "mini_val", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("gt_v1.0-mini_mini_val_*.npz"))) == 1
    second = load_ground_truth(root, "v1.0-mini", "mini_val", cache_dir=tmp_path)
    assert second.sample_tokens == first.sample_tokens
    for f in ("translation", "velocity", "class_index", "attribute_index", "num_pts", "sample_index"):
        np.testing.assert_array_equal(getattr(second.boxes, f), getattr(first.boxes, f))
    np.testing.assert_array_equal(second.racks.translation, first.racks.translation)


def test_split_version_mismatch_is_a_clear_error(mini_root):
    with pytest.raises(ValueError, match="not compatible with nuScenes version"):
        load_ground_truth(mini_root[0], "v1.0-mini", "val")


class _TableRecord(msgspec.Struct):
    token: str
    translation: tuple[float, float, float]
    attribute_tokens: list[str]


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 24])
def test_table_batches_yield_the_records_of_json_load(tmp_path, chunk_bytes):
    """msgspec chunks, and the json module from the first chunk msgspec cannot take: a string holding
    the '},' the chunks are cut at, or a NaN literal (which the json module reads)."""
    records = [{"token": f"t{i}", "translation": [i, 0.5, math.nan if i == 30 else -1.0],
                "name": "a},b" if i == 7 else "x", "attribute_tokens": [] if i % 2 else ["q"]} for i in range(40)]
    expected = [(r["token"], tuple(r["translation"]), r["attribute_tokens"]) for r in records]
    for indent in (None, 2):
        path = tmp_path / f"table_{indent}.json"
        path.write_text(json.dumps(records, indent=indent))
        got = [(r.token, r.translation, r.attribute_tokens)
               for batch in fast_eval.table_batches(path, _TableRecord, chunk_bytes=chunk_bytes) for r in batch]
        assert len(got) == len(expected)
        for (token, translation, attributes), (token_e, translation_e, attributes_e) in zip(got, expected):
            assert (token, attributes) == (token_e, attributes_e)
            np.testing.assert_array_equal(translation, translation_e)  # NaN == NaN here
    (tmp_path / "empty.json").write_text("[]")
    assert [r for b in fast_eval.table_batches(tmp_path / "empty.json", _TableRecord, chunk_bytes=chunk_bytes)
            for r in b] == []
    (tmp_path / "bad.json").write_text(json.dumps([{"token": "a", "translation": [1, 2], "attribute_tokens": []}]))
    with pytest.raises(ValueError, match=r"bad.json: .*not as in the nuScenes schema"):
        [r for b in fast_eval.table_batches(tmp_path / "bad.json", _TableRecord, chunk_bytes=chunk_bytes) for r in b]
