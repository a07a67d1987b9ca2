"""``outlierd serve``: one or several worker processes sharing the port (SO_REUSEPORT).

With several workers, prometheus-client's multiprocess mode is switched on (PROMETHEUS_MULTIPROC_DIR)
before any worker starts, and this parent process serves the aggregated ``/metrics``. SIGTERM is
forwarded to every worker, which stops gracefully.

Each worker tells the parent over a pipe when it is serving, or why it could not start. A worker
that fails before it ever served (an unknown model, a TLS key that does not match its certificate)
stops the whole server: ``serve`` exits 2 with the worker's one-line error, as one worker would. A
worker that dies after it served is restarted; its replacement failing to start is retried with a
growing delay (the other workers keep serving). Workers die with the parent, ``kill -9`` included
(``PR_SET_PDEATHSIG`` on Linux), so no orphan keeps the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from outlierd.core.errors import EXIT_ERROR, OutlierdError

from .settings import ServeSettings

log = logging.getLogger("outlierd.workers")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RESTART_DELAY_S = 1.0  # before restarting a worker that died after serving
MAX_RESTART_DELAY_S = 30.0  # a replacement that keeps failing to start is retried at most this far apart


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


class WorkerStartError(OutlierdError):
    """A worker could not start serving: the worker's own error message and exit code, so that
    several workers fail as one does (``outlierd: error: <message>``, exit 2)."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _watch_parent(parent_pid: int) -> None:
    """Where prctl is not available: a thread that sends this process SIGTERM once its parent is gone."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="outlierd-parent-watch", daemon=True).start()


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker end when the process that started it ends, ``kill -9`` included: on Linux the
    kernel sends SIGTERM (a graceful stop) when the parent dies (``PR_SET_PDEATHSIG``); elsewhere a
    thread watches ``getppid()``. A parent that died before the prctl took effect (it races with
    the start) is caught by comparing ``getppid()`` with the pid of the parent that started us."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno))
        except (OSError, AttributeError) as e:
            log.warning("prctl(PR_SET_PDEATHSIG) failed, watching the parent instead error=%s", e)
            _watch_parent(parent_pid)
    else:
        _watch_parent(parent_pid)
    if os.getppid() != parent_pid:  # already orphaned: no signal will come
        os._exit(EXIT_ERROR)


def _startup_failure(error: BaseException) -> tuple[str, int]:
    """``(one-line message, exit code)`` for an error that stopped a worker before it served, as the
    CLI would say it with one worker (``outlierd.cli.main``); an unexpected error is logged with its
    traceback first."""
    debug = bool(os.environ.get("OUTLIERD_DEBUG"))
    if isinstance(error, OutlierdError):
        message, code = error.message, error.exit_code
    elif isinstance(error, (OSError, ValueError)):
        message, code = str(error), EXIT_ERROR
    else:
        debug = True
        message, code = f"worker failed to start: {type(error).__name__}: {error}", EXIT_ERROR
    if debug:
        log.error("worker failed to start: %s", error, exc_info=error)
    return message, code


def _worker_main(settings: ServeSettings, index: int, report: Connection, parent_pid: int) -> None:
    """A worker process: serve until SIGTERM; ``report`` gets ``("serving",)`` once the port accepts
    calls, or ``("failed", message, exit_code)`` when the worker cannot start."""
    _die_with_parent(parent_pid)
    configure_logging()
    from outlierd.monitoring.metrics import ServiceMetrics

    from .app import run_worker

    log.debug("worker starting index=%d", index)
    serving = False

    def on_serving() -> None:
        nonlocal serving
        serving = True
        with contextlib.suppress(OSError):
            report.send(("serving",))

    try:
        asyncio.run(run_worker(settings, ServiceMetrics(), on_serving=on_serving, worker_index=index))
    except (Exception, KeyboardInterrupt) as e:
        if serving:
            raise  # a failure after serving: its traceback, and the parent restarts the worker
        message, code = _startup_failure(e)
        with contextlib.suppress(OSError):
            report.send(("failed", message, code))
        sys.exit(code)


def _check_port_free(host: str, port: int) -> None:
    """Workers bind with SO_REUSEPORT, which would silently share a port with another server:
    prove the port is free with a plain bind first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e


@dataclass
class _Worker:
    """The parent's view of one worker slot (its process changes on restart)."""

    index: int
    process: BaseProcess
    reports: Connection  # the read end of the worker's report pipe
    serving: bool = False  # this process said it is serving
    served: bool = False  # some process in this slot has served (then failures are restarted, not fatal)
    failure: tuple[str, int] | None = None  # ("message", exit_code) the process reported
    restart_at: float | None = None
    delay: float = RESTART_DELAY_S

    def read_reports(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while self.reports.poll():
                msg = self.reports.recv()
                if msg[0] == "serving":
                    self.serving = self.served = True
                    self.delay = RESTART_DELAY_S
                elif msg[0] == "failed":
                    self.failure = (str(msg[1]), int(msg[2]))

    def describe_failure(self) -> tuple[str, int]:
        if self.failure is not None:
            return self.failure
        return f"worker {self.index} exited with status {self.process.exitcode} before serving", EXIT_ERROR


def serve(settings: ServeSettings) -> int:
    """Run the service until SIGTERM / SIGINT; returns the exit code. A worker that cannot start
    raises its error (:class:`WorkerStartError` with several workers)."""
    configure_logging()
    from .checkpoint import refuse_several_workers

    refuse_several_workers(settings)  # a streaming model's state has one owner
    if settings.workers == 1:
        from outlierd.monitoring.metrics import ServiceMetrics, start_metrics_server

        if settings.metrics_port:
            start_metrics_server(settings.metrics_port, settings.metrics_bind_host())
        from .app import run_worker

        asyncio.run(run_worker(settings, ServiceMetrics()))
        return 0
    mpdir = tempfile.mkdtemp(prefix="outlierd-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mpdir  # before any worker imports prometheus_client
    from prometheus_client import multiprocess

    from outlierd.monitoring.metrics import start_metrics_server

    _check_port_free(settings.host, settings.port)
    ctx = multiprocessing.get_context("spawn")
    workers: dict[int, _Worker] = {}
    stopping = False

    def start(index: int) -> None:
        reports, report = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker_main, args=(settings, index, report, os.getpid()), name=f"outlierd-worker-{index}")
        p.start()
        report.close()  # the worker holds the write end now
        old = workers.get(index)
        if old is not None:
            old.reports.close()
            old.process, old.reports, old.serving, old.failure, old.restart_at = p, reports, False, None, None
        else:
            workers[index] = _Worker(index, p, reports)

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for w in workers.values():
            p = w.process
            if p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    def reap(w: _Worker) -> None:
        """A worker process that exited: fatal before its slot ever served, else restarted later."""
        w.read_reports()  # what it said just before it exited
        if w.process.pid is not None:
            multiprocess.mark_process_dead(w.process.pid)
        message, code = w.describe_failure()
        if not w.served:
            raise WorkerStartError(message, code)
        if w.serving:  # it died after serving: restart soon
            log.error("worker died index=%d pid=%s exitcode=%s; restarting", w.index, w.process.pid, w.process.exitcode)
            w.delay = RESTART_DELAY_S
        else:  # its replacement could not start: retry, further apart each time
            w.delay = min(2 * w.delay, MAX_RESTART_DELAY_S)
            log.error("worker failed to start index=%d error=%s; retrying in %.0fs", w.index, message, w.delay)
        w.restart_at = time.monotonic() + w.delay

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for i in range(settings.workers):
            start(i)
        if settings.metrics_port:
            extra: tuple[Any, ...] = ()
            if settings.drift:
                from outlierd.monitoring.collector import DriftCollector

                from outlierd.core.registry import Registry

                from .discovery import served_names

                # several models (--models): the collector aggregates the default model's drift panes
                try:
                    default = settings.model or served_names(Registry(settings.registry), "", settings.models, settings.alias)[0]
                except OutlierdError:  # no model yet: the workers say so and stop the server
                    default = ""
                if default:
                    extra = (DriftCollector(Path(mpdir) / "drift", settings.registry, default, settings.drift_window_panes,
                                            settings.drift_config()),)
            start_metrics_server(settings.metrics_port, settings.metrics_bind_host(), extra)
        all_serving = False
        while not stopping:
            time.sleep(0.2)
            for w in list(workers.values()):
                if stopping:
                    break
                w.read_reports()
                if w.restart_at is not None:
                    if time.monotonic() >= w.restart_at:
                        start(w.index)
                elif not w.process.is_alive():
                    reap(w)
            if not all_serving and all(w.serving for w in workers.values()):
                all_serving = True
                log.info("serving workers=%d port=%d metrics_port=%d", settings.workers, settings.port, settings.metrics_port)
    finally:
        _stop_all(workers, settings.grace_s, multiprocess)
        shutil.rmtree(mpdir, ignore_errors=True)
    return 0


def _stop_all(workers: dict[int, _Worker], grace_s: float, multiprocess: Any) -> None:
    """SIGTERM to every worker still running, then wait for them within the grace (kill the late ones)."""
    for w in workers.values():
        p = w.process
        if p.pid and p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.time() + grace_s + 5
    for w in workers.values():
        p = w.process
        p.join(max(0.1, deadline - time.time()))
        if p.is_alive():
            log.error("worker did not stop in time pid=%s; killing it", p.pid)
            p.kill()
            p.join()
        if p.pid is not None:
            multiprocess.mark_process_dead(p.pid)
        w.reports.close()
