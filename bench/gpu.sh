#!/usr/bin/env bash
# The side-by-side benchmark on a CUDA GPU (not part of CI). Run from the repository root on a
# machine with an NVIDIA GPU and this project installed (.venv with a CUDA build of torch):
#
#   bench/gpu.sh [PHOTOS_DIR]        # default: ../shared/data/labeled_photos
#
# Runs fp32 and fp16 (and bf16 where the GPU has it) with every method on the GPU, and writes
# bench/gpu-<precision>.json next to the printed tables. gpl's plan is measured for the GPU first
# (gpl tune --device cuda): batch sizes up to 256, NCHW and channels-last.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${1:-../shared/data/labeled_photos}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Decoding runs on the CPU: give the GPU as many decoding workers as there are spare cores.
WORKERS=${WORKERS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))}
precisions="fp32 fp16"
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_bf16_supported() else 1)'; then
  precisions="$precisions bf16"
fi
for p in $precisions; do
  echo "== precision $p"
  "$PY" bench/bench_embed.py "$DATA" --device cuda --precision "$p" --workers "$WORKERS" \
    --rounds "${ROUNDS:-3}" --large "${LARGE:-1000}" --json "bench/gpu-$p.json"
done
