# syntax=docker/dockerfile:1
# outlierd: the gRPC scoring service (`outlierd serve`), also usable for `outlierd train` and the rest
# of the CLI. Two stages: a builder that installs the package into a virtual environment, and a slim
# runtime that gets only that environment (no compilers, no pip caches, no sources).
#
#   docker build -t outlierd:0.1.0 .
#   docker build -t outlierd:0.1.0-onnx --build-arg OUTLIERD_EXTRAS=onnx .    # extras, comma-separated
#   docker run -p 50051:50051 -p 9100:9100 -v "$PWD/registry:/models" outlierd:0.1.0
#
# Serving settings come from OUTLIERD_* variables (server/settings.py); the CMD below only gives the
# two required flags. Lint: hadolint Dockerfile (tests/test_deploy_manifests.py runs it).

FROM python:3.11-slim AS builder

# Comma-separated extras to install with the package, e.g. "onnx" or "onnx,mlflow" (default: none).
ARG OUTLIERD_EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/outlierd
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY training ./training
COPY server ./server
COPY monitoring ./monitoring
COPY outlierd ./outlierd
COPY proto ./proto
# The package is this source tree (so hadolint's DL3013 has no version to ask for); its dependencies'
# bounds live in pyproject.toml. No apt-get at all: every dependency ships as a manylinux wheel.
RUN /opt/outlierd/bin/pip install --no-cache-dir ".${OUTLIERD_EXTRAS:+[${OUTLIERD_EXTRAS}]}"


FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="outlierd" \
      org.opencontainers.image.description="Anomaly-detection scoring service: Numba kernels behind gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed non-root uid/gid (10001), so Kubernetes' runAsNonRoot and volume permissions can name it.
# /models: the registry mount point. NUMBA_CACHE_DIR: compiled kernels (cache=True), so a restarted
# container does not recompile; it must be writable by the service user.
RUN groupadd --system --gid 10001 outlierd \
    && useradd --system --uid 10001 --gid outlierd --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin outlierd \
    && install -d -o outlierd -g outlierd -m 0755 /models /var/cache/outlierd/numba

COPY --from=builder /opt/outlierd /opt/outlierd

ENV PATH=/opt/outlierd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/var/cache/outlierd/numba \
    OUTLIERD_HOST=0.0.0.0 \
    OUTLIERD_PORT=50051 \
    OUTLIERD_METRICS_PORT=9100

USER 10001:10001
WORKDIR /models

# gRPC (Score, ScoreStream, GetModelInfo, grpc.health.v1, reflection) and Prometheus /metrics.
EXPOSE 50051 9100

# grpc.health.v1 Check on the local port; `python -m outlierd.health_cli` is `outlierd health`
# without importing Numba, so the check stays cheap. The start period covers loading the model and
# compiling the kernels on a cold Numba cache.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "outlierd.health_cli", "--timeout", "3"]

ENTRYPOINT ["outlierd", "serve"]
CMD ["--registry", "/models", "--model", "default"]
