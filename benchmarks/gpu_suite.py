"""GPU suite: correctness first, then forest throughput by batch size on CUDA vs the Numba CPU kernel
vs scikit-learn, the host<->device transfer share, the autoencoder, and the CPU/GPU crossover.

    python benchmarks/gpu_suite.py [--device cuda] [--max-rows 1000000] [--budget-s 420] [--json out.json]

Prints one table and the measured crossover (the batch size from which the GPU beats the CPU
kernel end to end), which is what ``outlierd serve --gpu-min-rows`` wants. Runs on the CPU too
(``--device cpu``) so the script itself is tested where no GPU is present; every timing is a ratio
against the peers measured in the same run. Bounded: each timing stops after ~0.5 s or 3 reps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, max_s: float = 0.5, max_reps: int = 3) -> float:
    """Best wall time of fn() over a few repetitions (after one warm-up call)."""
    fn()
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < max_reps and (reps == 0 or time.perf_counter() - start < max_s):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        try:
            import torch

            torch.cuda.synchronize()
        except ImportError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--max-rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop timing new batch sizes after this long")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    t_start = time.perf_counter()

    from sklearn.ensemble import IsolationForest

    from outlierd.core import load_model
    from outlierd.core.backends import cuda_available
    from outlierd.training import export_sklearn

    print(f"[gpu-suite] device={args.device} cuda_available(onnx)={cuda_available('onnx')} cuda_available(torch)={cuda_available('torch')}", flush=True)
    if args.device == "cuda" and not cuda_available():
        print("[gpu-suite] no usable CUDA device: run with --device cpu to exercise the script", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    d = args.features
    X_train = rng.standard_normal((20_000, d)).astype(np.float32)
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=0).fit(X_train)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    path = export_sklearn(forest, tmp / "iforest", X_train=X_train)
    cpu = load_model(path)
    backends = {}
    for backend in ("onnx", "torch"):
        try:
            backends[backend] = load_model(path, backend=backend, device=args.device)
        except Exception as e:  # a backend missing here is reported, not fatal
            print(f"[gpu-suite] {backend} backend unavailable on {args.device}: {e}", flush=True)
    X = rng.standard_normal((args.max_rows, d)).astype(np.float32)

    # 1. correctness first: every backend against the Numba kernel on the same rows
    check = X[: min(100_000, args.max_rows)]
    ref = cpu.score(check)
    correctness = {}
    for name, m in backends.items():
        diff = float(np.max(np.abs(m.score(check) - ref)))
        correctness[name] = diff
        print(f"[gpu-suite] {name}/{args.device} vs numba/cpu: max |diff| = {diff:.3g} on {len(check):,} rows", flush=True)
        if diff > 1e-5:
            print(f"[gpu-suite] FAILED: {name} differs from the CPU kernel by {diff}", file=sys.stderr)
            return 1

    # 2. throughput by batch size
    sizes = [s for s in (1, 16, 256, 4096, 65_536, 262_144, 1_000_000) if s <= args.max_rows]
    rows = []
    for n in sizes:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"[gpu-suite] budget reached; skipping batches >= {n}", flush=True)
            break
        Xn = X[:n]
        row = {"rows": n, "numba_cpu": n / _time(lambda Xn=Xn: cpu.score(Xn))}
        if n <= 65_536:  # sklearn is slow: keep it to the sizes that finish quickly
            row["sklearn"] = n / _time(lambda Xn=Xn: forest.score_samples(Xn), max_reps=1)
        for name, m in backends.items():
            def run(m=m, Xn=Xn):
                m.score(Xn)
                _sync(args.device)
            row[f"{name}_{args.device}"] = n / _time(run)
        rows.append(row)
        print("[gpu-suite] " + "  ".join(f"{k}={v:,.0f}" if k != "rows" else f"rows={v:,}" for k, v in row.items()), flush=True)

    # 3. host<->device transfer share (torch only: it exposes the copy separately)
    transfer = None
    if args.device == "cuda" and "torch" in backends:
        import torch

        n = min(args.max_rows, 1_000_000)
        Xn = X[:n]
        t_copy = _time(lambda: (torch.from_numpy(Xn).to("cuda"), torch.cuda.synchronize()))
        t_all = _time(lambda: (backends["torch"].score(Xn), torch.cuda.synchronize()))
        transfer = {"rows": n, "copy_s": t_copy, "end_to_end_s": t_all, "share": t_copy / t_all}
        print(f"[gpu-suite] host->device copy of {n:,} rows: {t_copy * 1e3:.2f} ms of {t_all * 1e3:.2f} ms end to end ({100 * t_copy / t_all:.0f}%)", flush=True)

    # 4. autoencoder throughput (ONNX Runtime), when the torch extra is there to train one
    autoencoder = None
    try:
        from outlierd.training.train import train

        csv = tmp / "ae.csv"
        np.savetxt(csv, X_train[:5000], delimiter=",", header=",".join(f"x{j}" for j in range(d)), comments="", fmt="%.7g")
        res = train(csv, tmp / "reg", "ae", detector="autoencoder", quiet=True)
        ae = load_model(res.path, device=args.device)
        n = min(args.max_rows, 262_144)
        autoencoder = {"rows": n, "device": ae.device, "records_per_s": n / _time(lambda: ae.score(X[:n]))}
        print(f"[gpu-suite] autoencoder ({ae.backend} on {ae.device}): {autoencoder['records_per_s']:,.0f} records/s at {n:,} rows", flush=True)
    except Exception as e:
        print(f"[gpu-suite] autoencoder skipped: {e}", flush=True)

    # 5. the crossover: the smallest batch from which the best GPU backend beats the CPU kernel
    crossover = None
    for row in rows:
        gpu = max((v for k, v in row.items() if k.endswith(f"_{args.device}") and not k.startswith("numba")), default=0.0)
        if args.device == "cuda" and gpu > row["numba_cpu"]:
            crossover = row["rows"]
            break

    print("\n| rows | numba cpu rec/s | " + " | ".join(f"{b}/{args.device} rec/s" for b in backends) + " | sklearn rec/s | best GPU / numba |")
    print("|---:|---:|" + "---:|" * len(backends) + "---:|---:|")
    for row in rows:
        gpu = [row.get(f"{b}_{args.device}", float("nan")) for b in backends]
        best = max(gpu) if gpu else float("nan")
        print(f"| {row['rows']:,} | {row['numba_cpu']:,.0f} | " + " | ".join(f"{g:,.0f}" for g in gpu)
              + f" | {row.get('sklearn', float('nan')):,.0f} | {best / row['numba_cpu']:.2f} |")
    print(f"\ncrossover (GPU beats the Numba kernel end to end from this batch size): {crossover if crossover else 'none measured'}"
          + (f"  -> outlierd serve --gpu-min-rows {crossover}" if crossover else ""))
    print(f"suite took {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "correctness": correctness, "throughput": rows,
                                         "transfer": transfer, "autoencoder": autoencoder, "crossover_rows": crossover}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
