"""Batch scoring of a large Parquet file: flat memory, same scores, records/s (local and Dask).

    PYTHONPATH=. .venv/bin/python benchmarks/batch_scoring.py --rows 5000000

1. Generates a Parquet file of ``--rows`` records (``--features`` float32 columns and an int64 id,
   1% planted anomalies) chunk by chunk in a temporary directory (generation itself is flat), and
   a ``--small-rows`` file with the same first records, to compare peak memory at two sizes.
2. Trains an Isolation Forest on a 20,000-record sample and publishes it (alias champion).
3. Peer, in this process: plain ``load_model().score`` on the small file's records as one
   in-memory array (median of 3 calls) -- the throughput streaming is compared with.
4. ``outlierd score --input FILE --output out.parquet --id-column id`` in a subprocess per size;
   peak RSS = its ``ru_maxrss`` (``RUSAGE_CHILDREN`` of a small launcher), records/s from its JSON
   summary (reading, scoring and writing; model loading excluded).
5. The same with ``--dask local --dask-workers N`` on the big file (records/s with and without the
   cluster start).
6. Checks every output row against ``load_model().score`` computed chunk by chunk, and the Dask
   output against the local one, then prints a table (and ``--json FILE`` writes it).

Numbers are indicative on a shared machine; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHUNK = 250_000
TRAIN_ROWS = 20_000
SEED = 20240601


def generate(path_big: Path, path_small: Path, rows: int, small_rows: int, d: int) -> None:
    """Write ``rows`` records to ``path_big`` and the first ``small_rows`` of them to ``path_small``,
    one CHUNK at a time (one row group per chunk)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(SEED)
    names = [f"x{j}" for j in range(d)]
    schema = pa.schema([pa.field("id", pa.int64())] + [pa.field(n, pa.float32()) for n in names])
    with pq.ParquetWriter(path_big, schema) as big, pq.ParquetWriter(path_small, schema) as small:
        for lo in range(0, rows, CHUNK):
            n = min(CHUNK, rows - lo)
            X = rng.standard_normal((n, d), dtype=np.float32)
            far = rng.random(n) < 0.01
            X[far] += np.float32(6.0)
            t = pa.table([pa.array(np.arange(lo, lo + n, dtype=np.int64))] + [pa.array(X[:, j]) for j in range(d)],
                         schema=schema)
            big.write_table(t)
            if lo < small_rows:
                small.write_table(t.slice(0, min(n, small_rows - lo)))


def train_model(data: Path, registry: Path, d: int) -> Path:
    import pyarrow.parquet as pq

    from outlierd.core.registry import Registry
    from outlierd.training.train import train

    sample = data.parent / "train.parquet"
    pq.write_table(pq.ParquetFile(data).read_row_group(0).slice(0, TRAIN_ROWS).drop_columns(["id"]), sample)
    res = train(sample, registry, "bench", alias="champion", quiet=True)
    return Registry(registry).path("bench", res.version)


# Linux counts a forked child's copy of its parent in the child's ru_maxrss (kept across exec): a
# child forked from this process (which holds the peer's array) would report at least our RSS. So a
# small, fresh Python starts `outlierd score` and reports its child's peak (RUSAGE_CHILDREN, KiB).
_LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


def run_cli(args: list[str], work: Path) -> tuple[dict[str, Any], float, float]:
    """``python -m outlierd score ...`` in a subprocess: (JSON summary, peak RSS MiB, wall seconds)."""
    rss_file = work / "maxrss.txt"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(rss_file), sys.executable, "-m", "outlierd", "score",
                           *args, "--json"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"outlierd score {' '.join(args)} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout), int(rss_file.read_text()) / 1024.0, wall


def peer_rate(model: Any, data: Path, d: int) -> float:
    """records/s of plain ``model.score`` on the file's records as one in-memory float32 array."""
    import pyarrow.parquet as pq

    t = pq.read_table(data)
    X = np.column_stack([t.column(f"x{j}").to_numpy() for j in range(d)])
    del t
    model.score(X[:2048])  # warm up (JIT cache load, thread pool)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.score(X)
        times.append(time.perf_counter() - t0)
    return X.shape[0] / float(np.median(times))


def verify(model: Any, data: Path, outputs: dict[str, Path], d: int) -> dict[str, int]:
    """Compare every output row with ``model.score`` on the input, chunk by chunk: mismatching rows
    per output (0 everywhere = identical), plus id order and the anomalous flag."""
    import pyarrow.parquet as pq

    cols = {name: pq.read_table(p, columns=["id", "score", "anomalous"]) for name, p in outputs.items()}
    bad = {name: 0 for name in outputs}
    lo = 0
    for batch in pq.ParquetFile(data).iter_batches(batch_size=CHUNK):
        X = np.column_stack([batch.column(f"x{j}").to_numpy() for j in range(d)])
        expected = model.score(X)
        ids = batch.column("id").to_numpy()
        hi = lo + len(expected)
        for name, t in cols.items():
            got = t.column("score").slice(lo, hi - lo).to_numpy()
            flag = t.column("anomalous").slice(lo, hi - lo).to_numpy(zero_copy_only=False)
            gid = t.column("id").slice(lo, hi - lo).to_numpy()
            bad[name] += int(np.count_nonzero((got != expected) | (flag != (expected >= model.threshold)) | (gid != ids)))
        lo = hi
    for name, t in cols.items():
        if t.num_rows != lo:
            bad[name] += abs(t.num_rows - lo)
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--small-rows", type=int, default=1_000_000, help="the second size, for the memory comparison")
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--batch-rows", type=int, default=65536)
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (one thread each)")
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory, removed)")
    a = ap.parse_args()
    small_rows = min(a.small_rows, a.rows)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="outlierd-batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from outlierd.core import load_model

        big, small = work / "big.parquet", work / "small.parquet"
        t0 = time.perf_counter()
        generate(big, small, a.rows, small_rows, a.features)
        print(f"[bench] generated {a.rows:,} + {small_rows:,} rows x {a.features} float32 in {time.perf_counter() - t0:.1f} s "
              f"({big.stat().st_size / 2**20:,.0f} MiB)", file=sys.stderr)
        registry = work / "registry"
        artifact = train_model(big, registry, a.features)
        model = load_model(artifact)
        peer = peer_rate(model, small, a.features)
        print(f"[bench] peer: plain load_model().score on {small_rows:,} in-memory rows: {peer:,.0f} records/s", file=sys.stderr)
        common = ["--registry", str(registry), "--model", "bench", "--id-column", "id", "--batch-rows", str(a.batch_rows)]
        runs: dict[str, dict[str, Any]] = {}
        for name, src in (("local-small", small), ("local-big", big)):
            out = work / f"{name}.parquet"
            summary, rss, wall = run_cli(["--input", str(src), "--output", str(out), *common], work)
            runs[name] = {"rows": summary["rows"], "records_per_s": summary["records_per_s"], "peak_rss_mib": rss,
                          "wall_s": wall, "output": out}
            print(f"[bench] {name}: {summary['rows']:,} rows, {summary['records_per_s']:,.0f} records/s, "
                  f"peak RSS {rss:,.0f} MiB", file=sys.stderr)
        if not a.no_dask:
            out = work / "dask-big.parquet"
            summary, rss, wall = run_cli(["--input", str(big), "--output", str(out), *common, "--dask", "local",
                                          "--dask-workers", str(a.workers)], work)
            scoring_s = summary["seconds"] - summary["setup_seconds"]
            runs["dask-big"] = {"rows": summary["rows"], "records_per_s": summary["records_per_s"],
                                "records_per_s_after_start": summary["rows"] / scoring_s if scoring_s > 0 else None,
                                "cluster_start_s": summary["setup_seconds"], "peak_rss_mib": rss, "wall_s": wall,
                                "output": out}
            print(f"[bench] dask-big: {summary['records_per_s']:,.0f} records/s "
                  f"({runs['dask-big']['records_per_s_after_start']:,.0f} after a {summary['setup_seconds']:.1f} s cluster start)",
                  file=sys.stderr)
        mismatches = verify(model, big, {n: r["output"] for n, r in runs.items() if n != "local-small"}, a.features)
        mismatches.update({f"{k}": v for k, v in verify(model, small, {"local-small": runs["local-small"]["output"]}, a.features).items()})
        local = runs["local-big"]
        result = {
            "rows": a.rows, "small_rows": small_rows, "features": a.features, "batch_rows": a.batch_rows,
            "peer_records_per_s": peer,
            "runs": {n: {k: v for k, v in r.items() if k != "output"} for n, r in runs.items()},
            "peer_ratio_local": local["records_per_s"] / peer,
            "peer_ratio_dask": runs["dask-big"]["records_per_s"] / peer if "dask-big" in runs else None,
            "rss_ratio_big_vs_small": local["peak_rss_mib"] / runs["local-small"]["peak_rss_mib"],
            "mismatched_rows": mismatches,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
        }
        print()
        print(f"batch scoring, {a.features} float32 features, batches of {a.batch_rows:,} rows, iforest (100 trees); "
              f"{os.cpu_count()} CPUs, load average {result['loadavg']}")
        print(f"  {'run':<34} {'rows':>11} {'records/s':>12} {'peak RSS':>10} {'vs peer':>8}")
        print(f"  {'peer: load_model().score in memory':<34} {small_rows:>11,} {peer:>12,.0f} {'':>10} {'1.00':>8}")
        for n, r in runs.items():
            rss = f"{r['peak_rss_mib']:,.0f} MiB" if n.startswith("local") else "(client)"
            print(f"  {n:<34} {r['rows']:>11,} {r['records_per_s']:>12,.0f} {rss:>10} {r['records_per_s'] / peer:>8.2f}")
            if n == "dask-big" and r["records_per_s_after_start"]:
                print(f"  {'  dask after the cluster start':<34} {'':>11} {r['records_per_s_after_start']:>12,.0f} "
                      f"{'':>10} {r['records_per_s_after_start'] / peer:>8.2f}   (start {r['cluster_start_s']:.1f} s)")
        print(f"  peak RSS {a.rows:,} rows / {small_rows:,} rows: {result['rss_ratio_big_vs_small']:.2f} "
              "(1.00 = flat in the input size)")
        print(f"  rows differing from load_model().score (chunkwise) or out of order: {mismatches}")
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0 if all(v == 0 for v in mismatches.values()) else 1
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
