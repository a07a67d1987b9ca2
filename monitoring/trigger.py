"""Retraining triggers: close the loop from drift to a freshly trained ``challenger``.

A :class:`RetrainPolicy` retrains a model and publishes the result under the ``challenger`` alias --
never ``champion``: promotion stays a separate, gated step. It triggers

- **on demand** (:meth:`RetrainPolicy.trigger_now`, ``outlierd retrain-policy --now``);
- **on sustained drift**: every ``interval`` seconds it scrapes the server's ``/metrics`` and reads
  the last evaluated drift window of the model (``outlierd_feature_drift_state{model,feature}``,
  ``outlierd_feature_psi``, ``outlierd_drift_window_records{model}``, ...). A scrape whose window has
  records and shows state 2 (drift) for a feature extends that feature's run of drifted windows; any
  other scrape (state 0/1, an empty or missing window, a failed scrape) ends it. When one feature's
  run reaches ``sustained`` it triggers;
- **on a schedule**: ``every`` seconds after the start or the last trigger of any kind.

New windows are detected by **counting scrapes**, not by watching the gauges change: the server
evaluates one window per drift pane (``--drift-pane-seconds``, 15 s by default), so ``interval``
should equal the pane length (the default is 15 s) for one scrape to be one window. (Watching
``outlierd_drift_window_records`` for a change would miss new windows under a steady record rate, when
consecutive sliding windows hold the same number of records.) With sliding windows of ``P`` panes,
``N`` consecutive drifted windows span ``N + P - 1`` panes of traffic.

After a trigger the runs are reset, so the same drift needs ``sustained`` new windows to trigger
again, and the next scrape waits a cool-down (``cooldown``, at least one ``interval``). Every trigger
-- its kind, reason, data, the new version or the error -- is appended to the model's registry audit
log as ``action="retrain_trigger"``. Progress goes to stderr as ``retrain-policy ... key=value`` lines.

Training itself is injected (``train``: the signature of :func:`training.train.train`), so this
module depends on ``core`` only, as the layering asks.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from outlierd.core.errors import DataError, InvalidInputError, UnavailableError
from outlierd.core.registry import Registry, validate_name

CHALLENGER = "challenger"
AUDIT_ACTION = "retrain_trigger"
DATA_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".parquet", ".pq")

STATE_DRIFT = 2
_STATE = "outlierd_feature_drift_state"
_PSI = "outlierd_feature_psi"
_RECORDS = "outlierd_drift_window_records"
_PER_MODEL = {"outlierd_score_ks": "score_ks", "outlierd_alert_rate": "alert_rate",
              "outlierd_alert_rate_pvalue": "alert_rate_p"}


# ---------------------------------------------------------------------------------- the window


@dataclass(frozen=True)
class WindowView:
    """The last evaluated drift window of one model, as read from a ``/metrics`` exposition."""

    records: float
    states: dict[str, int] = field(default_factory=dict)
    psi: dict[str, float] = field(default_factory=dict)
    score_ks: float | None = None
    alert_rate: float | None = None
    alert_rate_p: float | None = None

    @property
    def judged(self) -> bool:
        return self.records > 0


def parse_window(text: str, model: str) -> WindowView | None:
    """Read ``model``'s drift window out of Prometheus text exposition ``text``.

    Returns ``None`` when there is none (drift monitoring off, no window evaluated yet, another
    model). Raises ``ValueError`` when ``text`` is not a valid exposition.
    """
    records: float | None = None
    states: dict[str, int] = {}
    psi: dict[str, float] = {}
    extra: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == _RECORDS:
                records = s.value
            elif s.name == _STATE and "feature" in s.labels:
                states[s.labels["feature"]] = int(s.value) if math.isfinite(s.value) else 0
            elif s.name == _PSI and "feature" in s.labels:
                psi[s.labels["feature"]] = s.value
            elif s.name in _PER_MODEL:
                extra[_PER_MODEL[s.name]] = s.value
    if records is None:
        return None
    return WindowView(records if math.isfinite(records) else 0.0, states, psi, **extra)


class ScrapeError(UnavailableError):
    """The metrics endpoint could not be read or parsed."""


def scrape(url: str, model: str, timeout: float = 5.0) -> WindowView | None:
    """GET ``url`` and :func:`parse_window` the answer; :class:`ScrapeError` when that fails."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ScrapeError(f"cannot read {url}: {reason}") from e
    try:
        return parse_window(text, model)
    except ValueError as e:
        raise ScrapeError(f"{url} did not answer a Prometheus exposition: {e}") from e


class DriftTracker:
    """Runs of consecutive drifted windows per feature.

    :meth:`update` takes one window per call (``None``: no window, or a failed scrape) and returns
    the features whose run has reached ``sustained``. A window without records (not judged) or with
    a feature below state 2 ends that feature's run; a missing window ends every run.
    """

    def __init__(self, sustained: int):
        if not isinstance(sustained, int) or isinstance(sustained, bool) or sustained < 1:
            raise InvalidInputError(f"sustained must be a whole number of windows >= 1; got {sustained!r}")
        self.sustained = sustained
        self.runs: dict[str, int] = {}

    def update(self, window: WindowView | None) -> list[str]:
        if window is None or not window.judged:
            self.runs.clear()
            return []
        self.runs = {f: self.runs.get(f, 0) + 1 for f, s in window.states.items() if s >= STATE_DRIFT}
        return sorted((f for f, n in self.runs.items() if n >= self.sustained), key=lambda f: (-window.psi.get(f, 0.0), f))

    def reset(self) -> None:
        self.runs.clear()


# ---------------------------------------------------------------------------------- the policy


@dataclass
class Trigger:
    """One retraining trigger and its outcome (``version`` is ``None`` when training failed)."""

    kind: str  # "drift", "schedule" or "on_demand"
    reason: str
    data: str
    version: int | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def resolve_data(path: str | os.PathLike) -> Path:
    """The training data a trigger uses: ``path`` itself when it is a file, else the newest data
    file (``.csv``, ``.csv.gz``, ``.tsv``, ``.parquet``, ``.pq``) in the directory ``path`` -- the
    latest captured data. Raises ``ValueError`` when there is none."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        files = [e for e in p.iterdir() if e.is_file() and e.name.endswith(DATA_SUFFIXES) and not e.name.startswith(".")]
        if not files:
            raise DataError(f"data directory {p} holds no data file ({', '.join(DATA_SUFFIXES)})")
        return max(files, key=lambda e: (e.stat().st_mtime_ns, e.name))
    if p.exists():
        raise DataError(f"data {p} is neither a file nor a directory")
    raise DataError(f"data {p}: no such file or directory (give a training data file, or a directory of captured data files)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    s = str(value)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n\t')) else s


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class RetrainPolicy:
    """Retrain ``model`` of the registry at ``registry`` on ``data`` and publish it as ``challenger``.

    ``train`` is called as ``train(data, registry, model, alias="challenger", quiet=True,
    **train_kwargs)`` and must return an object with the new ``version`` (as
    :func:`training.train.train` does). ``metrics_url`` (the server's ``/metrics``) enables drift
    triggers after ``sustained`` consecutive drifted windows, scraped every ``interval`` seconds;
    ``every`` > 0 enables schedule triggers. :meth:`run` loops until :meth:`stop`, ``max_triggers``
    triggers or ``max_seconds``. ``log`` receives one ``retrain-policy ...`` line per event.
    """

    def __init__(
        self,
        registry: str | os.PathLike,
        model: str,
        data: str | os.PathLike,
        *,
        train: Callable[..., Any],
        train_kwargs: Mapping[str, Any] | None = None,
        metrics_url: str | None = None,
        sustained: int = 3,
        interval: float = 15.0,
        every: float = 0.0,
        cooldown: float | None = None,
        max_triggers: int | None = None,
        max_seconds: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        validate_name(model)
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
            raise InvalidInputError(f"interval must be > 0 seconds; got {interval!r}")
        if not (isinstance(every, (int, float)) and math.isfinite(every) and every >= 0):
            raise InvalidInputError(f"every must be >= 0 seconds (0: no schedule); got {every!r}")
        if max_triggers is not None and (not isinstance(max_triggers, int) or max_triggers < 1):
            raise InvalidInputError(f"max_triggers must be >= 1; got {max_triggers!r}")
        if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
            raise InvalidInputError(f"max_seconds must be > 0; got {max_seconds!r}")
        if metrics_url is not None and not metrics_url.startswith(("http://", "https://")):
            raise InvalidInputError(f"metrics URL must start with http:// or https://; got {metrics_url!r}")
        self.tracker = DriftTracker(sustained)
        p = Path(data)
        if not p.exists():
            raise DataError(f"data {p}: no such file or directory (give a training data file, or a directory of captured data files)")
        if not (p.is_file() or p.is_dir()):
            raise DataError(f"data {p} is neither a file nor a directory")
        self.registry = Registry(registry)
        self.model, self.data = model, p
        self.train, self.train_kwargs = train, dict(train_kwargs or {})
        self.metrics_url, self.interval, self.every = metrics_url, float(interval), float(every)
        self.cooldown = max(float(cooldown) if cooldown is not None else 0.0, self.interval)
        self.max_triggers, self.max_seconds = max_triggers, max_seconds
        self.log_line = log or _stderr_log
        self.triggers: list[Trigger] = []
        self._stop = threading.Event()
        self._stop_reason = "stopped"

    # ------------------------------------------------------------------ logging and control

    def log(self, event: str, level: str = "info", **fields: Any) -> None:
        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        kv = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None)
        self.log_line(f"retrain-policy ts={ts} level={level} event={event} model={self.model}" + (f" {kv}" if kv else ""))

    def stop(self, reason: str = "stopped") -> None:
        """Ask :meth:`run` to return (a trigger in progress finishes first)."""
        self._stop_reason = reason
        self._stop.set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` (or a signal under :meth:`handle_signals`); False on timeout."""
        return self._stop.wait(timeout)

    @contextmanager
    def handle_signals(self) -> Iterator[None]:
        """Within the block, SIGTERM and SIGINT stop the loop instead of killing it mid-training (a
        second signal raises ``KeyboardInterrupt`` at once). Only in the main thread (elsewhere it
        does nothing); the previous handlers come back after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.getsignal(s) for s in sigs}

        def handler(signum: int, _frame: Any) -> None:
            if self._stop.is_set():
                raise KeyboardInterrupt
            self.stop(signal.Signals(signum).name)

        for s in sigs:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ triggering

    def trigger(self, kind: str, reason: str, *, raise_errors: bool = False, audit: Mapping[str, Any] | None = None) -> Trigger:
        """Train on the (latest) data, publish as ``challenger``, audit the trigger (with the extra
        fields ``audit``, e.g. an alert's group key). A failed training is logged, audited and kept
        in the returned :class:`Trigger`; with ``raise_errors`` it is then raised again."""
        t0 = time.perf_counter()
        self.log("trigger", kind=kind, reason=reason)
        data = str(self.data)
        version: int | None = None
        error: str | None = None
        failure: Exception | None = None
        try:
            path = resolve_data(self.data)
            data = str(path.resolve())
            res = self.train(path, self.registry.root, self.model, alias=CHALLENGER, quiet=True, **self.train_kwargs)
            version = int(res.version)
        except Exception as e:  # a failed retraining is reported and audited, never a crash of the loop
            error, failure = str(e) or type(e).__name__, e
        seconds = time.perf_counter() - t0
        trig = Trigger(kind, reason, data, version, error, seconds)
        self.triggers.append(trig)
        self.tracker.reset()
        self.registry.record(self.model, AUDIT_ACTION, kind=kind, reason=reason, data=data, alias=CHALLENGER,
                             version=version, result="published" if error is None else "failed",
                             **({"error": error} if error is not None else {}), **dict(audit or {}))
        if error is None:
            self.log("published", kind=kind, version=version, alias=CHALLENGER, data=data, seconds=round(seconds, 3))
        else:
            self.log("retrain_failed", level="error", kind=kind, data=data, error=error)
            if raise_errors and failure is not None:
                raise failure
        return trig

    def trigger_now(self) -> Trigger:
        """The on-demand trigger (reason ``"on demand"``); a failed training raises (after the audit)."""
        return self.trigger("on_demand", "on demand", raise_errors=True)

    def _drift_reason(self, features: list[str], window: WindowView) -> str:
        parts = [f"{f} (psi {window.psi[f]:.3f})" if f in window.psi else f for f in features]
        return f"drift sustained over {self.tracker.sustained} windows on {', '.join(parts)}"

    def poll(self) -> Trigger | None:
        """One scrape: update the drift runs and trigger when a feature's run is long enough."""
        assert self.metrics_url is not None
        try:
            window = scrape(self.metrics_url, self.model, timeout=min(max(self.interval, 1.0), 10.0))
        except ScrapeError as e:
            self.tracker.update(None)
            self.log("scrape_failed", level="warning", url=self.metrics_url, error=str(e))
            return None
        hits = self.tracker.update(window)
        if window is None:
            self.log("no_window", url=self.metrics_url)
            return None
        runs = ",".join(f"{f}:{n}" for f, n in sorted(self.tracker.runs.items())) or "-"
        self.log("window", records=int(window.records), drifting=runs, sustained=self.tracker.sustained,
                 score_ks=window.score_ks, alert_rate=window.alert_rate)
        if hits:
            return self.trigger("drift", self._drift_reason(hits, window))
        return None

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[Trigger]:
        """Scrape and trigger until stopped; returns the triggers of this run."""
        if self.metrics_url is None and self.every <= 0:
            raise InvalidInputError("nothing to trigger on: give a metrics URL (drift), a schedule (every > 0) or trigger on demand")
        clock = time.monotonic
        start = clock()
        deadline = start + self.max_seconds if self.max_seconds else math.inf
        next_scrape = start if self.metrics_url else math.inf
        next_schedule = start + self.every if self.every > 0 else math.inf
        self.log("start", url=self.metrics_url, sustained=self.tracker.sustained, interval=self.interval,
                 every=self.every or None, cooldown=self.cooldown, data=str(self.data), alias=CHALLENGER)
        count = 0
        while not self._stop.is_set():
            now = clock()
            if now >= deadline:
                self.stop("max_seconds")
                break
            trig: Trigger | None = None
            if now >= next_schedule:
                trig = self.trigger("schedule", "schedule")
            elif now >= next_scrape:
                next_scrape = max(next_scrape + self.interval, now)
                trig = self.poll()
            if trig is not None:
                count += 1
                after = clock()
                next_schedule = after + self.every if self.every > 0 else math.inf
                if self.metrics_url:
                    next_scrape = after + self.cooldown
                if self.max_triggers is not None and count >= self.max_triggers:
                    self.stop("max_triggers")
                    break
                continue
            self._stop.wait(max(0.0, min(next_scrape, next_schedule, deadline) - clock()))
        self.log("stop", reason=self._stop_reason, triggers=count,
                 failed=sum(not t.ok for t in self.triggers[-count:]) if count else 0)
        return self.triggers[-count:] if count else []
