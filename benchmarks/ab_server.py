"""This checkout's ``outlierd serve`` against another source tree's, in the same run, alternating.

For a change that must not cost speed: check out the commit before it somewhere (``git worktree
add /tmp/base <commit>``), then

    .venv/bin/python benchmarks/ab_server.py --base /tmp/base --rounds 6 --seconds 3

Both servers serve one registry (an Isolation Forest, 100 trees of 256 samples, 32 features,
trained with this checkout's ``outlierd train``) on 127.0.0.1 with their defaults. Each scenario
runs ``--rounds`` rounds; a round measures both servers with a fresh ``loadgen.py`` each, the order
alternating (base-new, new-base, ...). Printed per scenario: each server's median (records/s for
streams, p50 µs for unary calls; and the server process's CPU µs per record, less noisy than
throughput on a shared machine), the ratio new/base of the medians (for latency and CPU base/new,
so above 1 is always "new is faster"), and the spread of the per-round ratios. The other tree is run
with ``PYTHONPATH=<base>`` from its own directory: it may predate the one-import-name layout.

Kernels: with ``--kernels``, ``Model.score`` of the same artifact through each tree (in a
subprocess each, alternating, best of 5 calls per round) on 1,000,000 rows and 64-row calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from test_bench_server import ServerProcess, free_port  # noqa: E402

SCENARIOS = {
    "stream-256x1": ["--mode", "stream", "--records", "256", "--streams", "1"],
    "stream-256x4": ["--mode", "stream", "--records", "256", "--streams", "4"],
    "unary-1row-c1": ["--mode", "unary", "--records", "1", "--concurrency", "1"],
    "unary-1row-c16": ["--mode", "unary", "--records", "1", "--concurrency", "16"],
    "stream-4096-raw": ["--mode", "stream", "--records", "4096", "--streams", "1"],
}
KERNEL = """
import json, sys, time
import numpy as np
try:
    from outlierd import load_model
except ImportError:
    from core import load_model
m = load_model(sys.argv[1]); X = np.load(sys.argv[2])
out = {}
for name, rows, reps in (("score-1M", X, 3), ("score-64", X[:64], 2000)):
    m.score(rows[:64]); best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            m.score(rows)
        best = min(best, (time.perf_counter() - t0) / reps)
    out[name] = rows.shape[0] / best
print(json.dumps(out))
"""


def _env(base: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_") and k != "PYTHONPATH"}
    env["OUTLIERD_LOG_LEVEL"] = "WARNING"
    if base is not None:
        env["PYTHONPATH"] = str(base)
    return env


class Tree(ServerProcess):
    def __init__(self, name: str, base: Path | None, registry: Path, log_dir: Path):
        port = free_port()
        super().__init__(name, [sys.executable, "-m", "outlierd", "serve", "--registry", str(registry), "--model", "m",
                                "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"], port, log_dir)
        self.base = base

    def start(self, timeout: float = 120.0) -> Tree:
        # ServerProcess.start with this tree's directory and PYTHONPATH
        import test_bench_server as tb

        old_root, old_env = tb.ROOT, tb._env
        tb.ROOT, tb._env = (self.base or ROOT), (lambda: _env(self.base))
        try:
            super().start(timeout)
        finally:
            tb.ROOT, tb._env = old_root, old_env
        return self


def _load(server: Tree, data: Path, args: list[str], seconds: float) -> dict:
    """One loadgen run against ``server``; its result, plus the server's CPU microseconds per record
    scored over the whole run (warm-up included: an estimate, but the same one for both sides)."""
    target = server.target
    cpu0 = server.cpu_s()
    out = subprocess.run([sys.executable, str(HERE / "loadgen.py"), "--target", target, "--data", str(data), *args,
                          "--warmup", "0.5", "--duration", str(seconds)], capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise SystemExit(f"loadgen failed: {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    records = res["records_per_s"] * (seconds + 0.5)
    res["cpu_us_per_record"] = (server.cpu_s() - cpu0) * 1e6 / records if records else float("nan")
    return res


def _value(res: dict) -> float:
    return res["records_per_s"] if "p50_us" not in res else res["p50_us"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="the other source tree (its root directory)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--kernels", action="store_true", help="also compare Model.score through each tree")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="outlierd-ab-"))
    rng = np.random.default_rng(20240601)
    train = work / "train.csv"
    cols = [f"f{i}" for i in range(32)]
    np.savetxt(train, rng.standard_normal((20_000, 32)), delimiter=",", header=",".join(cols), comments="", fmt="%.6f")
    data = work / "load.npy"
    np.save(data, rng.standard_normal((65_536, 32)).astype(np.float32))
    registry = work / "registry"
    subprocess.run([sys.executable, "-m", "outlierd", "train", "--data", str(train), "--registry", str(registry), "--model", "m",
                    "--detector", "iforest", "--alias", "champion"], check=True, env=_env(None), cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    results: dict[str, dict[str, list[float]]] = {}
    if a.kernels:
        big = work / "big.npy"
        np.save(big, rng.standard_normal((1_000_000, 32)).astype(np.float32))
        artifact = registry / "m" / "1"
        for r in range(a.rounds):
            for side in (("base", "new") if r % 2 == 0 else ("new", "base")):
                tree = a.base if side == "base" else None
                out = subprocess.run([sys.executable, "-c", KERNEL, str(artifact), str(big)], capture_output=True, text=True,
                                     env=_env(tree), cwd=tree or ROOT, check=True)
                for k, v in json.loads(out.stdout).items():
                    results.setdefault(k, {"base": [], "new": []})[side].append(v)
            print(f"[ab] kernels round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
    servers = {"base": Tree("base", a.base.resolve(), registry, work), "new": Tree("new", None, registry, work)}
    try:
        for s in servers.values():
            s.start()
        for name in a.scenarios.split(","):
            for r in range(a.rounds):
                for side in (("base", "new") if r % 2 == 0 else ("new", "base")):
                    res = _load(servers[side], data, SCENARIOS[name], a.seconds)
                    results.setdefault(name, {"base": [], "new": []})[side].append(_value(res))
                    results.setdefault(f"{name} cpu", {"base": [], "new": []})[side].append(res["cpu_us_per_record"])
                print(f"[ab] {name} round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.stop()
    print(f"{'scenario':<18} {'base':>12} {'new':>12} {'ratio':>7}  per-round ratios (min / median / max)")
    for name, v in results.items():
        latency = name.startswith("unary") or name.endswith(" cpu")
        b, n = statistics.median(v["base"]), statistics.median(v["new"])
        per = [(bb / nn) if latency else (nn / bb) for bb, nn in zip(v["base"], v["new"])]
        ratio = b / n if latency else n / b
        unit = "server cpu us/record" if name.endswith(" cpu") else "us p50" if latency else "rec/s"
        print(f"{name:<18} {b:>12.1f} {n:>12.1f} {ratio:>7.3f}  {min(per):.3f} / {statistics.median(per):.3f} / {max(per):.3f}  ({unit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
