#!/usr/bin/env bash
# GPU checks for the day a device is lent: one GPU, no network, after the README's setup (`make setup`).
# Builds synthetic shards locally, then runs bench/gpu_checks.py (throughput of resnet50 and resnet50w2
# with 2x224+6x96, bf16, channels_last, augment_on: device; SyncBN over nccl; host syncs per step;
# pinned memory) and writes bench/results/gpu-<date>.json. Budget: under 8 minutes on one H100/H200.
#   bash bench/gpu.sh            # on the GPU machine
#   bash bench/gpu.sh --smoke    # the same script on CPU at toy sizes (what CI-like machines can test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ "${1:-}" != "--smoke" ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  export DS_ACCELERATOR=cuda
else
  export DS_ACCELERATOR=cpu
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
timeout 480 "$PY" bench/gpu_checks.py "$@"
