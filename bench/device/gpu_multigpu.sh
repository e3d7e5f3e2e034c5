#!/usr/bin/env bash
# Runs on a lent 2-GPU host (see docs/results/h200x2/README.md): builds the 7b-random
# stand-in and the synthetic data, then the same short QLoRA run on 1 GPU and on 2 GPUs
# (DDP through accelerate) with the same global batch, and compares them into
# perf_multigpu.json. Expects the bitsandbytes wheel under .whl/.
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
wd=/tmp/run-multigpu
steps="${STEPS:-20}"
common=(--profile 7b-random --workdir "$wd" --set train.max_steps="$steps" --set train.per_device_batch_size=2
        --set train.eval_steps=1000 --set train.save_steps=1000 --set train.logging_steps=1)
for n in 1 2 5; do ./run_pipeline.sh --profile 7b-random --workdir "$wd" --only "$n" > "$OUT/setup_phase$n.log" 2>&1 || exit 1; done
# one GPU: 2 per step x 2 accumulation = global batch 4
CUDA_VISIBLE_DEVICES=0 ./run_pipeline.sh "${common[@]}" --only 6 --set train.grad_accum_steps=2 \
  > >(grep -v "it/s\]$" > "$OUT/train_1gpu.log") 2>&1
cp "$wd/benchmarks/training_metrics.json" "$OUT/training_1gpu.json"
# two GPUs: 2 per step per GPU x 1 accumulation x 2 GPUs = global batch 4
./run_pipeline.sh "${common[@]}" --only 6 --gpus 2 --set train.grad_accum_steps=1 \
  > >(grep -v "it/s\]$" > "$OUT/train_2gpu.log") 2>&1
cp "$wd/benchmarks/training_metrics.json" "$OUT/training_2gpu.json"
python3 bench/device/compare_multigpu.py "$OUT/training_1gpu.json" "$OUT/training_2gpu.json" "$OUT/perf_multigpu.json"
