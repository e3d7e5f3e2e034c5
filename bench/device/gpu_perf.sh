#!/usr/bin/env bash
# Runs on a lent H100 (see docs/results/h100/README.md): builds the 7b-random profile's inputs
# (phases 1-2, and 5 for training), then perf scripts. Usage: gpu_perf.sh training|inference|serving|prefill|all [args]
# Expects the bitsandbytes and torchao wheels under .whl/ (the GPU image lacks them).
set -uo pipefail
what="${1:-all}"
source "$(dirname "$0")/wheels.sh"
python3 -c "import torch, transformers, peft, torchao, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'torchao', torchao.__version__, 'bitsandbytes', b.__version__)"
wd=/tmp/perf-7b-random
case $what in inference|serving|prefill) phases=(1 2);; *) phases=(1 2 5);; esac
for n in "${phases[@]}"; do
  ./run_pipeline.sh --profile 7b-random --workdir "$wd" --only "$n" > >(grep -v "it/s\]$" >> "$OUT/pipeline.log") 2>&1 \
    || { tail -20 "$OUT/pipeline.log"; exit 1; }
done
for job in training inference serving prefill; do
  [[ $what == all || $what == "$job" ]] || continue
  TORCH_LOGS=recompiles timeout "${PERF_TIMEOUT:-540}" python3 bench/perf_$job.py --profile 7b-random \
    --workdir "$wd" "${@:2}" 2>&1 | grep --line-buffered -v "it/s\]$" | tee "$OUT/perf_$job.log"
  cp "$wd/benchmarks/perf_$job.json" "$OUT/" 2>/dev/null
done
