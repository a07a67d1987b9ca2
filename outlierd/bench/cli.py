"""``outlierd bench``: run the suites that apply here and write the report; ``outlierd bench compare``."""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SUITES = ("kernels", "latency", "server", "quality", "gpu")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure outlierd on this machine against its peers; write an HTML report with plots + JSON",
                       description="Run the benchmark suites that apply on this machine (kernels against scikit-learn / ONNX "
                                   "Runtime, per-call latency, the gRPC server against a bare echo, detection quality, the GPU "
                                   "when one is present) and write DIR/results.json, DIR/report.html and a PNG per plot. "
                                   "Every speed number has its peer measured in the same run beside it.")
    p.add_argument("--out", type=Path, default=Path("bench-report"), help="output folder (default ./bench-report)")
    p.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated suites out of {','.join(SUITES)} (default all)")
    p.add_argument("--quick", action="store_true", help="smaller batches and shorter windows: about a minute in all")
    p.add_argument("--json-only", action="store_true", help="write results.json only (no plots, no HTML)")
    p.add_argument("--data", type=Path, help="quality suite: a folder of CSV / Parquet files with a 0/1 label column")
    p.add_argument("--label", default="label", help="quality suite: the label column's name (default 'label')")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_run)
    bsub = p.add_subparsers(dest="bench_command", metavar="compare")
    c = bsub.add_parser("compare", help="ratios B/A between two reports (two machines or two versions)",
                        description="Print the ratio B/A of every number two reports share (outlierd bench results.json, "
                                    "or the pytest-benchmark suites' .benchmarks/summary.json), and plot them.")
    c.add_argument("a", type=Path, metavar="A.json")
    c.add_argument("b", type=Path, metavar="B.json")
    c.add_argument("--plot", type=Path, help="also write the ratios as a PNG here")
    c.set_defaults(func=_compare)


def _suites(spec: str) -> list[str]:
    from outlierd.core.errors import InvalidInputError

    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SUITES]
    if bad or not chosen:
        raise InvalidInputError(f"--suite: unknown suite(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(SUITES)}")
    return chosen


def run_bench(out: Path, suites: list[str], quick: bool, json_only: bool = False, data: Path | None = None,
              label: str = "label", quiet: bool = False) -> dict[str, Any]:
    """Run ``suites`` and write the report to ``out``; returns the results (as written to results.json)."""
    from . import gpu, kernels, quality, report, server
    from .common import Progress, machine

    progress = Progress(quiet)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="outlierd-bench-"))
    results: dict[str, Any] = {"schema": 1, "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "quick": quick,
                               "suites": suites, "notes": [
                                   "ratios compare implementations measured in the same run on the same rows; numbers from a "
                                   "shared or busy machine are noisy: compare min and median, and rerun when they differ much"]}
    try:
        needs_models = {"kernels", "latency", "server", "gpu"} & set(suites)
        if needs_models == {"gpu"} and not any(gpu.available().values()):
            needs_models = set()  # nothing to measure: say so without fitting the models first
            results["gpu"] = {"available": False, "reason": gpu.no_gpu_reason()}
            results["notes"].append(f"GPU: {results['gpu']['reason']}")
        models = None
        if needs_models:
            max_rows = 262_144 if quick else 1_000_000
            models = kernels.build(max_rows, progress, work, onnx="kernels" in suites or "latency" in suites)
        if "kernels" in suites and models is not None:
            if quick:
                for p in models.detectors[0].peers:
                    if p.max_batch is not None:
                        p.max_batch = min(p.max_batch, 16_384)  # ONNX Runtime's graph is slow: keep quick quick
            batches = kernels.BATCHES_QUICK if quick else kernels.BATCHES_FULL
            with progress.step("kernels: throughput against batch size"):
                tp = kernels.throughput(models, batches, 0.1 if quick else 0.5, progress)
            with progress.step("kernels: threads"):
                th = kernels.threads_sweep(models, 65_536 if quick else 1_000_000, 0.1 if quick else 0.5, progress)
            results["kernels"] = {"throughput": tp, "threads": th}
        if "latency" in suites and models is not None:
            with progress.step("latency: 1 and 64 records per call"):
                results["latency"] = kernels.latency(models, (1, 64), 2_000 if quick else 20_000, 0.25 if quick else 2.0, progress)
        if "server" in suites and models is not None:
            scen = server.SCENARIOS_QUICK if quick else server.SCENARIOS_FULL
            results["server"] = server.run(work / "iforest", models.detectors[0].ours, models.X, work, scen,
                                           rounds=1 if quick else 3, warmup=0.2 if quick else 0.5, seconds=0.8 if quick else 2.0,
                                           progress=progress, http_records=server.HTTP_QUICK if quick else server.HTTP_FULL)
        if "quality" in suites:
            with progress.step("quality: ROC-AUC / PR-AUC"):
                # k-NN / LOF cost ~10 s each at 10,000 rows: the full run grades them, quick does not
                results["quality"] = quality.run(data, label, work, progress,
                                                 detectors=quality.QUICK_DETECTORS if quick else quality.DETECTORS,
                                                 river_rows=2000 if quick else 20_000)
        if "gpu" in suites and models is not None:
            with progress.step("gpu"):
                results["gpu"] = gpu.run(work / "iforest", models.detectors[0].ours, models.X, 0.1 if quick else 0.5, progress,
                                         quick=quick)
            if not results["gpu"].get("available"):
                results["notes"].append(f"GPU: {results['gpu']['reason']}")
        results["machine"] = machine()
        results["wall_s"] = time.perf_counter() - t0
        files = report.write(results, out, json_only=json_only)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(report.table(results))
        print(f"\nwritten: {', '.join(str(f) for f in files)}")
    return results


def _run(args: argparse.Namespace) -> int:
    suites = _suites(args.suite)
    if "quality" in suites and args.data is not None:
        from . import quality

        quality.datasets(args.data, args.label)  # a bad --data fails now, not after the speed suites
    run_bench(args.out, suites, args.quick, args.json_only, args.data, args.label, args.quiet)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from . import compare

    a, b = compare.load(args.a), compare.load(args.b)
    rows = compare.compare(a, b)
    print(compare.text(rows, str(args.a), str(args.b)))
    if args.plot is not None:
        try:
            compare.plot(rows, args.plot)
        except ImportError:
            print("outlierd: no plot: matplotlib is not installed (pip install 'outlierd[bench]')", file=sys.stderr)
            return 0
        print(f"written: {args.plot}")
    return 0 if rows else 1
