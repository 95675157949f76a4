#!/usr/bin/env bash
# Labeling throughput on one CUDA GPU: `superdml label` with a ResNet-50 in bf16 autocast
# (channels_last) against a bare bf16 forward loop of the same model, and the peak RSS of
# a raster 4x larger. Prints the same table as the CPU run of benchmarks/label.py (plus
# the peak CUDA memory of each case); see benchmarks/README.md, section "label".
#
# Usage: benchmarks/gpu_label.sh [extra benchmarks/label.py options, e.g. --out DIR]
# Environment: PYTHON (default: python), THREADS (torch threads of every case, default 8),
# CUDA_VISIBLE_DEVICES (the one GPU to use).
#
# Sizes: 4096^2 and 8192^2 at region size 32 (about 16k and 65k superpixels), label tiles
# of 2048 px (4 and 16 tiles), batches of 1024 crops. Each label case first labels a
# 256^2 raster, untimed (--warm), so CUDA initialization and the model load stay out of
# the figure. The rasters are segmented beforehand on a local dask cluster with one worker
# per core (untimed). Expect a few minutes on a 16-core machine.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
THREADS=${THREADS:-8}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: $PYTHON sees no CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

exec "$PYTHON" benchmarks/label.py \
    --device cuda \
    --backbone resnet50 \
    --sizes 4096 8192 \
    --tile-size 2048 \
    --batch-size 1024 \
    --threads "$THREADS" \
    --segment-workers "$(nproc)" \
    --warm \
    "$@"
