"""One worker: the data plane, and on it a grpc.aio server with the scorer, health, reflection,
TLS and token auth.

Lifecycle: load and warm up the model -> health SERVING -> serve, watching the alias -> on SIGTERM
or SIGINT: health NOT_SERVING, stop taking calls, let in-flight work finish within the grace.
Everything is built in order and handed its parts at construction (``start_worker``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from outlierd.core.errors import InvalidInputError
from outlierd.core.registry import Registry
from outlierd.monitoring.capture import CaptureWriter
from outlierd.monitoring.capture_proc import Retention
from outlierd.monitoring.drift import reference_for
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.monitoring.store import StoreOpener, open_store, store_location
from outlierd.monitoring.stream import ServingMonitor
from outlierd.v1 import scoring_pb2

from .auth import TokenAuthInterceptor
from .batcher import MicroBatcher
from .discovery import ALL, Discovery, served_names
from .events import EventFeatures
from .feedback import FeedbackService, FieldLimits
from .health import HealthServicer
from .plane import DataPlane, ServedModel
from .reload import DevicePolicy, ModelSlot
from .rollout import ChallengerSlot, Rollout, RolloutMetrics, ShadowScorer
from .servicer import ScorerServicer, add_to_server
from .settings import ServeSettings
from .streams import StreamGuard

log = logging.getLogger("outlierd.server")
SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name


@dataclass
class Worker:
    server: grpc.aio.Server
    port: int
    plane: DataPlane
    health: HealthServicer
    watcher: asyncio.Task
    settings: ServeSettings
    capture: CaptureWriter | None = None
    feedback: FeedbackService | None = None
    checkpointer: Any = None  # server.checkpoint.Checkpointer with --checkpoint-dir
    checkpoint_task: asyncio.Task | None = None
    http: Any = None  # http_app.HttpServer with --http-port, else None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None
    events: EventFeatures | None = None
    feature_checkpoints: asyncio.Task | None = None

    @property
    def slot(self) -> ModelSlot:
        """The served model's champion slot."""
        return self.plane.default.slot

    @property
    def rollout(self) -> Rollout | None:
        """The served model's rollout (None with ``--rollout off``)."""
        return self.plane.default.rollout

    @property
    def batcher(self) -> MicroBatcher:
        return self.plane.batcher

    def flush_capture(self, timeout: float = 10.0) -> bool:
        """Wait until every request answered so far is captured and written (from a thread other
        than the event loop's and the scoring threads': tests, tools). False on timeout or with
        capture off."""
        if self.capture is None:
            return False
        deadline = time.monotonic() + timeout
        return self.plane.batcher.drain(timeout) and self.capture.flush(max(0.0, deadline - time.monotonic()))

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING first, then no new calls, in-flight ones finish."""
        grace = self.settings.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.watcher.cancel()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        await self.plane.close()  # the batcher's running batches, then the rollout's shadow
        if self.checkpointer is not None:  # after the last batch: the final state of streaming models
            if self.checkpoint_task is not None:
                self.checkpoint_task.cancel()
            for served in self.plane.models.values():
                await asyncio.get_running_loop().run_in_executor(None, self.checkpointer.save, served.current)
        if self.capture is not None:  # after the batcher and the shadow: their last offers get written
            await asyncio.get_running_loop().run_in_executor(None, self.capture.close)
        if self.feedback is not None:
            self.feedback.close()
        if self.events is not None:  # after the last request: the checkpoint holds every answered event
            if self.feature_checkpoints is not None:
                self.feature_checkpoints.cancel()
            await self.events.stop_routing()
            await self.events.checkpoint()
        log.info("stopped port=%d", self.port)


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load (gRPC cannot use one) instead of prompting on a terminal


def _check_tls(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Load the certificate, the key and the client CA as a TLS server would, before anything is
    bound, so that a key that does not match its certificate (or a file that is not PEM) is named
    as such (gRPC only says that it failed to bind). InvalidInputError otherwise."""
    for flag, path, what, marker in (("--tls-cert", cert, "certificate", b"-----BEGIN CERTIFICATE-----"),
                                     ("--tls-key", key, "private key", b"PRIVATE KEY-----"),
                                     ("--tls-client-ca", client_ca, "certificate", b"-----BEGIN CERTIFICATE-----")):
        if path is not None and marker not in path.read_bytes():
            raise InvalidInputError(f"{flag} {path} holds no PEM {what}: expected a '{marker.decode()}' block")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise InvalidInputError(f"--tls-key {key} does not match the certificate in --tls-cert {cert}") from e
        raise InvalidInputError(f"cannot load --tls-cert {cert} with --tls-key {key}: {e.reason or e}") from e
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as e:
            raise InvalidInputError(f"cannot load --tls-client-ca {client_ca}: {e.reason or e}") from e


def _credentials(s: ServeSettings) -> grpc.ServerCredentials | None:
    if s.tls_cert is None or s.tls_key is None:
        return None
    for flag, path in (("--tls-cert", s.tls_cert), ("--tls-key", s.tls_key), ("--tls-client-ca", s.tls_client_ca)):
        if path is not None and not path.is_file():
            raise InvalidInputError(f"{flag} {path}: no such file")
    _check_tls(s.tls_cert, s.tls_key, s.tls_client_ca)
    key, cert = s.tls_key.read_bytes(), s.tls_cert.read_bytes()
    ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _monitor_factory(settings: ServeSettings, metrics: ServiceMetrics | None, default: str = ""):
    if not settings.drift:
        return None
    share = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    share_dir = Path(share) / "drift" if share else None
    if share_dir is not None:
        share_dir.mkdir(exist_ok=True)

    def factory(handle):
        if share_dir is not None and default and handle.name != default:
            # several models: each model's panes apart (the parent's collector reads the default model's)
            own = share_dir.with_name(f"drift-{handle.name}")
            own.mkdir(exist_ok=True)
            return _monitor(settings, metrics, handle, own)
        return _monitor(settings, metrics, handle, share_dir)

    return factory


def _monitor(settings: ServeSettings, metrics: ServiceMetrics | None, handle: Any, share_dir: Path | None) -> ServingMonitor:
    ref = reference_for(handle.model, settings.drift_config())
    return ServingMonitor(handle.name, ref, metrics, config=settings.drift_config(),
                          pane_records=settings.drift_pane_records or None, pane_seconds=settings.drift_pane_seconds,
                          window_panes=settings.drift_window_panes, share_dir=share_dir, version=handle.version)


async def _background(plane: DataPlane, settings: ServeSettings, feedback: FeedbackService | None = None,
                      discovery: Discovery | None = None, checkpointer: Any = None) -> None:
    """Watch the aliases (and, with ``--models all``, the registry for new models); close
    time-based drift panes even when no traffic comes."""
    while True:
        await asyncio.sleep(settings.reload_interval_s)
        if discovery is not None:
            await discovery.tick()
        for served in list(plane.models.values()):
            await served.slot.check()
            if checkpointer is not None and served.slot.current is not None:  # a reloaded streaming version: its checkpoint
                checkpointer.restore(served.slot.current)
            if served.rollout is not None:  # the challenger alias, and the thresholds in force as metrics
                await served.rollout.tick()
            handle = served.slot.current
            if handle is not None and handle.monitor is not None:
                handle.monitor.tick()
        if feedback is not None:  # quality gauges from the labels, recomputed every few seconds off the loop
            feedback.tick()


async def _start_rollout(settings: ServeSettings, registry: Registry, slot: ModelSlot, metrics: ServiceMetrics | None,
                         policy: DevicePolicy, capture=None, name: str | None = None) -> Rollout:
    """The challenger slot (rollout shadow / split) and the rollout metrics; ``capture`` receives shadow scores."""
    challenger = shadow = None
    rmetrics = RolloutMetrics.for_service(metrics)
    if settings.rollout != "off":
        challenger = ChallengerSlot(registry, name or settings.model, slot, metrics, policy)
        await asyncio.get_running_loop().run_in_executor(None, challenger.load_initial)
        if settings.rollout == "shadow":
            if capture is None:
                log.warning("rollout shadow with capture off: challenger scores are counted but not stored (outlierd compare needs them)")
            shadow = ShadowScorer(capture, rmetrics, max_batch=settings.max_batch, max_records=settings.max_queue_records)
    rollout = Rollout(settings.rollout, settings.split_share, settings.split_key, slot, challenger, shadow, rmetrics)
    await rollout.tick()
    return rollout


async def _start_feedback(settings: ServeSettings, metrics: ServiceMetrics | None,
                          store=None, model: str | None = None) -> tuple[CaptureWriter | None, FeedbackService]:
    """The capture writer (None with capture off) and the feedback service, sharing one store. A
    store that cannot be opened does not stop the server: captures are dropped (counted) and
    feedback answers UNAVAILABLE until it can be opened."""
    path = store_location(settings.feedback_store, settings.registry)
    on_retry = None if metrics is None else (lambda result: metrics.store_retries.labels(result).inc())
    opener = StoreOpener(path, opener=(lambda _p: store) if store is not None else (lambda p: open_store(p, on_retry=on_retry)))
    try:
        await asyncio.get_running_loop().run_in_executor(None, opener.get)
    except OSError as e:
        log.error("feedback store not available; captures are dropped and feedback refused until it is error=%s", e)
    capture = None
    if settings.capture:
        # the store's file is written by a child process (SQLite off this process's GIL); a store
        # object handed in (tests) is written by the writer thread itself
        capture = (CaptureWriter(opener, sample_rate=settings.capture_sample, metrics=metrics) if store is not None else
                   CaptureWriter.in_process(path, sample_rate=settings.capture_sample, metrics=metrics,
                                            retention=Retention(settings.capture_max_age_s, settings.capture_max_bytes))).start()
    return capture, FeedbackService(opener, model or settings.model, metrics, capture=capture, limits=FieldLimits.from_settings(settings))


def _add_oip(plane: DataPlane, settings: ServeSettings, metrics: ServiceMetrics | None, server: grpc.aio.Server) -> tuple[str, ...]:
    """The Open Inference Protocol on the gRPC port, when ``tritonclient`` (its protobuf modules) is
    installed (the ``oip`` extra); the service names added."""
    try:
        from . import oip_grpc
    except ImportError as e:
        log.warning("Open Inference Protocol off: %s (install outlierd[oip])", e)
        return ()
    oip_grpc.add_to_server(oip_grpc.OipServicer(plane, stream_inflight=settings.stream_inflight, metrics=metrics), server)
    return (oip_grpc.SERVICE,)


async def start_worker(settings: ServeSettings, metrics: ServiceMetrics | None = None, store=None, worker_index: int = 0) -> Worker:
    """Load the model, then start serving; returns once the port accepts calls. ``store``: a
    monitoring.store.Store to use instead of opening ``settings.feedback_store`` (tests).
    ``worker_index``: this worker's number among ``settings.workers`` (raw events' entity owners)."""
    creds = _credentials(settings)  # first: a TLS file that cannot serve fails before the model loads
    registry = Registry(settings.registry)
    policy = DevicePolicy(settings.device, settings.gpu_backend, settings.gpu_min_rows)
    names = served_names(registry, settings.model, settings.models, settings.alias)
    loop = asyncio.get_running_loop()
    checkpointer = None
    if settings.checkpoint_dir is not None:  # each model restores before the port opens: a restart resumes at the checkpoint
        from .checkpoint import Checkpointer

        checkpointer = Checkpointer(settings.checkpoint_dir, settings.checkpoint_interval_s)
    capture, feedback = await _start_feedback(settings, metrics, store, names[0])

    async def start_model(name: str) -> ServedModel:
        """One model's slot (loaded and warmed up) and rollout."""
        slot = ModelSlot(registry, name, settings.alias, metrics, monitor_factory=_monitor_factory(settings, metrics, names[0]),
                         policy=policy)
        handle = await loop.run_in_executor(None, slot.load_initial)
        if checkpointer is not None:
            await loop.run_in_executor(None, checkpointer.restore, handle)
        if capture is not None:
            await loop.run_in_executor(None, capture.prepare, handle.model.n_features)
        return ServedModel(slot, await _start_rollout(settings, registry, slot, metrics, policy, capture, name))

    try:
        served = [await start_model(name) for name in names]
    except BaseException:
        if capture is not None:
            capture.close()
        feedback.close()
        raise
    handle = served[0].current
    if settings.drift:  # the drift tick's binomial test imports scipy.stats: now, not on the event loop mid-traffic
        await loop.run_in_executor(None, importlib.import_module, "scipy.stats")
    interceptors = [TokenAuthInterceptor(settings.auth_token)] if settings.auth_token else []
    options = [
        # only several workers of one server share a port; a lone server must fail on a taken port
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options, maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    plane = DataPlane(served, threads=settings.threads,
                      max_batch=settings.max_batch, max_delay_us=settings.max_delay_us,
                      max_queue_records=settings.max_queue_records, max_request_records=settings.max_request_records,
                      max_id_bytes=settings.max_id_bytes, metrics=metrics, capture=capture,
                      trim_after_bytes=settings.trim_after_mb << 20)
    plane.start()
    events = EventFeatures(settings.feature_state_dir, settings.feature_checkpoint_s, metrics, settings.workers, worker_index)
    spec_fitted = events.spec_of(handle)
    if spec_fitted is not None:  # load (or restore) the entity state before serving
        await loop.run_in_executor(None, events.engine, handle, *spec_fitted)
    servicer = ScorerServicer(plane, stream_inflight=settings.stream_inflight, metrics=metrics, feedback=feedback, events=events,
                              max_message_bytes=settings.max_message_bytes,
                              streams=StreamGuard(settings.max_streams_per_peer, settings.max_streams_per_connection,
                                                  settings.stream_idle_s))
    add_to_server(servicer, server)
    services = (SERVICE, *_add_oip(plane, settings, metrics, server))
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as e:  # grpc says "Failed to bind": give the CLI a clear OSError
        await plane.close()
        if capture is not None:
            capture.close()
        feedback.close()
        raise OSError(f"cannot listen on {address}: {e} (is another server using the port?)") from e
    http = None
    if settings.http_port is not None:
        from .http_app import HttpServer, build_app

        try:
            http = HttpServer(build_app(plane, token=settings.auth_token, feedback=feedback, metrics=metrics), settings)
            await http.start()
        except BaseException:
            await plane.close()
            if capture is not None:
                capture.close()
            feedback.close()
            raise
    await server.start()
    await events.start_routing(port, lambda: plane.default.current)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    discovery = Discovery(registry, settings.alias, plane, start_model) if settings.models == ALL else None
    watcher = loop.create_task(_background(plane, settings, feedback, discovery, checkpointer), name="outlierd-reload")
    checkpoint_task = None
    if checkpointer is not None:
        checkpoint_task = loop.create_task(checkpointer.run(lambda: [m.current for m in plane.models.values()]),
                                           name="outlierd-checkpoint")
    log.info("listening address=%s:%d model=%s version=%d alias=%s tls=%s auth=%s models=%s http_port=%s", settings.host, port,
             handle.name, handle.version, settings.alias, creds is not None, bool(settings.auth_token), ",".join(plane.models),
             http.port if http is not None else None)
    feature_checkpoints = loop.create_task(events.run_checkpoints(), name="outlierd-feature-checkpoints")
    return Worker(server, port, plane, health_servicer, watcher, settings, capture, feedback,
                  checkpointer=checkpointer, checkpoint_task=checkpoint_task, http=http, events=events,
                  feature_checkpoints=feature_checkpoints)


async def run_worker(settings: ServeSettings, metrics: ServiceMetrics | None = None,
                     on_serving: Callable[[], None] | None = None, worker_index: int = 0) -> None:
    """Serve until SIGTERM / SIGINT, then stop gracefully. ``on_serving`` is called once the port
    accepts calls (the worker processes tell their parent)."""
    worker = await start_worker(settings, metrics, worker_index=worker_index)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_serving is not None:
        on_serving()
    await stop.wait()
    log.info("shutting down grace=%.1fs", settings.grace_s)
    await worker.stop()
