"""The feature engine against River, and raw events against feature vectors through gRPC, in one run.

    .venv/bin/python benchmarks/bench_features.py [--events 1000000] [--entities 10000]
        [--river-events 100000] [--messages 400] [--batch 256] [--parity]

1. Offline replay: ``FeatureEngine.replay`` of ``--events`` synthetic payments over ``--entities``
   cards, spec = 3 windows (10m, 1h, 24h) x 5 aggregates (count, sum, mean, max, std of amount)
   + 2 categorical (mcc frequency, merchant new for the card) + time (hour and weekday cyclic, time
   since the card's last event); one thread (Arrow's pool set to 1). Peer: River's ``Agg`` with
   ``utils.TimeRolling`` per window and aggregate on the first ``--river-events`` of the same events
   (River has no revertible max: it gets count as a rolling sum of ones, sum, mean and variance,
   12 aggregates to our 15, and no categorical or time features: its number flatters it).
2. gRPC: one ``outlierd serve`` (one worker, a model trained on the events), ``--messages`` stream
   messages of ``--batch`` records: raw events (``arrow_events``) vs the same records as
   pre-computed feature vectors (``raw_values``); requests built before timing; records/s ratio.
   Three rounds each, alternating, best of three; each round streams the next slice of the events
   (never events the server has seen: a resent event is late for its card), so ``--events`` must
   hold 50,000 (training) + 3 x (20 + ``--messages``) x ``--batch``.
3. State memory per entity (the engine's arrays).
4. ``--parity``: every event of the stream through the server (in event-time order, in
   ``--batch`` messages), with a worker restart (SIGTERM, checkpoint, new process restores it) at
   one third and a hot reload (a new version, same spec) at two thirds; the answered features
   compared with the offline replay: bit-equal or not, and the largest difference.

The machine has 2 shared cores and other jobs run beside it: the numbers are noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from outlierd.core.features import FeatureEngine, FittedCategories, decode_events, engine_for, parse_spec
from outlierd.payments import payments

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = {"10m": 600, "1h": 3600, "24h": 86400}
AGGS = ("count", "sum", "mean", "max", "std")
BENCH_SPEC = {"version": 1, "entity": "card_id", "time": "ts", "state": {"max_events": 64}, "features": [
    *[{"name": f"amount_{a}_{w}", "window": w, "agg": a, **({"of": "amount"} if a != "count" else {})}
      for w in WINDOWS for a in AGGS],
    {"name": "mcc", "category": "mcc", "encode": "frequency"}, {"name": "merchant_new", "new_for_entity": "merchant"},
    {"name": "hour", "time_of_day": True}, {"name": "weekday", "day_of_week": True}, {"name": "since_last", "since_last": True}]}


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def offline(events: pa.Table) -> dict:
    pa.set_cpu_count(1)
    spec = parse_spec(BENCH_SPEC)
    fitted = FittedCategories.fit(spec, decode_events(events, spec))
    FeatureEngine(spec, fitted).replay(events.slice(0, 1000))  # JIT / cache load outside the timing
    best = float("inf")
    for _ in range(3):
        engine = FeatureEngine(spec, fitted)
        t0 = time.perf_counter()
        engine.replay(events)
        best = min(best, time.perf_counter() - t0)
    return {"events": events.num_rows, "seconds": best, "events_per_s": events.num_rows / best,
            "bytes_per_entity": engine.bytes_per_entity(), "entities": engine.stats()["entities"],
            "state_bytes": engine.stats()["bytes"]}


def river(events: pa.Table) -> dict:
    from river import feature_extraction as fx
    from river import stats, utils

    aggs = []
    for seconds in WINDOWS.values():
        period = dt.timedelta(seconds=seconds)
        aggs += [fx.Agg(on="one", by="card_id", how=utils.TimeRolling(stats.Sum, period)),
                 fx.Agg(on="amount", by="card_id", how=utils.TimeRolling(stats.Sum, period)),
                 fx.Agg(on="amount", by="card_id", how=utils.TimeRolling(stats.Mean, period)),
                 fx.Agg(on="amount", by="card_id", how=utils.TimeRolling(stats.Var, period, ddof=0))]
    cards = events.column("card_id").to_pylist()
    amounts = events.column("amount").to_pylist()
    times = [dt.datetime.utcfromtimestamp(t) for t in events.column("ts").to_pylist()]
    t0 = time.perf_counter()
    for card, amount, t in zip(cards, amounts, times):
        x = {"card_id": card, "amount": amount, "one": 1.0}
        for a in aggs:
            a.learn_one(x, t=t)
            a.transform_one(x)
    seconds = time.perf_counter() - t0
    return {"events": len(cards), "seconds": seconds, "events_per_s": len(cards) / seconds, "aggregates": len(aggs)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outlierd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "outlierd", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Server:
    def __init__(self, registry: Path, state_dir: Path | None = None, workers: int = 1, port: int | None = None) -> None:
        self.port = port or free_port()
        cmd = [sys.executable, "-m", "outlierd", "serve", "--registry", str(registry), "--model", "pay", "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", "0", "--no-capture", "--no-drift", "--reload-interval-s", "0.1", "--workers", str(workers)]
        if state_dir is not None:
            cmd += ["--feature-state-dir", str(state_dir), "--feature-checkpoint-s", "0"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        import grpc

        deadline = time.monotonic() + 120
        while True:
            try:
                grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{self.port}")).result(timeout=1)
                from outlierd.server.client import ScorerClient

                ScorerClient(f"127.0.0.1:{self.port}").model_info()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def train(tmp: Path, events: pa.Table, spec_path: Path) -> Path:
    pq.write_table(events, tmp / "train.parquet")
    registry = tmp / "reg"
    outlierd("train", "--events", str(tmp / "train.parquet"), "--features", str(spec_path), "--registry", str(registry),
             "--model", "pay", "--alias", "champion", "--quiet")
    return registry


def stream_rate(target: str, requests: list, n_records: int, warm: list) -> float:
    from outlierd.server.client import ScorerClient

    with ScorerClient(target) as client:
        list(client.stub.ScoreStream(iter(warm)))  # warm up
        t0 = time.perf_counter()
        for resp in client.stub.ScoreStream(iter(requests)):
            if resp.error:
                raise RuntimeError(resp.error)
        return n_records / (time.perf_counter() - t0)


ROUNDS = 3  # each kind of stream timed this many times, alternating; the best counts


def grpc_ratio(tmp: Path, events: pa.Table, spec_path: Path, messages: int, batch: int) -> dict:
    """Every round streams events the server has not seen yet, continuing in event time: sending the
    same events again would make every one of them late for its card (processed at the card's last
    time, piling up in its windows), a state no real stream reaches."""
    from outlierd.server.client import events_request, request

    registry = train(tmp, events.slice(0, 50000), spec_path)
    from outlierd.core.registry import Registry

    artifact = Registry(registry).path("pay", 1)
    warm_n = 20
    per_round = (warm_n + messages) * batch
    if events.num_rows < 50000 + ROUNDS * per_round:
        raise SystemExit(f"--events {events.num_rows} is too few for {ROUNDS} rounds of {warm_n} + {messages} messages of "
                         f"{batch} raw events: at least {50000 + ROUNDS * per_round}")
    stream = events.slice(50000)
    features = engine_for(artifact).replay(stream).astype(np.float32)

    def round_requests(k: int, raw: bool) -> tuple[list, list]:
        at = k * per_round
        if raw:
            reqs = [events_request(stream.slice(at + i * batch, batch), request_id=i) for i in range(warm_n + messages)]
        else:
            reqs = [request(features[at + i * batch:at + (i + 1) * batch], request_id=i) for i in range(warm_n + messages)]
        return reqs[:warm_n], reqs[warm_n:]

    # round k: the k-th slice of the stream, as raw events and as their features (replayed offline)
    raw_rounds = [round_requests(k, True) for k in range(ROUNDS)]
    vec_rounds = [round_requests(k, False) for k in range(ROUNDS)]
    server = Server(registry)
    try:
        target = f"127.0.0.1:{server.port}"
        rates: dict[str, list[float]] = {"events": [], "vectors": []}
        for k in range(ROUNDS):  # alternate, best of ROUNDS each
            warm, reqs = vec_rounds[k]
            rates["vectors"].append(stream_rate(target, reqs, messages * batch, warm))
            warm, reqs = raw_rounds[k]
            rates["events"].append(stream_rate(target, reqs, messages * batch, warm))
    finally:
        server.stop()
    ev, vc = max(rates["events"]), max(rates["vectors"])
    return {"batch": batch, "messages": messages, "events_records_per_s": ev, "vectors_records_per_s": vc, "ratio": ev / vc,
            "rounds": rates}


def parity(tmp: Path, events: pa.Table, spec_path: Path, batch: int, workers: int = 1) -> dict:
    from outlierd.core.registry import Registry
    from outlierd.server.client import ScorerClient, events_request

    registry = train(tmp, events.slice(0, 50000), spec_path)
    artifact = Registry(registry).path("pay", 1)
    t0 = time.perf_counter()
    offline_x = engine_for(artifact).replay(events)
    offline_s = time.perf_counter() - t0
    n = events.num_rows
    cuts = [0, n // 3, 2 * n // 3, n]
    state = tmp / "state"
    got = []
    server = Server(registry, state, workers)
    t0 = time.perf_counter()
    for part in range(3):
        if part == 1:  # restart: SIGTERM checkpoints, a new process restores
            server.stop()
            server = Server(registry, state, workers, server.port)
        if part == 2:  # hot reload: a new version with the same spec
            v2 = Registry(registry).publish("pay", artifact, aliases=("champion",))
            with ScorerClient(f"127.0.0.1:{server.port}") as c:
                while c.model_info().version != str(v2):
                    time.sleep(0.05)
        reqs = (events_request(events.slice(s, min(batch, cuts[part + 1] - s)), request_id=s, return_features=True)
                for s in range(cuts[part], cuts[part + 1], batch))
        if workers == 1:
            with ScorerClient(f"127.0.0.1:{server.port}", timeout=None) as client:
                for resp in client.stub.ScoreStream(reqs):
                    if resp.error:
                        raise RuntimeError(resp.error)
                    got.append(np.frombuffer(resp.features, dtype="<f8").reshape(len(resp.scores), -1))
        else:  # a connection per message, so that every worker receives messages (SO_REUSEPORT)
            for req in reqs:
                with ScorerClient(f"127.0.0.1:{server.port}", timeout=None) as client:
                    resp = client.stub.Score(req)
                    got.append(np.frombuffer(resp.features, dtype="<f8").reshape(len(resp.scores), -1))
    online_s = time.perf_counter() - t0
    server.stop()
    online_x = np.vstack(got)
    both = ~np.isnan(offline_x)
    same_nan = np.array_equal(np.isnan(offline_x), np.isnan(online_x))
    diff = float(np.max(np.abs(online_x[both] - offline_x[both]))) if both.any() else 0.0
    return {"workers": workers, "events": n, "bit_equal": bool(np.array_equal(online_x, offline_x, equal_nan=True)), "same_nan": same_nan,
            "max_abs_diff": diff, "offline_s": offline_s, "online_s": online_s, "restart_at": cuts[1], "reload_at": cuts[2]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--entities", type=int, default=10_000)
    p.add_argument("--river-events", type=int, default=100_000)
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--parity", action="store_true", help="also run the online == offline check through the server")
    p.add_argument("--parity-workers", type=int, default=1, help="worker processes of the parity server (default 1)")
    p.add_argument("--skip-grpc", action="store_true")
    p.add_argument("--skip-river", action="store_true")
    args = p.parse_args()
    say(f"generating {args.events} events over {args.entities} entities")
    events = payments(args.events, args.entities, days=30)
    out: dict = {"machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}}
    say("offline replay")
    out["offline"] = offline(events)
    if not args.skip_river:
        say("River Agg + TimeRolling")
        out["river"] = river(events.slice(0, args.river_events))
        out["offline_vs_river"] = out["offline"]["events_per_s"] / out["river"]["events_per_s"]
    with tempfile.TemporaryDirectory(prefix="bench-features-") as d:
        tmp = Path(d)
        spec_path = ROOT / "data" / "payments.features.json"
        if not args.skip_grpc:
            say("gRPC: raw events vs feature vectors")
            (tmp / "g").mkdir()
            out["grpc"] = grpc_ratio(tmp / "g", events, spec_path, args.messages, args.batch)
        if args.parity:
            say("parity through the server (restart + reload)")
            (tmp / "p").mkdir()
            out["parity"] = parity(tmp / "p", events, spec_path, max(args.batch, 4096), args.parity_workers)
    out["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    o = out["offline"]
    print(f"offline replay {o['events_per_s']:,.0f} events/s (1 thread); state {o['bytes_per_entity']:.0f} bytes per entity",
          file=sys.stderr)
    if "river" in out:
        print(f"River Agg+TimeRolling {out['river']['events_per_s']:,.0f} events/s: ours {out['offline_vs_river']:.0f}x",
              file=sys.stderr)
    if "grpc" in out:
        g = out["grpc"]
        print(f"gRPC stream, {g['batch']} records per message: raw events {g['events_records_per_s']:,.0f}/s vs vectors "
              f"{g['vectors_records_per_s']:,.0f}/s: {g['ratio']:.2f}x", file=sys.stderr)
    if "parity" in out:
        q = out["parity"]
        print(f"parity over {q['events']} events, {q['workers']} worker(s) (restart at {q['restart_at']}, reload at {q['reload_at']}): bit-equal "
              f"{q['bit_equal']}, max |diff| {q['max_abs_diff']:.3g}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
