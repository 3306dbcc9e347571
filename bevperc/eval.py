"""``python -m bevperc.eval``: nuScenes detection evaluation with the fast exact evaluator or the devkit.

Evaluate a submission file::

    python -m bevperc.eval --results results_nusc.json --dataroot data/nuscenes \\
        --version v1.0-mini --split mini_val --evaluator fast --out work/eval

Predict with a trained model first, then evaluate (needs ``bevperc.inference.predict_split``)::

    python -m bevperc.eval --config configs/bev.yaml --checkpoint work/ckpt.pt --dataroot data/nuscenes \\
        --version v1.0-mini --split mini_val --out work/eval

or with the model exported by ``python -m bevperc.export`` (run by onnxruntime, same decoding)::

    python -m bevperc.eval --config configs/bev.yaml --onnx bev.onnx --split mini_val --out work/eval_onnx

Writes ``metrics_summary.json`` and ``metrics_details.json`` (devkit layout) into ``--out`` and prints
the metrics table. Both evaluators give the same numbers; ``fast`` is the one to use during training.
``--engine`` is the old spelling of ``--evaluator`` and still accepted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ERR_NAMES = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bevperc.eval", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_argument_group("what to evaluate (either --results, or --config with --checkpoint or --onnx)")
    source.add_argument("--results", type=Path, help="submission JSON file (nuScenes detection format)")
    source.add_argument("--config", type=Path, help="model config YAML (predicts the split first)")
    source.add_argument("--checkpoint", type=Path, help="model checkpoint for --config")
    source.add_argument("--onnx", type=Path, help="ONNX model from python -m bevperc.export, for --config (instead of --checkpoint)")
    parser.add_argument("--dataroot", type=Path, default=None,
                        help="nuScenes root (holds <version>/*.json); with --config defaults to data.dataroot")
    parser.add_argument("--version", default=None, help="dataset version (default: data.version with --config, else v1.0-mini)")
    parser.add_argument("--split", default=None, help="evaluation split (default: data.val_split with --config, else mini_val)")
    parser.add_argument("--figures", type=int, default=None,
                        help="with --config: draw this many best and worst samples (default: eval.figures)")
    parser.add_argument("--evaluator", "--engine", dest="evaluator", choices=("fast", "devkit"), default=None,
                        help="fast: bevperc's vectorised exact evaluator; devkit: nuscenes DetectionEval "
                             "(default: eval.evaluator with --config, else fast; --engine: the old spelling)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the metrics JSON files")
    parser.add_argument("--render-curves", action="store_true", help="also write the devkit's PR/TP plots")
    parser.add_argument("--allow-empty-attribute", action="store_true",
                        help="accept attribute_name '' for classes that have attributes")
    parser.add_argument("--gt-cache", type=Path, default=None, help="fast evaluator: folder for a GT .npz cache")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("overrides", nargs="*", help="with --config: section.field=value config overrides")
    return parser


def _load_config(args: argparse.Namespace) -> Any:
    """The run config with CLI overrides; --dataroot/--version/--split default from it."""
    from bevperc.config import load_run_config

    if not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    overrides = list(args.overrides)
    # The dataset to predict is the one being evaluated.
    if args.dataroot is not None:
        overrides.append(f"data.dataroot={args.dataroot}")
    if args.version is not None:
        overrides.append(f"data.version={args.version}")
    cfg = load_run_config(args.config, overrides)
    args.dataroot, args.version = Path(cfg.data.dataroot), cfg.data.version
    args.split = args.split or cfg.data.val_split
    return cfg


def _predict(cfg: Any, args: argparse.Namespace) -> Path:
    """Predict ``args.split`` with ``bevperc.inference.predict_split``; returns the submission path."""
    from bevperc.inference import predict_split

    out_json = args.out / f"results_{args.split}.json"
    predict_split(cfg, args.checkpoint, args.split, out_json, onnx=args.onnx)
    if not out_json.is_file():
        raise FileNotFoundError(f"predict_split did not write {out_json}")
    return out_json


def _write_figures(cfg: Any, args: argparse.Namespace, results: Path, count: int) -> list[Path]:
    """Figures of the ``count`` best and worst samples, ranked by a per-sample detection F1.

    The ranking uses the submission already written (global frame) against the GT of the info
    file, so only the drawn samples are run through the model again.
    """
    import json

    import numpy as np

    from bevperc.data.classes import CLASS_INDEX
    from bevperc.data.dataset import NuScenesBEVDataset
    from bevperc.geometry import transform_boxes
    from bevperc.inference import load_detector
    from bevperc.viz import sample_quality, write_sample_figures
    from bevperc.viz.inference import predict_sample

    dataset = NuScenesBEVDataset(cfg.data, args.split, train=False)
    predictions = json.loads(results.read_text())["results"]
    scores = []
    for index, sample in enumerate(dataset.samples):
        gt = np.asarray(sample["gt"]["boxes"], dtype=np.float64).reshape(-1, 9)
        keep = np.asarray(sample["gt"]["num_lidar_pts"]) > 0 if len(gt) else np.zeros(0, bool)
        gt_global = transform_boxes(np.asarray(sample["global_from_ego"]), gt[keep])
        gt_labels = np.array([CLASS_INDEX[n] for n, k in zip(sample["gt"]["names"], keep) if k], dtype=np.int64)
        boxes = predictions.get(sample["token"], [])
        pred = np.array([[*b["translation"], *b["size"], 0.0, 0.0, 0.0] for b in boxes]).reshape(-1, 9)
        pred_scores = np.array([b["detection_score"] for b in boxes], dtype=np.float64)
        pred_labels = np.array([CLASS_INDEX[b["detection_name"]] for b in boxes], dtype=np.int64)
        scores.append(sample_quality(gt_global, gt_labels, pred, pred_scores, pred_labels))
    order = np.argsort(scores, kind="stable")
    picks = [("worst", i) for i in order[:count]] + [("best", i) for i in order[::-1][:count]]
    model = load_detector(cfg, args.checkpoint)
    written = []
    for rank, (kind, index) in enumerate(picks):
        prediction = predict_sample(model, dataset, int(index))
        token = dataset.samples[int(index)]["token"]
        paths = write_sample_figures(
            args.out / "figures", **prediction.figure_kwargs(), prefix=f"{kind}_{rank % count:02d}_",
            title=f"{kind} sample {token} (detection F1 {scores[int(index)]:.2f})",
        )
        written.extend(Path(p) for p in paths.values())
    return written


def evaluate(results: Path, dataroot: Path, version: str, split: str, evaluator: str, out: Path,
             render_curves: bool = False, allow_empty_attribute: bool = False, gt_cache: Path | None = None,
             verbose: bool = False) -> dict[str, Any]:
    """Evaluate a submission with one evaluator (``"fast"`` or ``"devkit"``); writes the metrics JSON files
    into ``out``; returns the summary."""
    if evaluator == "devkit":
        from bevperc.evaluation.devkit_eval import run_devkit_eval

        return run_devkit_eval(results, dataroot, version, split, out, allow_empty_attribute=allow_empty_attribute,
                               render_curves=render_curves, verbose=verbose)
    from bevperc.evaluation.fast_eval import FastDetectionEval, to_jsonable, write_metrics

    fast = FastDetectionEval(dataroot, version, split, cache_dir=gt_cache, verbose=verbose)
    result = fast.evaluate_file(results, allow_empty_attribute=allow_empty_attribute)
    write_metrics(result, out)
    if render_curves:
        _render_fast(result, fast, out)
    return to_jsonable(result.summary)


def _render_fast(result: Any, evaluator: Any, out: Path) -> None:
    """The devkit's plots from the fast evaluator's curves (same functions as DetectionEval.render)."""
    from nuscenes.eval.detection.data_classes import DetectionConfig, DetectionMetricDataList, DetectionMetrics
    from nuscenes.eval.detection.render import class_pr_curve, class_tp_curve, dist_pr_curve, summary_plot

    cfg = DetectionConfig.deserialize(evaluator.cfg.to_dict())
    md_list = DetectionMetricDataList()
    for (name, th), md in result.metric_data.items():
        md_list.set(name, th, md.to_devkit())
    metrics = DetectionMetrics(cfg)
    for name, aps in result.summary["label_aps"].items():
        for th, ap in aps.items():
            metrics.add_label_ap(name, th, ap)
    for name, tps in result.summary["label_tp_errors"].items():
        for metric, value in tps.items():
            metrics.add_label_tp(name, metric, value)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    path = lambda name: str(plot_dir / f"{name}.pdf")  # noqa: E731
    summary_plot(md_list, metrics, min_precision=cfg.min_precision, min_recall=cfg.min_recall,
                 dist_th_tp=cfg.dist_th_tp, savepath=path("summary"))
    for name in cfg.class_names:
        class_pr_curve(md_list, metrics, name, cfg.min_precision, cfg.min_recall, savepath=path(name + "_pr"))
        class_tp_curve(md_list, metrics, name, cfg.min_recall, cfg.dist_th_tp, savepath=path(name + "_tp"))
    for th in cfg.dist_ths:
        dist_pr_curve(md_list, metrics, th, cfg.min_precision, cfg.min_recall, savepath=path(f"dist_pr_{th}"))


def format_summary(summary: dict[str, Any]) -> str:
    """The devkit's printout as a markdown table."""
    lines = [f"mAP: {summary['mean_ap']:.4f}"]
    lines += [f"{ERR_NAMES[k]}: {v:.4f}" for k, v in summary["tp_errors"].items()]
    lines += [f"NDS: {summary['nd_score']:.4f}", f"Eval time: {summary['eval_time']:.1f}s", ""]
    lines.append("| Object Class | AP | ATE | ASE | AOE | AVE | AAE |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, ap in summary["mean_dist_aps"].items():
        tp = summary["label_tp_errors"][name]
        lines.append(f"| {name} | {ap:.3f} | " + " | ".join(
            f"{tp[m]:.3f}" for m in ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model_given = args.checkpoint is not None or args.onnx is not None
    if args.results is not None and (args.config is not None or model_given):
        parser.error("give either --results, or --config with --checkpoint or --onnx, not both")
    if args.results is None and (args.config is None or not model_given):
        parser.error("give --results FILE, or --config and --checkpoint (or --onnx) to predict the split first")
    if args.checkpoint is not None and args.onnx is not None:
        parser.error("give --checkpoint or --onnx, not both")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg = None
    try:
        if args.results is None:
            cfg = _load_config(args)
            results = _predict(cfg, args)
        else:
            if args.overrides:
                parser.error("config overrides need --config")
            if args.dataroot is None:
                parser.error("--results needs --dataroot")
            results = args.results
        version, split = args.version or "v1.0-mini", args.split or "mini_val"
        args.evaluator = args.evaluator or (cfg.eval.evaluator if cfg is not None else "fast")
        summary = evaluate(results, args.dataroot, version, split, args.evaluator, args.out,
                           render_curves=args.render_curves, allow_empty_attribute=args.allow_empty_attribute,
                           gt_cache=args.gt_cache, verbose=args.verbose)
    except (ValueError, OSError) as exc:  # SubmissionError, ConfigError, DataError, CheckpointError; file errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    figures = args.figures if args.figures is not None else (cfg.eval.figures if cfg is not None else 0)
    if args.onnx is not None and figures > 0:
        print("figures: not drawn for --onnx (they need the PyTorch model's BEV features); use --checkpoint")
    elif cfg is not None and figures > 0:
        written = _write_figures(cfg, args, results, figures)
        print(f"figures of the {figures} best and worst samples: {args.out / 'figures'} ({len(written)} files)")
    print(f"\nevaluator={args.evaluator}  total {time.perf_counter() - started:.1f} s  ->  "
          f"{args.out / 'metrics_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
