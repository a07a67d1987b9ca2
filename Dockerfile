# outlierd: scoring core, training and (from the service issue on) the gRPC server.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY core ./core
COPY training ./training
COPY server ./server
COPY monitoring ./monitoring
COPY outlierd ./outlierd
RUN pip install --no-cache-dir .

RUN useradd --create-home --uid 10001 outlierd
USER outlierd

ENTRYPOINT ["outlierd"]
CMD ["--help"]
