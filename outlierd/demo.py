"""``outlierd demo``: train, serve, stream with injected anomalies, hot-swap the model, summarise.

The whole loop on one machine, through the real paths only:

1. generate a synthetic card-payments history (13 correlated numeric features), train the default
   detector (Isolation Forest) on it with :func:`outlierd.training.train.train` and publish it as alias
   ``champion`` in a registry;
2. start ``python -m outlierd serve`` on 127.0.0.1 in a subprocess and wait for gRPC health SERVING;
3. stream fresh traffic with anomalies injected at known positions (four kinds) through
   ``ScoreStream``, a live line every second: throughput, flags, recall and precision so far, the
   version serving;
4. a third of the way in, train a new version on a larger, newer window, publish it and move
   ``champion`` to it: the server hot-reloads, and the demo reports the time from the alias move to
   the first response scored by the new version;
5. stop at ``records`` or ``seconds``, print the summary, stop the server with SIGTERM.

Everything is bounded in time and size and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from collections.abc import Iterator

import numpy as np

from outlierd.core.errors import InvalidInputError, OutlierdError
from outlierd.core.registry import CHAMPION
from outlierd.server.settings import ServeSettings

MODEL = "payments"
ALIAS = CHAMPION
HOST = "127.0.0.1"

FEATURES = (
    "log_amount",             # ln(ticket, currency units): amounts are log-normal, as in real card data
    "log_amount_vs_typical",  # ln(amount / the customer's typical ticket)
    "log_typical_amount",     # ln(the customer's typical ticket)
    "hour",                   # local time of day, 0-24
    "merchant_risk",          # merchant's historical fraud score, 0-1
    "card_present",           # 1 chip/contactless, 0 online / keyed
    "log_km_from_home",       # ln(1 + km)
    "log_km_from_last_txn",   # ln(1 + km)
    "log_minutes_since_last", # ln(minutes since the card's previous payment)
    "log_speed_kmh",          # ln(1 + km_from_last_txn / hours since the previous payment)
    "txns_last_1h",
    "log_amount_last_24h",    # ln(total spent on the card in the last 24 h)
    "log_account_age_days",
)
KINDS = ("cash_out", "impossible_travel", "card_testing_burst", "night_spree")
KIND_WEIGHTS = (0.25, 0.25, 0.25, 0.25)

# Share of each hour of the day in normal traffic: quiet nights, a lunch and an evening peak.
_HOUR_WEIGHTS = np.array([0.6, 0.4, 0.3, 0.25, 0.25, 0.4, 1.0, 2.2, 3.4, 4.2, 4.8, 5.4,
                          6.2, 6.0, 5.2, 5.0, 5.3, 6.0, 6.6, 6.4, 5.4, 4.0, 2.6, 1.3])
_HOUR_WEIGHTS = _HOUR_WEIGHTS / _HOUR_WEIGHTS.sum()

DEFAULT_RECORDS = 10_000_000
DEFAULT_SECONDS = 20.0
DEFAULT_BATCH = 256
DEFAULT_TRAIN_RECORDS = 20_000
DEFAULT_ANOMALY_RATE = 0.02
DEFAULT_ALERT_RATE = 0.01
RETRAIN_AT = 1 / 3            # share of --records or --seconds (whichever comes first)
CHUNK = 65_536                # records generated at a time for the stream
READY_TIMEOUT_S = 180.0       # a cold Numba cache compiles the kernels on first start
GRACE_S = 5.0




class DemoError(OutlierdError):
    """The demo could not run to its end (the server did not start, the stream broke...)."""


# ---------------------------------------------------------------------------- synthetic data


def generate_payments(n: int, rng: np.random.Generator, *, anomaly_rate: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic card payments: ``(X, kind)`` with ``X`` (n, 13) float64 in :data:`FEATURES`
    order (heavy-tailed quantities on a log scale, as a payments feature pipeline gives them) and
    ``kind`` (n,) int8, ``-1`` for a normal record, else an index into :data:`KINDS`.

    Normal traffic has correlated structure: a customer's typical ticket drives the amount and the
    24 h total; online payments are larger, riskier and further from home; travel distance is
    bounded by the time since the last payment (ground speed, occasional flights); busy customers
    pay more often. Anomalies, at ``anomaly_rate`` and random positions, break that structure.
    """
    typical = np.exp(rng.normal(np.log(45.0), 0.6, n))
    age = np.clip(np.exp(rng.normal(np.log(700.0), 0.9, n)), 1.0, 6000.0)
    present = rng.random(n) < 0.65
    hour = rng.choice(24, size=n, p=_HOUR_WEIGHTS) + rng.random(n)
    risk = np.clip(rng.beta(2.0, 14.0, n) + np.where(present, 0.0, 0.05), 0.0, 1.0)
    amount = typical * np.exp(rng.normal(0.0, 0.45, n)) * np.where(present, 1.0, 1.25)
    activity = np.exp(rng.normal(0.0, 0.7, n))
    minutes = rng.exponential(600.0 / activity) + 0.5
    home = np.exp(rng.normal(np.log(6.0), 1.0, n)) * np.where(present, 1.0, 2.5)
    km_last = np.minimum(np.exp(rng.normal(np.log(4.0), 1.1, n)), 70.0 * minutes / 60.0 + 1.0)
    trip = rng.random(n) < 0.003  # travellers: a flight since the last payment
    n_trip = int(trip.sum())
    km_last[trip] = rng.uniform(200.0, 3000.0, n_trip)
    minutes[trip] = np.maximum(minutes[trip], km_last[trip] / 750.0 * 60.0 + rng.uniform(60.0, 240.0, n_trip))
    home[trip] = km_last[trip] * rng.uniform(0.7, 1.1, n_trip)
    count_1h = rng.poisson(0.2 * activity) + (minutes < 60.0)
    others_24h = rng.poisson(1.5 * activity)
    sum_24h = amount + others_24h * typical * np.exp(rng.normal(0.0, 0.3, n))

    kind = np.full(n, -1, dtype=np.int8)
    if anomaly_rate > 0:
        bad = np.flatnonzero(rng.random(n) < anomaly_rate)
        kind[bad] = rng.choice(len(KINDS), size=bad.size, p=KIND_WEIGHTS)

        i = np.flatnonzero(kind == 0)  # cash-out: a huge online payment for this customer at a risky merchant
        old = amount[i].copy()
        amount[i] = typical[i] * np.exp(rng.uniform(np.log(25.0), np.log(150.0), i.size))
        risk[i] = rng.uniform(0.3, 0.7, i.size)
        present[i] = False
        sum_24h[i] += amount[i] - old

        i = np.flatnonzero(kind == 1)  # impossible travel: a cloned card used far away minutes later
        km_last[i] = rng.uniform(900.0, 9000.0, i.size)
        minutes[i] = rng.uniform(2.0, 60.0, i.size)
        home[i] = km_last[i] * rng.uniform(0.8, 1.2, i.size)
        present[i] = True
        count_1h[i] += 1

        i = np.flatnonzero(kind == 2)  # card testing: a burst of tiny online payments at risky merchants
        count_1h[i] = rng.integers(10, 40, i.size)
        minutes[i] = rng.uniform(0.05, 1.5, i.size)
        amount[i] = rng.uniform(0.5, 4.0, i.size)
        km_last[i] = rng.uniform(0.0, 1.0, i.size)
        risk[i] = rng.uniform(0.35, 0.9, i.size)
        present[i] = False
        hour[i] = rng.uniform(0.0, 5.0, i.size)
        sum_24h[i] += amount[i] * count_1h[i]

        i = np.flatnonzero(kind == 3)  # night spree: subtler, several-times-typical online buys at night
        hour[i] = rng.uniform(1.0, 5.0, i.size)
        old = amount[i].copy()
        amount[i] = typical[i] * rng.uniform(4.0, 12.0, i.size)
        risk[i] = rng.uniform(0.3, 0.6, i.size)
        present[i] = False
        home[i] = rng.uniform(40.0, 400.0, i.size)
        sum_24h[i] += amount[i] - old

    speed = km_last / (minutes / 60.0)
    X = np.column_stack([np.log(amount), np.log(amount / typical), np.log(typical), hour, risk, present.astype(np.float64),
                         np.log1p(home), np.log1p(km_last), np.log(minutes), np.log1p(speed), count_1h.astype(np.float64),
                         np.log(sum_24h), np.log(age)])
    return X, kind


def write_csv(path: Path, X: np.ndarray, kind: np.ndarray) -> Path:
    """The records with a ``label`` column (1 = injected anomaly; used for evaluation only)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    cols = {name: pa.array(np.round(X[:, j], 4)) for j, name in enumerate(FEATURES)}
    for name in ("card_present", "txns_last_1h"):
        cols[name] = pa.array(X[:, FEATURES.index(name)].astype(np.int64))
    cols["label"] = pa.array((kind >= 0).astype(np.int8))
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(pa.table(cols), path)
    return path


# ---------------------------------------------------------------------------- the server subprocess

_LISTENING = re.compile(r"listening address=\S+:(\d+) ")
_ECHO = ("serving model=", "reloaded model=", "reload refused", "shutting down", "stopped port=", "level=error")
_LOGFMT_PREFIX = re.compile(r"^ts=\S+ level=\S+ logger=\S+ pid=\d+ ")


class _Printer:
    """Whole lines to ``out`` from several threads."""

    def __init__(self, out: TextIO):
        self.out, self.lock = out, threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            print(line, file=self.out, flush=True)


class ServerProcess:
    """``python -m outlierd serve`` on 127.0.0.1, its log kept in a file (reload lines echoed)."""

    def __init__(self, registry: Path, port: int, log_path: Path, say: _Printer):
        self.registry, self.requested_port, self.log_path, self.say = registry, port, log_path, say
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._listening = threading.Event()
        self._tail: deque[str] = deque(maxlen=20)
        self._reader: threading.Thread | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "outlierd", "serve", "--registry", str(self.registry), "--model", MODEL,
                "--alias", ALIAS, "--host", HOST, "--port", str(self.requested_port), "--metrics-port", "0",
                "--grace-s", str(GRACE_S)]

    def start(self) -> None:
        # The demo is self-contained: OUTLIERD_* settings of this shell (TLS, tokens...) do not apply.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_") or k == "OUTLIERD_LOG_LEVEL"}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read_log, name="outlierd-demo-serverlog", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                self._tail.append(line)
                m = _LISTENING.search(line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    self._listening.set()
                if any(s in line for s in _ECHO):
                    self.say(f"  server | {_LOGFMT_PREFIX.sub('', line)}")

    def _died(self) -> DemoError:
        tail = "\n".join(f"    {t}" for t in self._tail)
        return DemoError(f"the server exited with code {self.proc.returncode if self.proc else None} before serving; "
                         f"its last log lines:\n{tail}\n  (full log: {self.log_path})")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Block until gRPC health says SERVING; returns the seconds it took."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from outlierd.v1 import scoring_pb2

        assert self.proc is not None
        t0 = time.perf_counter()
        deadline = t0 + timeout
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None:
                raise self._died()
            if time.perf_counter() > deadline:
                raise DemoError(f"the server did not listen within {timeout:.0f}s (log: {self.log_path})")
        service = scoring_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name
        with grpc.insecure_channel(f"{HOST}:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise self._died()
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - t0
                except grpc.RpcError:
                    pass
                if time.perf_counter() > deadline:
                    raise DemoError(f"the server was not SERVING within {timeout:.0f}s (log: {self.log_path})")
                time.sleep(0.1)

    def stop(self, timeout: float = GRACE_S + 15.0) -> int | None:
        """SIGTERM, wait for the graceful stop (SIGKILL past ``timeout``); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.say(f"  server did not stop within {timeout:.0f}s of SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5.0)
        return self.proc.returncode


# ---------------------------------------------------------------------------- the stream


class _Feed:
    """The request side of the stream (iterated on gRPC's sending thread): fresh traffic in
    ``batch``-record messages until ``records`` or the deadline; the truth of each message goes to
    ``truth`` in send order (responses come back in the same order)."""

    def __init__(self, rng: np.random.Generator, records: int, batch: int, anomaly_rate: float, deadline: float):
        self.rng, self.records, self.batch, self.anomaly_rate, self.deadline = rng, records, batch, anomaly_rate, deadline
        self.truth: queue.SimpleQueue = queue.SimpleQueue()
        self.sent = 0       # records
        self.messages = 0   # messages
        self.stop = threading.Event()

    def batches(self) -> Iterator[np.ndarray]:
        X = kind = None
        pos = 0
        while self.sent < self.records and not self.stop.is_set() and time.perf_counter() < self.deadline:
            if X is None or pos >= X.shape[0]:
                X, kind = generate_payments(min(CHUNK, self.records - self.sent), self.rng, anomaly_rate=self.anomaly_rate)
                X = X.astype(np.float32)
                pos = 0
            assert kind is not None
            n = min(self.batch, X.shape[0] - pos)
            self.truth.put(kind[pos:pos + n])
            self.sent += n
            self.messages += 1
            yield X[pos:pos + n]
            pos += n


@dataclass
class _Tally:
    records: int = 0
    flagged: int = 0
    injected: int = 0
    caught: int = 0

    def add(self, flagged: np.ndarray, injected: np.ndarray) -> None:
        self.records += flagged.size
        self.flagged += int(flagged.sum())
        self.injected += int(injected.sum())
        self.caught += int((flagged & injected).sum())

    @property
    def recall(self) -> float | None:
        return self.caught / self.injected if self.injected else None

    @property
    def precision(self) -> float | None:
        return self.caught / self.flagged if self.flagged else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


@dataclass
class DemoSummary:
    registry: Path
    total: _Tally = field(default_factory=_Tally)  # every streamed record, all versions
    messages: int = 0
    errors: int = 0
    stream_seconds: float = 0.0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    by_version: dict[int, _Tally] = field(default_factory=dict)
    versions_seen: list[int] = field(default_factory=list)
    first_version: int | None = None
    new_version: int | None = None
    alias_moved_at_s: float | None = None
    switch_latency_s: float | None = None
    retrain_error: str | None = None
    server_exit_code: int | None = None
    server_log: Path | None = None

    @property
    def throughput(self) -> float:
        return self.records / self.stream_seconds if self.stream_seconds > 0 else 0.0

    # the totals, read from the tally the stream keeps
    records = property(lambda self: self.total.records)
    injected = property(lambda self: self.total.injected)
    caught = property(lambda self: self.total.caught)
    flagged = property(lambda self: self.total.flagged)
    recall = property(lambda self: self.total.recall)
    precision = property(lambda self: self.total.precision)

    @property
    def ok(self) -> bool:
        """Everything the demo shows happened: records scored, the switch seen, a clean stop."""
        return (self.records > 0 and self.errors == 0 and self.retrain_error is None and self.switch_latency_s is not None
                and self.server_exit_code == 0)


class _Retrainer(threading.Thread):
    """Trains the next version on a larger, newer window, publishes it, then moves the alias."""

    def __init__(self, registry: Path, data_dir: Path, rows: int, seed: int, alert_rate: float, t0: float, say: _Printer):
        super().__init__(name="outlierd-demo-retrain", daemon=True)
        self.registry, self.data_dir, self.rows, self.seed = registry, data_dir, rows, seed
        self.alert_rate, self.t0, self.say = alert_rate, t0, say
        self.version: int | None = None
        self.previous: int | None = None
        self.moved_at: float | None = None  # perf_counter when the alias move began
        self.error: str | None = None

    def run(self) -> None:
        try:
            from outlierd.core.registry import Registry
            from outlierd.training.train import TrainSpec, run_train

            t = time.perf_counter()
            self.say(f"  retrain | t={t - self.t0:5.1f}s  training the next version on {self.rows:,} newer records "
                     f"(seed {self.seed}) while the stream runs")
            rng = np.random.default_rng(self.seed)
            X, kind = generate_payments(self.rows, rng, anomaly_rate=0.002)
            csv = write_csv(self.data_dir / f"payments-train-seed{self.seed}.csv", X, kind)
            res = run_train(TrainSpec(csv, self.registry, MODEL, label_column="label", alert_rate=self.alert_rate,
                                      seed=self.seed, quiet=True))
            reg = Registry(self.registry)
            self.previous = reg.resolve(MODEL, ALIAS)
            self.version = res.version
            self.say(f"  retrain | t={time.perf_counter() - self.t0:5.1f}s  published version {res.version} in "
                     f"{time.perf_counter() - t:.1f}s (training ROC-AUC {res.metrics.get('roc_auc', float('nan')):.3f}); "
                     f"moving alias {ALIAS!r}: {self.previous} -> {res.version}")
            # The switch latency counts from here, set_alias included; set first, as the server may
            # serve the new version before set_alias returns.
            self.moved_at = time.perf_counter()
            reg.set_alias(MODEL, ALIAS, res.version)
        except Exception as e:  # reported in the summary; the stream goes on with the old version
            self.moved_at = None
            self.error = f"{type(e).__name__}: {e}"
            self.say(f"  retrain | failed: {self.error}")


def _check_port_free(port: int) -> None:
    """The server binds with SO_REUSEPORT, so a port another server holds would be shared, not
    refused: look first, with a plain bind."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError as e:
            raise DemoError(f"port {port} on {HOST} is in use ({e.strerror}); choose another --port, or 0 for a free one") from e


def _live_line(t: float, version: int | None, tally: _Tally, rate: float) -> str:
    return (f"  t={t:5.1f}s  v{version}  {tally.records:>10,} records  {rate:>9,.0f} rec/s  flagged {tally.flagged:>7,}  "
            f"caught {tally.caught:,}/{tally.injected:,} injected (recall {_pct(tally.recall)})  precision {_pct(tally.precision)}")


def run_demo(
    registry: str | os.PathLike | None = None,
    *,
    records: int = DEFAULT_RECORDS,
    seconds: float = DEFAULT_SECONDS,
    port: int = 0,
    batch: int = DEFAULT_BATCH,
    train_records: int = DEFAULT_TRAIN_RECORDS,
    anomaly_rate: float = DEFAULT_ANOMALY_RATE,
    alert_rate: float = DEFAULT_ALERT_RATE,
    seed: int = 0,
    retrain_at: float = RETRAIN_AT,
    out: TextIO | None = None,
) -> DemoSummary:
    """Run the demo (see the module docstring); progress goes to ``out`` (default stdout).

    ``registry`` None: a temporary registry, deleted at the end. The retraining starts at
    ``retrain_at`` of ``records`` or ``seconds``, whichever comes first. Returns the summary; its
    ``ok`` says whether everything the demo shows happened.
    """
    if records < 1:
        raise InvalidInputError(f"--records must be >= 1; got {records}")
    if not seconds > 0:
        raise InvalidInputError(f"--seconds must be > 0; got {seconds}")
    if batch < 1:
        raise InvalidInputError(f"--batch must be >= 1; got {batch}")
    if train_records < 100:
        raise InvalidInputError(f"--train-records must be >= 100; got {train_records}")
    if not 0.0 <= anomaly_rate < 0.5:
        raise InvalidInputError(f"--anomaly-rate must be in [0, 0.5); got {anomaly_rate}")
    if not 0.0 <= retrain_at < 1.0:
        raise InvalidInputError(f"retrain_at must be in [0, 1); got {retrain_at}")
    if not 0 <= port < 65536:
        raise InvalidInputError(f"--port must be in 0..65535; got {port}")
    if port:
        _check_port_free(port)  # before any work
    say = _Printer(out or sys.stdout)
    temporary = registry is None
    root = Path(tempfile.mkdtemp(prefix="outlierd-demo-")) if temporary else Path(registry)  # type: ignore[arg-type]
    data_dir = root / ".demo-data"  # not a model name the registry lists (names cannot start with '.')
    data_dir.mkdir(parents=True, exist_ok=True)
    summary = DemoSummary(root, server_log=data_dir / "server.log")
    server: ServerProcess | None = None
    try:
        try:
            from outlierd.training.train import TrainSpec, run_train

            # 1. train and publish the first champion
            say(f"outlierd demo: card payments, {len(FEATURES)} features; registry {root}{' (temporary)' if temporary else ''}")
            say(f"[1/5] training {MODEL!r} (iforest) on {train_records:,} historical payments (alert rate {alert_rate:g})")
            t = time.perf_counter()
            X, kind = generate_payments(train_records, np.random.default_rng(seed), anomaly_rate=0.002)
            csv = write_csv(data_dir / f"payments-train-seed{seed}.csv", X, kind)
            res = run_train(TrainSpec(csv, root, MODEL, label_column="label", alert_rate=alert_rate, alias=ALIAS, seed=seed,
                                      quiet=True))
            summary.first_version = res.version
            say(f"      published {MODEL} version {res.version} as {ALIAS!r} in {time.perf_counter() - t:.1f}s: threshold "
                f"{res.threshold:.4f}, training ROC-AUC {res.metrics.get('roc_auc', float('nan')):.3f}")

            # 2. serve it through the real CLI
            server = ServerProcess(root, port, summary.server_log, say)  # type: ignore[arg-type]
            say(f"[2/5] starting the server: {' '.join(['outlierd', *server.command()[3:]])}")
            server.start()
            ready = server.wait_ready()
            say(f"      SERVING on {HOST}:{server.port} after {ready:.1f}s (gRPC health check)")

            # 3-4. stream, retrain mid-stream, watch the switch
            summary.by_kind = {k: {"injected": 0, "caught": 0} for k in KINDS}
            say(f"[3/5] streaming up to {records:,} payments or {seconds:g}s through ScoreStream, {batch} per message, "
                f"{100 * anomaly_rate:g}% injected anomalies ({', '.join(KINDS)})")
            say(f"[4/5] at {100 * retrain_at:.0f}% of the run a new version is trained and {ALIAS!r} moves to it")
            _stream(server.port, summary, say, records=records, seconds=seconds, batch=batch, train_records=train_records,
                    anomaly_rate=anomaly_rate, alert_rate=alert_rate, seed=seed, retrain_at=retrain_at, data_dir=data_dir,
                    root=root, expect_version=res.version)
        finally:
            if server is not None:
                say(f"[5/5] stopping the server (SIGTERM, grace {GRACE_S:g}s)")
                summary.server_exit_code = server.stop()
                say(f"      server exited with code {summary.server_exit_code}")
        _print_summary(summary, say, temporary)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    return summary


def _stream(port: int | None, s: DemoSummary, say: _Printer, *, records: int, seconds: float, batch: int, train_records: int,
            anomaly_rate: float, alert_rate: float, seed: int, retrain_at: float, data_dir: Path, root: Path,
            expect_version: int) -> None:
    import grpc

    from outlierd.server.client import ScorerClient

    t0 = time.perf_counter()
    feed = _Feed(np.random.default_rng(seed + 1000), records, batch, anomaly_rate, deadline=t0 + seconds)
    total = s.total
    retrainer: _Retrainer | None = None
    last_print, last_records = t0, 0
    version: int | None = None
    try:
        with ScorerClient(f"{HOST}:{port}", timeout=30.0) as client:
            # The server sets SO_REUSEPORT: a busy --port is shared, not refused. Check whom we talk to.
            info = client.model_info()
            if info.model != MODEL or info.version != str(expect_version):
                raise DemoError(f"{HOST}:{port} serves {info.model!r} version {info.version}, not {MODEL!r} version "
                                f"{expect_version}: another server shares this port; choose another --port (or 0)")
            for resp in client.score_stream(feed.batches(), timeout=seconds + 120.0):
                kind = feed.truth.get()
                now = time.perf_counter()
                if resp.request_id != s.messages:  # answers come in request order, one per message
                    raise DemoError(f"response {s.messages} answers request {resp.request_id}: "
                                    "the stream lost or reordered messages")
                s.messages += 1
                if resp.error:
                    s.errors += 1
                    if s.errors <= 3:
                        say(f"  error on message {resp.request_id}: {resp.error}")
                    continue
                injected = kind >= 0
                flagged = resp.anomalous
                total.add(flagged, injected)
                for k, name in enumerate(KINDS):
                    mine = kind == k
                    s.by_kind[name]["injected"] += int(mine.sum())
                    s.by_kind[name]["caught"] += int((flagged & mine).sum())
                v = resp.version
                if v not in s.by_version:
                    s.by_version[v] = _Tally()  # type: ignore[index]
                s.by_version[v].add(flagged, injected)  # type: ignore[index]
                if v != version:
                    if version is not None:
                        say(_live_line(now - t0, version, total, (total.records - last_records) / max(now - last_print, 1e-9)))
                    s.versions_seen.append(v)  # type: ignore[arg-type]
                    if retrainer is not None and retrainer.moved_at is not None and v == retrainer.version:
                        s.switch_latency_s = now - retrainer.moved_at
                        say(f"  >>> SWITCH  t={now - t0:5.1f}s  responses now come from version {v} (was {version}): first one "
                            f"{1e3 * s.switch_latency_s:.0f} ms after the alias move; {s.messages:,} messages answered in order, "
                            f"{s.errors} errors")
                    elif version is not None:
                        say(f"  >>> version changed {version} -> {v} at t={now - t0:.1f}s")
                    version = v
                    last_print, last_records = now, total.records
                if now - last_print >= 1.0:
                    say(_live_line(now - t0, version, total, (total.records - last_records) / (now - last_print)))
                    last_print, last_records = now, total.records
                if retrainer is None and (feed.sent >= retrain_at * records or now - t0 >= retrain_at * seconds):
                    retrainer = _Retrainer(root, data_dir, 2 * train_records, seed + 1, alert_rate, t0, say)
                    retrainer.start()
            if s.messages != feed.messages:  # the stream ended OK, yet some messages got no answer
                raise DemoError(f"the stream ended after {s.messages:,} answers to {feed.messages:,} messages")
    except grpc.RpcError as e:
        raise DemoError(f"the stream broke after {s.messages:,} messages: {e.code().name}: {e.details()}") from e
    finally:
        feed.stop.set()
        s.stream_seconds = time.perf_counter() - t0
        if retrainer is not None:
            retrainer.join(300.0)
    say(_live_line(s.stream_seconds, version, total, total.records / max(s.stream_seconds, 1e-9)) + "  (end; average rate)")
    if retrainer is not None:
        s.new_version, s.retrain_error = retrainer.version, retrainer.error
        if retrainer.moved_at is not None:
            s.alias_moved_at_s = retrainer.moved_at - t0


def _print_summary(s: DemoSummary, say: _Printer, temporary: bool) -> None:
    say()
    say("summary")
    msg_size = f"{s.records / s.messages:,.0f} records/message" if s.messages else "no messages"
    say(f"  records      {s.records:,} in {s.stream_seconds:.1f}s: {s.throughput:,.0f} records/s through ScoreStream "
        f"({s.messages:,} messages, {msg_size}, {s.errors} errors)")
    say(f"  injected     {s.injected:,} anomalies ({100 * s.injected / max(s.records, 1):.1f}%): caught {s.caught:,} "
        f"(recall {_pct(s.recall)})")
    for name, k in s.by_kind.items():
        r = k["caught"] / k["injected"] if k["injected"] else None
        say(f"    {name:<20} caught {k['caught']:>9,} of {k['injected']:>9,} ({_pct(r)})")
    say(f"  flagged      {s.flagged:,}: {s.caught:,} of them injected (precision {_pct(s.precision)}), "
        f"{s.flagged - s.caught:,} normal payments flagged")
    parts = []
    for v, t in s.by_version.items():
        parts.append(f"version {v}: {t.records:,} records, recall {_pct(t.recall)}, precision {_pct(t.precision)}")
    say(f"  versions     {' -> '.join(str(v) for v in s.versions_seen) or 'none'}  ({'; '.join(parts)})")
    if s.switch_latency_s is not None:
        say(f"  switch       {ALIAS!r} moved {s.first_version} -> {s.new_version} at t={s.alias_moved_at_s:.1f}s; first response "
            f"from version {s.new_version} {1e3 * s.switch_latency_s:.0f} ms later (the server polls the alias every "
            f"{1e3 * ServeSettings.reload_interval_s:.0f} ms, then loads, verifies and warms the new version up)")
    elif s.retrain_error:
        say(f"  switch       none: retraining failed ({s.retrain_error})")
    elif s.alias_moved_at_s is not None:
        say(f"  switch       {ALIAS!r} moved to version {s.new_version} at t={s.alias_moved_at_s:.1f}s but the stream ended before "
            "a response came from it: raise --records or --seconds")
    else:
        say("  switch       none: the stream ended before the retrained version was published: raise --records or --seconds")
    say(f"  server       exit code {s.server_exit_code} after SIGTERM" + ("" if temporary else f"; log {s.server_log}"))
    if temporary:
        say("  registry     temporary, deleted; keep one with --registry DIR")
    else:
        say(f"  registry     {s.registry}: outlierd registry list --registry {s.registry} --model {MODEL}")
    say(f"demo {'OK' if s.ok else 'INCOMPLETE'}")
