#!/usr/bin/env bash
# Runs on a lent H100 (issue 32): builds 7b-random (phases 1-2), then serves it in each of
# FORMS (default: int4 then bf16; int4 is round-to-nearest at load, the same W4A16Linear layers
# an AWQ checkpoint serves through; FORM:SECTION.KEY=VALUE adds a --set, e.g.
# bf16:decode.vision_in_prepare=false) and measures the mixed workload and /extract at 1 and
# CLIENTS clients (bench/perf_serving.py). Writes $OUT/perf_serving_mixed_<label>.json and the
# servers' logs. Expects the wheels under .whl/ (torchao, pypdfium2, fhir.resources, the server's stack).
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
wd=${WD:-/tmp/run-7b-random}  # WD=/tmp/awq-7b-random serves gpu_awq.sh's AWQ checkpoint (FORMS="awq bf16")
build_7b_random "$wd"
for config in ${FORMS:-int4 bf16}; do
  form=${config%%:*}
  extra=(); [[ $config == *:* ]] && extra=(--set "${config#*:}")
  label=$(echo "$config" | tr ':=.' '___')
  timeout "${PERF_TIMEOUT:-300}" python3 bench/perf_serving.py --profile 7b-random --workdir "$wd" "${extra[@]}" \
    --out "$OUT/perf_serving_mixed_$label.json" --weights "$form" --routes "${ROUTES:-mixed,extract}" \
    --clients "${CLIENTS:-1,32}" --seconds "${SECONDS_PER_LEVEL:-15}" 2>&1 | grep --line-buffered -v "it/s\]$" \
    | grep -v "^        engine" | tail -8
  grep -v "it/s\]$" "$wd/logs/api_server_stdout.log" | tail -40 > "$OUT/server_$label.log"
done
