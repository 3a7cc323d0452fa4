# syntax=docker/dockerfile:1
#
# fxserve image. The PyTorch wheels from PyPI for Linux x86_64 bundle their own
# CUDA libraries, so a slim Python base runs on a GPU node as long as the node's
# NVIDIA driver supports the CUDA version of the wheel (`torch.version.cuda`).
#
# Build:  docker build -t REGISTRY/fxserve:TAG .
# CPU-only image (smaller, no CUDA libraries):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t REGISTRY/fxserve:TAG-cpu .

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Extra package index searched for torch and torchvision; empty means PyPI only.
ARG TORCH_INDEX_URL=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/fxserve/venv/bin:$PATH \
    TORCH_HOME=/opt/fxserve/torch

WORKDIR /src
RUN python -m venv /opt/fxserve/venv

COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" \
        "torchvision==${TORCHVISION_VERSION}" \
        .

# Download every configured weight into $TORCH_HOME now, so a pod starts
# without network access and with a read-only root filesystem.
COPY models.yaml /etc/fxserve/models.yaml
RUN python -m service prefetch --config /etc/fxserve/models.yaml


FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/fxserve/venv/bin:$PATH \
    TORCH_HOME=/opt/fxserve/torch \
    FXSERVE_CONFIG=/etc/fxserve/models.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A passwd entry for the numeric user: getpass.getuser(), which torch calls for
# some cache paths, fails without one. HOME is /tmp because the Kubernetes
# manifests mount a writable emptyDir only there.
RUN groupadd --gid 10001 fxserve \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin fxserve

COPY --from=build /opt/fxserve /opt/fxserve
COPY models.yaml /etc/fxserve/models.yaml

USER 10001:10001
WORKDIR /opt/fxserve
EXPOSE 8000

# Liveness only: /healthz stays 200 while models load, so the start period just
# keeps a slow first check from counting as a failure.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Exec form, so the server is PID 1 and receives SIGTERM directly.
CMD ["python", "-m", "service", "serve", "--config", "/etc/fxserve/models.yaml", "--host", "0.0.0.0", "--port", "8000"]
