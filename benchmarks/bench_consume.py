"""Records/s through `outlierd consume`'s Kafka loop vs a bare consume -> decode -> produce -> commit
loop (no scoring) on the same broker (Tansu, started here), same topic and records, same run.

    python benchmarks/bench_consume.py [--records 200000] [--repeat 2]

Both read the whole topic with a fresh consumer group (group join included in both) and commit
after their outputs are delivered. Prints records/s of each and the ratio (issue 16 item 7: the
consumer should reach at least half the bare loop), without and with capture into the feedback store
(the CLI captures by default). Two shared cores, other work beside: noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from brokers import Tansu  # noqa: E402

D = 4


def bare_loop(bootstrap: str, topic: str, out: str, n: int, batch: int) -> float:
    from confluent_kafka import Consumer, Producer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bare-{time.monotonic_ns()}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "max.poll.interval.ms": 10000, "session.timeout.ms": 6000,
                  "partition.assignment.strategy": "cooperative-sticky", "isolation.level": "read_committed"})
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    t0 = time.perf_counter()
    c.subscribe([topic])
    done = 0
    while done < n:
        msgs = [m for m in c.consume(batch, 0.2) if m.error() is None]
        if not msgs:
            continue
        for m in msgs:
            body = json.loads(m.value())
            p.produce(out, json.dumps({"id": body["id"], "score": 0.0}).encode(), key=m.key())
        p.flush(60)
        c.commit(asynchronous=False)
        done += len(msgs)
    dt = time.perf_counter() - t0
    c.close()
    return n / dt


async def consume_loop(bootstrap: str, topic: str, out: str, n: int, batch: int, registry: Path, capture: bool = False) -> float:
    from outlierd.server.consume import ConsumeCore, ConsumeMetrics
    from outlierd.server.consume_app import start_plane
    from outlierd.server.kafka_consumer import KafkaConsumerLoop, KafkaOptions
    from outlierd.server.settings import ServeSettings
    from prometheus_client import CollectorRegistry

    # capture: as the CLI runs by default (flagged records and 1% of the others into a SQLite store)
    settings = ServeSettings(registry=registry, model="m", drift=0, threads=2,
                             feedback_store=registry.parent / f"feedback-{time.monotonic_ns()}.sqlite")
    plane = await start_plane(settings, capture=capture)
    metrics = ConsumeMetrics(CollectorRegistry())
    core = ConsumeCore(plane, "m", alerts=False, metrics=metrics)
    url = f"kafka://{bootstrap}"
    loop = KafkaConsumerLoop(core, KafkaOptions(f"{url}/{topic}", f"outlierd-{time.monotonic_ns()}", f"{url}/{out}",
                                                max_inflight=batch), metrics)
    stop = asyncio.Event()

    async def watch() -> None:
        while metrics.records_in._value.get() < n:
            await asyncio.sleep(0.01)
        stop.set()

    t0 = time.perf_counter()
    w = asyncio.create_task(watch())
    await loop.run(stop)
    dt = time.perf_counter() - t0
    await w
    from outlierd.server.consume_app import close_plane

    await close_plane(plane)
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    from sklearn.ensemble import IsolationForest

    from outlierd.core.registry import Registry
    from outlierd.training.export import export_sklearn

    tmp = Path(tempfile.mkdtemp())
    Xt = np.random.default_rng(0).standard_normal((2000, D))
    Registry(tmp / "reg").publish("m", export_sklearn(IsolationForest(n_estimators=100, random_state=0).fit(Xt), tmp / "a",
                                                      X_train=Xt, feature_names=[f"f{j}" for j in range(D)]),
                                  aliases=("champion",))
    broker = Tansu()
    try:
        broker.create_topics(["in", "bare-out", "consume-out"])
        X = np.random.default_rng(1).standard_normal((a.records, D))
        broker.produce("in", ((f"k{i % 257}".encode(), json.dumps({"id": f"r{i}", **{f"f{j}": float(v) for j, v in enumerate(row)}}).encode())
                              for i, row in enumerate(X)))
        for r in range(a.repeat):  # alternate, so drift in the box's load hits both
            bare = bare_loop(broker.bootstrap, "in", "bare-out", a.records, a.batch)
            ours = asyncio.run(consume_loop(broker.bootstrap, "in", "consume-out", a.records, a.batch, tmp / "reg"))
            cap = asyncio.run(consume_loop(broker.bootstrap, "in", "consume-out", a.records, a.batch, tmp / "reg", capture=True))
            print(f"round {r}: bare consume->decode->produce {bare:,.0f} rec/s; outlierd consume {ours:,.0f} rec/s "
                  f"(ratio {ours / bare:.2f}); with capture (the CLI's default) {cap:,.0f} rec/s (ratio {cap / bare:.2f})", flush=True)
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
