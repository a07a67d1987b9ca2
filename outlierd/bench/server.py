"""Server suite: ``outlierd serve`` end to end over gRPC against a bare gRPC echo of the same messages.

Both servers run as subprocesses on 127.0.0.1 (``python -m outlierd serve ...`` and
``python -m outlierd.bench.echo``); the load comes from ``python -m outlierd.bench.loadgen`` in its
own process (requests serialized once, bytes reused). Per scenario, rounds alternate echo then ours,
so drifting load on a shared machine hits both; the result is the median over rounds. Before any
timing, outlierd's answers to the scenario's messages are checked against ``Model.score``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import Progress

MODEL = "bench"
LOAD_ROWS = 65_536


@dataclass(frozen=True)
class Scenario:
    key: str
    mode: str              # "stream" or "unary"
    records: int           # records per message
    encoding: str = "raw"  # "raw" (raw_values) or "values"
    streams: int = 1
    concurrency: int = 1

    def args(self) -> list[str]:
        return ["--mode", self.mode, "--records", str(self.records), "--encoding", self.encoding,
                "--streams", str(self.streams), "--concurrency", str(self.concurrency)]


SCENARIOS_QUICK = [Scenario("stream-256x1", "stream", 256), Scenario("unary-1row-c1", "unary", 1)]
SCENARIOS_FULL = [Scenario("stream-256x1", "stream", 256), Scenario("stream-256x4", "stream", 256, streams=4),
                  Scenario("unary-1row-c1", "unary", 1), Scenario("unary-64rows-c1", "unary", 64),
                  Scenario("unary-1row-c16", "unary", 1, concurrency=16),
                  Scenario("stream-4096-values", "stream", 4096, encoding="values"),
                  Scenario("stream-4096-raw", "stream", 4096)]


HTTP_QUICK = [1]            # records per request through the HTTP door (JSON)
HTTP_FULL = [1, 64, 256]


def http_door() -> bool:
    """Whether this version's ``outlierd serve`` has the HTTP door (``--http-port``)."""
    from dataclasses import fields

    from outlierd.server.settings import ServeSettings

    return "http_port" in {f.name for f in fields(ServeSettings)}


def http_ready(port: int) -> bool:
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/v2/health/ready")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OUTLIERD_LOG_LEVEL", "WARNING")
    return env


class ServerProcess:
    def __init__(self, name: str, cmd: list[str], port: int, log: Path):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log
        self.target = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0, http_port: int | None = None) -> None:
        """Start and wait until gRPC health says SERVING (and, with ``http_port``, the HTTP door is ready)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        if self.port > 0:
            self._wait_grpc(deadline, timeout)
        while http_port is not None and not http_ready(http_port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name}: HTTP door on port {http_port} not ready: {self.log_tail()}")
            time.sleep(0.1)

    def _wait_grpc(self, deadline: float, timeout: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert self.proc is not None
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before serving: {self.log_tail()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} not SERVING after {timeout:.0f} s: {self.log_tail()}")
                time.sleep(0.1)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_loadgen(target: str, data: Path, sc: Scenario, warmup: float, seconds: float) -> dict[str, Any]:
    """One load generator run (its own process): its JSON result; bounded by a kill timer."""
    cmd = [sys.executable, "-m", "outlierd.bench.loadgen", "--target", target, "--data", str(data),
           "--warmup", str(warmup), "--duration", str(seconds), *sc.args()]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(warmup + seconds + 60.0, proc.kill)
    killer.start()
    try:
        out, err = proc.communicate()
    finally:
        killer.cancel()
    result = next((json.loads(ln) for ln in out.splitlines() if ln.startswith("{")), None)
    if result is None or proc.returncode != 0:
        raise RuntimeError(f"loadgen failed (exit {proc.returncode}) against {target}: {err[-1500:]}")
    return dict(result)


def run_httpload(port: int, data: Path, records: int, warmup: float, seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "outlierd.bench.httpload", "--port", str(port), "--model", MODEL, "--data", str(data),
           "--records", str(records), "--warmup", str(warmup), "--duration", str(seconds)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=warmup + seconds + 60.0)
    result = next((json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if result is None or out.returncode != 0:
        raise RuntimeError(f"httpload failed (exit {out.returncode}) against port {port}: {(result or {}).get('failures')} {out.stderr[-1500:]}")
    return dict(result)


def _check_http(port: int, model: Any, X: np.ndarray) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", f"/v1/models/{MODEL}/score", json.dumps({"records": X[:64].astype(np.float64).tolist()}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if resp.status != 200:
        raise AssertionError(f"outlierd's HTTP door answered {resp.status}: {body[:300]!r}")
    diff = float(np.max(np.abs(np.asarray(json.loads(body)["scores"]) - model.score(X[:64]))))
    if diff > 1e-6:
        raise AssertionError(f"outlierd's HTTP scores differ from Model.score by {diff:.3g}")


def _check_answers(target: str, model: Any, X: np.ndarray) -> None:
    from outlierd.server.client import ScorerClient

    with ScorerClient(target) as client:
        for k, raw in ((1, True), (256, True), (4096, False)):
            r = client.score(X[:k], raw=raw)
            diff = float(np.max(np.abs(r.scores - model.score(X[:k]))))
            if diff > 1e-6:
                raise AssertionError(f"outlierd serve's scores differ from Model.score by {diff:.3g} ({k} records)")


def run(forest_artifact: Path, model: Any, X: np.ndarray, workdir: Path, scenarios: list[Scenario], rounds: int,
        warmup: float, seconds: float, progress: Progress, http_records: list[int] | None = None) -> dict[str, Any]:
    """Publish ``forest_artifact`` to a fresh registry, serve it and the echo, run the scenarios."""
    from outlierd.core.registry import Registry

    registry = workdir / "registry"
    Registry(registry).publish(MODEL, forest_artifact, aliases=["champion"], reprobe=False)
    data = workdir / "load.npy"
    np.save(data, np.ascontiguousarray(X[:LOAD_ROWS]))
    p_ours, p_echo = free_port(), free_port()
    http = http_door() and bool(http_records)
    h_ours, h_echo = (free_port(), free_port()) if http else (None, None)
    ours = ServerProcess("outlierd serve", [sys.executable, "-m", "outlierd", "serve", "--registry", str(registry), "--model", MODEL,
                                            "--host", "127.0.0.1", "--port", str(p_ours), "--metrics-port", "0",
                                            *(["--http-port", str(h_ours)] if http else [])],
                         p_ours, workdir / "serve.log")
    http_echo = ServerProcess("http echo", [sys.executable, "-m", "outlierd.bench.http_echo", "--host", "127.0.0.1", "--port", str(h_echo)],
                              0, workdir / "http_echo.log") if http else None
    echo = ServerProcess("echo", [sys.executable, "-m", "outlierd.bench.echo", "--host", "127.0.0.1", "--port", str(p_echo)],
                         p_echo, workdir / "echo.log")
    results: list[dict[str, Any]] = []
    try:
        with progress.step("server: starting `outlierd serve` and the gRPC echo server"):
            echo.start()
            ours.start(http_port=h_ours)
            if http_echo is not None:
                http_echo.start(http_port=h_echo)
            _check_answers(ours.target, model, X)
            if h_ours is not None:
                _check_http(h_ours, model, X)
        for sc in scenarios:
            runs: dict[str, list[dict[str, Any]]] = {"echo": [], "ours": []}
            progress.say(f"server: {sc.key} ({rounds} round(s) of echo then ours, {seconds:g} s each)")
            for _ in range(rounds):
                for role, srv in (("echo", echo), ("ours", ours)):
                    runs[role].append(run_loadgen(srv.target, data, sc, warmup, seconds))
                    if not srv.alive():
                        raise RuntimeError(f"{srv.name} died under load: {srv.log_tail()}")
            row: dict[str, Any] = {"scenario": sc.key, "mode": sc.mode, "records_per_message": sc.records, "encoding": sc.encoding,
                                   "streams": sc.streams, "concurrency": sc.concurrency,
                                   "message_bytes": runs["ours"][0]["message_bytes"], "rounds": rounds}
            for role in ("ours", "echo"):
                rs = runs[role]
                row[role] = {k: float(np.median([r[k] for r in rs])) for k in ("records_per_s", "p50_us", "p99_us", "p99.9_us")
                             if all(r.get(k) is not None for r in rs)}
            row["ratio"] = row["ours"]["records_per_s"] / row["echo"]["records_per_s"]
            results.append(row)
        if http and h_ours is not None and h_echo is not None:
            for k in http_records or []:
                progress.say(f"server: HTTP JSON, {k} record(s) per request ({rounds} round(s) of echo then ours)")
                hruns: dict[str, list[dict[str, Any]]] = {"echo": [], "ours": []}
                for _ in range(rounds):
                    for role, port in (("echo", h_echo), ("ours", h_ours)):
                        hruns[role].append(run_httpload(port, data, k, warmup, seconds))
                hrow: dict[str, Any] = {"scenario": f"http-json-{k}", "mode": "http", "records_per_message": k, "encoding": "json",
                                        "streams": 1, "concurrency": 1, "message_bytes": hruns["ours"][0]["body_bytes"], "rounds": rounds}
                for role in ("ours", "echo"):
                    hrow[role] = {q: float(np.median([r[q] for r in hruns[role]])) for q in ("records_per_s", "p50_us", "p99_us", "p99.9_us")}
                hrow["ratio"] = hrow["ours"]["records_per_s"] / hrow["echo"]["records_per_s"]
                results.append(hrow)
    finally:
        ours.stop()
        echo.stop()
        if http_echo is not None:
            http_echo.stop()
    return {"ours": "outlierd serve (default settings)", "floor": "grpc.aio echo server (same messages, no scoring)",
            "warmup_s": warmup, "seconds": seconds, "rounds": rounds, "scenarios": results,
            "other_front_doors": ("HTTP JSON (POST /v1/models/{name}/score, one keep-alive connection) against a FastAPI/uvicorn echo "
                                  "parsing the same body" if http else "none measured: this version's outlierd serve has no HTTP door")}
