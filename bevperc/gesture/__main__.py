"""``python -m bevperc.gesture {synth,train,distill,eval,detect,export,demo}``.

Configs are YAML files of the dataclasses in ``bevperc.gesture.config`` plus ``--set a.b=value``
overrides (see configs/gesture_*.yaml). ``train`` and ``distill`` run ``bevperc.training.Trainer``:
``--resume`` continues a killed run, ``torchrun --nproc_per_node N -m bevperc.gesture train ...``
trains data-parallel. Bad input (a config, an annotation, an image, a checkpoint)
ends the command with exit code 2 and a message naming the file or field.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bevperc.utils.config import load_config


def _cmd_synth(args: argparse.Namespace) -> None:
    from bevperc.gesture.data import SyntheticGestureSpec, generate_synthetic_gestures

    spec = SyntheticGestureSpec(image_size=args.image_size)
    paths = generate_synthetic_gestures(args.out, args.num_train, args.num_test, args.seed, spec, progress=True)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


def _cmd_train(args: argparse.Namespace) -> None:
    from bevperc.gesture.config import GestureTrainConfig
    from bevperc.gesture.train import train_detector

    cfg = load_config(GestureTrainConfig, args.config, args.set)
    print(train_detector(cfg, args.out, resume=args.resume))


def _cmd_distill(args: argparse.Namespace) -> None:
    from bevperc.gesture.config import DistillConfig
    from bevperc.gesture.distill import distill_student

    cfg = load_config(DistillConfig, args.config, args.set)
    print(distill_student(cfg, args.out, resume=args.resume))


def _cmd_eval(args: argparse.Namespace) -> None:
    from bevperc.gesture.config import GestureDataConfig
    from bevperc.gesture.evaluate import evaluate_checkpoint
    from bevperc.utils.io import atomic_write_json

    data = load_config(GestureDataConfig, args.data_config, args.set)
    results = [evaluate_checkpoint(ckpt, data) for ckpt in args.checkpoints]
    for r in results:
        print(f"{r['checkpoint']}: mAP50={r['mAP50']:.4f} mAP={r['mAP']:.4f} ({r['num_images']} images)")
    if args.json:
        atomic_write_json(args.json, results)


def _cmd_detect(args: argparse.Namespace) -> None:
    from bevperc.gesture.detect import detect_folder

    report = detect_folder(args.checkpoint, args.images, args.out, args.score_threshold, pattern=args.pattern)
    n = sum(len(v) for v in report.values())
    print(f"{len(report)} images, {n} detections -> {Path(args.out) / 'detections.json'}")


def _cmd_export(args: argparse.Namespace) -> None:
    from bevperc.gesture.export import export_onnx

    report = export_onnx(args.checkpoint, args.out, atol=args.atol)
    print(json.dumps(report["max_abs_diff"]), "->", report["onnx"])


def _cmd_demo(args: argparse.Namespace) -> None:
    from bevperc.gesture.demo import default_jobs, run_demo, summary_table

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    summary = run_demo(args.out, num_train=args.num_train, num_test=args.num_test, epochs=args.epochs,
                       jobs=default_jobs() if args.jobs is None else args.jobs, threads=args.threads)
    print(json.dumps(summary, indent=2))
    print(summary_table(summary))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bevperc.gesture", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic HaGRID-format gesture set")
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    for name, helptext, func in (("train", "train a detector (student or teacher) on labels", _cmd_train),
                                 ("distill", "distil a student from frozen teachers", _cmd_distill)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", help="YAML config (configs/gesture_*.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.epochs=5")
        p.add_argument("--out", required=True, help="run directory (model.pt, history.json, engine_summary.json, "
                                                    "train.log, tensorboard/, checkpoints/)")
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints (after a kill)")
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="COCO mAP@0.5 and mAP@[0.5:0.95] of checkpoints")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data-config", help="YAML of GestureDataConfig (the test split)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="write results here")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("detect", help="detect gestures in an image folder")
    p.add_argument("checkpoint")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--pattern", default="*", help="file-name glob, e.g. 'test_*'")
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser("export", help="export to ONNX and check against onnxruntime")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="path of the .onnx file")
    p.add_argument("--atol", type=float, default=1e-4)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="synthetic set -> teachers -> distil -> eval -> detect -> export")
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=240, help="as bench/distill.py (default 240)")
    p.add_argument("--num-test", type=int, default=80, help="as bench/distill.py (default 80)")
    p.add_argument("--epochs", type=int, default=40, help="as bench/distill.py (default 40)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on a busy shared CPU)")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes for the four trainings (default: the usable CPU cores, at most 2; the result "
                        "does not depend on it)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bevperc.training.checkpoint import WorkDirLocked
    from bevperc.training.distributed import cleanup_distributed

    start = time.perf_counter()
    try:
        args.func(args)
    except (ValueError, OSError, WorkDirLocked) as err:  # ConfigError, AnnotationError, CheckpointError; files
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()  # train/distill under torchrun
    print(f"[{args.command}] done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
