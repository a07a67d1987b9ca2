"""Back-pressure of `outlierd consume` (issue 16 item 4): a producer several times faster than the
consumer for --seconds; the consumer process's RSS is sampled every second; at the end nothing may
be missing below the committed offsets (every input record below each partition's committed offset
has its result).

    python benchmarks/consume_backpressure.py [--seconds 60] [--rate 50000]

Prints the producer's and the consumer's rates, their ratio, RSS when the producer starts and its
maximum, and the check. Two shared cores with other work beside: noisy. With the default 20,000
trees and --threads 1 the consumer scores ~5k records/s against the producer's 50k/s (2026-12-05:
10.9x for 60 s, RSS +36 MB, 0 missing below the committed offsets).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from brokers import Tansu  # noqa: E402

D = 4


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rate", type=int, default=50000, help="producer's records/s cap")
    ap.add_argument("--trees", type=int, default=20000,
                    help="Isolation Forest trees: a slow model (one scoring thread), so the producer is 5x+ faster")
    a = ap.parse_args()
    from confluent_kafka import Consumer, Producer, TopicPartition
    from sklearn.ensemble import IsolationForest

    from outlierd.core.registry import Registry
    from outlierd.training.export import export_sklearn

    tmp = Path(tempfile.mkdtemp())
    Xt = np.random.default_rng(0).standard_normal((2000, D))
    Registry(tmp / "reg").publish("m", export_sklearn(IsolationForest(n_estimators=a.trees, random_state=0).fit(Xt), tmp / "a",
                                                      X_train=Xt, feature_names=[f"f{j}" for j in range(D)]),
                                  aliases=("champion",))
    broker = Tansu()
    url = f"kafka://{broker.bootstrap}"
    broker.create_topics(["in", "out"])
    proc = subprocess.Popen([sys.executable, "-m", "outlierd", "consume", "--registry", str(tmp / "reg"), "--model", "m",
                             "--source", f"{url}/in", "--group", "bp", "--out", f"{url}/out", "--max-inflight", "2000",
                             "--threads", "1"], env={**os.environ, "OUTLIERD_LOG_LEVEL": "WARNING"})
    try:
        time.sleep(8)  # model load and group join
        p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
        rows = np.random.default_rng(1).standard_normal((10000, D))
        payloads = [json.dumps({"id": "", **{f"f{j}": float(v) for j, v in enumerate(r)}})[:-1] for r in rows]
        t0 = time.monotonic()
        n = 0
        samples = []
        next_sample = t0
        while time.monotonic() - t0 < a.seconds:
            now = time.monotonic()
            if n < a.rate * (now - t0):
                for _ in range(1000):
                    body = payloads[n % len(payloads)].replace('"id": ""', f'"id": "r{n}"', 1) + "}"
                    while True:
                        try:
                            p.produce("in", body.encode(), key=f"k{n % 257}".encode())
                            break
                        except BufferError:
                            p.poll(0.01)
                    n += 1
                p.poll(0)
            else:
                time.sleep(0.001)
            if now >= next_sample:
                samples.append(rss_mb(proc.pid))
                next_sample += 1.0
        p.flush(60)
        elapsed = time.monotonic() - t0
        proc.send_signal(signal.SIGTERM)  # the batch in flight is published and committed
        proc.wait(60)
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bp", "enable.auto.commit": False})
        committed = c.committed([TopicPartition("in", i) for i in range(4)], timeout=10)
        c.close()
        done = sum(max(tp.offset, 0) for tp in committed)
        outs = {json.loads(m.value())["id"] for m in broker.read("out", idle=3, timeout=300)}
        ins = broker.read("in", idle=3, timeout=300)
        below = {tp.partition: tp.offset for tp in committed}
        missing = [m for m in ins if m.offset() < below[m.partition()] and json.loads(m.value())["id"] not in outs]
        print(f"producer {n / elapsed:,.0f} rec/s for {elapsed:.0f} s; consumer {done / elapsed:,.0f} rec/s "
              f"(producer/consumer {n / max(done, 1):.1f}x); consumer RSS first {samples[0]:.0f} MB, max {max(samples):.0f} MB "
              f"(growth {max(samples) - samples[0]:.0f} MB); committed {done:,} of {n:,}; missing below the committed "
              f"offsets: {len(missing)}", flush=True)
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop()


if __name__ == "__main__":
    main()
