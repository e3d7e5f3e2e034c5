#!/usr/bin/env bash
# Runs on a lent H100 (see docs/results/h100/README.md): builds the 7b-random stand-in (phases
# 1-2), then the HTTP load benchmark (bench/perf_serving.py) once per run spec, each
# "NAME:ARGS" (e.g. "bf16:--weights bf16 --seconds 15"), writing $OUT/perf_serving_NAME.json.
# Expects the server's wheels (fastapi, starlette, pydantic, uvicorn, ..., torchao,
# bitsandbytes) under .whl/ (the GPU image lacks them).
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
wd=/tmp/perf-7b-random  # gpu_perf.sh's: phases it already ran are not run again
./run_pipeline.sh --profile 7b-random --workdir "$wd" --to 2 > >(grep -v "it/s\]$" >> "$OUT/pipeline.log") 2>&1 \
  || { tail -20 "$OUT/pipeline.log"; exit 1; }
for spec in "$@"; do
  name="${spec%%:*}"
  read -r -a args <<< "${spec#*:}"
  timeout "${PERF_TIMEOUT:-540}" python3 bench/perf_serving.py --profile 7b-random --workdir "$wd" \
    --out "$OUT/perf_serving_$name.json" "${args[@]}" 2>&1 | grep --line-buffered -v "it/s\]$" \
    | tee "$OUT/perf_serving_$name.log"
  grep -v "it/s\]$" "$wd/logs/api_server_stdout.log" | tail -30 > "$OUT/server_$name.log"
done
