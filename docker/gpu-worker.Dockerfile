# syntax=docker/dockerfile:1.7
# GPU image: flow runs of the a100 pool (Kubernetes pods, or the compose gpu-worker) that fine-tune with
# accelerate on 1-8 A100s. Build from the repository root:
#   docker build -f docker/gpu-worker.Dockerfile -t REGISTRY/recycler/gpu-worker:0.1.0 .
#
# torch==2.13.0 from PyPI is the CUDA 13.0 build and brings its own CUDA, cuDNN and NCCL as pip packages;
# the base image's CUDA major must match it (13.x) and the node's driver must support CUDA 13 (>= 580).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- build: a self-contained venv in /opt/venv ------------------------------------------------------
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The largest, slowest-changing layer first, so code changes rebuild only the small layers below.
RUN python3.12 -m venv /opt/venv \
 && pip install "torch==2.13.0"
COPY pyproject.toml README.md /src/
COPY recycler /src/recycler
COPY flows /src/flows
# Pins: the set the tests run on (Prefect 3.9.1 with fastapi 0.150 and SQLAlchemy 2.0).
RUN pip install "/src[lora]" \
        "accelerate==1.16.0" "transformers==5.24.0" "safetensors==0.8.0" \
        "prefect==3.9.1" "fastapi==0.150.0" "sqlalchemy[asyncio]==2.0.58" \
        "mlflow==3.17.2" "prefect-aws==0.7.12" "boto3==1.44.5" "peft==0.21.2" \
 && python -c "import recycler.delta._native"  # built with the build stage's gcc (optional for pip)

# ---- runtime: same CUDA base, the venv, a non-root user -----------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 recycler \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin recycler \
 && mkdir -p /scratch \
 && chown 10001:10001 /scratch
COPY --from=build /opt/venv /opt/venv
# Deployment entrypoints are modules of the installed package (recycler_flows.…), so no source tree is
# needed here; the accelerate configs are found through RECYCLER_ACCELERATE_CONFIGS
# (recycler.stages.finetune.launcher); the benchmark runs on a node.
COPY infra/accelerate /opt/recycler/accelerate
COPY bench/gpu_bench.py /opt/recycler/bench/gpu_bench.py
# No credentials here: AWS_*, MLFLOW_TRACKING_* and PREFECT_API_URL come from the Kubernetes secret
# (envFrom) or the compose .env at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RECYCLER_ACCELERATE_CONFIGS=/opt/recycler/accelerate \
    RECYCLER_HOME=/home/recycler/.recycler \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30
WORKDIR /opt/recycler
USER 10001:10001
CMD ["prefect", "worker", "start", "--pool", "a100", "--type", "process", "--with-healthcheck"]
