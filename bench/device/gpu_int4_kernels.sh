#!/usr/bin/env bash
# Runs on a lent GPU (issue 32): the 4-bit kernel table, bf16 vs tinygemm vs dequantize + cuBLAS
# vs the project's Triton W4A16 kernel on Qwen2.5-7B's 28 layers (bench/int4_kernels.py).
# Writes $OUT/int4_kernels.json. Expects torchao under .whl/ (the GPU image lacks it).
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
python3 -c "import triton; print('triton', triton.__version__)"
timeout "${KERNEL_TIMEOUT:-540}" python3 bench/int4_kernels.py --out "$OUT/${NAME:-int4_kernels}.json" "$@" 2>&1 | tail -40
