#!/usr/bin/env bash
# GPU checks of the BEV detector in one run (well inside 15 minutes on one H100/H200-class GPU):
#   1. training throughput of configs/bevdet_r50_256x704.yaml (random init: no weights download),
#      fp32 and bf16 autocast: samples/s and peak GPU memory (bench/train_speed.py);
#   2. BEV pooling forward + backward at 256x704, 6 cameras, 59 bins, 128x128 grid, against
#      BEVPoolv2's published 0.82 ms on an RTX 3090 (bench/bev_pool.py --device cuda).
# Data: a tiny synthetic trainval world (2 train scenes) generated here; throughput is measured on
# one real batch, data loading excluded. Results go to $OUT (default bench/results/gpu).
#
#   bash bench/gpu_check.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
OUT="${OUT:-bench/results/gpu}"
WORLD="${WORLD:-/tmp/bevperc-gpu-world}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ ! -f "$WORLD/bevperc_infos_train.json" ]; then
  "$PY" data_tools/synthetic_nuscenes.py --out "$WORLD" --version v1.0-trainval --train-scenes 2 --val-scenes 1 \
    --samples-per-scene 4 --workers 8 --quiet --overwrite
  "$PY" data_tools/create_infos.py --dataroot "$WORLD" --version v1.0-trainval --splits train val
fi
R50="configs/bevdet_r50_256x704.yaml"
common=(data.dataroot="$WORLD" model.backbone.pretrained=false train.batch_size=8)
"$PY" bench/train_speed.py --config "$R50" --device cuda --threads 8 --rounds 3 --steps 20 --warmup 5 \
  --json "$OUT/train_speed_r50.json" --variant r50-256x704-fp32 "train.amp=false" \
  --variant r50-256x704-bf16 "train.amp=true train.amp_dtype=bfloat16" "${common[@]}" | tee "$OUT/train_speed_r50.md"
"$PY" bench/bev_pool.py --device cuda --repeats 20 | tee "$OUT/bev_pool_cuda.md"
echo "BEVPoolv2 (published, RTX 3090, 256x704): 0.82 ms forward+backward" | tee -a "$OUT/bev_pool_cuda.md"
