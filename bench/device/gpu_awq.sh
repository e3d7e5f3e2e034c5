#!/usr/bin/env bash
# Runs on a lent H100 (see docs/results/h100/README.md): builds the 7b-random stand-in and runs
# phases 3-4 (AWQ through llm-compressor: calibration time and peak memory; next-token logits of
# AWQ, round-to-nearest int4 and NF4 against bf16 on the five documents), checks the AWQ
# checkpoint in the GPU's int4 kernel against compressed-tensors' dequantization, then decode
# speed at batch 1 of bf16, round-to-nearest int4, AWQ int4 and NF4 (bench/perf_inference.py).
# CHECK=0 skips the kernel check, PERF=0 the decode speeds; SERVE=1 then serves the AWQ checkpoint
# (the profile's form) under load (bench/perf_serving.py). Extra arguments go to every script
# (e.g. --set quant.awq_calibration_samples=16).
# Writes $OUT/{quantization_info,quantized_int4,baseline_fp16,awq_kernel_check,perf_inference}.json.
# Expects the wheels under .whl/ (torchao, bitsandbytes, llmcompressor, compressed-tensors,
# auto-round, loguru, datasets, dill, multiprocess: the GPU image lacks them).
set -uo pipefail
started=$SECONDS
source "$(dirname "$0")/wheels.sh"
python3 -c "import llmcompressor, compressed_tensors, torchao, bitsandbytes; print('llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'torchao', torchao.__version__, 'bitsandbytes', bitsandbytes.__version__)"
wd=/tmp/awq-7b-random
./run_pipeline.sh --profile 7b-random --workdir "$wd" --to 4 "$@" > >(grep -v "it/s\]$" >> "$OUT/pipeline.log") 2>&1 \
  || { tail -30 "$OUT/pipeline.log"; exit 1; }
cp "$wd"/benchmarks/{quantization_info,quantized_int4,baseline_fp16}.json "$OUT/"
if [[ ${CHECK:-1} == 1 ]]; then
  python3 bench/check_awq_kernel.py --profile 7b-random --workdir "$wd" --layers 7 "$@" 2>&1 | grep -v "it/s\]$" | tail -3
  cp "$wd/benchmarks/awq_kernel_check.json" "$OUT/" 2>/dev/null
fi
left() { echo $(( ${DEVICE_LIMIT:-590} - (SECONDS - started) )); }
if [[ ${PERF:-1} == 1 ]]; then
  echo "perf_inference gets $(left) s"
  TORCH_LOGS=recompiles timeout "$(left)" python3 bench/perf_inference.py --profile 7b-random --workdir "$wd" \
    --variants awq_int4,int4_torchao,bf16,nf4_bitsandbytes --batch 1 --new-tokens 64 "$@" 2>&1 \
    | grep --line-buffered -v "it/s\]$" > "$OUT/perf_inference.log"
  tail -3 "$OUT/perf_inference.log"
  cp "$wd/benchmarks/perf_inference.json" "$OUT/" 2>/dev/null
fi
if [[ ${SERVE:-0} == 1 ]]; then
  echo "perf_serving gets $(left) s"
  timeout "$(left)" python3 bench/perf_serving.py --profile 7b-random --workdir "$wd" --weights auto \
    --routes extract --clients 1,8 --seconds 10 --out "$OUT/perf_serving_awq.json" "$@" 2>&1 \
    | grep --line-buffered -v "it/s\]$" > "$OUT/perf_serving_awq.log"
  tail -5 "$OUT/perf_serving_awq.log"
  grep -v "it/s\]$" "$wd/logs/api_server_stdout.log" | tail -20 > "$OUT/server_awq.log"
fi
echo "total $(( SECONDS - started )) s"
