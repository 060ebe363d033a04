# The GPU worker image: `docker build -t pedsynth-gpu .` then run it with the GPUs and
# PREFECT_API_URL set; it serves the `gpu` work pool (deployment build-dataset/gpu-nightly).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/pedsynth
COPY pyproject.toml README.md ./
COPY pedsynth ./pedsynth
COPY configs ./configs
COPY prefect.yaml ./
# Real models are fetched from the hub on first use; mount a cache to keep them across runs.
ENV HF_HOME=/cache/huggingface
RUN pip install --upgrade pip && pip install ".[gpu]"

# Flows run from the project root, where prefect.yaml's entrypoints and configs/ resolve.
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
