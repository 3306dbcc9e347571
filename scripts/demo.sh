#!/usr/bin/env bash
# The bevperc demo on a fresh machine: set up .venv, generate the synthetic nuScenes world,
# write info files, train the CPU demo detector, evaluate it with the real nuScenes devkit,
# and draw what it sees. Everything lands under $OUT (default outputs/demo).
# Idempotent: finished steps are skipped (training resumes from its latest checkpoint).
#
#   bash scripts/demo.sh                      # the whole demo
#   OUT=/tmp/run DATA=/data/nuscenes VERSION=v1.0-trainval bash scripts/demo.sh   # your data
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
export MPLBACKEND=Agg
OUT="${OUT:-outputs/demo}"
DATA="${DATA:-data/nuscenes-synthetic}"
VERSION="${VERSION:-v1.0-mini}"
CONFIG="${CONFIG:-configs/demo_cpu.yaml}"
TRAIN_SPLIT="${TRAIN_SPLIT:-mini_train}"
VAL_SPLIT="${VAL_SPLIT:-mini_val}"
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "1/5 data: synthetic nuScenes world in $DATA"
if [ -f "$DATA/$VERSION/scene.json" ]; then
  echo "found $DATA/$VERSION, skipping generation"
else
  "$PY" data_tools/synthetic_nuscenes.py --out "$DATA" --version "$VERSION" --seed 0
fi
if [ ! -f "$DATA/bevperc_infos_${VAL_SPLIT}.json" ]; then
  "$PY" data_tools/create_infos.py --dataroot "$DATA" --version "$VERSION" --splits "$TRAIN_SPLIT" "$VAL_SPLIT"
fi

step "2/5 train $CONFIG -> $OUT/train"
"$PY" -m bevperc.train --config "$CONFIG" --work-dir "$OUT/train" --resume \
  data.dataroot="$DATA" data.version="$VERSION" data.train_split="$TRAIN_SPLIT" data.val_split="$VAL_SPLIT"

step "3/5 evaluate with the nuScenes devkit -> $OUT/eval"
"$PY" -m bevperc.eval --config "$CONFIG" --checkpoint "$OUT/train/checkpoints/latest.pth" --split "$VAL_SPLIT" \
  --engine devkit --out "$OUT/eval" data.dataroot="$DATA" data.version="$VERSION"

step "4/5 figures -> $OUT/figures"
"$PY" -m bevperc.viz --config "$CONFIG" --checkpoint "$OUT/train/checkpoints/latest.pth" --split "$VAL_SPLIT" \
  --out "$OUT/figures" data.dataroot="$DATA" data.version="$VERSION"

step "5/5 gestures: dual-teacher distillation demo -> $OUT/gesture"
"$PY" -m bevperc.gesture demo --out "$OUT/gesture"

step "done. metrics: $OUT/eval/metrics_summary.json, figures: $OUT/figures, TensorBoard: tensorboard --logdir $OUT"
