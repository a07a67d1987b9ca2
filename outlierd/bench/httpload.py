"""HTTP load for the score route: one keep-alive connection, calls back to back; prints one JSON line.

The body (JSON ``{"records": [...]}``) is built once and reused. Warm-up responses are parsed and
checked (one score per record); measured ones by status and size. Result: records/s and
per-call latency percentiles (client side).

    python -m outlierd.bench.httpload --port 8080 --data X.npy --records 64 --duration 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="bench")
    p.add_argument("--data", required=True)
    p.add_argument("--records", type=int, required=True)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=2.0)
    args = p.parse_args(argv)
    X = np.load(args.data)[: args.records]
    body = json.dumps({"records": X.astype(np.float64).tolist()}).encode()
    path = f"/v1/models/{args.model}/score"
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection(args.host, args.port, timeout=30)
    failures: list[str] = []
    lat: list[int] = []
    min_bytes = 0
    t_start = time.perf_counter() + args.warmup
    t_end = t_start + args.duration
    while True:
        t0 = time.perf_counter_ns()
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        t1 = time.perf_counter_ns()
        if resp.status != 200:
            failures.append(f"HTTP {resp.status}: {data[:200]!r}")
            break
        if time.perf_counter() < t_start:
            answer = json.loads(data)
            if len(answer.get("scores", [])) != args.records:
                failures.append(f"{len(answer.get('scores', []))} scores for {args.records} records")
                break
            min_bytes = len(data) // 2
        elif time.perf_counter() < t_end:
            if len(data) < min_bytes:
                failures.append(f"short response ({len(data)} bytes)")
                break
            lat.append(t1 - t0)
        else:
            break
    conn.close()
    a = np.asarray(lat, dtype=np.float64) / 1e3
    out = {"calls": int(a.size), "records_per_s": a.size * args.records / args.duration, "body_bytes": len(body),
           "failures": failures, **{f"p{q:g}_us": float(np.percentile(a, q)) if a.size else None for q in (50, 99, 99.9)}}
    print(json.dumps(out), flush=True)
    return 1 if failures or not a.size else 0


if __name__ == "__main__":
    sys.exit(main())
