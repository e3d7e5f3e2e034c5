# Sourced by the gpu_*.sh scripts on a lent GPU: installs the packages carried in .whl/ (what the
# GPU image lacks, e.g. bitsandbytes, torchao, the server's FastAPI stack) into /tmp/site, runs
# the pipeline with the image's python3 offline, names the GPU, and defines build_7b_random.
# .whl/site.tar.xz (bench/device/make_wheels.sh: the packages unpacked, bitsandbytes trimmed) or
# loose .whl/*.whl files.
mkdir -p /tmp/site
if [[ -f .whl/site.tar.xz ]]; then  # once per machine (a warm machine's later calls skip it)
  [[ -f /tmp/site/.unpacked ]] || { tar -xJf .whl/site.tar.xz -C /tmp/site && touch /tmp/site/.unpacked; } || exit 1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
# The repository itself on the path too: the image's python3 has no editable install of medvl.
export PYTHONPATH="/tmp/site:$PWD" MEDVL_PYTHON=python3 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# build_7b_random WORKDIR: phases 1-2 of 7b-random there (the stand-in built on the GPU); a warm
# machine that already passed a phase's gate keeps its outputs. Exits the script if a phase fails.
build_7b_random() {
  for n in 1 2; do
    python3 -m medvl.cli.gates --profile 7b-random --workdir "$1" | grep "^phase $n .*: pass" >/dev/null && continue
    ./run_pipeline.sh --profile 7b-random --workdir "$1" --only "$n" > >(grep -v "it/s\]$" >> "$OUT/pipeline.log") 2>&1 \
      || { tail -20 "$OUT/pipeline.log"; exit 1; }
  done
}
