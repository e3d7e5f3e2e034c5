#!/usr/bin/env bash
# Runs on a lent H100 that still holds a finished `small` run in /tmp/run-small (issue 43):
# phase 6 again on the same base and data with other LoRA settings, each in a copy of the
# workdir, to tell whether the loss floor near 2.0 (lr 1e-3, r=64, 450 or 1,125 steps) is the
# adapter's rank or learning rate. Each variant's training_metrics.json goes to $OUT/<name>.json.
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
probe() {  # NAME SETTING...
  local name=$1; shift
  local wd=/tmp/probe-$name
  rm -rf "$wd"; cp -r /tmp/run-small "$wd"; rm -rf "$wd"/models/*-medical-*
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  ./run_pipeline.sh --profile small --workdir "$wd" --only 6 "${sets[@]}" > "$OUT/$name.log" 2>&1
  cp "$wd/benchmarks/training_metrics.json" "$OUT/$name.json"
  python3 -c "import json;d=json.load(open('$OUT/$name.json'));print('$name', d['global_step'], d['final_loss'], d['eval_loss_curve'][-1], d['train_time_s'])"
}
probe lr3e-3 train.learning_rate=3e-3 train.epochs=8
probe r256 train.lora_r=256 train.lora_alpha=512 train.epochs=8 train.expected_trainable_pct_max=40
