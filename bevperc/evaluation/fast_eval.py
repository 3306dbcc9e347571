"""Fast, exact nuScenes detection evaluation (same numbers as ``nuscenes.eval.detection.DetectionEval``).

The devkit builds one Python object per box and matches predictions in a Python loop. This evaluator
keeps every box set as NumPy columns and reproduces the devkit step by step, in stages:

* **Ground truth** (:mod:`~bevperc.evaluation.ground_truth`): read straight from the tables, once
  per :class:`FastDetectionEval` (or from an ``.npz`` cache), then filtered and split by class.
* **Submission** (:mod:`~bevperc.evaluation.submission_chunks`): byte ranges of the file decoded
  into columns by msgspec, validated with array operations and filtered (range, points, bike racks)
  by worker processes, which send back only the kept boxes, by class. Files of another layout, and
  dict submissions, go through :mod:`~bevperc.evaluation.submission` in this process.
* **Metrics** (:mod:`~bevperc.evaluation.metrics`): per class, predictions sorted by score with the
  devkit's tie order, greedy matching vectorised over samples and thresholds, the devkit's curves,
  AP, TP errors and NDS.

Every stage's wall and CPU time is kept (:attr:`EvalResult.timings`, :attr:`FastDetectionEval.load_timings`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bevperc.data.classes import DETECTION_NAME_INDEX
from bevperc.evaluation.columns import BoxColumns, RackColumns
from bevperc.evaluation.ground_truth import (
    GroundTruth,
    load_ground_truth,
    table_batches,
    table_fingerprint,
)
from bevperc.evaluation.metrics import (
    N_RECALL_POINTS,
    TP_METRICS,
    BoxFilter,
    DetectionEvalConfig,
    MetricCurves,
    accumulate_class,
    accumulate_class_boxes,
    calc_ap,
    calc_tp,
    cummean,
    filter_mask,
    match_class,
    score_order,
    summarize,
)
from bevperc.evaluation.submission import (
    PredictionBoxes,
    existing_results_file,
    read_submission_stream,
    submission_from_dict,
)
from bevperc.evaluation.submission_chunks import read_chunked
from bevperc.evaluation.timing import StageTimer
from bevperc.evaluation.workers import default_workers, prestart

__all__ = [
    "N_RECALL_POINTS", "TP_METRICS", "BoxColumns", "DetectionEvalConfig", "EvalResult",
    "FastDetectionEval", "GroundTruth", "MetricCurves", "RackColumns", "accumulate_class", "calc_ap", "calc_tp",
    "cummean", "evaluate_boxes", "filter_mask", "load_ground_truth", "match_class", "prediction_columns",
    "score_order", "summarize", "table_batches", "table_fingerprint", "to_jsonable",
    "write_metrics",
]


@dataclass
class EvalResult:
    """Metrics summary (``metrics_summary.json`` layout), per (class, threshold) curves, and the
    seconds each stage took (:meth:`StageTimer.as_dict` layout)."""

    summary: dict[str, Any]
    metric_data: dict[tuple[str, float], MetricCurves]
    timings: dict[str, dict[str, float]]

    def details(self) -> dict[str, dict]:
        """``metrics_details.json`` layout (``DetectionMetricDataList.serialize()``)."""
        return {f"{name}:{th}": md.serialize() for (name, th), md in self.metric_data.items()}


def prediction_columns(pred: PredictionBoxes, gt: GroundTruth) -> BoxColumns:
    """Map a submission's samples onto the GT's; the devkit requires the same sample set."""
    index_of = {token: i for i, token in enumerate(gt.sample_tokens)}
    try:
        remap = np.array([index_of[t] for t in pred.sample_tokens], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"results: sample {exc.args[0]!r} is not in split {gt.split!r}") from None
    if len(set(pred.sample_tokens)) != len(gt.sample_tokens):
        missing = sorted(set(gt.sample_tokens) - set(pred.sample_tokens))
        raise ValueError(f"results: {len(missing)} samples of split {gt.split!r} are missing, e.g. {missing[:5]}")
    return BoxColumns(sample_index=remap[pred.sample_index] if len(pred) else pred.sample_index,
                      translation=pred.translation, size=pred.size, rotation=pred.rotation, velocity=pred.velocity,
                      class_index=pred.class_index, attribute_index=pred.attribute_index, score=pred.score,
                      num_pts=pred.num_pts)


def _filtered_by_class(boxes: BoxColumns, box_filter: BoxFilter) -> dict[int, list[BoxColumns]]:
    return {cls: [part] for cls, part in boxes.split_by_class(np.flatnonzero(box_filter.mask(boxes))).items()}


def evaluate_by_class(gt_by_class: dict[int, BoxColumns], pred_by_class: dict[int, list[BoxColumns]],
                      n_samples: int, cfg: DetectionEvalConfig, meta: dict | None, timer: StageTimer) -> EvalResult:
    """Metrics from filtered boxes split by class (predictions: parts in file order, consumed here)."""
    started = time.time()
    metric_data: dict[tuple[str, float], MetricCurves] = {}
    for class_name in cfg.class_names:
        cls = DETECTION_NAME_INDEX[class_name]
        with timer.stage("pred_gather"):
            pred = BoxColumns.concatenate(pred_by_class.pop(cls)) if cls in pred_by_class else BoxColumns.empty()
        gt = gt_by_class.get(cls, BoxColumns.empty())
        for th, md in accumulate_class_boxes(gt, pred, class_name, n_samples, cfg.dist_ths, timer).items():
            metric_data[(class_name, th)] = md
    with timer.stage("summarize"):
        summary = summarize(metric_data, cfg)
    summary["eval_time"] = time.time() - started
    summary["cfg"] = cfg.to_dict()
    summary["meta"] = dict(meta or {})
    return EvalResult(summary=summary, metric_data=metric_data, timings=timer.as_dict())


def evaluate_boxes(gt: GroundTruth, pred: BoxColumns, cfg: DetectionEvalConfig | None = None,
                   meta: dict | None = None) -> EvalResult:
    """Evaluate prediction columns against the GT (both unfiltered; filtering happens here)."""
    cfg = cfg or DetectionEvalConfig()
    timer = StageTimer()
    with timer.stage("filter"):
        box_filter = BoxFilter.create(gt.ego_translation, gt.racks, cfg)
        gt_by_class = {cls: parts[0] for cls, parts in _filtered_by_class(gt.boxes, box_filter).items()}
        pred_by_class = _filtered_by_class(pred, box_filter)
    return evaluate_by_class(gt_by_class, pred_by_class, len(gt.sample_tokens), cfg, meta, timer)


class FastDetectionEval:
    """Holds one split's GT (read once from the tables) and evaluates any number of submissions.

    ``workers``: processes that decode the annotation table and submission files (default
    :func:`~bevperc.evaluation.workers.default_workers`), started right away so that they boot while
    the GT is read; 1 decodes in this process. The results do not depend on it.

    >>> evaluator = FastDetectionEval("data/nuscenes", "v1.0-mini", "mini_val")   # doctest: +SKIP
    >>> result = evaluator.evaluate_file("results_nusc.json")                       # doctest: +SKIP
    >>> result.summary["nd_score"], result.summary["mean_ap"]                       # doctest: +SKIP
    """

    def __init__(self, dataroot: str | Path, version: str, split: str, cfg: DetectionEvalConfig | None = None,
                 cache_dir: str | Path | None = None, verbose: bool = False, workers: int | None = None):
        self.cfg = cfg or DetectionEvalConfig()
        self.workers = default_workers() if workers is None else workers
        prestart(self.workers)  # the workers boot while the GT is read
        timer = StageTimer()
        self.gt = load_ground_truth(dataroot, version, split, cache_dir=cache_dir, timer=timer, workers=self.workers)
        with timer.stage("gt_filter"):
            self.box_filter = BoxFilter.create(self.gt.ego_translation, self.gt.racks, self.cfg)
            self._gt_by_class = {cls: parts[0] for cls, parts in _filtered_by_class(self.gt.boxes, self.box_filter).items()}
        self.load_timings = timer.as_dict()
        if verbose:
            seconds = sum(stage["wall_s"] for stage in self.load_timings.values())
            print(f"Loaded {len(self.gt.boxes)} GT boxes of {len(self.gt.sample_tokens)} samples ({split}) from "
                  f"{Path(dataroot) / version} in {seconds:.1f} s")

    @property
    def sample_tokens(self) -> list[str]:
        return self.gt.sample_tokens

    def evaluate_file(self, results_path: str | Path, allow_empty_attribute: bool = False) -> EvalResult:
        """Validate (strictly) and evaluate a submission file."""
        path = existing_results_file(results_path)
        timer = StageTimer()
        with timer.stage("submission"):
            chunked = read_chunked(path, self.gt.sample_tokens, self.cfg.max_boxes_per_sample, allow_empty_attribute,
                                   self.workers, self.box_filter, self.gt.sample_tokens, timer)
        if chunked is None:
            with timer.stage("submission"):
                pred = read_submission_stream(path, self.gt.sample_tokens, self.cfg.max_boxes_per_sample,
                                              allow_empty_attribute)
            return self._evaluate_predictions(pred, timer)
        return evaluate_by_class(self._gt_by_class, chunked.by_class, len(self.gt.sample_tokens), self.cfg,
                                 chunked.meta, timer)

    def evaluate_dict(self, submission: dict, allow_empty_attribute: bool = False) -> EvalResult:
        """Validate and evaluate an in-memory submission ``{"meta": ..., "results": ...}``."""
        timer = StageTimer()
        with timer.stage("submission"):
            pred = submission_from_dict(submission, self.gt.sample_tokens, self.cfg.max_boxes_per_sample,
                                        allow_empty_attribute)
        return self._evaluate_predictions(pred, timer)

    def evaluate_predictions(self, pred: PredictionBoxes) -> EvalResult:
        return self._evaluate_predictions(pred, StageTimer())

    def _evaluate_predictions(self, pred: PredictionBoxes, timer: StageTimer) -> EvalResult:
        with timer.stage("pred_filter"):
            pred_by_class = _filtered_by_class(prediction_columns(pred, self.gt), self.box_filter)
        return evaluate_by_class(self._gt_by_class, pred_by_class, len(self.gt.sample_tokens), self.cfg,
                                 pred.meta, timer)


def write_metrics(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics_summary.json`` and ``metrics_details.json`` atomically (devkit file names)."""
    from bevperc.utils.io import atomic_write_json

    out_dir = Path(out_dir)
    summary = atomic_write_json(out_dir / "metrics_summary.json", to_jsonable(result.summary))
    details = atomic_write_json(out_dir / "metrics_details.json", result.details())
    return summary, details


def to_jsonable(obj: Any) -> Any:
    """NumPy scalars -> floats, float dict keys -> their str() (as json.dump writes the devkit's)."""
    if isinstance(obj, dict):
        return {(str(k) if isinstance(k, float) else k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
