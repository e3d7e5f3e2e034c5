#!/usr/bin/env bash
# Runs on a lent H100 (issue 43): the `small` profile's whole pipeline from an empty workdir.
# A call runs at most 10 minutes and the pipeline takes longer, so the pipeline runs detached
# (setsid) and each call waits on it:
#   bash bench/device/gpu_small.sh start   # installs the carried packages, checks PP-OCR on the GPU, starts phase 1
#   bash bench/device/gpu_small.sh wait    # the next call, within 30 s (the machine stays warm)
#   bash bench/device/gpu_small.sh resume  # after a failed phase is fixed: from the first failing gate
# The first call unpacks the carried packages (about a minute): give it WAIT_S=480 in a 600 s call.
# Each call waits up to WAIT_S (540) seconds, then packs what exists into $OUT/small_run.tar.gz:
# benchmarks/*.json, the build log, the report and its figures, the pipeline log and
# phase_times.txt (each phase's wall time, from start to its gate passing). A run that died
# (not finished, not running) is resumed by `wait`: run_pipeline.sh starts at the first
# failing gate. Set WD to use another workdir (default /tmp/run-small).
set -uo pipefail
source "$(dirname "$0")/wheels.sh"
wd=${WD:-/tmp/run-small}
log=/tmp/small_pipeline.log
mkdir -p "$wd"

launch() {
  local sets; sets=$(tr '\n' ' ' < "$wd/.sets" 2>/dev/null)
  setsid nohup bash -c "
    for n in 1 2 3 4 5 6 7 8 9; do
      python3 -m medvl.cli.gates --profile small $sets --workdir '$wd' | grep -q \"^phase \$n .*: pass\" && continue
      started=\$(date +%s)
      ./run_pipeline.sh --profile small $sets --workdir '$wd' --only \$n || { echo failed > '$wd/.state'; exit 1; }
      echo \"phase \$n \$((\$(date +%s) - started)) s\" >> '$wd/phase_times.txt'
    done
    echo done > '$wd/.state'" >> "$log" 2>&1 < /dev/null &
  echo $! > "$wd/.pid"
  echo running > "$wd/.state"
}

state() { cat "$wd/.state" 2>/dev/null || echo none; }

case "${1:-wait}" in
  # PP-OCR under PyTorch on this GPU, checked against ONNX Runtime on the phase-3 pages first
  # (bench/check_ocr_runtimes.py): if it cannot read a page, the run reads with ONNX Runtime.
  # SETS: overrides for the whole run (e.g. SETS="--set bench.eval_also_forms=" to save phase 7 a model).
  start) rm -rf "$wd" && mkdir -p "$wd" && : > "$log" && echo "${SETS:-}" > "$wd/.sets"
         python3 -m bench.check_ocr_runtimes --out "$wd/ocr_runtimes.json" >> "$log" 2>&1 \
           || echo "--set api.ocr_backend=onnxruntime" >> "$wd/.sets"
         launch ;;
  resume) launch ;;
  wait) if [[ $(state) == running ]] && ! kill -0 "$(cat "$wd/.pid")" 2>/dev/null; then
          echo "the run was not running: resuming at the first failing gate"; launch
        fi ;;
esac
deadline=$((SECONDS + ${WAIT_S:-540}))
while [[ $(state) == running && $SECONDS -lt $deadline ]]; do sleep 5; done
echo "state: $(state)"; cat "$wd/phase_times.txt" 2>/dev/null
tail -5 "$log"
tr '\r' '\n' < "$log" | grep -v "it/s\]$" > "$wd/pipeline.log"
tar -C "$wd" -czf "$OUT/small_run.tar.gz" --exclude='*.png' --exclude='*.jsonl' benchmarks docs logs \
  pipeline.log phase_times.txt ocr_runtimes.json models/small-qwen25-vl-base/pretraining.json 2>/dev/null
(cd "$wd" && tar -czf "$OUT/small_answers.tar.gz" benchmarks/eval_cases.jsonl benchmarks/eval_answers_*.jsonl) 2>/dev/null
ls -la "$OUT"
