# Sourced by the gpu_*.sh scripts on a lent GPU: installs the wheels carried in .whl/ (what the
# GPU image lacks, e.g. bitsandbytes, torchao, the server's FastAPI stack) into /tmp/site, runs
# the pipeline with the image's python3 offline, and names the GPU.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
# The repository itself on the path too: the image's python3 has no editable install of medvl.
export PYTHONPATH="/tmp/site:$PWD" MEDVL_PYTHON=python3 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
