"""Worker RSS before and after bursts of 32 MB Score requests (issue 14 item 22).

Trains a 32-feature Isolation Forest into a temporary registry, starts ``outlierd serve`` (one
worker, no capture) with this Python, and sends three bursts of six concurrent clients, each
sending three 250,000-record (32 MB) requests (the queue admits one at a time: the others are
refused RESOURCE_EXHAUSTED, as under a real overload). After each burst and seven idle seconds it
reads the worker's RSS, then times ten sequential 32 MB requests.

    python benchmarks/memory_burst.py [-- SERVE-FLAGS...]      e.g. -- --trim-after-mb 0

Run it with another checkout's venv Python to measure that checkout (the A/B in one session).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from outlierd.server.client import ScorerClient

D = 32


def rss_mb(pid: int) -> int:
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for p in [pid, *map(int, kids)]:
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return total // 1024


def main(serve_flags: list[str]) -> None:
    root = Path(tempfile.mkdtemp())
    X = np.random.default_rng(0).normal(size=(5000, D)).astype(np.float32)
    np.savetxt(root / "train.csv", X, delimiter=",", header=",".join(f"f{i}" for i in range(D)), comments="")
    subprocess.run([sys.executable, "-m", "outlierd", "train", "--data", str(root / "train.csv"), "--registry",
                    str(root / "reg"), "--model", "m", "--alias", "champion", "--detector", "iforest"],
                   check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "outlierd", "serve", "--registry", str(root / "reg"), "--model", "m",
                             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--workers", "1",
                             "--no-capture", *serve_flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = ScorerClient(f"127.0.0.1:{port}")
        for _ in range(300):
            try:
                client.score(X[:1])
                break
            except Exception:
                time.sleep(0.2)
        big = np.random.default_rng(1).normal(size=(250_000, D)).astype(np.float32)
        client.score(big[:1000])
        time.sleep(1)
        before = rss_mb(proc.pid)

        def calls() -> None:
            c = ScorerClient(f"127.0.0.1:{port}")
            for _ in range(3):
                try:
                    c.score(big)
                except Exception:  # RESOURCE_EXHAUSTED
                    pass

        after = []
        for _ in range(3):
            threads = [threading.Thread(target=calls) for _ in range(6)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            time.sleep(7)
            after.append(rss_mb(proc.pid))
        lat = []
        for _ in range(10):
            t = time.perf_counter()
            client.score(big)
            lat.append(time.perf_counter() - t)
        print(json.dumps({"serve_flags": serve_flags, "rss_before_mb": before, "rss_after_bursts_mb": after,
                          "req_32mb_median_ms": round(1000 * float(np.median(lat)), 1)}))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if a != "--"])
