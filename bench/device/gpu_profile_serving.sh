#!/usr/bin/env bash
# Runs on a lent H100 (issue 32): where the server's Python time goes under the mixed workload.
# Serves 7b-random bf16 (bench/perf_serving.py, mixed, 32 clients, 30-s window) and samples the
# server process with py-spy (carried wheel) twice, 10 s each: which threads hold the GIL
# (--gil) and what every thread does, idle included (--idle); then FORMS (default int4) as
# gpu_serving_mixed.sh serves them. Writes $OUT/pyspy_gil.txt, $OUT/pyspy_idle.txt (collapsed
# stacks per thread) and the perf JSONs.
set -uo pipefail
wd=${WD:-/tmp/run-7b-random}
export ROUTES=${ROUTES:-mixed} CLIENTS=${CLIENTS:-32} SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-30} WD=$wd
log="$wd/logs/api_server_stdout.log"
rm -f "$log"
(
  while ! grep -q "model ready" "$log" 2>/dev/null; do sleep 1; done
  sleep 10  # the benchmark's warm-up, then into the measured window
  pid=$(pgrep -f "medvl.http.server" | head -1)
  /tmp/site/bin/py-spy record -p "$pid" -d 10 -r 200 --threads --gil --nonblocking -f raw -o "$OUT/pyspy_gil.txt" >/dev/null 2>&1
  /tmp/site/bin/py-spy record -p "$pid" -d 10 -r 200 --threads --idle --nonblocking -f raw -o "$OUT/pyspy_idle.txt" >/dev/null 2>&1
) &
FORMS=bf16 bash bench/device/gpu_serving_mixed.sh
wait
FORMS=${FORMS:-int4} bash bench/device/gpu_serving_mixed.sh
