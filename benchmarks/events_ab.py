"""Raw events vs feature vectors through gRPC, with the server run alternately from two source trees:
a same-run before/after of the raw-event path (issue 15), on a shared, noisy machine.

    .venv/bin/python benchmarks/events_ab.py --batch 256 --runs 6 BEFORE_TREE AFTER_TREE

Each tree is a checkout of the repository (``git archive REV | tar -x -C DIR``); its server is started
with ``PYTHONPATH=TREE``. One client, one registry (trained once, from this checkout), one event stream
at the density of ``bench_features.py --events 1400000`` (1.4M events in 30 days over 10,000 cards).
Per server run, the protocol of ``bench_features.grpc_ratio``: 3 rounds, vectors and raw events
alternating, each round on events the server has not seen, best of the 3 per kind; the ratio is
raw/vector records per second. The trees alternate in order (ABBA...) over ``--runs``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_features as bf  # noqa: E402 - the benchmark's own server, training and timing

from outlierd.core.features import engine_for  # noqa: E402
from outlierd.core.registry import Registry  # noqa: E402
from outlierd.payments import payments  # noqa: E402
from outlierd.server.client import events_request, request  # noqa: E402

WARM, ROUNDS = 20, 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("trees", nargs="+")
    args = p.parse_args()
    b, m = args.batch, args.messages
    per_round = (WARM + m) * b
    n = 50000 + ROUNDS * per_round
    events = payments(n, 10000, days=30.0 * n / 1_400_000)
    registry = bf.train(Path(tempfile.mkdtemp(prefix="events-ab-")), events.slice(0, 50000), bf.ROOT / "data" / "payments.features.json")
    stream = events.slice(50000)
    features = engine_for(Registry(registry).path("pay", 1)).replay(stream).astype(np.float32)

    def round_requests(k: int, raw: bool) -> tuple[list, list]:
        at = k * per_round
        if raw:
            reqs = [events_request(stream.slice(at + i * b, b), request_id=i) for i in range(WARM + m)]
        else:
            reqs = [request(features[at + i * b:at + (i + 1) * b], request_id=i) for i in range(WARM + m)]
        return reqs[:WARM], reqs[WARM:]

    raw_rounds = [round_requests(k, True) for k in range(ROUNDS)]
    vec_rounds = [round_requests(k, False) for k in range(ROUNDS)]
    ratios: dict[str, list[float]] = {t: [] for t in args.trees}
    for run in range(args.runs):
        for tree in (args.trees if run % 2 == 0 else args.trees[::-1]):
            os.environ["PYTHONPATH"] = tree
            server = bf.Server(registry)
            try:
                rates: dict[str, list[float]] = {"events": [], "vectors": []}
                target = f"127.0.0.1:{server.port}"
                for k in range(ROUNDS):
                    warm, reqs = vec_rounds[k]
                    rates["vectors"].append(bf.stream_rate(target, reqs, m * b, warm))
                    warm, reqs = raw_rounds[k]
                    rates["events"].append(bf.stream_rate(target, reqs, m * b, warm))
            finally:
                server.stop()
            ev, vc = max(rates["events"]), max(rates["vectors"])
            ratios[tree].append(ev / vc)
            print(f"run {run} {tree}: raw events {ev:,.0f}/s vectors {vc:,.0f}/s ratio {ev / vc:.3f} "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    for tree, r in ratios.items():
        print(f"{tree} batch {b}: ratios {[round(x, 3) for x in r]} median {float(np.median(r)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
