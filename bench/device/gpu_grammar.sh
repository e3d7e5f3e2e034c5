#!/usr/bin/env bash
# Runs on a lent H100 (see docs/results/h100/README.md): builds the 7b-random stand-in (phases
# 1-2), compares the grammar libraries on its tokenizer (bench/perf_grammar.py), then serves
# it and measures chat decoding with and without a grammar, in the same server, at 1 and 32
# clients (bench/perf_serving.py --response-formats). Writes $OUT/perf_grammar.json and
# $OUT/perf_serving_grammar.json. Expects the wheels under .whl/ (llguidance; xgrammar and
# apache-tvm-ffi for the comparison; the server's stack: the GPU image lacks them).
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
wd=/tmp/perf-7b-random
./run_pipeline.sh --profile 7b-random --workdir "$wd" --to 2 > >(grep -v "it/s\]$" >> "$OUT/pipeline.log") 2>&1 \
  || { tail -20 "$OUT/pipeline.log"; exit 1; }
python3 bench/perf_grammar.py --profile 7b-random --workdir "$wd" --out "$OUT/perf_grammar.json" 2>&1 \
  | grep -v "it/s\]$" | tail -5
timeout "${PERF_TIMEOUT:-420}" python3 bench/perf_serving.py --profile 7b-random --workdir "$wd" \
  --out "$OUT/perf_serving_grammar.json" --weights "${WEIGHTS:-bf16}" --routes chat --clients 1,32 \
  --response-formats none,long,record --seconds "${SECONDS_PER_LEVEL:-20}" 2>&1 | grep --line-buffered -v "it/s\]$" \
  | tee "$OUT/perf_serving_grammar.log"
grep -v "it/s\]$" "$wd/logs/api_server_stdout.log" | tail -30 > "$OUT/server_grammar.log"
