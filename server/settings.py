"""Typed settings of ``outlierd serve``; every field can come from an ``OUTLIERD_*`` variable.

Each field's docstring (the string under it) is its ``--flag``'s help: ``outlierd serve``'s flags are
generated from these fields (``outlierd.cli``), with the type and default shown from the field.
``field(metadata=...)`` says what the generated flag needs beyond that: ``choices``; ``metavar``;
``flag``/``dest``/``const`` for the flags of another form (``--no-drift`` stores 0 in ``drift``);
``cli_note``, said in the help instead of the default.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from outlierd.core.errors import InvalidInputError
from outlierd.core.registry import CHAMPION


@dataclass
class ServeSettings:
    registry: Path = field(metadata={"metavar": "DIR", "cli_note": "required here or as OUTLIERD_REGISTRY"})
    """Registry root directory (a shared volume for many replicas)."""
    model: str = field(metadata={"metavar": "NAME", "append": True,
                                 "cli_note": "required here or as OUTLIERD_MODEL, unless --models all; give it again for more models"})
    """Registry model name this server serves (requests with an empty ``model`` get it)."""
    alias: str = field(default=CHAMPION, metadata={"metavar": "ALIAS"})
    """Alias whose version is served; watched for changes (hot reload)."""
    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = field(default=50051, metadata={"metavar": "PORT"})
    """gRPC port (0: pick a free one; single worker only)."""
    metrics_port: int = field(default=9100, metadata={"metavar": "PORT"})
    """Prometheus /metrics port (0: no metrics server)."""
    metrics_host: str | None = field(default=None, metadata={
        "metavar": "ADDR", "cli_note": "default: 127.0.0.1 when --auth-token-file or TLS is on, else --host"})
    """Address the /metrics server listens on. /metrics has no token or TLS of its own: with either on
    the gRPC port it stays on loopback unless an address is given here."""
    workers: int = 1
    """Worker processes sharing the port with SO_REUSEPORT."""
    threads: int = 2
    """Scoring threads per worker (kernels release the GIL)."""
    max_batch: int = 1024
    """Micro-batch size in records; requests this large or larger pass straight through."""
    max_delay_us: int = 0
    """Extra wait for a batch to fill. Requests coalesce anyway while the scoring threads are busy;
    asyncio timers have ~1 ms granularity, so small values cost about 1 ms of latency."""
    max_queue_records: int = 262144
    """Records admitted and not yet answered (queued or being scored); beyond it, RESOURCE_EXHAUSTED."""
    trim_after_mb: int = 8
    """After a request of at least this many MB, the worker gives its free heap back to the OS once no
    record is in flight (glibc malloc_trim, at most once a second), so memory falls back after bursts
    of large requests (0: never)."""
    max_concurrent_rpcs: int = 4096
    """Concurrent RPCs per worker; gRPC answers RESOURCE_EXHAUSTED beyond it."""
    max_request_records: int = 1048576
    """Records per request; larger requests are INVALID_ARGUMENT."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Transport cap on a message's size (gRPC answers RESOURCE_EXHAUSTED beyond it)."""
    stream_inflight: int = 8
    """Messages of one stream scored concurrently (responses still come in order)."""
    stream_idle_s: float = 300.0
    """A stream (ScoreStream, SubmitFeedbackStream) with no message and nothing unanswered for this
    long is closed with UNAVAILABLE, so idle streams cannot hold the concurrent-RPC capacity (0: never)."""
    max_streams_per_peer: int = 1024
    """Open streams from one client address at most; beyond it a new stream is RESOURCE_EXHAUSTED
    (unary calls and other clients keep the rest of --max-concurrent-rpcs)."""
    max_streams_per_connection: int = 256
    """Open streams on one connection (channel) at most; beyond it a new stream is RESOURCE_EXHAUSTED."""
    reload_interval_s: float = 0.25
    """How often workers check the alias."""
    grace_s: float = 10.0
    """On SIGTERM: how long in-flight work may take to finish."""
    device: str = field(default="auto", metadata={"choices": ("cpu", "cuda", "auto")})
    """cpu, cuda (every batch on the GPU; fails at start without one) or auto (large batches on the GPU when present)."""
    gpu_backend: str = field(default="onnx", metadata={"choices": ("onnx", "torch", "cuda")})
    """Backend for GPU batches: onnx (ONNX Runtime CUDA), torch, or cuda (the custom CUDA kernel; Isolation Forest)."""
    gpu_min_rows: int = 65536  # measured crossover on an H200 (torch backend): between 4,096 and 65,536 rows
    """With device auto: batches of at least this many records go to the GPU (measure it: benchmarks/gpu_suite.py)."""
    drift: int = field(default=1, metadata={"flag": "--no-drift", "const": 0})
    """Drift and data-quality monitoring on the scoring path (1 on, 0 off)."""
    drift_pane_records: int = 0
    """Close a drift pane every N records (0: by time, every drift_pane_seconds)."""
    drift_pane_seconds: float = 15.0
    """Pane length in seconds when panes go by time (they then align across workers)."""
    drift_window_panes: int = 4
    """Panes in the sliding drift window (1: tumbling windows)."""
    drift_psi_warn: float = 0.1
    """PSI at or above which a feature is 'warn'."""
    drift_psi_drift: float = 0.25
    """PSI at or above which a feature is 'drift'."""
    drift_min_records: int = 1000
    """Windows with fewer records are not judged."""
    rollout: str = field(default="off", metadata={"choices": ("off", "shadow", "split")})
    """Challenger rollout: off; shadow (the 'challenger' alias scores every message too, captured, never
    returned); split (a share of messages is answered by the challenger). No challenger alias: champion only."""
    split_share: float = 0.1
    """With rollout split: the share of messages (by a stable hash of split_key) answered by the challenger."""
    split_key: str = field(default="id", metadata={"choices": ("id", "request")})
    """With rollout split: route each message by its first record id (id; messages without ids by
    request_id) or by its request_id (request)."""
    capture: int = field(default=1, metadata={"flag": "--no-capture", "const": 0})
    """Prediction capture into the feedback store (1 on, 0 off): every flagged record and a random sample of the others.
    Feedback RPCs store labels either way."""
    capture_sample: float = 0.01
    """Share of unflagged records captured (the random sample that estimates recall from labels)."""
    capture_max_age_s: float = 7 * 24 * 3600.0
    """Captured predictions older than this are deleted, labelled ones kept (0: kept forever)."""
    capture_max_bytes: int = 4 * 1024**3
    """The capture store's size bound: beyond it the oldest unlabelled predictions are deleted (0: none)."""
    feedback_store: Path | str | None = None
    """Feedback store for captures and labels: a SQLite file, or a ``postgresql://`` URL (one store for
    many replicas); default: feedback.sqlite in the registry directory."""
    tls_cert: Path | None = field(default=None, metadata={"metavar": "PEM"})
    """Server certificate (PEM) for TLS."""
    tls_key: Path | None = field(default=None, metadata={"metavar": "PEM"})
    """Server private key (PEM) for TLS."""
    tls_client_ca: Path | None = field(default=None, metadata={"metavar": "PEM"})
    """CA bundle (PEM): when set, clients must present a certificate it signed (mutual TLS)."""
    max_id_bytes: int = 256
    """Longest record id in UTF-8 bytes (each of a ScoreRequest's ids, a FeedbackRequest's record_id);
    a longer one is INVALID_ARGUMENT."""
    max_reviewer_bytes: int = 256
    """Longest FeedbackRequest reviewer in UTF-8 bytes; a longer one is INVALID_ARGUMENT."""
    max_note_bytes: int = 4096
    """Longest FeedbackRequest note in UTF-8 bytes; a longer one is INVALID_ARGUMENT."""
    feature_state_dir: Path | None = field(default=None, metadata={"metavar": "DIR"})
    """Raw events (models with a feature spec): checkpoint the per-entity feature state here, restored at
    start when the spec is the same (default: no checkpoints; the state starts empty at each start)."""
    feature_checkpoint_s: float = 30.0
    """Seconds between feature state checkpoints (also written on a graceful stop; 0: only then)."""
    auth_token: str | None = field(default=None, repr=False, metadata={
        "flag": "--auth-token-file", "dest": "auth_token_file", "metavar": "FILE",
        "cli_note": "the CLI reads it from FILE, or from OUTLIERD_AUTH_TOKEN"})
    """Bearer token clients must send (``authorization: Bearer …``); health checks are exempt."""
    checkpoint_dir: Path | None = field(default=None, metadata={"metavar": "DIR"})
    """Streaming models (hst): where their learned state is checkpointed (DIR/<model>/v<version>) and
    restored from when the version starts serving; default: none (a restart starts from the artifact)."""
    checkpoint_interval_s: float = 5.0
    """Streaming models: seconds between checkpoints of the learned state (with --checkpoint-dir)."""
    models: str | None = field(default=None, metadata={"metavar": "NAMES|all", "cli_note": "default: --model only"})
    """More models in this server: comma-separated names (as --model given again), or 'all': every registry model
    with the alias, one added later picked up without a restart. Each has its own slot, hot reload, threshold and
    metrics labels; --model is the default for requests without a model name."""
    http_port: int | None = field(default=None, metadata={"metavar": "PORT", "cli_note": "default: no HTTP port"})
    """HTTP port in the same workers: the Open Inference Protocol's REST routes (/v2/...), JSON routes
    (/v1/models/NAME/score, /feedback), the OpenAPI page at /docs; same token and TLS as gRPC (0: a free one, single worker)."""

    @classmethod
    def from_env(cls, **overrides: object) -> ServeSettings:
        """Settings from ``OUTLIERD_<FIELD>`` variables, then ``overrides`` (CLI flags) on top."""
        values: dict[str, Any] = {}  # Any: checked by validate() below, not by static types
        for f in fields(cls):
            env = os.environ.get(f"OUTLIERD_{f.name.upper()}")
            if env is not None:
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        for f in fields(cls):
            raw = values.get(f.name)
            if isinstance(raw, str):
                t = str(f.type)
                if t.startswith("int"):
                    values[f.name] = int(raw)
                elif t.startswith("float"):
                    values[f.name] = float(raw)
                elif "Path" in t:
                    values[f.name] = raw if raw.startswith(("postgresql://", "postgres://")) else Path(raw)  # a URL stays a URL
        s = cls(**values)
        s.validate()
        return s

    def validate(self) -> None:
        for name in ("workers", "threads", "max_batch", "max_queue_records", "max_request_records", "stream_inflight",
                     "max_concurrent_rpcs", "drift_window_panes", "max_streams_per_peer", "max_streams_per_connection",
                     "max_id_bytes", "max_reviewer_bytes", "max_note_bytes"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise InvalidInputError(f"--device must be cpu, cuda or auto; got {self.device!r}")
        if self.gpu_backend not in ("onnx", "torch", "cuda"):
            raise InvalidInputError(f"--gpu-backend must be onnx, torch or cuda; got {self.gpu_backend!r}")
        if self.drift_pane_records < 0 or self.drift_pane_seconds <= 0:
            raise InvalidInputError("--drift-pane-records must be >= 0 and --drift-pane-seconds > 0")
        if self.rollout not in ("off", "shadow", "split"):
            raise InvalidInputError(f"--rollout must be off, shadow or split; got {self.rollout!r}")
        if not 0.0 <= self.split_share <= 1.0:
            raise InvalidInputError(f"--split-share must be in [0, 1]; got {self.split_share}")
        if self.split_key not in ("id", "request"):
            raise InvalidInputError(f"--split-key must be id or request; got {self.split_key!r}")
        if not 0.0 <= self.capture_sample <= 1.0:
            raise InvalidInputError(f"--capture-sample must be in [0, 1]; got {self.capture_sample}")
        if not self.stream_idle_s >= 0:
            raise InvalidInputError(f"--stream-idle-s must be >= 0 (0: never); got {self.stream_idle_s}")
        if self.trim_after_mb < 0:
            raise InvalidInputError(f"--trim-after-mb must be >= 0 (0: never); got {self.trim_after_mb}")
        if self.capture_max_age_s < 0 or self.capture_max_bytes < 0:
            raise InvalidInputError("--capture-max-age-s and --capture-max-bytes must be >= 0 (0: no bound)")
        if not self.checkpoint_interval_s > 0:
            raise InvalidInputError(f"--checkpoint-interval-s must be > 0; got {self.checkpoint_interval_s}")
        if self.max_delay_us < 0:
            raise InvalidInputError(f"--max-delay-us must be >= 0; got {self.max_delay_us}")
        if self.http_port is not None and (self.http_port < 0 or (self.workers > 1 and self.http_port == 0)):
            raise InvalidInputError(f"--http-port must be a port number (0: a free one, single worker only); got {self.http_port}")
        if self.workers > 1 and self.port == 0:
            raise InvalidInputError("--port 0 cannot be shared by several workers; choose a port")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInputError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidInputError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    def metrics_bind_host(self) -> str:
        """Where /metrics listens: ``metrics_host``; by default loopback when a token or TLS guards
        the gRPC port (an open /metrics beside it would undo that), else ``host``."""
        if self.metrics_host:
            return self.metrics_host
        return "127.0.0.1" if self.auth_token or self.tls_cert is not None else self.host

    def drift_config(self):
        from outlierd.monitoring.drift import DriftConfig

        return DriftConfig(psi_warn=self.drift_psi_warn, psi_drift=self.drift_psi_drift, min_records=self.drift_min_records)


@functools.cache
def field_docs() -> dict[str, str]:
    """Each :class:`ServeSettings` field's docstring, whitespace folded to single spaces (read once,
    from the class's source: attribute docstrings are not kept at run time)."""
    cls = ast.parse(inspect.getsource(ServeSettings)).body[0]
    assert isinstance(cls, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, nxt in zip(cls.body, cls.body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
