"""Detection quality with a few reviewers' labels: label-aware retraining vs the unsupervised model.

For each data set (../shared/datasets/*.csv, ``label`` column) and seed:

1. Split the records: 70% training, 30% held back (never labelled, only used to measure).
2. ``outlierd train`` on the training split without labels: the default unsupervised model
   (iforest), as a first deployment would be.
3. The reviewer's view: the training records that model flags at its alert rate (1%), plus a
   random sample of the rest (``--sample-rate`` of the unflagged records), as the capture store
   keeps them. Labels are revealed for ``--label-share`` (1%) of all training records, drawn at
   random from that pool.
4. ``outlierd train --label-column label --detector auto`` on the same training split, labels
   present only for the revealed records (empty cells elsewhere). Also ``--detector iforest`` with
   the same labels: only the known anomalies are left out of the fit.
   And the default path, ``--label-column label`` with no ``--detector`` (issue 14 item 11: with
   labels of both kinds it is ``auto``; below that, iforest without the known anomalies).
   ``--reveal random`` labels 1% of the training records drawn uniformly instead (no reviewer).
5. PR-AUC (average precision) of each model on the held-back records. The held-back split is fixed
   per data set (one seed for all runs); the seeds vary the labels revealed and the fits.

The ratio column is with-labels / unsupervised PR-AUC, measured in the same run. Nothing is tuned on
the held-back split: every choice the label-aware path makes comes from the training labels (out of
fold). Run::

    PYTHONPATH=. .venv/bin/python benchmarks/label_quality.py [--seeds 5] [--datasets cardio,shuttle] [--json out.json]

The last lines compare the default path with the unsupervised model: per data set the ratio of mean
PR-AUCs, then their mean and minimum over data sets (the must-show of issue 14 item 11: mean >= 1.5,
no data set below 1). ``--default-only`` skips the ``auto`` and ``iforest minus known`` runs (faster);
``--max-train-rows N`` subsamples the training split (seeded, stratified) to bound the time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

ROOT = Path(__file__).resolve().parents[1]

from sklearn.metrics import average_precision_score  # noqa: E402

from outlierd.core import load_model  # noqa: E402
from outlierd.training.train import train  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
NAMES = ("cardio", "satellite", "mammography", "shuttle")


def log(msg: str) -> None:
    print(f"[label_quality] {msg}", file=sys.stderr, flush=True)


def load(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    table = pacsv.read_csv(DATASETS / f"{name}.csv")
    feats = [c for c in table.column_names if c != "label"]
    X = np.column_stack([table.column(c).to_numpy().astype(np.float64) for c in feats])
    return X, table.column("label").to_numpy().astype(np.int64), feats


def write(path: Path, X: np.ndarray, feats: list[str], labels: list | None = None) -> Path:
    cols = {f: X[:, j] for j, f in enumerate(feats)}
    if labels is not None:
        cols["label"] = pa.array(labels, type=pa.int64())
    pacsv.write_csv(pa.table(cols), path)
    return path


def describe(metrics: dict) -> str:
    if metrics.get("chosen") == "stacked":
        return f"stacked({metrics['stacked_primary']}, a={metrics['stacked_alpha']:.2f})"
    return str(metrics.get("chosen", "iforest"))


SPLIT_SEED = 20261128  # the held-back split is the same for every seed: seeds vary labels and fits


def split(n: int, share: float, seed: int = SPLIT_SEED, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(held back, training)`` row indices; stratified by ``y`` when given."""
    if y is not None:
        from sklearn.model_selection import train_test_split

        te, tr = train_test_split(np.arange(n), train_size=share, stratify=y, random_state=seed % (2**32))
        return np.sort(te), np.sort(tr)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(share * n))
    return perm[:n_test], perm[n_test:]


def subsample(y: np.ndarray, idx: np.ndarray, n: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """At most ``n`` of the rows ``idx``, stratified by label (seeded; the same for every run)."""
    if n <= 0 or idx.size <= n:
        return idx
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(idx, train_size=n, stratify=y[idx], random_state=seed % (2**32))
    return np.sort(keep)


def one_run(name: str, X: np.ndarray, y: np.ndarray, feats: list[str], seed: int, args: argparse.Namespace, work: Path) -> dict:
    rng = np.random.default_rng(seed)
    te, tr = split(len(y), args.test_share, y=y if args.stratified else None)
    tr = subsample(y, tr, args.max_train_rows)
    Xtr, ytr = X[tr], y[tr]
    reg = work / f"{name}-{seed}"
    # 2. the unsupervised model
    u = train(write(work / f"{name}-{seed}-u.csv", Xtr, feats), reg, "u", seed=seed, quiet=True)
    mu = load_model(u.path)
    flagged = mu.score(Xtr) >= mu.threshold
    # 3. what a reviewer sees: flagged + a sample of the rest; 1% of the training records get labels
    rest = np.flatnonzero(~flagged)
    sample = rng.choice(rest, size=max(1, int(round(args.sample_rate * rest.size))), replace=False)
    pool = np.concatenate([np.flatnonzero(flagged), sample]) if args.reveal == "reviewer" else np.arange(len(tr))
    n_reveal = min(pool.size, max(1, int(round(args.label_share * len(tr)))))
    reveal = rng.choice(pool, size=n_reveal, replace=False)
    labels: list = [None] * len(tr)
    for i in reveal:
        labels[i] = int(ytr[i])
    data = write(work / f"{name}-{seed}-l.csv", Xtr, feats, labels)
    # 4. label-aware retraining; the default path: no detector given
    t0 = time.perf_counter()
    default = train(data, reg, "default", label_column="label", seed=seed, quiet=True)
    t_default = time.perf_counter() - t0
    models = [("unsupervised", u), ("default", default)]
    auto = default
    if not args.default_only:
        t0 = time.perf_counter()
        auto = train(data, reg, "auto", detector="auto", label_column="label", seed=seed, quiet=True)
        t_default = time.perf_counter() - t0
        minus = train(data, reg, "minus", detector="iforest", label_column="label", seed=seed, quiet=True)
        models += [("iforest_minus_known", minus), ("with_labels", auto)]
    if args.dev and args.force_stacked:  # diagnosis: the stacked model even when selection would not take it
        try:
            models.append(("stacked_forced", train(data, reg, "st", detector="stacked", label_column="label", seed=seed, quiet=True)))
        except ValueError as e:
            log(f"stacked not possible: {e}")
    # 5. held-back records
    ap = {k: float(average_precision_score(y[te], load_model(r.path).score(X[te]))) for k, r in models}
    if args.default_only:
        ap["iforest_minus_known"] = ap["with_labels"] = float("nan")
    return {"dataset": name, "seed": seed, **ap, "default_chosen": describe(default.metrics),
            "default_resolved": default.metrics.get("detector_default"), "train_rows": int(len(tr)), "labelled": int(n_reveal), "labelled_anomalies": int(ytr[reveal].sum()),
            "flagged": int(flagged.sum()), "chosen": describe(auto.metrics), "oof_pr_auc": auto.metrics.get("pr_auc"),
            "selection_pr_auc": auto.metrics.get("selection_pr_auc"),
            "seconds_label_aware": t_default}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(NAMES))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--label-share", type=float, default=0.01, help="labelled share of the training records (default 0.01)")
    p.add_argument("--sample-rate", type=float, default=0.01, help="captured share of the unflagged records (default 0.01)")
    p.add_argument("--test-share", type=float, default=0.3)
    p.add_argument("--json", metavar="FILE", help="write every run and the summary here")
    p.add_argument("--dev", action="store_true",
                   help="development mode: use only the training split (its own 30%% held back), so that design "
                        "choices are never made on the reported held-back records")
    p.add_argument("--reveal", choices=("reviewer", "random"), default="reviewer",
                   help="which training records get labels: reviewer (the unsupervised model's alerts plus a sample "
                        "of the rest, as the capture store keeps them; default) or random (uniform)")
    p.add_argument("--stratified", action="store_true",
                   help="stratify the held-back split by label (default: a plain random permutation, as measured before)")
    p.add_argument("--default-only", action="store_true",
                   help="train only the unsupervised model and the default path (skip auto and iforest minus known)")
    p.add_argument("--max-train-rows", type=int, default=0, metavar="N",
                   help="subsample the training split to N rows (stratified, seeded; 0: all)")
    p.add_argument("--force-stacked", action="store_true", help="with --dev: also train --detector stacked (diagnosis)")
    p.add_argument("--unlabelled-normals", type=int, default=None, metavar="N",
                   help="override training.semi.UNLABELLED_NORMALS (unlabelled records taken as weak normals by the "
                        "stacked model; 0: none, the behaviour before); for design studies on --dev")
    p.add_argument("--unlabelled-weight", type=float, default=None, metavar="W",
                   help="override training.semi.UNLABELLED_WEIGHT (their total weight relative to the labelled normals)")
    p.add_argument("--stacked-guard", type=float, default=None, metavar="SHARE",
                   help="set training.semi.STACKED_GUARD (drop the stacked model when the best unsupervised detector "
                        "ranks the labelled records better on SHARE of bootstrap resamples; 0.9: the rule before "
                        "2026-12-06); for design studies")
    args = p.parse_args(argv)
    from outlierd.training import semi

    if args.stacked_guard is not None:
        semi.STACKED_GUARD = args.stacked_guard

    if args.unlabelled_normals is not None:
        semi.UNLABELLED_NORMALS = args.unlabelled_normals
    if args.unlabelled_weight is not None:
        semi.UNLABELLED_WEIGHT = args.unlabelled_weight
    runs = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="outlierd-labelq-") as tmp:
        for name in args.datasets.split(","):
            X, y, feats = load(name)
            if args.dev:  # develop on the training split only: its own held-back part, never the real one
                _, tr = split(len(y), args.test_share, y=y if args.stratified else None)
                X, y = X[tr], y[tr]
            for seed in range(args.seeds):
                r = one_run(name, X, y, feats, seed, args, Path(tmp))
                runs.append(r)
                if "stacked_forced" in r:
                    log(f"{name} seed {seed}: stacked (forced) {r['stacked_forced']:.4f}; out-of-fold selection "
                        + json.dumps({k: round(v, 3) for k, v in (r["selection_pr_auc"] or {}).items()}))
                log(f"{name} seed {seed}: unsupervised {r['unsupervised']:.4f}, default {r['default']:.4f} "
                    f"({r['default_chosen']}), iforest minus known {r['iforest_minus_known']:.4f}, "
                    f"auto {r['with_labels']:.4f}; {r['labelled']} labels, {r['labelled_anomalies']} anomalies; "
                    f"{r['seconds_label_aware']:.1f}s) [+{time.perf_counter() - t_start:.0f}s]")
    summary = []
    if not args.default_only:  # with --default-only, auto and iforest minus known were not trained
        print()
        print("| dataset | labels (anomalies), mean | unsupervised PR-AUC | iforest minus known anomalies | with labels PR-AUC "
              "(min..max over seeds) | ratio | improved seeds | chosen |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in [] if args.default_only else args.datasets.split(","):
        rs = [r for r in runs if r["dataset"] == name]
        u = np.array([r["unsupervised"] for r in rs])
        m = np.array([r["iforest_minus_known"] for r in rs])
        w = np.array([r["with_labels"] for r in rs])
        chosen = Counter(r["chosen"].split("(")[0] + ("(" + r["chosen"].split("(")[1].split(",")[0] + ")" if "(" in r["chosen"] else "")
                         for r in rs)
        row = {"dataset": name, "unsupervised": float(u.mean()), "unsupervised_std": float(u.std()),
               "iforest_minus_known": float(m.mean()), "with_labels": float(w.mean()), "with_labels_std": float(w.std()),
               "with_labels_min": float(w.min()), "with_labels_max": float(w.max()), "ratio": float(w.mean() / u.mean()),
               "improved_seeds": int(np.sum(w > u)), "seeds": len(rs), "chosen": dict(chosen),
               "labels": float(np.mean([r["labelled"] for r in rs])),
               "labelled_anomalies": float(np.mean([r["labelled_anomalies"] for r in rs]))}
        summary.append(row)
        print(f"| {name} | {row['labels']:.0f} ({row['labelled_anomalies']:.1f}) | {u.mean():.3f} ± {u.std():.3f} | "
              f"{m.mean():.3f} ± {m.std():.3f} | {w.mean():.3f} ± {w.std():.3f} ({w.min():.3f}..{w.max():.3f}) | "
              f"{row['ratio']:.2f}x | {row['improved_seeds']}/{len(rs)} | "
              + ", ".join(f"{k} x{v}" for k, v in chosen.most_common()) + " |")
    print("\nThe default path (--label-column label, no --detector) vs the unsupervised model:\n")
    print("| dataset | train rows | labels (anomalies), mean | unsupervised PR-AUC | default PR-AUC | ratio | "
          "improved seeds | default chose |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    dflt: dict = {"datasets": {}}
    for name in args.datasets.split(","):
        rs = [r for r in runs if r["dataset"] == name]
        u = np.array([r["unsupervised"] for r in rs])
        d = np.array([r["default"] for r in rs])
        chose = Counter(r["default_chosen"].split("(")[0] for r in rs)
        ratio = float(d.mean() / u.mean())
        dflt["datasets"][name] = {"unsupervised": float(u.mean()), "default": float(d.mean()), "ratio": ratio,
                                  "improved_seeds": int(np.sum(d > u)), "seeds": len(rs), "chosen": dict(chose)}
        print(f"| {name} | {rs[0]['train_rows']} | {np.mean([r['labelled'] for r in rs]):.0f} "
              f"({np.mean([r['labelled_anomalies'] for r in rs]):.1f}) | {u.mean():.3f} ± {u.std():.3f} | "
              f"{d.mean():.3f} ± {d.std():.3f} | {ratio:.2f}x | {int(np.sum(d > u))}/{len(rs)} | "
              + ", ".join(f"{k} x{v}" for k, v in chose.most_common()) + " |")
    ratios = [v["ratio"] for v in dflt["datasets"].values()]
    dflt.update(mean_ratio=float(np.mean(ratios)), min_ratio=float(np.min(ratios)))
    print(f"\nmean ratio over data sets {dflt['mean_ratio']:.2f}x, minimum {dflt['min_ratio']:.2f}x "
          f"(must-show: mean >= 1.5x and no data set below 1.0x: "
          f"{'holds' if dflt['mean_ratio'] >= 1.5 and dflt['min_ratio'] >= 1.0 else 'does NOT hold'})")
    print(f"\n{len(runs)} runs in {time.perf_counter() - t_start:.0f}s; ratio = with-labels / unsupervised mean PR-AUC on the "
          "held-back 30%; ± is the standard deviation over seeds")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary, "default_vs_unsupervised": dflt,
                                               "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
