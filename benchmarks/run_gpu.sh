#!/usr/bin/env bash
# KVSwap on a GPU (laptop GPU, Jetson board, server): the throughput benchmark's HF rows with the
# model on CUDA (KVSwap: hot tier and tail in GPU memory; disk tier and low-rank metadata in
# host memory) against HF's dense cache on the same GPU. Writes the same JSON (rows[]) and PNG
# as benchmarks/throughput.py; rows carry device and gpu_growth_mb.
#
#   benchmarks/run_gpu.sh [OUT.json] [more benchmarks.throughput flags]
#
# Environment: KVSWAP_GPU_MODEL (model folder; default: the prepared default model),
# KVSWAP_GPU_DEVICE (default cuda), KVSWAP_GPU_CONTEXT (default 2000,7000), KVSWAP_GPU_BATCH
# (default 4), KVSWAP_GPU_SYSTEMS (default hf-full,kvswap; also kvswap-prefetch,
# kvswap-noprefetch, llamacpp), PYTHON (default python3). Needs torch with CUDA and this package's dependencies
# (Jetson: NVIDIA's JetPack torch wheel; see docker/Dockerfile.jetson).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-results/throughput_gpu.json}")
shift || true
python=${PYTHON:-python3}
device=${KVSWAP_GPU_DEVICE:-cuda}
"$python" - "$device" <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"run_gpu.sh: torch {torch.__version__} sees no CUDA GPU; run benchmarks/throughput.py on the CPU instead")
print(f"run_gpu.sh: {torch.cuda.get_device_name(sys.argv[1])}, torch {torch.__version__}", file=sys.stderr)
PY
args=(--engine hf --device "$device" --context "${KVSWAP_GPU_CONTEXT:-2000,7000}" --batch "${KVSWAP_GPU_BATCH:-4}"
      --systems "${KVSWAP_GPU_SYSTEMS:-hf-full,kvswap}" --out "$out")
if [[ -n "${KVSWAP_GPU_MODEL:-}" ]]; then args+=(--model "$(realpath "$KVSWAP_GPU_MODEL")"); fi
mkdir -p "$(dirname "$out")"
cd "$repo"
exec "$python" -m benchmarks.throughput "${args[@]}" "$@"
