"""Run the official nuScenes devkit detection evaluation (``DetectionEval``, ``detection_cvpr_2019``)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from bevperc.evaluation.fast_eval import to_jsonable
from bevperc.evaluation.ground_truth import _check_split
from bevperc.evaluation.submission import read_submission
from bevperc.utils.io import atomic_write_json


def split_sample_tokens(nusc: Any, split: str) -> list[str]:
    """Sample tokens of a predefined split, in the devkit's order (``load_gt``)."""
    from nuscenes.utils.splits import create_splits_scenes

    scene_names = set(create_splits_scenes()[split])
    scene_name = {s["token"]: s["name"] for s in nusc.scene}
    return [s["token"] for s in nusc.sample if scene_name[s["scene_token"]] in scene_names]


def run_devkit_eval(results_path: str | Path, dataroot: str | Path, version: str, split: str, out_dir: str | Path,
                    nusc: Any = None, config_name: str = "detection_cvpr_2019", validate: bool = True,
                    allow_empty_attribute: bool = False, render_curves: bool = False, verbose: bool = False
                    ) -> dict[str, Any]:
    """Evaluate ``results_path`` with ``nuscenes.eval.detection.evaluate.DetectionEval``.

    Writes ``metrics_summary.json`` (with ``meta``) and ``metrics_details.json`` atomically into
    ``out_dir`` (plots in ``out_dir/plots`` when ``render_curves``) and returns the summary dict
    (``DetectionMetrics.serialize()`` + ``meta``). ``validate`` first runs the strict submission checks
    of :mod:`bevperc.evaluation.submission` so that a bad file fails with a clear message instead of a
    bare devkit assertion. ``nusc``: an existing ``NuScenes`` instance to reuse. A split that is not a
    devkit split of ``version``, or a table the devkit cannot read, is a ``ValueError`` naming it.
    """
    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    _check_split(version, split)  # the fast evaluator's check: the devkit would raise a bare KeyError
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if nusc is None:
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        try:
            with quiet:
                nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=verbose)
        except (AssertionError, ValueError):  # a missing folder or unreadable table: the devkit does not say which
            from bevperc.data.infos import validate_tables

            validate_tables(dataroot, version)  # raises a DataError naming the file
            raise
    cfg = config_factory(config_name)
    if validate:
        read_submission(results_path, split_sample_tokens(nusc, split), cfg.max_boxes_per_sample,
                        allow_empty_attribute)
    evaluator = DetectionEval(nusc, config=cfg, result_path=str(results_path), eval_set=split,
                              output_dir=str(out_dir), verbose=verbose)
    metrics, metric_data_list = evaluator.evaluate()
    if render_curves:
        evaluator.render(metrics, metric_data_list)
    summary = metrics.serialize()
    summary["meta"] = dict(evaluator.meta)
    summary = to_jsonable(summary)
    atomic_write_json(out_dir / "metrics_summary.json", summary)
    atomic_write_json(out_dir / "metrics_details.json", metric_data_list.serialize())
    return summary
