"""The Open Inference Protocol door against outlierd's own Scorer, and the HTTP JSON route against
Seldon MLServer's REST endpoint, in the same run (issue 17, must-show 4).

    .venv/bin/python benchmarks/oip_vs_scorer.py [--rounds 6] [--calls 300] [--mlserver /path/to/venv]

One ``outlierd serve`` (an Isolation Forest, 100 trees of 256 samples, 32 features; defaults, plus
``--http-port``) answers both gRPC services; requests are serialized once up front and sent as bytes
(no client-side protobuf work in the timings). Each round measures both peers back to back, the order
alternating, and the ratio is taken per round; printed: per-peer medians over rounds and the median
of the per-round ratios.

* unary: ``ModelInfer`` vs ``Scorer.Score`` p50 and p99 latency at 1 and 256 records, one call at a
  time, the two alternating call by call;
* stream: ``ModelStreamInfer`` vs ``ScoreStream`` records/s, 256 records per message (4 short streams
  each per round, alternating; the best of them);
* HTTP JSON: ``POST /v1/models/m/score`` vs MLServer's ``POST /v2/models/m/infer`` (the
  ``mlserver-sklearn`` runtime serving the same scikit-learn IsolationForest, ``decision_function``)
  with the same records, 256 per request, 4 clients. MLServer runs from its own virtualenv
  (``--mlserver``; it pins packages this project does not), so it is skipped when none is given.

The machine is shared: numbers are noisy; ratios from the same round are what to read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from test_bench_server import ServerProcess, free_port  # noqa: E402

D = 32
SCORE = "/outlierd.v1.Scorer/Score"
SCORE_STREAM = "/outlierd.v1.Scorer/ScoreStream"
INFER = "/inference.GRPCInferenceService/ModelInfer"
INFER_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def build(root: Path) -> tuple[Path, np.ndarray, object]:
    from sklearn.ensemble import IsolationForest

    from outlierd.core.registry import Registry
    from outlierd.training.export import export_sklearn

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20000, D)).astype(np.float32)
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=0).fit(X)
    reg = Registry(root / "reg")
    reg.publish("m", export_sklearn(forest, root / "artifact", X_train=X), aliases=("champion",))
    return root / "reg", X, forest


def messages(X: np.ndarray, n: int) -> dict[str, bytes]:
    from tritonclient.grpc import service_pb2 as ipb

    from outlierd.v1 import scoring_pb2 as pb

    x = X[:n]
    score = pb.ScoreRequest(model="m", n_features=D, raw_values=x.tobytes()).SerializeToString()
    infer = ipb.ModelInferRequest(model_name="m")
    infer.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    infer.raw_input_contents.append(x.tobytes())
    return {"scorer": score, "oip": infer.SerializeToString()}


def unary(channel: grpc.Channel, bodies: dict[str, bytes], calls: int) -> dict[str, list[float]]:
    """Latencies of one call at a time, the two peers alternating call by call (the same noise for both)."""
    peers = {"scorer": (channel.unary_unary(SCORE), bodies["scorer"]), "oip": (channel.unary_unary(INFER), bodies["oip"])}
    out: dict[str, list[float]] = {p: [] for p in peers}
    for _ in range(20):
        for call, body in peers.values():
            call(body)
    for _ in range(calls):
        for p, (call, body) in peers.items():
            t0 = time.perf_counter()
            call(body)
            out[p].append(time.perf_counter() - t0)
    return out


def stream(channel: grpc.Channel, path: str, body: bytes, messages_n: int, records: int) -> float:
    call = channel.stream_stream(path)
    list(call(iter([body] * 20)))
    t0 = time.perf_counter()
    n = sum(1 for _ in call(iter([body] * messages_n)))
    assert n == messages_n
    return messages_n * records / (time.perf_counter() - t0)


def http_rate(url: str, bodies: list[bytes], clients: int = 4) -> float:
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)

    def worker(chunk: list[bytes]) -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        for body in chunk:
            conn.request("POST", u.path, body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"{url}: {r.status} {data[:300]!r}")
        conn.close()

    chunks = [bodies[i::clients] for i in range(clients)]
    worker(bodies[:4])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, chunks))
    return len(bodies) * 256 / (time.perf_counter() - t0)


def start_mlserver(venv: Path, root: Path, forest: object) -> tuple[subprocess.Popen, int]:
    import joblib  # the peer's own model format (MLServer's sklearn runtime loads joblib files)

    d = root / "mlserver"
    (d / "m").mkdir(parents=True)
    joblib.dump(forest, d / "m" / "model.joblib")
    (d / "m" / "model-settings.json").write_text(json.dumps({
        "name": "m", "implementation": "mlserver_sklearn.SKLearnModel", "parameters": {"uri": "./model.joblib", "extra": {"predict_fn": "decision_function"}}}))
    port = free_port()
    (d / "settings.json").write_text(json.dumps({"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                                                  "parallel_workers": 0, "debug": False}))
    log = open(root / "mlserver.log", "wb")
    proc = subprocess.Popen([str(venv / "bin" / "mlserver"), "start", str(d)], stdout=log, stderr=subprocess.STDOUT, cwd=d)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/m/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("MLServer did not start: " + (root / "mlserver.log").read_text()[-2000:])


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=300, help="unary calls per peer per round")
    ap.add_argument("--stream-messages", type=int, default=400)
    ap.add_argument("--http-requests", type=int, default=200)
    ap.add_argument("--mlserver", type=Path, help="a virtualenv with mlserver and mlserver-sklearn")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="oip-bench-"))
    results: dict[str, dict] = {}
    mlserver = None
    try:
        reg, X, forest = build(tmp)
        port, http_port = free_port(), free_port()
        server = ServerProcess("outlierd", [sys.executable, "-m", "outlierd", "serve", "--registry", str(reg), "--model", "m",
                                            "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
                                            "--metrics-port", "0"], port, tmp).start()
        if args.mlserver is not None:
            mlserver, ml_port = start_mlserver(args.mlserver, tmp, forest)
        channel = grpc.insecure_channel(server.target)
        bodies = {n: messages(X, n) for n in (1, 256)}
        rows = [X[k:k + 256] for k in (i * 256 % (X.shape[0] - 256) for i in range(args.http_requests))]
        ours = [json.dumps({"records": r.tolist()}).encode() for r in rows]
        theirs = [json.dumps({"inputs": [{"name": "X", "shape": list(r.shape), "datatype": "FP32", "data": r.ravel().tolist()}]}).encode()
                  for r in rows]
        rounds: dict[str, list] = {}
        for k in range(args.rounds):
            order = ("scorer", "oip") if k % 2 == 0 else ("oip", "scorer")
            for n in (1, 256):
                lat = unary(channel, bodies[n], args.calls)
                for q in (50, 99):
                    rounds.setdefault(f"unary-{n}-p{q}", []).append((pct(lat["scorer"], q), pct(lat["oip"], q)))
            rate: dict[str, float] = {p: 0.0 for p in order}
            for _ in range(4):  # short streams, alternating: the same noise for both; the best of 4 each
                for p in order:
                    path = SCORE_STREAM if p == "scorer" else INFER_STREAM
                    rate[p] = max(rate[p], stream(channel, path, bodies[256][p], args.stream_messages // 4, 256))
            rounds.setdefault("stream-256", []).append((rate["scorer"], rate["oip"]))
            if mlserver is not None:
                http = {}
                for p in (("ours", "mlserver") if k % 2 == 0 else ("mlserver", "ours")):
                    http[p] = (http_rate(f"http://127.0.0.1:{http_port}/v1/models/m/score", ours) if p == "ours" else
                               http_rate(f"http://127.0.0.1:{ml_port}/v2/models/m/infer", theirs))
                rounds.setdefault("http-json-256", []).append((http["mlserver"], http["ours"]))
            print(f"round {k + 1}/{args.rounds} done", file=sys.stderr)
        print(f"{'scenario':<18} {'peer':>12} {'outlierd':>12} {'ratio':>8}  per-round ratios")
        for name, pairs in rounds.items():
            peer = statistics.median(p for p, _ in pairs)
            new = statistics.median(o for _, o in pairs)
            ratios = [o / p for p, o in pairs]
            unit = "us" if name.startswith("unary") else "rec/s"
            results[name] = {"peer": peer, "outlierd": new, "unit": unit, "ratio": statistics.median(ratios), "ratios": ratios}
            print(f"{name:<18} {peer:>12.0f} {new:>12.0f} {statistics.median(ratios):>8.2f}  "
                  f"{' '.join(f'{r:.2f}' for r in ratios)}  ({unit})")
        print("unary: ModelInfer/Score latency (<= 1.2 wanted); stream: ModelStreamInfer/ScoreStream records/s (>= 0.8 wanted); "
              "http-json: outlierd JSON route / MLServer REST records/s")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        server.stop()
    finally:
        if mlserver is not None:
            mlserver.terminate()
            mlserver.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
