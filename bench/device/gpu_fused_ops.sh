#!/usr/bin/env bash
# Runs on a lent H100 (issue 32): the fused elementwise kernels (medvl.model.fused_ops). Builds
# 7b-random (phases 1-2), checks the kernels against the eager ones on the five phase-3 pages
# (bench/check_fused_ops.py: outputs and GPU times), then serves the mixed workload at 32 clients
# from the tree before them (BASE, default .whl/base.tar.xz) and from this tree, one machine
# (gpu_prefill_chunks.sh with BASE_FORMS / FORMS, default bf16 both). Writes
# $OUT/check_fused_ops.json and $OUT/perf_serving_mixed_*.json (the baseline's as *_base.json).
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
wd=${WD:-/tmp/run-7b-random}
build_7b_random "$wd"
[[ ${CHECK:-1} == 1 ]] && timeout "${CHECK_TIMEOUT:-200}" python3 bench/check_fused_ops.py --profile 7b-random \
  --workdir "$wd" --out "$OUT/check_fused_ops.json" 2>&1 | grep -v "it/s\]$" | tail -4
BASE_FORMS=${BASE_FORMS:-bf16} FORMS=${FORMS:-bf16} WD=$wd bash bench/device/gpu_prefill_chunks.sh
