#!/usr/bin/env bash
# Runs on a lent H100/H200 (see docs/GPU_RUNS.md): phases 1-6 on the 7b-random profile,
# phase 6 as a short QLoRA run. Copies each phase's JSONs to $OUT as soon as it passes.
# Expects the bitsandbytes wheel under .whl/ (the GPU image lacks it).
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
wd=/tmp/run-7b-random
short_run=(--set train.max_steps="${MAX_STEPS:-24}" --set train.grad_accum_steps=1
           --set train.eval_steps=1000 --set train.save_steps=1000)
for n in 1 2 3 4 5 6; do
  extra=(); [[ $n == 6 ]] && extra=("${short_run[@]}")
  ./run_pipeline.sh --profile 7b-random --workdir "$wd" --only "$n" "${extra[@]}" \
    > >(grep -v "it/s\]$" | tee -a "$OUT/pipeline.log") 2>&1
  cp "$wd"/benchmarks/*.json "$OUT"/ 2>/dev/null
done
cp "$wd"/docs/BUILD_LOG.md "$OUT"/ 2>/dev/null
python3 -m medvl.cli.gates --profile 7b-random --workdir "$wd" 2>&1 | sed -n 1,20p
