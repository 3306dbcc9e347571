"""Filtering, matching, curves and metrics of the fast evaluator: the devkit's ``filter_eval_boxes``,
``accumulate``, ``calc_ap``, ``calc_tp`` and ``DetectionMetrics`` on NumPy columns.

* **Filtering** (``filter_eval_boxes``), for GT and predictions alike: xy distance to the ego pose of
  the sample's key-frame LIDAR_TOP ``sample_data`` strictly below the class range; ``num_pts != 0``;
  bicycles and motorcycles whose centre is inside a ``static_object.bicycle_rack`` box of the sample
  are dropped (the devkit's ``points_in_box`` test).
* **Matching** (``accumulate``): predictions of a class sorted by score, descending, ties broken like
  the devkit's ``sorted((v, i))[::-1]`` (the later box first); each is matched greedily to the
  nearest (xy centre distance, first on ties) untaken GT of its class in its sample, a match if the
  distance is strictly below the threshold. Samples are independent, so the k-th prediction of every
  sample is matched in one vectorised step; the four thresholds share the distance matrices.
* **Curves and metrics** (``accumulate``/``calc_ap``/``calc_tp``/``DetectionMetrics``): the same
  NumPy calls on the same arrays in the same order (cumulative TP/FP, ``np.interp`` onto 101 recall
  points, NaN-aware cumulative means of the TP errors, yaw of the normalised quaternion, barrier yaw
  period pi, NaN for traffic_cone attr/vel/orient and barrier attr/vel, ``nanmean`` over classes, NDS).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np

from bevperc.data.classes import DETECTION_NAME_INDEX, DETECTION_NAMES
from bevperc.evaluation.columns import BoxColumns, RackColumns
from bevperc.evaluation.timing import StageTimer
from bevperc.geometry import devkit_box_corners, devkit_quaternion_yaws

TP_METRICS: tuple[str, ...] = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
N_RECALL_POINTS = 101  # DetectionMetricData.nelem
_CYCLE_CLASSES = np.array([DETECTION_NAME_INDEX["bicycle"], DETECTION_NAME_INDEX["motorcycle"]])


@dataclass(frozen=True)
class DetectionEvalConfig:
    """The devkit's ``DetectionConfig`` (defaults: ``detection_cvpr_2019``)."""

    class_range: dict[str, float] = field(default_factory=lambda: {
        "car": 50, "truck": 50, "bus": 50, "trailer": 50, "construction_vehicle": 50,
        "pedestrian": 40, "motorcycle": 40, "bicycle": 40, "traffic_cone": 30, "barrier": 30})
    dist_fcn: str = "center_distance"
    dist_ths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    dist_th_tp: float = 2.0
    min_recall: float = 0.1
    min_precision: float = 0.1
    max_boxes_per_sample: int = 500
    mean_ap_weight: int = 5

    def __post_init__(self) -> None:
        unknown = [name for name in self.class_range if name not in DETECTION_NAME_INDEX]
        if unknown:
            raise ValueError(f"DetectionEvalConfig.class_range: unknown classes {unknown}; expected {list(DETECTION_NAMES)}")
        if self.dist_fcn != "center_distance":
            raise ValueError(f"DetectionEvalConfig.dist_fcn: only 'center_distance' is supported, got {self.dist_fcn!r}")
        if self.dist_th_tp not in self.dist_ths:
            raise ValueError(f"DetectionEvalConfig.dist_th_tp={self.dist_th_tp} must be one of dist_ths={self.dist_ths}")

    @property
    def class_names(self) -> list[str]:
        return list(self.class_range.keys())

    @classmethod
    def from_dict(cls, content: dict) -> "DetectionEvalConfig":
        """From the devkit's JSON config format (``DetectionConfig.serialize()``)."""
        return cls(class_range=dict(content["class_range"]), dist_fcn=content["dist_fcn"],
                   dist_ths=tuple(content["dist_ths"]), dist_th_tp=content["dist_th_tp"],
                   min_recall=content["min_recall"], min_precision=content["min_precision"],
                   max_boxes_per_sample=content["max_boxes_per_sample"], mean_ap_weight=content["mean_ap_weight"])

    def to_dict(self) -> dict:
        """Same keys and order as ``DetectionConfig.serialize()``."""
        return {"class_range": dict(self.class_range), "dist_fcn": self.dist_fcn,
                "dist_ths": list(self.dist_ths), "dist_th_tp": self.dist_th_tp, "min_recall": self.min_recall,
                "min_precision": self.min_precision, "max_boxes_per_sample": self.max_boxes_per_sample,
                "mean_ap_weight": self.mean_ap_weight}


# --------------------------------------------------------------------------- filtering
@dataclass
class BoxFilter:
    """Everything ``filter_eval_boxes`` needs, precomputed once per split (small: it is sent to the
    worker processes that filter predictions as they decode them).

    Rack r spans ``rack_corner[r] + a * rack_axes[r, 0] + b * rack_axes[r, 1] + c * rack_axes[r, 2]``
    (a, b, c in [0, 1]): corner 0 and the edges to corners 4, 1 and 3 of ``Box.corners()``.
    """

    ego_translation: np.ndarray  # float64 [S, 3] ego position of each sample
    max_dist: np.ndarray  # float64 [n_classes] class range (-inf: class not evaluated)
    rack_sample: np.ndarray  # int64 [R] sorted
    rack_corner: np.ndarray  # float64 [R, 3]
    rack_axes: np.ndarray  # float64 [R, 3, 3]

    @classmethod
    def create(cls, ego_translation: np.ndarray, racks: RackColumns, cfg: DetectionEvalConfig) -> "BoxFilter":
        max_dist = np.full(len(DETECTION_NAMES), -np.inf)
        for name, value in cfg.class_range.items():
            max_dist[DETECTION_NAME_INDEX[name]] = value
        order = np.argsort(racks.sample_index, kind="stable")
        corners = [devkit_box_corners(racks.translation[r], racks.size[r], racks.rotation[r]) for r in order]
        corner = np.array([c[:, 0] for c in corners]).reshape(-1, 3)
        axes = np.array([[c[:, 4] - c[:, 0], c[:, 1] - c[:, 0], c[:, 3] - c[:, 0]] for c in corners]).reshape(-1, 3, 3)
        return cls(ego_translation=ego_translation, max_dist=max_dist, rack_sample=racks.sample_index[order],
                   rack_corner=corner, rack_axes=axes)

    def mask(self, boxes: BoxColumns) -> np.ndarray:
        """bool [N]: which boxes survive the devkit's ``filter_eval_boxes`` (range, points, bike racks)."""
        n = len(boxes)
        if n == 0:
            return np.zeros(0, dtype=bool)
        # add_center_dist: ego_translation = box - pose (3D); ego_dist = sqrt(sum(ego[:2] ** 2)).
        ego = boxes.translation - self.ego_translation[boxes.sample_index]
        ego_dist = np.sqrt(ego[:, 0] ** 2 + ego[:, 1] ** 2)
        max_dist = self.max_dist[boxes.class_index]
        if np.isneginf(max_dist).any():  # the devkit raises a KeyError for such boxes
            raise ValueError("boxes of a class that is not in DetectionEvalConfig.class_range")
        keep = (ego_dist < max_dist) & (boxes.num_pts != 0)
        if len(self.rack_sample):
            cycles = np.flatnonzero(keep & np.isin(boxes.class_index, _CYCLE_CLASSES)
                                    & np.isin(boxes.sample_index, self.rack_sample))
            if len(cycles):
                keep[cycles[self._in_any_rack(boxes.translation[cycles], boxes.sample_index[cycles])]] = False
        return keep

    def _in_any_rack(self, points: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
        """bool [P]: whether each point lies in a rack of its sample (``points_in_box``, wlh_factor 1)."""
        inside = np.zeros(len(points), dtype=bool)
        order = np.argsort(sample_index, kind="stable")
        sorted_samples = sample_index[order]
        lo = np.searchsorted(sorted_samples, self.rack_sample, side="left")
        hi = np.searchsorted(sorted_samples, self.rack_sample, side="right")
        for r in np.flatnonzero(hi > lo):
            candidates = order[lo[r]:hi[r]]
            p1 = self.rack_corner[r]
            i, j, k = self.rack_axes[r]
            v = points[candidates].T - p1.reshape((-1, 1))
            iv, jv, kv = np.dot(i, v), np.dot(j, v), np.dot(k, v)
            in_box = ((0 <= iv) & (iv <= np.dot(i, i)) & (0 <= jv) & (jv <= np.dot(j, j))
                      & (0 <= kv) & (kv <= np.dot(k, k)))
            inside[candidates[in_box]] = True
        return inside


def filter_mask(boxes: BoxColumns, ego_translation: np.ndarray, racks: RackColumns, cfg: DetectionEvalConfig) -> np.ndarray:
    """bool [N]: which boxes survive the devkit's ``filter_eval_boxes`` (range, points, bike racks)."""
    return BoxFilter.create(ego_translation, racks, cfg).mask(boxes)


# --------------------------------------------------------------------------- metric data
@dataclass
class MetricCurves:
    """The devkit's ``DetectionMetricData``: 101-point curves of one (class, distance threshold)."""

    recall: np.ndarray
    precision: np.ndarray
    confidence: np.ndarray
    trans_err: np.ndarray
    vel_err: np.ndarray
    scale_err: np.ndarray
    orient_err: np.ndarray
    attr_err: np.ndarray

    @classmethod
    def no_predictions(cls) -> "MetricCurves":
        n = N_RECALL_POINTS
        return cls(recall=np.linspace(0, 1, n), precision=np.zeros(n), confidence=np.zeros(n),
                   trans_err=np.ones(n), vel_err=np.ones(n), scale_err=np.ones(n), orient_err=np.ones(n),
                   attr_err=np.ones(n))

    @property
    def max_recall_ind(self) -> int:
        non_zero = np.nonzero(self.confidence)[0]
        return 0 if len(non_zero) == 0 else int(non_zero[-1])

    def serialize(self) -> dict[str, list[float]]:
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    def to_devkit(self):
        """The same data as a ``nuscenes`` ``DetectionMetricData`` (for the devkit's plots)."""
        from nuscenes.eval.detection.data_classes import DetectionMetricData

        return DetectionMetricData(**{f.name: getattr(self, f.name) for f in fields(self)})


def score_order(score: np.ndarray) -> np.ndarray:
    """Indices that sort predictions as the devkit does: ``[i for (v, i) in sorted((v, i) ...)][::-1]``,
    i.e. descending score and, among equal scores, descending index."""
    return np.lexsort((np.arange(len(score)), score))[::-1]


def cummean(x: np.ndarray) -> np.ndarray:
    """NaN-aware cumulative mean (``nuscenes.eval.common.utils.cummean``)."""
    if np.isnan(x).all():
        return np.ones(len(x))
    sum_vals = np.nancumsum(x.astype(float))
    count_vals = np.cumsum(~np.isnan(x))
    return np.divide(sum_vals, count_vals, out=np.zeros_like(sum_vals), where=count_vals != 0)


def _group_slots(group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Position of each element among the elements of its group (in array order), and group sizes."""
    counts = np.bincount(group, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    order = np.argsort(group, kind="stable")
    slot = np.empty(len(group), dtype=np.int64)
    slot[order] = np.arange(len(group)) - starts[group[order]]
    return slot, counts


def match_class(gt_xy: np.ndarray, gt_sample: np.ndarray, pred_xy: np.ndarray, pred_sample: np.ndarray,
                n_samples: int, dist_ths: Sequence[float]) -> np.ndarray:
    """Greedy matching of one class for several thresholds at once.

    Predictions must already be in the devkit's processing order (:func:`score_order`). Each takes
    the nearest untaken GT of its sample (xy centre distance; the first GT in table order on ties) and
    is a match if that distance is ``< dist_th``.

    gt_xy [G, 2], gt_sample [G], pred_xy [P, 2], pred_sample [P] -> matched GT index int64 [T, P] (-1: none).
    """
    n_th = len(dist_ths)
    matched = np.full((n_th, len(pred_sample)), -1, dtype=np.int64)
    if len(gt_sample) == 0 or len(pred_sample) == 0:
        return matched
    gt_slot, gt_counts = _group_slots(gt_sample, n_samples)
    gt_at = np.full((n_samples, int(gt_counts.max())), -1, dtype=np.int64)  # [S, Gmax] GT index or -1
    gt_at[gt_sample, gt_slot] = np.arange(len(gt_sample))
    # Only predictions in samples with GT of this class can match; samples are independent, so the
    # k-th prediction (rank k) of every sample is processed in the same vectorised step.
    active = np.flatnonzero(gt_counts[pred_sample] > 0)
    if not len(active):
        return matched
    rank, _ = _group_slots(pred_sample[active], n_samples)
    by_rank = active[np.argsort(rank, kind="stable")]
    rank_counts = np.bincount(rank)
    taken = np.zeros((n_th, n_samples, gt_at.shape[1]), dtype=bool)
    thresholds = np.asarray(dist_ths, dtype=np.float64)
    start = 0
    for count in rank_counts:
        preds = by_rank[start:start + count]
        start += count
        samples = pred_sample[preds]
        width = int(gt_counts[samples].max())
        candidates = gt_at[samples, :width]  # [A, W]
        valid = candidates >= 0
        dx = pred_xy[preds, 0][:, None] - gt_xy[candidates, 0]
        dy = pred_xy[preds, 1][:, None] - gt_xy[candidates, 1]
        dist = np.sqrt(dx * dx + dy * dy)
        rows = np.arange(count)
        for t in range(n_th):
            free_dist = np.where(valid & ~taken[t, samples, :width], dist, np.inf)
            nearest = free_dist.argmin(axis=1)  # first minimum, like the devkit's strict '<' scan
            hit = free_dist[rows, nearest] < thresholds[t]
            taken[t, samples[hit], nearest[hit]] = True
            matched[t, preds[hit]] = candidates[rows[hit], nearest[hit]]
    return matched


def _curves(is_match: np.ndarray, conf_sorted: np.ndarray, npos: int, errors: dict[str, np.ndarray],
            match_conf: np.ndarray) -> MetricCurves:
    """``accumulate`` after the matching loop: PR curve and TP-error curves on 101 recall points."""
    tp = np.cumsum(is_match).astype(float)
    fp = np.cumsum(~is_match).astype(float)
    prec = tp / (fp + tp)
    rec = tp / float(npos)
    rec_interp = np.linspace(0, 1, N_RECALL_POINTS)
    prec = np.interp(rec_interp, rec, prec, right=0)
    conf = np.interp(rec_interp, rec, conf_sorted, right=0)
    resampled = {}
    for key, values in errors.items():
        tmp = cummean(values)
        resampled[key] = np.interp(conf[::-1], match_conf[::-1], tmp[::-1])[::-1]
    return MetricCurves(recall=rec_interp, precision=prec, confidence=conf, **resampled)


def accumulate_class(gt: BoxColumns, pred: BoxColumns, class_name: str, n_samples: int,
                     dist_ths: Sequence[float]) -> dict[float, MetricCurves]:
    """The devkit's ``accumulate`` for one class and every threshold of ``dist_ths``.

    ``gt``/``pred``: filtered boxes (any classes), predictions in file order.
    """
    cls = DETECTION_NAME_INDEX[class_name]
    return accumulate_class_boxes(gt.take(np.flatnonzero(gt.class_index == cls)),
                                  pred.take(np.flatnonzero(pred.class_index == cls)),
                                  class_name, n_samples, dist_ths, StageTimer())


def accumulate_class_boxes(gt_c: BoxColumns, pred_c: BoxColumns, class_name: str, n_samples: int,
                           dist_ths: Sequence[float], timer: StageTimer) -> dict[float, MetricCurves]:
    """:func:`accumulate_class` on the filtered boxes of that class only (predictions in file order);
    times the stages ``sort``, ``match`` and ``accumulate``."""
    npos = len(gt_c)
    if npos == 0:
        return {th: MetricCurves.no_predictions() for th in dist_ths}
    with timer.stage("sort"):
        order = score_order(pred_c.score)
        score_sorted = pred_c.score[order]
    with timer.stage("match"):
        matched = match_class(gt_c.translation[:, :2], gt_c.sample_index, pred_c.translation[order, :2],
                              pred_c.sample_index[order], n_samples, dist_ths)
    period = np.pi if class_name == "barrier" else 2 * np.pi
    out = {}
    with timer.stage("accumulate"):
        for t, th in enumerate(dist_ths):
            is_match = matched[t] >= 0
            if not is_match.any():
                out[th] = MetricCurves.no_predictions()
                continue
            p = np.flatnonzero(is_match)
            g = matched[t, p]
            errors = _match_errors(gt_c, g, pred_c, order[p], period)
            out[th] = _curves(is_match, score_sorted, npos, errors, score_sorted[p])
    return out


def _match_errors(gt: BoxColumns, g: np.ndarray, pred: BoxColumns, p: np.ndarray, period: float) -> dict[str, np.ndarray]:
    """TP errors of matched pairs (gt[g[k]], pred[p[k]]), in matching order (``center_distance``,
    ``velocity_l2``, ``1 - scale_iou``, ``yaw_diff``, ``1 - attr_acc``)."""
    d = pred.translation[p, :2] - gt.translation[g, :2]
    trans_err = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
    dv = pred.velocity[p] - gt.velocity[g]
    vel_err = np.sqrt(dv[:, 0] * dv[:, 0] + dv[:, 1] * dv[:, 1])
    sa, sr = gt.size[g], pred.size[p]
    mn = np.minimum(sa, sr)
    intersection = mn[:, 0] * mn[:, 1] * mn[:, 2]
    union = sa[:, 0] * sa[:, 1] * sa[:, 2] + sr[:, 0] * sr[:, 1] * sr[:, 2] - intersection
    scale_err = 1 - intersection / union
    yaw_gt, yaw_pred = devkit_quaternion_yaws(gt.rotation[g]), devkit_quaternion_yaws(pred.rotation[p])
    diff = (yaw_gt - yaw_pred + period / 2) % period - period / 2
    diff = np.where(diff > np.pi, diff - 2 * np.pi, diff)
    orient_err = np.abs(diff)
    gt_attr = gt.attribute_index[g]
    attr_acc = np.where(gt_attr == -1, np.nan, (gt_attr == pred.attribute_index[p]).astype(float))
    return {"trans_err": trans_err, "vel_err": vel_err, "scale_err": scale_err, "orient_err": orient_err,
            "attr_err": 1 - attr_acc}


def calc_ap(md: MetricCurves, min_recall: float, min_precision: float) -> float:
    """The devkit's ``calc_ap``."""
    prec = np.copy(md.precision)
    prec = prec[round(100 * min_recall) + 1:]
    prec -= min_precision
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - min_precision)


def calc_tp(md: MetricCurves, min_recall: float, metric_name: str) -> float:
    """The devkit's ``calc_tp``."""
    first_ind = round(100 * min_recall) + 1
    last_ind = md.max_recall_ind
    if last_ind < first_ind:
        return 1.0
    return float(np.mean(getattr(md, metric_name)[first_ind: last_ind + 1]))


def summarize(metric_data: dict[tuple[str, float], MetricCurves], cfg: DetectionEvalConfig) -> dict[str, Any]:
    """``DetectionEval.evaluate`` step 2 + ``DetectionMetrics.serialize()`` (without eval_time)."""
    label_aps: dict[str, dict[float, float]] = {}
    label_tp_errors: dict[str, dict[str, float]] = {}
    for class_name in cfg.class_names:
        label_aps[class_name] = {th: calc_ap(metric_data[(class_name, th)], cfg.min_recall, cfg.min_precision)
                                 for th in cfg.dist_ths}
        label_tp_errors[class_name] = {}
        for metric_name in TP_METRICS:
            md = metric_data[(class_name, cfg.dist_th_tp)]
            if class_name == "traffic_cone" and metric_name in ("attr_err", "vel_err", "orient_err"):
                tp = np.nan
            elif class_name == "barrier" and metric_name in ("attr_err", "vel_err"):
                tp = np.nan
            else:
                tp = calc_tp(md, cfg.min_recall, metric_name)
            label_tp_errors[class_name][metric_name] = tp
    mean_dist_aps = {c: np.mean(list(d.values())) for c, d in label_aps.items()}
    mean_ap = float(np.mean(list(mean_dist_aps.values())))
    tp_errors = {m: float(np.nanmean([label_tp_errors[c][m] for c in cfg.class_names])) for m in TP_METRICS}
    tp_scores = {m: max(0.0, 1.0 - tp_errors[m]) for m in TP_METRICS}
    nd_score = float(cfg.mean_ap_weight * mean_ap + np.sum(list(tp_scores.values())))
    nd_score = nd_score / float(cfg.mean_ap_weight + len(tp_scores))
    return {"label_aps": label_aps, "mean_dist_aps": {c: float(v) for c, v in mean_dist_aps.items()},
            "mean_ap": mean_ap, "label_tp_errors": label_tp_errors, "tp_errors": tp_errors,
            "tp_scores": tp_scores, "nd_score": nd_score}
