#!/usr/bin/env bash
# Runs on a lent GPU machine (see docs/GPU_RUNS.md): phases 1-4 on the 7b-random profile,
# then copies the result JSONs to $OUT. Expects bitsandbytes as a wheel under .whl/.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site MEDVL_PYTHON=python3 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
wd=/tmp/run-7b-random
for n in 1 2 3 4; do
  ./run_pipeline.sh --profile 7b-random --workdir "$wd" --only "$n" 2>&1 | tee -a "$OUT/phases_1_4.log" \
    | grep -v "it/s\]" || true
done
cp "$wd"/benchmarks/{environment,model_download,baseline_fp16,quantization_info,quantized_int4}.json "$OUT"/ || true
cp "$wd"/docs/BUILD_LOG.md "$OUT"/ || true
python3 -m medvl.gates --profile 7b-random --workdir "$wd"
