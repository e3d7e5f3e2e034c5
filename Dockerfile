# medvl API + Gradio demo on an NVIDIA CUDA runtime.
# Build:  docker build -t medvl .
# Run:    docker run --gpus all -p 8000:8000 -p 7860:7860 -v "$PWD/models:/app/models:ro" \
#           -v "$PWD/benchmarks:/app/benchmarks:ro" -e MEDVL_PROFILE=7b medvl
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MEDVL_PYTHON=/opt/venv/bin/python \
    MEDVL_PROFILE=tiny \
    MEDVL_WORKDIR=/app

# libgl1 and libglib2.0: OpenCV's shared libraries, which the OCR baseline (rapidocr-onnxruntime,
# through opencv-python) loads.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv fonts-dejavu-core curl libgl1 libglib2.0-0t64 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY pyproject.toml ./
COPY medvl/ medvl/
COPY api/ api/
COPY bench/ bench/
COPY scripts/ scripts/
# The Kubernetes Job (deploy/kubernetes/pipeline-job.yaml) runs the pipeline in this image.
COPY run_pipeline.sh ./
# The package itself (its dependencies came with requirements.txt): medvl-serve, medvl-infer ...
RUN pip install --no-deps .

# Models come from a mounted volume (or bake them in with COPY models/ models/).
# A UID above 10000 so that it matches no user of the host (Kubernetes hardening: checkov CKV_K8S_40).
RUN useradd --create-home --uid 10001 medvl \
    && mkdir -p /app/models /app/benchmarks /app/logs \
    && chown -R medvl:medvl /app/logs /app/benchmarks
USER 10001:10001

EXPOSE 8000 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["/app/api/start.sh"]
