"""``outlierd serve``: one or several worker processes sharing the port (SO_REUSEPORT).

With several workers, prometheus-client's multiprocess mode is switched on (PROMETHEUS_MULTIPROC_DIR)
before any worker starts, and this parent process serves the aggregated ``/metrics``. A worker that
dies is restarted; SIGTERM is forwarded to every worker, which stops gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .settings import ServeSettings

log = logging.getLogger("outlierd.workers")


class _Logfmt(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} pid={record.process} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Logfmt())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("OUTLIERD_LOG_LEVEL", "INFO").upper())


def _worker_main(settings: ServeSettings, index: int) -> None:
    configure_logging()
    from outlierd.monitoring.metrics import ServiceMetrics

    from .app import run_worker

    log.info("worker starting index=%d", index)
    asyncio.run(run_worker(settings, ServiceMetrics()))


def _check_port_free(host: str, port: int) -> None:
    """Workers bind with SO_REUSEPORT, which would silently share a port with another server:
    prove the port is free with a plain bind first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e


def serve(settings: ServeSettings) -> int:
    """Run the service until SIGTERM / SIGINT; returns the exit code."""
    configure_logging()
    if settings.workers == 1:
        from outlierd.monitoring.metrics import ServiceMetrics, start_metrics_server

        if settings.metrics_port:
            start_metrics_server(settings.metrics_port, settings.host)
        from .app import run_worker

        asyncio.run(run_worker(settings, ServiceMetrics()))
        return 0
    mpdir = tempfile.mkdtemp(prefix="outlierd-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mpdir  # before any worker imports prometheus_client
    from prometheus_client import multiprocess

    from outlierd.monitoring.metrics import start_metrics_server

    _check_port_free(settings.host, settings.port)
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start(index: int) -> None:
        p = ctx.Process(target=_worker_main, args=(settings, index), name=f"outlierd-worker-{index}")
        p.start()
        procs[index] = p

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for i in range(settings.workers):
            start(i)
        if settings.metrics_port:
            extra: tuple[Any, ...] = ()
            if settings.drift:
                from outlierd.monitoring.collector import DriftCollector

                extra = (DriftCollector(Path(mpdir) / "drift", settings.registry, settings.model, settings.drift_window_panes,
                                        settings.drift_config()),)
            start_metrics_server(settings.metrics_port, settings.host, extra)
        log.info("started workers=%d port=%d metrics_port=%d", settings.workers, settings.port, settings.metrics_port)
        while not stopping:
            time.sleep(0.2)
            for i, p in list(procs.items()):
                if not p.is_alive() and not stopping:
                    multiprocess.mark_process_dead(p.pid)
                    log.error("worker died index=%d pid=%s exitcode=%s; restarting", i, p.pid, p.exitcode)
                    time.sleep(1.0)
                    start(i)
        deadline = time.time() + settings.grace_s + 5
        for p in procs.values():
            p.join(max(0.1, deadline - time.time()))
            if p.is_alive():
                log.error("worker did not stop in time pid=%s; killing it", p.pid)
                p.kill()
                p.join()
            multiprocess.mark_process_dead(p.pid)
    finally:
        shutil.rmtree(mpdir, ignore_errors=True)
    return 0
