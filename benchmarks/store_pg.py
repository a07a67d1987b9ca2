"""Feedback store write throughput: PostgreSQL vs SQLite, measured in the same run.

What the server asks of its store, on the same machine, alternating the two stores round by round
(so a drift of the machine's load favours neither), medians over rounds:

- **captures**: ``add_predictions`` of one capture frame (``--frame`` records of 21 float32
  features: what the capture writer hands over every 100 ms), records/s;
- **labels, one per commit**: ``add_labels`` of one label (a unary SubmitFeedback: the commit is
  durable before the ack: SQLite fsyncs its WAL, PostgreSQL flushes its WAL), labels/s;
- **labels, 256 per commit**: a stream's group commit, labels/s;
- **labelled read**: ``labelled()`` (training with --labels-from-feedback) over what was written.

The ratio is PostgreSQL / SQLite (1.0: as fast). SQLite is a file in a temporary directory of this
machine; PostgreSQL is the server at ``--url`` (default the local test server; a fresh schema,
dropped after). Both pay their own fsync; a PostgreSQL on another host adds a network round trip
per commit. Run::

    PYTHONPATH=. python benchmarks/store_pg.py [--url postgresql://...] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import numpy as np

from outlierd.monitoring.store import LabelRow, open_store

D = 21


def _captures(store, rng, frames: int, frame: int, tag: str) -> float:
    X = rng.standard_normal((frame, D)).astype(np.float32)
    scores = rng.random(frame)
    flagged = scores > 0.5
    t0 = time.perf_counter()
    for f in range(frames):
        ids = [f"{tag}-{f}-{i}" for i in range(frame)]
        store.add_predictions("m", 1, "champion", ids, X, scores, flagged, ~flagged, 10.0, sample_rate=0.01)
    return frames * frame / (time.perf_counter() - t0)


def _labels(store, n: int, per_commit: int, tag: str) -> float:
    t0 = time.perf_counter()
    for k in range(0, n, per_commit):
        store.add_labels("m", [LabelRow(f"{tag}-0-{i}", "anomaly" if i % 3 else "normal", "rev") for i in range(k, min(n, k + per_commit))])
    return n / (time.perf_counter() - t0)


def _read(store) -> float:
    t0 = time.perf_counter()
    X, _, _ = store.labelled("m")
    return len(X) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=20, help="capture frames per round")
    ap.add_argument("--frame", type=int, default=1024, help="records per capture frame")
    ap.add_argument("--labels", type=int, default=300, help="one-per-commit labels per round")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.url, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    url = f"{args.url}{'&' if '?' in args.url else '?'}options={quote(f'-csearch_path={schema}')}"
    tmp = tempfile.TemporaryDirectory()
    stores = {"sqlite": open_store(Path(tmp.name) / "fb.sqlite"), "postgres": open_store(url)}
    res: dict[str, dict[str, list[float]]] = {name: {"captures": [], "labels_1": [], "labels_256": [], "read": []} for name in stores}
    rng = np.random.default_rng(0)
    try:
        for r in range(args.rounds):
            order = list(stores) if r % 2 == 0 else list(reversed(stores))
            for name in order:
                s, tag = stores[name], f"r{r}"
                res[name]["captures"].append(_captures(s, rng, args.frames, args.frame, tag))
                res[name]["labels_1"].append(_labels(s, args.labels, 1, tag))
                res[name]["labels_256"].append(_labels(s, 256 * 8, 256, tag))
                res[name]["read"].append(_read(s))
    finally:
        for s in stores.values():
            s.close()
        tmp.cleanup()
        with psycopg.connect(args.url, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")
    summary = {}
    print(f"{'workload':<22}{'SQLite':>14}{'PostgreSQL':>14}{'PG/SQLite':>11}   per round (PG/SQLite)")
    for key, unit in (("captures", "rec/s"), ("labels_1", "labels/s"), ("labels_256", "labels/s"), ("read", "rec/s")):
        a, b = statistics.median(res["sqlite"][key]), statistics.median(res["postgres"][key])
        rounds = [p / q for p, q in zip(res["postgres"][key], res["sqlite"][key])]
        summary[key] = {"sqlite": a, "postgres": b, "ratio": b / a, "rounds": rounds, "unit": unit}
        print(f"{key:<22}{a:>11,.0f} {unit[:3]}{b:>11,.0f} {unit[:3]}{b / a:>10.2f}x   " + " ".join(f"{x:.2f}" for x in rounds))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
