"""The gRPC server: ``outlierd serve`` against a bare grpc.aio echo server (the transport floor).

Both servers run as subprocesses on 127.0.0.1 for the whole module: outlierd through the real CLI
(``python -m outlierd serve --registry R --model M --port P --metrics-port 0``), the floor as
``benchmarks/echo_server.py``, which answers every ScoreRequest with a ScoreResponse of the same shape
(zeros) and does nothing else. Each is measured only after grpc.health.v1 says SERVING.

The load comes from ``benchmarks/loadgen.py`` in its own process (grpc.aio, requests built and
serialized once, bytes reused; bounded: a warm-up, then a measured window). The model: an Isolation Forest (100 trees,
max_samples=256) trained by ``training.train.train`` on a generated CSV of 20,000 x 32
standard-normal rows; the load messages are rows of another 65,536 x 32 float32 array.

Before anything is timed, outlierd's answers for the same rows, encodings and RPCs as the load are
checked against ``core.load_model(...).score`` (atol 1e-6), flags against the threshold, and the
floor's answers for their shape. During the load, the generator checks every warm-up response fully
and every measured one by size (so an error response cannot count as scored records).

Each scenario runs ROUNDS rounds of (floor, ours), alternating, each a fresh load generator with a
warm-up and a measured window; the table takes the median over rounds (records/s, or p50 / p99 of
each round's calls). Alternating matters on a small shared machine: other work drifts in and out.

Knobs (environment):
  OUTLIERD_BENCH_SERVER_ROUNDS   rounds per scenario (default 3)
  OUTLIERD_BENCH_SERVER_SECONDS  measured seconds per round and server (default 2)
  OUTLIERD_BENCH_SERVER_WARMUP   warm-up seconds before each measurement (default 0.5)
  OUTLIERD_BENCH_SERVER_ARGS     extra ``outlierd serve`` flags, e.g. "--max-delay-us 0 --threads 1"
                                 (default none: the server's defaults from server/settings.py)
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from outlierd.bench.server import Scenario

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
ECHO = HERE / "echo_server.py"

N_FEATURES = 32
TRAIN_ROWS = 20_000
LOAD_ROWS = 65_536     # 16 distinct 4,096-record messages
SEED = 20240601
MODEL = "bench"
ATOL = 1e-6

SECONDS = float(os.environ.get("OUTLIERD_BENCH_SERVER_SECONDS", 2.0))
WARMUP = float(os.environ.get("OUTLIERD_BENCH_SERVER_WARMUP", 0.5))
ROUNDS = int(os.environ.get("OUTLIERD_BENCH_SERVER_ROUNDS", 3))
SERVER_ARGS = shlex.split(os.environ.get("OUTLIERD_BENCH_SERVER_ARGS", ""))
SMOKE_SECONDS = 0.3    # with --benchmark-disable: every path runs, briefly, and nothing is recorded

OURS = "outlierd serve (" + (" ".join(SERVER_ARGS) or "default settings") + ")"
FLOOR = "grpc.aio echo server (same messages, no scoring)"
LOADGEN_DESC = ("benchmarks/loadgen.py in its own process, grpc.aio, pre-serialized requests; per scenario "
                f"{ROUNDS} rounds of floor then ours, each {WARMUP:g} s warm-up + {SECONDS:g} s measured, median; "
                f"isolation forest on {N_FEATURES} float32 features")


SCENARIOS = [
    Scenario("stream-256x1", "stream", 256),
    Scenario("stream-256x4", "stream", 256, streams=4),
    Scenario("unary-1row-c1", "unary", 1),
    Scenario("unary-1row-c16", "unary", 1, concurrency=16),
    Scenario("stream-4096-values", "stream", 4096, encoding="values"),
    Scenario("stream-4096-raw", "stream", 4096),
]


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OUTLIERD_LOG_LEVEL", "WARNING")
    return env


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy (all cores, all processes) since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """A server subprocess on 127.0.0.1:port; ``start`` returns once health says SERVING."""

    def __init__(self, name: str, cmd: list[str], port: int, log_dir: Path):
        self.name, self.cmd, self.port = name, cmd, port
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""

    def start(self, timeout: float = 120.0) -> ServerProcess:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=_env(), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before serving:\n{self.log_tail()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} not SERVING after {timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_s(self) -> float:
        assert self.proc is not None
        return _proc_cpu_s(self.proc.pid)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def run_loadgen(server: ServerProcess, data: Path, sc: Scenario, warmup: float, seconds: float) -> dict[str, Any]:
    """Run the load generator against ``server``; its JSON result plus the server's CPU seconds in
    the measured window (sampled when the generator prints its window markers)."""
    cmd = [sys.executable, str(LOADGEN), "--target", server.target, "--data", str(data),
           "--warmup", str(warmup), "--duration", str(seconds), *sc.args()]
    limit = warmup + seconds + 60.0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        killer = threading.Timer(limit, proc.kill)  # bounded even if something hangs
        killer.start()
        result, cpu0, cpu1, busy0, busy1 = None, None, None, None, None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("# measuring"):
                    cpu0, busy0 = server.cpu_s(), _machine_busy_s()
                elif line.startswith("# measured"):
                    cpu1, busy1 = server.cpu_s(), _machine_busy_s()
                elif line.startswith("{"):
                    result = json.loads(line)
            rc = proc.wait()
        finally:
            killer.cancel()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")[-3000:]
    if result is None:
        raise RuntimeError(f"loadgen gave no result (exit {rc}): {' '.join(cmd)}\n{stderr}")
    assert not result["failures"], f"{server.name}: bad responses under load: {result['failures']}"
    assert rc == 0, f"loadgen exited {rc}: {stderr}"
    if cpu0 is not None and cpu1 is not None:
        result["server_cpu_s"] = cpu1 - cpu0
        result["server_cores"] = (cpu1 - cpu0) / result["seconds"]
        n = result.get("messages", result.get("calls")) or 0
        if n:
            result["server_cpu_us_per_message"] = (cpu1 - cpu0) / n * 1e6
        if busy0 is not None and busy1 is not None:  # everything running, other users' work included
            result["machine_busy_cores"] = (busy1 - busy0) / result["seconds"]
    if result.get("client_cpu_s") is not None:
        result["client_cores"] = result["client_cpu_s"] / result["seconds"]
    return result


# --------------------------------------------------------------------------------------------
# Fixtures: the model, the load rows, both servers, and the correctness check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerBench:
    registry: Path
    data: Path          # the load rows, .npy (LOAD_ROWS, N_FEATURES) float32
    X: np.ndarray
    model: Any          # core.load_model of the served version: the reference scores
    ours: ServerProcess
    floor: ServerProcess


def served_model(tmp: Path, bench_step) -> tuple[Path, Any, np.ndarray, Path]:
    """The served model (an iforest trained by ``training.train.train`` on generated rows, published
    as ``champion`` in ``tmp/registry``) and the load rows (also saved to ``tmp/load.npy``):
    ``(registry, loaded model, X, load.npy path)``."""
    from outlierd.core import load_model
    from outlierd.core.registry import Registry
    from outlierd.training.train import train

    rng = np.random.default_rng(SEED)
    with bench_step(f"training the served model: iforest on {TRAIN_ROWS:,} x {N_FEATURES} generated rows"):
        X_train = rng.standard_normal((TRAIN_ROWS, N_FEATURES), dtype=np.float32)
        csv = tmp / "train.csv"
        np.savetxt(csv, X_train, delimiter=",", fmt="%.9g", comments="",
                   header=",".join(f"x{j}" for j in range(N_FEATURES)))
        registry = tmp / "registry"
        train(csv, registry, MODEL, alias="champion", quiet=True)
        model = load_model(Registry(registry).path(MODEL, "champion"))
    X = rng.standard_normal((LOAD_ROWS, N_FEATURES), dtype=np.float32)
    data = tmp / "load.npy"
    np.save(data, X)
    return registry, model, X, data


@pytest.fixture(scope="module")
def server_bench(tmp_path_factory: pytest.TempPathFactory, bench_step) -> ServerBench:
    tmp = tmp_path_factory.mktemp("server")
    registry, model, X, data = served_model(tmp, bench_step)
    port_ours, port_floor = free_port(), free_port()
    ours = ServerProcess("outlierd", [sys.executable, "-m", "outlierd", "serve", "--registry", str(registry),
                                      "--model", MODEL, "--host", "127.0.0.1", "--port", str(port_ours),
                                      "--metrics-port", "0", *SERVER_ARGS], port_ours, tmp)
    floor = ServerProcess("echo", [sys.executable, str(ECHO), "--host", "127.0.0.1", "--port", str(port_floor)],
                          port_floor, tmp)
    with bench_step(f"starting `outlierd serve {' '.join(SERVER_ARGS)}` and the echo server, waiting for SERVING"):
        floor.start()
        try:
            ours.start()
        except BaseException:
            floor.stop()
            raise
    bench = ServerBench(registry, data, X, model, ours, floor)
    try:
        with bench_step("checking outlierd's scores against core.load_model(...).score before timing"):
            check_answers(bench)
        yield bench
    finally:
        alive = {s.name: s.alive() for s in (ours, floor)}
        for s in (ours, floor):
            s.stop()
        assert all(alive.values()), f"a server died during the benchmarks: {alive}\n{ours.log_tail()}"


def _rows(X: np.ndarray, k: int, records: int) -> np.ndarray:
    """The rows of loadgen's message k (see loadgen.build_messages)."""
    return X[np.arange(k * records, (k + 1) * records) % X.shape[0]]


def check_answers(b: ServerBench) -> None:
    """Same rows, encodings and RPCs as the load: outlierd's scores == the model's (atol 1e-6), flags
    == score >= threshold away from the threshold, version and request_id echoed; the floor's
    answers have the same shape."""
    from outlierd.server.client import ScorerClient

    thr = b.model.threshold
    with ScorerClient(b.ours.target) as ours, ScorerClient(b.floor.target) as floor:
        for records, raw, n_msgs in ((256, True, 8), (4096, False, 2), (4096, True, 2)):
            batches = [_rows(b.X, k, records) for k in range(n_msgs)]
            got = list(ours.score_stream(batches, raw=raw))
            assert len(got) == n_msgs
            for k, (X, r) in enumerate(zip(batches, got)):
                assert not r.error and r.request_id == k, (r.error, r.request_id)
                ref = b.model.score(X)
                np.testing.assert_allclose(r.scores, ref, rtol=0, atol=ATOL)
                clear = np.abs(ref - thr) > ATOL
                np.testing.assert_array_equal(r.anomalous[clear], ref[clear] >= thr)
                assert r.version == 1 and r.model == MODEL
            for k, r in enumerate(floor.score_stream(batches, raw=raw)):
                assert r.request_id == k and r.scores.shape == (records,) and r.anomalous.shape == (records,)
        for k in range(16):
            X = _rows(b.X, k, 1)
            r = ours.score(X, request_id=k)
            np.testing.assert_allclose(r.scores, b.model.score(X), rtol=0, atol=ATOL)
            assert r.request_id == k and r.anomalous.shape == (1,)
            assert floor.score(X, request_id=k).scores.shape == (1,)


# --------------------------------------------------------------------------------------------
# The benchmarks: per scenario, ROUNDS alternating runs of the floor and ours
# --------------------------------------------------------------------------------------------


def run_rounds(b: ServerBench, sc: Scenario, rounds: int, warmup: float, seconds: float) -> dict[str, list[dict]]:
    """floor, ours, floor, ours, ...: alternating, so drifting load on a shared machine hits both."""
    out: dict[str, list[dict]] = {"floor": [], "ours": []}
    for _ in range(rounds):
        for role, server in (("floor", b.floor), ("ours", b.ours)):
            out[role].append(run_loadgen(server, b.data, sc, warmup, seconds))
            assert server.alive(), f"{server.name} died under load:\n{server.log_tail()}"
    return out


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def _summary(runs: list[dict]) -> dict[str, Any]:
    keys = ("records_per_s", "messages_per_s", "calls_per_s", "p50_us", "p90_us", "p99_us", "p99.9_us", "max_us",
            "server_cores", "client_cores", "machine_busy_cores", "server_cpu_us_per_message", "seconds")
    return {k: [round(r[k], 3) for r in runs] for k in keys if all(r.get(k) is not None for r in runs)}


@pytest.mark.parametrize("sc", SCENARIOS, ids=[sc.key for sc in SCENARIOS])
def test_server(benchmark, record_value, server_bench: ServerBench, sc: Scenario):
    enabled = benchmark.enabled
    rounds, warmup, seconds = (ROUNDS, WARMUP, SECONDS) if enabled else (1, SMOKE_SECONDS, SMOKE_SECONDS)
    benchmark.group = f"server-{sc.key}"
    runs = benchmark.pedantic(run_rounds, args=(server_bench, sc, rounds, warmup, seconds), rounds=1, iterations=1)
    for role in ("floor", "ours"):
        assert all(r["checked"] > 0 for r in runs[role]), f"{role}: no warm-up response was checked"
    first = runs["ours"][0]
    benchmark.extra_info.update({"scenario": sc.key, "ours": OURS, "floor": FLOOR, "server_args": SERVER_ARGS,
                                 "rounds": rounds, "warmup_s": warmup, "seconds_per_round": seconds,
                                 "message_bytes": first["message_bytes"], "records_per_message": sc.records,
                                 "ours_runs": _summary(runs["ours"]), "floor_runs": _summary(runs["floor"])})
    if not enabled:
        return
    for role, name in (("ours", OURS), ("floor", FLOOR)):
        rs = runs[role]
        extra = {"loadgen": LOADGEN_DESC, "runs": _summary(rs), "message_bytes": first["message_bytes"]}
        common = dict(name=name, role="ours" if role == "ours" else "peer", rows=sc.records,
                      seconds=sum(r["seconds"] for r in rs), extra=extra)
        if sc.mode == "stream":
            record_value(group=f"server-{sc.key}", metric="throughput", value=_median(rs, "records_per_s"),
                         statistic=f"median of {len(rs)} rounds of records/s over {seconds:g} s", **common)
        else:
            for q in ("p50", "p99"):
                record_value(group=f"server-{sc.key}-{q}", metric="latency", value=_median(rs, f"{q}_us"),
                             statistic=f"median of {len(rs)} rounds' {q} ({sum(r['calls'] for r in rs):,} calls)",
                             **common)


MONITORING_SCENARIOS = [sc for sc in SCENARIOS if sc.key in ("stream-256x1", "stream-256x4")]


@pytest.fixture(scope="module")
def unmonitored(server_bench: ServerBench, tmp_path_factory: pytest.TempPathFactory, bench_step) -> ServerProcess:
    """The same server with drift and data-quality monitoring off: the peer for its overhead."""
    port = free_port()
    server = ServerProcess("outlierd-no-drift", [sys.executable, "-m", "outlierd", "serve", "--registry", str(server_bench.registry),
                                                 "--model", MODEL, "--host", "127.0.0.1", "--port", str(port),
                                                 "--metrics-port", "0", "--no-drift", *SERVER_ARGS], port, tmp_path_factory.mktemp("nodrift"))
    with bench_step("starting `outlierd serve --no-drift` (monitoring off), waiting for SERVING"):
        server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("sc", MONITORING_SCENARIOS, ids=[f"monitoring-{sc.key}" for sc in MONITORING_SCENARIOS])
def test_monitoring_overhead(benchmark, record_value, server_bench: ServerBench, unmonitored: ServerProcess, sc: Scenario):
    """Streaming throughput with drift + data-quality monitoring on vs off, alternating rounds."""
    enabled = benchmark.enabled
    rounds, warmup, seconds = (ROUNDS, WARMUP, SECONDS) if enabled else (1, SMOKE_SECONDS, SMOKE_SECONDS)
    benchmark.group = f"monitoring-{sc.key}"

    def run() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(rounds):
            for role, server in (("off", unmonitored), ("on", server_bench.ours)):
                out[role].append(run_loadgen(server, server_bench.data, sc, warmup, seconds))
                assert server.alive(), f"{server.name} died under load:\n{server.log_tail()}"
        return out

    runs = benchmark.pedantic(run, rounds=1, iterations=1)
    if not enabled:
        return
    for role, name in (("on", "outlierd serve (drift + data quality on)"), ("off", "outlierd serve --no-drift")):
        rs = runs[role]
        record_value(group=f"monitoring-{sc.key}", metric="throughput", value=_median(rs, "records_per_s"),
                     statistic=f"median of {len(rs)} rounds of records/s over {seconds:g} s", name=name,
                     role="ours" if role == "on" else "peer", rows=sc.records, seconds=sum(r["seconds"] for r in rs),
                     extra={"runs": _summary(rs)})
