"""Retraining from Prometheus alerts: an Alertmanager webhook receiver.

Alertmanager's webhook (payload ``version: "4"``) posts groups of alerts. :class:`AlertReceiver`
turns a **firing** alert for the policy's model (label ``model``) whose ``alertname`` is one of
``alertnames`` (default: the drift alerts of ``deploy/prometheus/outlierd-rules.yml``) into a
retraining by :meth:`~monitoring.trigger.RetrainPolicy.trigger` (kind ``"alert"``): a challenger is
trained and published, on the receiver's one worker thread (the webhook is answered at once:
Alertmanager does not wait for training).

Deduplication: Alertmanager re-sends a group every ``repeat_interval`` while it fires; one group
(its ``groupKey``) triggers at most once per ``cooldown_s``. The last trigger of each group is
looked up in the model's registry audit log, so a restarted receiver (or another replica) does not
trigger again within the cooldown. Every decision is audited (``action="retrain_trigger"``, with
``group_key`` and ``alertname``): a trigger with the training's result, a duplicate with
``result="deduplicated"``.

:func:`serve` runs the receiver on a plain :mod:`http.server` (no web framework): ``POST`` any path
with the JSON payload; ``GET /healthz`` answers 200. A malformed payload gets 400 naming what is
wrong.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from outlierd.core.errors import InvalidInputError

from .trigger import AUDIT_ACTION, RetrainPolicy, Trigger

log = logging.getLogger("outlierd.alerts")

DRIFT_ALERTS = ("OutlierdFeatureDrift", "OutlierdAlertRateShift")
DEFAULT_COOLDOWN_S = 3600.0
MAX_BODY_BYTES = 1 << 20
KIND = "alert"


@dataclass(frozen=True)
class Alert:
    """One alert of a webhook payload."""

    status: str                 # "firing" | "resolved"
    labels: dict[str, str]
    group_key: str
    starts_at: str = ""

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")


def parse_payload(payload: Any) -> list[Alert]:
    """The alerts of an Alertmanager webhook payload (version 4); :class:`InvalidInputError` naming
    the first thing that is wrong."""
    if not isinstance(payload, dict):
        raise InvalidInputError(f"payload must be a JSON object; got {type(payload).__name__}")
    if str(payload.get("version")) != "4":
        raise InvalidInputError(f"payload version must be \"4\" (Alertmanager webhook); got {payload.get('version')!r}")
    group_key = payload.get("groupKey")
    if not isinstance(group_key, str) or not group_key:
        raise InvalidInputError("payload groupKey must be a non-empty string")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise InvalidInputError("payload alerts must be a list")
    common = payload.get("commonLabels") or {}
    out = []
    for i, a in enumerate(alerts):
        if not isinstance(a, dict):
            raise InvalidInputError(f"alerts[{i}] must be an object")
        labels = a.get("labels")
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise InvalidInputError(f"alerts[{i}].labels must be an object of strings")
        status = a.get("status", payload.get("status"))
        if status not in ("firing", "resolved"):
            raise InvalidInputError(f"alerts[{i}].status must be firing or resolved; got {status!r}")
        out.append(Alert(status, {**common, **labels}, group_key, str(a.get("startsAt", ""))))
    return out


@dataclass
class Outcome:
    """What one payload led to (the webhook's JSON answer)."""

    triggered: list[str] = field(default_factory=list)     # group keys that start a retraining
    deduplicated: list[str] = field(default_factory=list)  # ... already triggered within the cooldown
    ignored: int = 0                                        # resolved, another model, another alert name

    def as_dict(self) -> dict[str, Any]:
        return {"triggered": self.triggered, "deduplicated": self.deduplicated, "ignored": self.ignored}


class AlertReceiver:
    """Firing alerts for ``policy.model`` -> retraining, deduplicated per group key within
    ``cooldown_s`` (see the module docstring). ``triggers`` holds the finished retrainings."""

    def __init__(self, policy: RetrainPolicy, *, cooldown_s: float = DEFAULT_COOLDOWN_S,
                 alertnames: tuple[str, ...] | list[str] | None = DRIFT_ALERTS, clock: Any = time.time):
        if not cooldown_s >= 0:
            raise InvalidInputError(f"alert cooldown must be >= 0 seconds; got {cooldown_s!r}")
        self.policy, self.cooldown_s = policy, float(cooldown_s)
        self.alertnames = None if alertnames is None else frozenset(alertnames)
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # group key -> when it last triggered (this process)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outlierd-alert-retrain")
        self.pending: list[Future] = []

    def _last_trigger(self, group_key: str) -> float:
        """When ``group_key`` last triggered: this process's memory, else the registry audit log."""
        last = self._last.get(group_key, -float("inf"))
        try:
            for rec in self.policy.registry.audit(self.policy.model):
                if rec.get("action") == AUDIT_ACTION and rec.get("kind") == KIND and rec.get("group_key") == group_key \
                        and rec.get("result") != "deduplicated" and isinstance(rec.get("received_at"), (int, float)):
                    last = max(last, float(rec["received_at"]))
        except Exception as e:  # an unreadable audit log: this process's memory still deduplicates
            log.warning("audit log not read for deduplication error=%s", e)
        return last

    def handle(self, payload: Any) -> Outcome:
        """Decide on every alert of ``payload`` now (a retraining runs on the worker thread)."""
        alerts = parse_payload(payload)
        out = Outcome()
        model = self.policy.model
        with self._lock:
            for a in alerts:
                if a.status != "firing" or a.labels.get("model") != model or (self.alertnames is not None and a.name not in self.alertnames):
                    out.ignored += 1
                    continue
                if a.group_key in out.triggered or a.group_key in out.deduplicated:
                    continue  # several alerts of one group: one decision
                now = self.clock()
                fields = {"group_key": a.group_key, "alertname": a.name, "received_at": now,
                          **({"feature": a.labels["feature"]} if "feature" in a.labels else {})}
                if now - self._last_trigger(a.group_key) < self.cooldown_s:
                    out.deduplicated.append(a.group_key)
                    self.policy.registry.record(model, AUDIT_ACTION, kind=KIND, result="deduplicated", cooldown_s=self.cooldown_s,
                                                reason=f"{a.name} repeated within the cooldown", **fields)
                    self.policy.log("deduplicated", group_key=a.group_key, alertname=a.name)
                    continue
                self._last[a.group_key] = now
                out.triggered.append(a.group_key)
                reason = f"alertmanager {a.name}" + (f" on {a.labels['feature']}" if "feature" in a.labels else "")
                self.pending.append(self._pool.submit(self.policy.trigger, KIND, reason, audit=fields))
        return out

    @property
    def triggers(self) -> list[Trigger]:
        return [f.result() for f in self.pending if f.done() and f.exception() is None]

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the retrainings started so far."""
        for f in list(self.pending):
            f.result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _handler(receiver: AlertReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.rstrip("/") in ("/healthz", "/-/healthy"):
                self._answer(200, {"status": "ok"})
            else:
                self._answer(405, {"error": "POST an Alertmanager webhook payload (version 4)"})

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if not 0 < n <= MAX_BODY_BYTES:
                self._answer(400, {"error": f"Content-Length must be 1..{MAX_BODY_BYTES} bytes; got {self.headers.get('Content-Length')!r}"})
                return
            try:
                payload = json.loads(self.rfile.read(n))
                out = receiver.handle(payload)
            except (ValueError, UnicodeDecodeError) as e:  # InvalidInputError is a ValueError, so is bad JSON
                self._answer(400, {"error": f"not an Alertmanager webhook payload: {e}"})
                return
            except Exception as e:  # the receiver keeps serving
                log.exception("alert not handled")
                self._answer(500, {"error": str(e)})
                return
            self._answer(200, out.as_dict())

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def serve(receiver: AlertReceiver, host: str, port: int) -> ThreadingHTTPServer:
    """Start the webhook on ``host:port`` in a daemon thread; returns the server (``server_address``
    has the port; ``shutdown()`` stops it)."""
    try:
        httpd = ThreadingHTTPServer((host, port), _handler(receiver))
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    threading.Thread(target=httpd.serve_forever, name="outlierd-alert-webhook", daemon=True).start()
    return httpd


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT``: every interface) for ``--listen``; InvalidInputError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInputError(f"--listen must be HOST:PORT (e.g. 0.0.0.0:9095); got {text!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)
