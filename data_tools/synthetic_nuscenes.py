#!/usr/bin/env python
"""Generate a synthetic nuScenes dataset that the real devkit loads.

Examples::

    # the demo set: the 10 mini scenes, 40 keyframes each, images + LiDAR
    python data_tools/synthetic_nuscenes.py --out data/nuscenes-synthetic --version v1.0-mini --seed 0
    # many short scenes: 96 train + 24 val scenes of 5 keyframes (more distinct scenes per rendered frame)
    python data_tools/synthetic_nuscenes.py --out data/synth --version v1.0-trainval --train-scenes 96 --val-scenes 24 --samples-per-scene 5
    # a 6000-sample tables-only set (the 150 real val scene names) for evaluator benchmarks
    python data_tools/synthetic_nuscenes.py --out data/synth-trainval --version v1.0-trainval --no-images --no-lidar

See the package bevperc/synthetic/ for the world (bevperc/synthetic/config.py: the meaning of every option).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bevperc.synthetic import SyntheticConfig, generate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root to create (must be empty unless --overwrite)")
    parser.add_argument("--version", default=defaults.version, choices=["v1.0-mini", "v1.0-trainval"])
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--samples-per-scene", type=int, default=defaults.samples_per_scene,
                        help="keyframes per scene (2 Hz)")
    parser.add_argument("--split", default=None,
                        help="keep only the scenes of this devkit split, e.g. mini_val (a held-out world for evaluation)")
    parser.add_argument("--num-scenes", type=int, default=None, help="keep only the first N scenes of the version")
    parser.add_argument("--include-train", action="store_true",
                        help="trainval: also generate the 700 train scenes (default: the 150 val scenes only)")
    parser.add_argument("--train-scenes", type=int, default=None,
                        help="trainval: generate only the first N of the 700 train scenes (implies --include-train)")
    parser.add_argument("--val-scenes", type=int, default=None,
                        help="trainval: generate only the first N of the 150 val scenes")
    parser.add_argument("--objects-per-sample", type=float, default=defaults.objects_per_sample,
                        help="target mean number of annotations within 50 m of the ego")
    parser.add_argument("--no-images", action="store_true", help="do not render camera JPEGs (tables only)")
    parser.add_argument("--no-lidar", action="store_true",
                        help="do not ray cast LiDAR sweeps (num_lidar_pts estimated analytically)")
    parser.add_argument("--tables-only", action="store_true", help="same as --no-images --no-lidar")
    parser.add_argument("--render-scale", type=float, default=defaults.render_scale,
                        help="render at this fraction of 1600x900, then resize")
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--annotation-radius", type=float, default=defaults.annotation_radius)
    parser.add_argument("--no-bicycle-racks", action="store_true")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes (one scene per task)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        generate(
            args.out, version=args.version, seed=args.seed, progress=not args.quiet,
            samples_per_scene=args.samples_per_scene, num_scenes=args.num_scenes, split=args.split,
            include_train=args.include_train, train_scenes=args.train_scenes, val_scenes=args.val_scenes,
            objects_per_sample=args.objects_per_sample,
            images=not (args.no_images or args.tables_only), lidar=not (args.no_lidar or args.tables_only),
            render_scale=args.render_scale, jpeg_quality=args.jpeg_quality,
            annotation_radius=args.annotation_radius, bicycle_racks=not args.no_bicycle_racks,
            workers=args.workers, overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
