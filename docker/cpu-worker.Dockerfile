# syntax=docker/dockerfile:1.7
# CPU image: the Prefect server, the cpu-pool worker and its flow runs (watcher, diff/apply, evaluation
# bookkeeping, registration). Build from the repository root:
#   docker build -f docker/cpu-worker.Dockerfile -t REGISTRY/recycler/cpu-worker:0.1.0 .
# The Prefect server runs from this image too, so that it gets the pins it needs (fastapi 0.150,
# SQLAlchemy < 2.1: the 3.9.1 server and scheduler were verified with these).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- build ----------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU wheel from PyTorch's CPU index (~200 MB instead of several GB of CUDA libraries); the project
# asks only for torch>=2.6, so the install below keeps it.
# gcc builds the Δ engine's C kernels (recycler/delta/_native.c) in this stage only; the runtime has none.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv \
 && pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
COPY pyproject.toml README.md /src/
COPY recycler /src/recycler
COPY flows /src/flows
# prefect-kubernetes: this image also runs the Kubernetes workers that submit flow-run Jobs.
RUN pip install "/src[lora]" \
        "accelerate==1.16.0" "transformers==5.24.0" "safetensors==0.8.0" \
        "prefect==3.9.1" "fastapi==0.150.0" "sqlalchemy[asyncio]==2.0.58" \
        "mlflow==3.17.2" "prefect-aws==0.7.12" "prefect-kubernetes==0.8.0" "boto3==1.44.5" "peft==0.21.2" \
 && python -c "import recycler.delta._native"  # the extension is optional for pip: not for the image

# ---- runtime --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 recycler \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin recycler \
 && mkdir -p /scratch \
 && chown 10001:10001 /scratch
COPY --from=build /opt/venv /opt/venv
COPY infra/accelerate /opt/recycler/accelerate
# `recycler deploy` (pools and deployments) can run from this image: it reads infra/prefect.yaml.
COPY infra/prefect.yaml /opt/recycler/infra/prefect.yaml
COPY infra/k8s /opt/recycler/infra/k8s
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RECYCLER_ACCELERATE_CONFIGS=/opt/recycler/accelerate \
    RECYCLER_HOME=/home/recycler/.recycler \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /opt/recycler
USER 10001:10001
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process", "--with-healthcheck"]
