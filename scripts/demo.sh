#!/usr/bin/env bash
# The bevperc demo on a fresh machine: set up .venv, generate the synthetic nuScenes world,
# write info files, train the CPU demo detector, evaluate it with the real nuScenes devkit,
# and draw what it sees. Everything lands under $OUT (default outputs/demo).
# Idempotent: finished steps are skipped (training resumes from its latest checkpoint).
#
#   bash scripts/demo.sh                      # the whole demo
#   OUT=/tmp/run DATA=/data/nuscenes HELDOUT= bash scripts/demo.sh   # your nuScenes (v1.0-trainval, train/val)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
export MPLBACKEND=Agg
OUT="${OUT:-outputs/demo}"
DATA="${DATA:-data/nuscenes-synthetic-trainval}"
VERSION="${VERSION:-v1.0-trainval}"
CONFIG="${CONFIG:-configs/demo_cpu.yaml}"
TRAIN_SPLIT="${TRAIN_SPLIT:-train}"
VAL_SPLIT="${VAL_SPLIT:-val}"
# The synthetic world: many short scenes (real trainval scene names), rendered at the resolution the
# demo network reads (400x225 upscaled into the 1600x900 JPEGs; the input is 352 px wide).
WORLD="${WORLD:---train-scenes 120 --val-scenes 25 --samples-per-scene 4 --render-scale 0.25}"
# A second synthetic world (another seed, only its val scenes): the trained model must score
# about as well there as on the demo's own val split, i.e. it learned the world, not one world.
# HELDOUT= (empty) skips it, e.g. when DATA is real nuScenes.
HELDOUT="${HELDOUT-data/nuscenes-synthetic-trainval-seed1}"
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "1/6 data: synthetic nuScenes world in $DATA"
if [ -f "$DATA/$VERSION/scene.json" ]; then
  echo "found $DATA/$VERSION, skipping generation"
else
  # shellcheck disable=SC2086
  "$PY" data_tools/synthetic_nuscenes.py --out "$DATA" --version "$VERSION" --seed 0 $WORLD
fi
if [ ! -f "$DATA/bevperc_infos_${VAL_SPLIT}.json" ]; then
  "$PY" data_tools/create_infos.py --dataroot "$DATA" --version "$VERSION" --splits "$TRAIN_SPLIT" "$VAL_SPLIT"
fi

step "2/6 train $CONFIG -> $OUT/train"
"$PY" -m bevperc.train --config "$CONFIG" --work-dir "$OUT/train" --resume \
  data.dataroot="$DATA" data.version="$VERSION" data.train_split="$TRAIN_SPLIT" data.val_split="$VAL_SPLIT"

step "3/6 evaluate with the nuScenes devkit -> $OUT/eval"
"$PY" -m bevperc.eval --config "$CONFIG" --checkpoint "$OUT/train/checkpoints/latest.pth" --split "$VAL_SPLIT" \
  --evaluator devkit --out "$OUT/eval" data.dataroot="$DATA" data.version="$VERSION"

# The learning curve: the in-training validations (train.val_every) of this run, scored on the val split
# with the fast evaluator, whose metrics equal the devkit's (the numbers above come from the devkit itself).
"$PY" - "$OUT/train/train.log" <<'PY'
import os, re, sys
scores = {}  # epoch -> scores; the last line wins (a resumed run may validate an epoch again)
for line in open(sys.argv[1], encoding="utf-8") if os.path.isfile(sys.argv[1]) else []:
    match = re.search(r"validation after epoch (\d+): (.*)$", line)
    if match:
        scores[int(match.group(1))] = match.group(2).strip()
if scores:
    print("learning curve (in-training validation, fast evaluator = devkit metrics):")
    for epoch in sorted(scores):
        print(f"  after epoch {epoch}: {scores[epoch]}")
else:
    print("learning curve: no in-training validation in this run (train.val_every: 0)")
PY

if [ -n "$HELDOUT" ]; then
  step "4/6 held-out world: seed 1, val scenes only, in $HELDOUT -> $OUT/eval_heldout"
  if [ ! -f "$HELDOUT/$VERSION/scene.json" ]; then
    # shellcheck disable=SC2086
    "$PY" data_tools/synthetic_nuscenes.py --out "$HELDOUT" --version "$VERSION" --seed 1 --split "$VAL_SPLIT" $WORLD
  fi
  if [ ! -f "$HELDOUT/bevperc_infos_${VAL_SPLIT}.json" ]; then
    "$PY" data_tools/create_infos.py --dataroot "$HELDOUT" --version "$VERSION" --splits "$VAL_SPLIT"
  fi
  "$PY" -m bevperc.eval --config "$CONFIG" --checkpoint "$OUT/train/checkpoints/latest.pth" --split "$VAL_SPLIT" \
    --evaluator devkit --figures 0 --out "$OUT/eval_heldout" data.dataroot="$HELDOUT" data.version="$VERSION"
  "$PY" - "$OUT/eval/metrics_summary.json" "$OUT/eval_heldout/metrics_summary.json" <<'PY'
import json, sys
own, held = (json.load(open(path)) for path in sys.argv[1:3])
print(f"demo world val: mAP {own['mean_ap']:.4f} NDS {own['nd_score']:.4f} | "
      f"held-out world (seed 1): mAP {held['mean_ap']:.4f} NDS {held['nd_score']:.4f} | "
      f"difference mAP {100 * (held['mean_ap'] - own['mean_ap']):+.2f} pts, NDS {100 * (held['nd_score'] - own['nd_score']):+.2f} pts")
PY
fi

step "5/6 figures (sample, heatmaps, training_curves.png) -> $OUT/figures"
"$PY" -m bevperc.viz --config "$CONFIG" --checkpoint "$OUT/train/checkpoints/latest.pth" --split "$VAL_SPLIT" \
  --out "$OUT/figures" data.dataroot="$DATA" data.version="$VERSION"

step "6/6 gestures: dual-teacher distillation demo -> $OUT/gesture"
"$PY" -m bevperc.gesture demo --out "$OUT/gesture"

step "done. metrics: $OUT/eval/metrics_summary.json, figures: $OUT/figures, TensorBoard: tensorboard --logdir $OUT"
