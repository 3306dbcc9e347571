"""Write a synthetic HaGRID-format gesture set (thin CLI over bevperc.gesture.data).

    python data_tools/synthetic_gestures.py --out data/gestures --num-train 400 --num-test 100 --seed 0

Layout: <out>/images/<class>/<id>.png, <out>/annotations/{train,test}/<class>.json (HaGRID JSON:
image id -> {"bboxes": normalised top-left [x, y, w, h], "labels", "user_id", ...}).
Deterministic per --seed. Classes differ by the orientation of a fine grating (period 4.4-5.2 px
at 128 px): clear at 128 px, weak but present at 64 px (about half its contrast survives the
resize, period 2.2-2.6 px just above the 2 px Nyquist limit; see ``cue_visibility`` in
bevperc/gesture/data.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from bevperc.gesture.data import SyntheticGestureSpec, generate_synthetic_gestures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128,
                        help="generated resolution (teacher 2's input for a 64 px student at L=2)")
    parser.add_argument("--max-hands", type=int, default=3)
    parser.add_argument("--no-gesture-prob", type=float, default=0.15)
    args = parser.parse_args(argv)
    spec = SyntheticGestureSpec(image_size=args.image_size, max_hands=args.max_hands, no_gesture_prob=args.no_gesture_prob)
    paths = generate_synthetic_gestures(args.out, args.num_train, args.num_test, args.seed, spec, progress=True)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
