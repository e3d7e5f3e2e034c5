#!/usr/bin/env bash
# Runs on a lent H100 (issue 19): a short phase-6 run on the 7b-random profile, then
# bench/perf_training.py at the same batch, then compares their steady-state tokens/s.
# Usage: gpu_training.sh phase6|perf|both|probe. "probe" runs the same short phase-6 run under each
# override set of $VARIANTS (";"-separated) into $OUT/probe_<n>.json ($WITH_PERF=1: then perf). Phases 1, 2 and 5 run first where their gates fail
# (a warm machine keeps them). Expects the bitsandbytes wheel under .whl/ (the GPU image lacks it).
set -uo pipefail
what="${1:-both}"
source "$(dirname "$0")/wheels.sh"
wd=/tmp/train-7b-random
batch="${BATCH:-2}"
for n in 1 2 5; do  # the inputs of phase 6, each run only where its gate fails
  python3 -c "import sys; from medvl.pipeline.gates import check_phase; from medvl.core.settings import load_settings
from medvl.core.workdir import Workdir; sys.exit(bool(check_phase($n, Workdir.at('$wd'), load_settings('7b-random'))))" \
    && continue
  ./run_pipeline.sh --profile 7b-random --workdir "$wd" --only "$n" > >(grep -v "it/s\]$" >> "$OUT/pipeline.log") 2>&1 \
    || { tail -20 "$OUT/pipeline.log"; exit 1; }
done
cp "$wd/datasets/formatted/data_summary.json" "$OUT/"
run6() {  # a short phase-6 run from step 0: batch $batch, no accumulation, evaluation and a save every 20 steps
  rm -rf "$wd"/models/*-medical-lora-checkpoints  # else a rerun with the same settings resumes at its end
  ./run_pipeline.sh --profile 7b-random --workdir "$wd" --only 6 --set train.max_steps="${MAX_STEPS:-40}" \
    --set train.per_device_batch_size="$batch" --set train.grad_accum_steps=1 --set train.eval_steps=20 \
    --set train.save_steps=20 --set train.logging_steps=5 "$@" 2>&1 | grep --line-buffered -v "it/s\]$" \
    | tee -a "$OUT/phase6.log" | grep -E "phase 6|steady|ERROR" | tail -3
}
if [[ $what == phase6 || $what == both ]]; then
  run6
  cp "$wd/benchmarks/training_metrics.json" "$OUT/"
  ls -la "$wd/logs/tensorboard" > "$OUT/tensorboard_listing.txt"
fi
if [[ $what == probe ]]; then
  IFS=';' read -ra variants <<< "${VARIANTS:-}"
  n=0
  for variant in "${variants[@]}"; do
    n=$((n + 1))
    sets=(); for kv in $variant; do sets+=(--set "$kv"); done
    run6 "${sets[@]}"
    python3 -c "import json,sys; m=json.load(open(sys.argv[1])); m['variant']=sys.argv[2]; json.dump(m, open(sys.argv[3],'w'), indent=1); print(sys.argv[2], m['steady_state'])" \
      "$wd/benchmarks/training_metrics.json" "$variant" "$OUT/probe_$n.json"
  done
fi
if [[ $what == perf || $what == both || -n ${WITH_PERF:-} ]]; then
  timeout "${PERF_TIMEOUT:-400}" python3 bench/perf_training.py --profile 7b-random --workdir "$wd" \
    --batches "$batch" --steps 10 2>&1 | grep --line-buffered -v "it/s\]$" > "$OUT/perf_training.log"
  tail -3 "$OUT/perf_training.log"
  cp "$wd/benchmarks/perf_training.json" "$OUT/"
fi
[[ -f $wd/benchmarks/training_metrics.json && -f $wd/benchmarks/perf_training.json ]] \
  && [[ $what != probe ]] && python3 bench/device/compare_training.py "$wd/benchmarks/training_metrics.json" \
       "$wd/benchmarks/perf_training.json" "$OUT/training_vs_perf.json"
exit 0
