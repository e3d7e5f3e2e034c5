#!/usr/bin/env bash
# Runs on a lent H100 (issue 32): where the GPU's time goes under the mixed workload. Builds
# 7b-random (phases 1-2, kept on a warm machine), then for each of FORMS (default bf16; as
# gpu_serving_mixed.sh takes them) runs bench/profile_engine.py: the engine served in-process
# by CLIENTS (32) client threads, GPU time per engine turn and a torch.profiler trace. Then
# SWITCH_MS (e.g. "0 0.5": one run per value, 0 = Python's own 5 ms GIL switch interval). Then
# SERVE (default: the same FORMS; "" for none) through gpu_serving_mixed.sh (HTTP, mixed,
# 32 clients). Writes $OUT/profile_engine_<label>.json (+ .trace.json.xz) and the perf JSONs.
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
wd=${WD:-/tmp/run-7b-random}
build_7b_random "$wd"
for config in ${FORMS:-bf16}; do
 for switch in ${SWITCH_MS:-0}; do
  form=${config%%:*}
  extra=(); [[ $config == *:* ]] && extra=(--set "${config#*:}")
  label=$(echo "$config" | tr ':=.' '___'); [[ $switch != 0 ]] && label+="_switch_${switch/./_}ms"
  timeout "${PROFILE_TIMEOUT:-240}" python3 bench/profile_engine.py --profile 7b-random --workdir "$wd" "${extra[@]}" \
    --weights "$form" --clients "${CLIENTS:-32}" --seconds "${SECONDS_PER_LEVEL:-20}" --keep-trace --switch-interval-ms "$switch" \
    --out "$OUT/profile_engine_$label.json" 2>&1 | grep -v "it/s\]$" | tail -6
 done
done
serve=${SERVE-${FORMS:-bf16}}
[[ -n $serve ]] && FORMS=$serve ROUTES=${ROUTES:-mixed} CLIENTS=${CLIENTS:-32} bash bench/device/gpu_serving_mixed.sh
exit 0
