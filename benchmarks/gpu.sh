#!/usr/bin/env bash
# End to end on one CUDA GPU: segment and label the demo mosaic at 16384^2 (about 260k
# superpixels at region size 32) with an untrained ResNet-50 (128-d, 64 px crops) in bf16
# autocast, channels_last (`superdml label --device cuda`, --precision auto), against the
# fastest bare forward of the same model on the GPU; and the kNN search on the GPU over
# 1M references against torch.mm + topk. Prints benchmarks/run.py's table: segment MP/s,
# label superpixels/s with the GPU utilisation nvidia-smi sampled while labeling, the
# bare forwards, and the kNN queries/s.
#
# Not yet measured whole: on the H200 lent on 2026-12-04 a run at 8192^2 did not finish
# within 330 s (the mosaic was then drawn on one core); see benchmarks/README.md.
#
# Usage: benchmarks/gpu.sh [--json FILE] [--workdir DIR] [other benchmarks/run.py options]
# Environment: PYTHON (default: python), CUDA_VISIBLE_DEVICES (the one GPU to use).
# Needs about 24 GiB of RAM: the demo mosaic is drawn in memory before it is written.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: $PYTHON sees no CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Label tiles of 2048 px and batches of 1024 crops keep the GPU fed; the segment row has
# no skimage baseline here (one slic call on 268 MP would take most of an hour).
exec "$PYTHON" benchmarks/run.py \
    --device cuda \
    --size 16384 \
    --backbone resnet50 \
    --batch-size 1024 \
    --tile-size 2048 \
    --refs 1000000 \
    --stages label knn \
    "$@"
