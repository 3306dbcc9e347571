"""Write bevperc info files (JSON) for the splits of a nuScenes root, real or synthetic.

    python data_tools/create_infos.py --dataroot data/synthetic-nuscenes --version v1.0-mini
    python data_tools/create_infos.py --dataroot /data/nuscenes --version v1.0-trainval --splits train val
"""

from __future__ import annotations

import argparse
import logging
import sys

from bevperc.data.infos import DataError, create_infos

DEFAULT_SPLITS = {"v1.0-mini": ["mini_train", "mini_val"], "v1.0-trainval": ["train", "val"], "v1.0-test": ["test"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", required=True, help="nuScenes root holding <version>/ tables and samples/")
    parser.add_argument("--version", default="v1.0-mini")
    parser.add_argument("--splits", nargs="+", help="devkit split names (default: all splits of the version)")
    parser.add_argument("--out-dir", help="where to write bevperc_infos_<split>.json (default: dataroot)")
    parser.add_argument("--strict", action="store_true",
                        help="annotations of a category nuScenes does not know are an error (default: a warning)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    splits = args.splits or DEFAULT_SPLITS.get(args.version)
    if not splits:
        parser.error(f"no default splits for version {args.version!r}; pass --splits")
    try:
        written = create_infos(args.dataroot, args.version, splits, args.out_dir, strict=args.strict)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
