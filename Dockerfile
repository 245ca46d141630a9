# The omnidiff image that infra/ runs: the KubeRay head and workers, the Prefect work pool's flow runs and
# worker, the Prefect and MLflow servers (docs/cluster.md).
#
#   docker build -t ghcr.io/omnidiff/omnidiff:0.1.0-cuda .                                # CUDA 12.8 torch
#   docker build --build-arg TORCH_VARIANT=cpu -t ghcr.io/omnidiff/omnidiff:0.1.0-cpu .   # CPU only
#
# torch's CUDA wheels carry the CUDA runtime, cuDNN and NCCL as pip packages, so a plain Python base is enough;
# the GPU nodes need the NVIDIA driver and the Kubernetes device plugin. Everything else is installed with the
# project's pins (requirements/constraints.txt, torch's line replaced by the build chosen here, as README's
# "GPU install" does). Artifacts never live in the image or on a node: stages read and write s3:// locations
# (storage.root, AWS_* variables from the cluster's ConfigMap and Secret); OMNIDIFF_HOME is scratch only.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# cu128 (default), cu126, ... or cpu: the index https://download.pytorch.org/whl/<variant> of torch's build.
ARG TORCH_VARIANT=cu128
ARG TORCH_VERSION=2.13.0
# Clients the cluster manifests need beyond the project's own dependencies, resolved under its pins: MLflow's
# PostgreSQL backend and S3 artifact store (infra/mlflow), the Prefect Kubernetes worker (infra/prefect).
ARG CLUSTER_PACKAGES="boto3 psycopg2-binary prefect-kubernetes"

LABEL org.opencontainers.image.title="omnidiff" \
      org.opencontainers.image.ref.name="ghcr.io/omnidiff/omnidiff:0.1.0-cuda" \
      org.opencontainers.image.source="https://github.com/omnidiff/omnidiff"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMNIDIFF_HOME=/var/lib/omnidiff

# A compiler and ninja for DeepSpeed's JIT-built ops; wget for KubeRay's health probes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ninja-build wget \
    && rm -rf /var/lib/apt/lists/*

# prefect.yaml's pull step runs flows from this folder.
WORKDIR /opt/omnidiff

COPY requirements/constraints.txt requirements/constraints.txt
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    && grep -v '^torch==' requirements/constraints.txt > /tmp/constraints.txt

COPY . .
RUN pip install -c /tmp/constraints.txt -e . ${CLUSTER_PACKAGES}

RUN useradd --create-home --uid 1000 omnidiff \
    && mkdir -p /var/lib/omnidiff \
    && chown omnidiff /var/lib/omnidiff
USER 1000

CMD ["omnidiff", "--help"]
