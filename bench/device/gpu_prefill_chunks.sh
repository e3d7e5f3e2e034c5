#!/usr/bin/env bash
# Runs on a lent H100 (issue 32, chunked prefill): the mixed workload at 32 clients, bf16, served
# by an earlier commit's tree (BASE, default .whl/base.tar.xz, made here with
# `git archive <commit> medvl bench scripts run_pipeline.sh pyproject.toml requirements.txt | xz > .whl/base.tar.xz`)
# in BASE_FORMS (default bf16), and by this tree in each of FORMS (as gpu_serving_mixed.sh takes
# them), one machine, one call: the baseline is measured beside the change. Writes
# $OUT/perf_serving_mixed_*.json (the baseline's as *_base.json) and the servers' logs.
set -uo pipefail
wd=${WD:-/tmp/run-7b-random}
export ROUTES=${ROUTES:-mixed} CLIENTS=${CLIENTS:-32} SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-25} WD=$wd
base=/tmp/base
mkdir -p "$base" && tar -xJf "${BASE:-.whl/base.tar.xz}" -C "$base" && ln -sfn "$PWD/.whl" "$base/.whl"
(cd "$base" && FORMS=${BASE_FORMS:-bf16} bash bench/device/gpu_serving_mixed.sh) || exit 1
for result in "$OUT"/perf_serving_mixed_*.json; do mv "$result" "${result%.json}_base.json"; done
for log in "$OUT"/server_*.log; do mv "$log" "/tmp/$(basename "${log%.log}")_base.log"; done
FORMS=${FORMS:-bf16 bf16:decode.max_prefill_tokens=8192 int4} bash bench/device/gpu_serving_mixed.sh
mv "$OUT"/server_*.log "$OUT/pipeline.log" /tmp/ 2>/dev/null
tar -C /tmp -czf "$OUT/logs.tar.gz" $(cd /tmp && ls server_*.log pipeline.log 2>/dev/null)
