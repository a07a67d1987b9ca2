"""Issue 14, the server's side: startup errors with several workers (3), workers that die with their
parent (4), size limits on feedback fields and record ids (7), TLS key checks, the bearer scheme and
echoed client strings (20), and where /metrics listens (21).

Real servers on loopback addresses only: in-process workers (``start_worker``) for the RPC checks, and
``python -m outlierd serve`` processes for what needs a real parent and its workers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, LoopThread, dataset_path
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from outlierd.core import InvalidInputError
from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.server.app import start_worker
from outlierd.server.client import request
from outlierd.server.settings import ServeSettings
from outlierd.v1 import scoring_pb2 as pb
from outlierd.v1 import scoring_pb2_grpc as pb_grpc

TIMEOUT = 10.0
SERVICE = "outlierd.v1.Scorer"


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return np.loadtxt(dataset_path("cardio"), delimiter=",", skiprows=1)[:, :-1]


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, X) -> Path:
    """A small cardio forest as champion (quick to export and to load)."""
    from sklearn.ensemble import IsolationForest

    from outlierd.training.export import export_sklearn

    root = tmp_path_factory.mktemp("registry")
    forest = IsolationForest(n_estimators=25, random_state=0).fit(X)
    artifact = export_sklearn(forest, root / "artifact", X_train=X)
    Registry(root / "reg").publish("cardio", artifact, aliases=("champion",))
    return root / "reg"


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@contextlib.contextmanager
def serving(loop_thread: LoopThread, registry_dir: Path, tmp: Path, **overrides):
    kw = {"registry": registry_dir, "model": "cardio", "host": "127.0.0.1", "port": 0, "feedback_store": tmp / "fb.sqlite"}
    kw.update(overrides)
    settings = ServeSettings(**kw)
    settings.validate()
    worker = loop_thread.call(start_worker(settings, ServiceMetrics(CollectorRegistry())))
    try:
        yield worker
    finally:
        loop_thread.call(worker.stop(1.0))


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=kwargs.pop("timeout", TIMEOUT), **kwargs)
    return info.value


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))  # no SO_REUSEPORT: fails while any worker still holds the port
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """``server.pem`` with its key ``server.key``, and ``other.key``: a key of no certificate here."""
    if shutil.which("openssl") is None:
        pytest.skip("TLS tests need the openssl CLI")
    d = tmp_path_factory.mktemp("certs")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
            "-out", "server.pem", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "other.key")
    return d


# ---------------------------------------------------------------------------------------------
# real processes: `outlierd serve` and its workers
# ---------------------------------------------------------------------------------------------


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp)
    return env


def _serve_cmd(registry_dir: Path, *args: str, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "outlierd", "serve", "--registry", str(registry_dir), "--host", host, *args]


@contextlib.contextmanager
def serve_process(tmp: Path, registry_dir: Path, *args: str, host: str = "127.0.0.1"):
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(_serve_cmd(registry_dir, *args, host=host), cwd=ROOT, env=_env(tmp), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log_path = tmp / "server.log"  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and whatever is left of its workers
        proc.wait(10)
        log.close()


def _log(proc) -> str:
    return proc.log_path.read_text(errors="replace")[-4000:]


def _children(pid: int) -> list[int]:
    """The worker processes of ``pid`` (multiprocessing's spawned children; not its resource tracker)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for whoever adopted it to reap it, has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(what: str, proc, predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s\n{_log(proc)}"
        time.sleep(0.1)


@pytest.mark.parametrize("case", ["unknown_model", "tls_key_mismatch"])
def test_startup_error_with_several_workers_exits_2_with_one_line(tmp_path, registry_dir, certs, case):
    """Item 3: the error one worker exits with (2, one line) is the error of any number of workers:
    no restart loop, no traceback."""
    port = free_port()
    if case == "unknown_model":
        args, expected = ("--model", "nope"), "outlierd: error: no model 'nope' in registry"
    else:
        args = ("--model", "cardio", "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "other.key"))
        expected = "outlierd: error: --tls-key"
    t0 = time.monotonic()
    r = subprocess.run(_serve_cmd(registry_dir, *args, "--workers", "2", "--port", str(port), "--metrics-port", "0"),
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr[-3000:]
    if case == "tls_key_mismatch":
        assert "does not match" in lines[0] and "another server" not in lines[0]
    assert elapsed < 30, elapsed
    assert port_is_free("127.0.0.1", port)


def test_workers_die_with_their_parent_and_a_dead_worker_is_restarted(tmp_path, registry_dir):
    """Item 4 (and item 3's other half): a worker killed after it served is restarted; kill -9 the
    parent and every worker goes, freeing the port for the next server."""
    port = free_port()
    with serve_process(tmp_path, registry_dir, "--model", "cardio", "--workers", "2", "--port", str(port), "--metrics-port", "0",
                       "--grace-s", "2", "--threads", "1") as proc:
        _wait_for("two workers listening", proc, lambda: _log(proc).count("listening address=") == 2 or proc.poll() is not None)
        assert proc.poll() is None, _log(proc)
        first = _children(proc.pid)
        assert len(first) == 2, (first, _log(proc))
        os.kill(first[0], signal.SIGKILL)
        _wait_for("the killed worker restarted", proc, lambda: _log(proc).count("listening address=") == 3)
        assert proc.poll() is None and "worker died" in _log(proc)
        workers = _children(proc.pid)
        assert len(workers) == 2 and first[0] not in workers and first[1] in workers, (first, workers)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert pb_grpc.ScorerStub(ch).GetModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT).model == "cardio"

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, f"orphan workers still running: {[w for w in workers if _alive(w)]}"
            time.sleep(0.1)
        _wait_for("the port free", proc, lambda: port_is_free("127.0.0.1", port), timeout=10)


# ---------------------------------------------------------------------------------------------
# item 21: /metrics listens on --metrics-host: loopback when a token or TLS guards the gRPC port
# ---------------------------------------------------------------------------------------------


def test_metrics_host_defaults():
    base = {"registry": Path("/r"), "model": "m", "host": "0.0.0.0"}
    assert ServeSettings(**base).metrics_bind_host() == "0.0.0.0"
    assert ServeSettings(**base, auth_token="t").metrics_bind_host() == "127.0.0.1"
    assert ServeSettings(**base, tls_cert=Path("c"), tls_key=Path("k")).metrics_bind_host() == "127.0.0.1"
    assert ServeSettings(**base, auth_token="t", metrics_host="0.0.0.0").metrics_bind_host() == "0.0.0.0"
    assert ServeSettings(**{**base, "host": "10.1.2.3"}).metrics_bind_host() == "10.1.2.3"


def _listening(port: int) -> set[str]:
    """The addresses listening on TCP ``port`` (from /proc/net/tcp and tcp6; IPv4-mapped IPv6 as IPv4)."""
    out = set()
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) != port or state != "0A":
                continue
            raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))  # words in host order
            if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
                raw = raw[12:]
            out.add(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw))
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_metrics_listen_on_loopback_when_a_token_guards_the_port(tmp_path, registry_dir, workers):
    host = "127.0.0.2"  # another loopback address: --host and the metrics host can be told apart
    port, metrics_port = free_port(host), free_port()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    args = ("--model", "cardio", "--workers", workers, "--port", str(port), "--metrics-port", str(metrics_port),
            "--auth-token-file", str(token), "--grace-s", "1", "--threads", "1")
    with serve_process(tmp_path, registry_dir, *args, host=host) as proc:
        _wait_for("serving", proc, lambda: "listening address=" in _log(proc) or proc.poll() is not None)
        assert proc.poll() is None, _log(proc)
        _wait_for("metrics listening", proc, lambda: bool(_listening(metrics_port)), timeout=10)
        assert _listening(port) == {host}
        assert _listening(metrics_port) == {"127.0.0.1"}, _log(proc)


# ---------------------------------------------------------------------------------------------
# item 7: size limits on feedback fields and record ids
# ---------------------------------------------------------------------------------------------


def _feedback(record_id: str = "r1", **kw) -> pb.FeedbackRequest:
    return pb.FeedbackRequest(record_id=record_id, label=pb.ANOMALY, **kw)


@pytest.mark.parametrize("field, value, size, limit", [
    ("note", "n" * 5000, 5000, 4096),
    ("note", "€" * 1400, 4200, 4096),  # counted in UTF-8 bytes, not characters
    ("reviewer", "r" * 300, 300, 256),
    ("record_id", "i" * 300, 300, 256),
])
def test_feedback_fields_over_their_limit_are_refused(loop_thread, registry_dir, tmp_path, field, value, size, limit):
    with serving(loop_thread, registry_dir, tmp_path) as worker, grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        stub = pb_grpc.ScorerStub(ch)
        req = _feedback(**{field: value}) if field != "record_id" else _feedback(value)
        err = rpc_error(stub.SubmitFeedback, req)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{field} is {size} bytes" in err.details() and f"limit is {limit} bytes" in err.details(), err.details()
        assert len(err.details()) < 300
        # on a stream: that message is refused (no 300-byte echo of a refused record id), the next one stored
        acks = list(stub.SubmitFeedbackStream(iter([req, _feedback("r2", note="ok")]), timeout=TIMEOUT))
        assert [a.stored for a in acks] == [False, True]
        assert f"{field} is {size} bytes" in acks[0].error and acks[0].record_id in ("", "r1")
        # at the limit: stored
        at_limit = {"note": "n" * 4096, "reviewer": "r" * 256, "record_id": "i" * 256}[field]
        ok = _feedback(**{field: at_limit}) if field != "record_id" else _feedback(at_limit)
        assert stub.SubmitFeedback(ok, timeout=TIMEOUT).stored


def test_feedback_limits_are_settings(loop_thread, registry_dir, tmp_path):
    with serving(loop_thread, registry_dir, tmp_path, max_note_bytes=10) as worker, \
            grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        stub = pb_grpc.ScorerStub(ch)
        err = rpc_error(stub.SubmitFeedback, _feedback(note="x" * 11))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "note is 11 bytes; the limit is 10 bytes" in err.details()
        assert stub.SubmitFeedback(_feedback(note="x" * 10), timeout=TIMEOUT).stored


def test_score_ids_over_the_limit_are_refused(loop_thread, registry_dir, tmp_path, X):
    with serving(loop_thread, registry_dir, tmp_path) as worker, grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        stub = pb_grpc.ScorerStub(ch)
        ids = ["a", "b" * 300, "c"]
        err = rpc_error(stub.Score, request(X[:3], ids=ids))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ids[1] is 300 bytes; the limit is 256 bytes" in err.details(), err.details()
        assert "b" * 300 not in err.details()
        wide = ["é" * 129]  # 258 bytes in 129 characters
        assert "ids[0] is 258 bytes" in rpc_error(stub.Score, request(X[:1], ids=wide)).details()
        # a stream answers that message with the error and goes on
        out = list(stub.ScoreStream(iter([request(X[:3], ids=ids, request_id=1), request(X[:2], ids=["x", "y"], request_id=2)]),
                                    timeout=TIMEOUT))
        assert out[0].request_id == 1 and out[0].error.startswith("INVALID_ARGUMENT: ids[1] is 300 bytes")
        assert out[1].error == "" and list(out[1].ids) == ["x", "y"] and len(out[1].scores) == 2
        ok = stub.Score(request(X[:2], ids=["i" * 256, "j"]), timeout=TIMEOUT)
        assert ok.error == "" and len(ok.scores) == 2
    with serving(loop_thread, registry_dir, tmp_path, max_id_bytes=4) as worker, \
            grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        err = rpc_error(pb_grpc.ScorerStub(ch).Score, request(X[:2], ids=["abcd", "abcde"]))
        assert "ids[1] is 5 bytes; the limit is 4 bytes" in err.details()


# ---------------------------------------------------------------------------------------------
# item 20: echoed client strings, the bearer scheme, a TLS key that does not match its certificate
# ---------------------------------------------------------------------------------------------


def test_a_huge_model_name_is_not_echoed_whole(loop_thread, registry_dir, tmp_path, X):
    with serving(loop_thread, registry_dir, tmp_path) as worker, grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        stub = pb_grpc.ScorerStub(ch)
        name = "m" * (1 << 20)
        for call, req in ((stub.Score, request(X[:1], model=name)), (stub.GetModelInfo, pb.ModelInfoRequest(model=name)),
                          (stub.SubmitFeedback, pb.FeedbackRequest(model=name, record_id="r", label=pb.ANOMALY))):
            err = rpc_error(call, req)
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert len(err.details()) < 200 and "…" in err.details() and "this server serves 'cardio'" in err.details()
        err = rpc_error(stub.Score, request(X[:1], model="short"))  # short names are echoed whole
        assert err.details() == "unknown model 'short'; this server serves 'cardio'"


def test_bearer_scheme_is_case_insensitive(loop_thread, registry_dir, tmp_path, X):
    token = "s3cret-token"
    with serving(loop_thread, registry_dir, tmp_path, auth_token=token) as worker, \
            grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        stub = pb_grpc.ScorerStub(ch)
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            resp = stub.Score(request(X[:1]), metadata=(("authorization", f"{scheme} {token}"),), timeout=TIMEOUT)
            assert len(resp.scores) == 1
        for value in (f"bearer {token}x", f"bearer{token}", f"Basic {token}", token, f"bearer {token.upper()}"):
            err = rpc_error(stub.Score, request(X[:1]), metadata=(("authorization", value),))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, value


def test_a_tls_key_that_does_not_match_its_certificate_is_named(loop_thread, registry_dir, tmp_path, certs):
    settings = ServeSettings(registry=registry_dir, model="cardio", host="127.0.0.1", port=0,
                             tls_cert=certs / "server.pem", tls_key=certs / "other.key")
    with pytest.raises(InvalidInputError) as info:
        loop_thread.call(start_worker(settings, ServiceMetrics(CollectorRegistry())))
    msg = str(info.value)
    assert "does not match" in msg and str(certs / "other.key") in msg and str(certs / "server.pem") in msg, msg
    assert "another server" not in msg
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    settings = ServeSettings(registry=registry_dir, model="cardio", host="127.0.0.1", port=0,
                             tls_cert=garbage, tls_key=certs / "server.key")
    with pytest.raises(InvalidInputError) as info:
        loop_thread.call(start_worker(settings, ServiceMetrics(CollectorRegistry())))
    assert "--tls-cert" in str(info.value) and str(garbage) in str(info.value)
    settings = ServeSettings(registry=registry_dir, model="cardio", host="127.0.0.1", port=0,
                             tls_cert=certs / "server.pem", tls_key=tmp_path / "missing.key")
    with pytest.raises(InvalidInputError) as info:
        loop_thread.call(start_worker(settings, ServiceMetrics(CollectorRegistry())))
    assert str(info.value) == f"--tls-key {tmp_path / 'missing.key'}: no such file"
    # the matching pair serves
    with serving(loop_thread, registry_dir, tmp_path, tls_cert=certs / "server.pem", tls_key=certs / "server.key") as worker:
        creds = grpc.ssl_channel_credentials((certs / "server.pem").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{worker.port}", creds) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_replacement_worker_that_cannot_start_is_retried_while_the_others_serve(tmp_path, registry_dir):
    """Item 3's boundary: only a server that never served exits on a startup error. Once serving, a
    restarted worker that cannot start (here: the model's directory gone) is retried, one log line
    each time, while the other worker serves; it serves again once it can."""
    reg = tmp_path / "reg"
    shutil.copytree(registry_dir, reg)
    port = free_port()
    with serve_process(tmp_path, reg, "--model", "cardio", "--workers", "2", "--port", str(port), "--metrics-port", "0",
                       "--grace-s", "1", "--threads", "1") as proc:
        _wait_for("two workers listening", proc, lambda: _log(proc).count("listening address=") == 2 or proc.poll() is not None)
        first = _children(proc.pid)
        assert len(first) == 2, (first, _log(proc))
        (reg / "cardio").rename(tmp_path / "cardio-away")
        os.kill(first[0], signal.SIGKILL)
        _wait_for("a failed restart logged", proc, lambda: "worker failed to start" in _log(proc) or proc.poll() is not None)
        assert proc.poll() is None, _log(proc)
        assert "Traceback" not in _log(proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # the other worker still serves
            assert pb_grpc.ScorerStub(ch).GetModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT).model == "cardio"
        (tmp_path / "cardio-away").rename(reg / "cardio")
        _wait_for("the replacement serving", proc, lambda: _log(proc).count("listening address=") == 3)
        assert proc.poll() is None and len(_children(proc.pid)) == 2


_PDEATHSIG_PROBE = """
import ctypes, os, sys
from outlierd.server.workers import _die_with_parent
_die_with_parent(int(sys.argv[1]))
sig = ctypes.c_int(0)
ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
print(sig.value)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_asks_for_a_signal_when_its_parent_dies_and_exits_if_already_orphaned():
    """Item 4, both halves of ``_die_with_parent``: the kernel is asked for SIGTERM on the parent's
    death; and a worker whose parent is not the one that started it (it died before the prctl, which
    races with the start) exits at once instead of serving as an orphan."""
    ok = subprocess.run([sys.executable, "-c", _PDEATHSIG_PROBE, str(os.getpid())], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == str(int(signal.SIGTERM)), ok.stderr
    orphan = subprocess.run([sys.executable, "-c", _PDEATHSIG_PROBE, "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert orphan.returncode == 2 and orphan.stdout == "", (orphan.stdout, orphan.stderr)
