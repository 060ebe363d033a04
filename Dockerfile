# The GPU worker image: `docker build -t pedsynth-gpu .` then run it with the GPUs and
# PREFECT_API_URL set; it serves the `gpu` work pool (deployment build-dataset/gpu-nightly).
#
# EXTRAS=gpu (default) installs vLLM in-process: `.[gpu]` resolves to the supported pairing in
# pyproject.toml (vllm 0.33.0 with prefect 3.7.7, fastapi 0.136.3, torch 2.14.0 built for
# CUDA 13.0, which needs an NVIDIA driver >= 580 on the host). EXTRAS="" builds the worker for
# a separate vLLM server (compose.gpu.yaml, configs/gpu-server.yaml): no vllm, the newest
# Prefect the project allows. EXTRAS=gpu,ray (or ray) adds prefect-ray and Ray, so the same
# image also serves as a Ray node: run it with `ray start --address HEAD:6379 --block` (a
# worker) or `ray start --head --block` instead of the default command (README, Ray).
# The CUDA libraries come with the torch wheels; the base image only carries the settings the
# NVIDIA container runtime reads.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

ARG EXTRAS=gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# A C compiler and Python's headers: Triton (under vLLM and torch.compile) builds its launchers
# when the worker first runs a kernel.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip python3-dev gcc libc6-dev git \
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
RUN pip install --upgrade pip \
 && if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; else pip install .; fi \
 && pip check

# Flows run from the project root, where prefect.yaml's entrypoints and configs/ resolve.
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
