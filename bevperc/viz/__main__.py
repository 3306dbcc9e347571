"""``python -m bevperc.viz``: write the figures of one sample (cameras, BEV, depth, 3D LiDAR), and a run's curves.

A ``--checkpoint`` written by the trainer also gives ``training_curves.png``: loss per step,
learning rate and the in-training validation metrics (``train.val_every``) from its history.

Examples::

    # a trained model on one sample of the validation split
    python -m bevperc.viz --config outputs/demo/train/config.yaml \\
        --checkpoint outputs/demo/train/checkpoints/latest.pth --sample 3e8750f331d7499e9b5123e9eb70f2e7 --out figures/

    # training curves only (loss, learning rate, validation mAP/NDS) from a run's checkpoint
    python -m bevperc.viz --checkpoint outputs/demo/train/checkpoints/latest.pth --out figures/

    # the first validation sample, random weights (checks the plumbing), no 3D render, another data root
    python -m bevperc.viz --config configs/demo_cpu.yaml --index 0 --out figures/ --no-3d data.dataroot=/data/nuscenes

    # ground truth only, from an mmdet3d-style keyframe folder (e.g. the real nuScenes sample)
    python -m bevperc.viz --info-sample ../shared/data/nuscenes-real-sample --out figures/real

    # loss-engine figure from a saved LossEngine.summary() JSON
    python -m bevperc.viz --engine-summary outputs/demo/train/loss_engine.json --out figures/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("bevperc.viz")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bevperc.viz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", help="run config YAML (bevperc.config.Config, e.g. a run's config.yaml)")
    parser.add_argument("--checkpoint", help="training checkpoint (weights_only load; EMA weights when eval.use_ema); "
                                             "with a training history it also gives training_curves.png")
    parser.add_argument("--sample", help="sample token (default: --index)")
    parser.add_argument("--index", type=int, default=0, help="sample index when no --sample token is given")
    parser.add_argument("--split", help="info split to read (default: the config's data.val_split)")
    parser.add_argument("--dataroot", help="override data.dataroot of the config")
    parser.add_argument("--info-sample", help="folder with an mmdet3d-style sample_info.json: GT figures, no model")
    parser.add_argument("--engine-summary", help="LossEngine.summary() JSON: write loss_engine.png")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="predictions below are not drawn")
    parser.add_argument("--depth-cameras", default="1", help="comma-separated camera indices for depth figures")
    parser.add_argument("--no-3d", action="store_true", help="skip the .ply files and the 3D render")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dpi", type=int, default=90)
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides of --config (e.g. data.dataroot=...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if not (args.config or args.info_sample or args.engine_summary or args.checkpoint):
        build_parser().error("give --config (model + dataset), --info-sample, --engine-summary or --checkpoint "
                             "(training curves)")
    if args.overrides and not args.config:
        build_parser().error(f"config overrides {args.overrides} need --config")
    try:
        written = write_figures(args, out)
    except (ValueError, OSError) as err:  # DataError, ConfigError, CheckpointError; missing or unreadable files
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def write_figures(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """The figures the arguments ask for, written into ``out``: name -> path."""
    from bevperc.viz.figures import save_figure, write_sample_figures

    written: dict[str, Path] = {}
    if args.engine_summary:
        from bevperc.viz.loss_engine import plot_loss_engine

        try:
            summary = json.loads(Path(args.engine_summary).read_text(encoding="utf-8"))
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"--engine-summary {args.engine_summary}: not a JSON file ({err})") from None
        summary = summary.get("loss_engine", summary)  # accept a wrapper dict with the summary under loss_engine
        written["loss_engine"] = save_figure(plot_loss_engine(summary, title=Path(args.engine_summary).name),
                                             out / "loss_engine.png", args.dpi)  # fmt: skip

    if args.checkpoint:
        from bevperc.training.checkpoint import load_checkpoint
        from bevperc.viz.training import history_from_checkpoint, plot_training_curves

        history = history_from_checkpoint(load_checkpoint(args.checkpoint))
        if history is not None:
            written["training_curves"] = save_figure(plot_training_curves(history, title=args.checkpoint),
                                                     out / "training_curves.png", args.dpi)  # fmt: skip
        elif not args.config:
            raise SystemExit(f"--checkpoint {args.checkpoint}: no training history in it (not written by the trainer)")
        else:
            log.info("%s holds no training history: no training_curves.png", args.checkpoint)

    if args.info_sample:
        from bevperc.viz.samples import load_info_sample

        sample = load_info_sample(args.info_sample)
        written.update(
            write_sample_figures(
                out, sample.images, sample.intrinsics, sample.ego_from_camera, sample.gt_boxes, sample.gt_labels,
                None, None, None, lidar_points=sample.lidar_points, title=f"sample {sample.sample_token} (GT)",
                with_3d=not args.no_3d, dpi=args.dpi, prefix="info_",
            )  # fmt: skip
        )

    if args.config:
        import torch

        from bevperc.viz.inference import find_sample_index, load_model_and_data, predict_sample

        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        model, dataset = load_model_and_data(args.config, args.checkpoint, args.split, args.dataroot, args.overrides)
        model.to(args.device)
        index = find_sample_index(dataset, args.sample) if args.sample else args.index
        if not 0 <= index < len(dataset):
            raise SystemExit(f"--index {index}: dataset {dataset.info_path} has {len(dataset)} samples")
        prediction = predict_sample(model, dataset, index, args.device)
        for note in prediction.notes:
            log.warning(note)
        title = f"sample {prediction.sample_token}" + ("" if args.checkpoint else " (random weights: no --checkpoint)")
        depth_cameras = [int(c) for c in args.depth_cameras.split(",") if c.strip()]
        written.update(
            write_sample_figures(
                out, **prediction.figure_kwargs(), depth_cameras=depth_cameras, score_threshold=args.score_threshold,
                title=title, with_3d=not args.no_3d, dpi=args.dpi,
            )  # fmt: skip
        )
        if len(prediction.heatmaps):
            from bevperc.viz.bev import plot_heatmap_grid

            written["heatmaps"] = save_figure(
                plot_heatmap_grid(prediction.heatmaps, prediction.heatmap_class_names, prediction.bev_range, title),
                out / "heatmaps.png", args.dpi,
            )  # fmt: skip
    return written


if __name__ == "__main__":
    sys.exit(main())
