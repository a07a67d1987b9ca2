"""Quality suite: ROC-AUC and PR-AUC per detector on labelled datasets.

Each dataset (``--data DIR``: every CSV / Parquet file in it, with a 0/1 label column, ``label`` by
default) is split in two halves at random (seeded, stratified by label). Each detector is trained on
the first half by the real training pipeline (``training.train.train``, labels withheld: the
unsupervised path a user gets with ``outlierd train --detector D``) and scores the second half;
the label column only grades the scores. Without ``--data`` a generated dataset is used: Gaussian
inliers with 2% of records displaced along a few features (the kind of anomaly a fraud or sensor
feed shows), so the suite always has something to grade.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import Progress

DETECTORS = ("iforest", "robust_z", "hbos", "knn", "lof")
QUICK_DETECTORS = ("iforest", "robust_z", "hbos")
MAX_EVAL_ROWS = 20_000     # per dataset half: k-NN / LOF scoring is O(rows x reference)


def synthetic(seed: int = 7, n: int = 20_000, d: int = 16, rate: float = 0.02) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Correlated Gaussian inliers; anomalies are shifted by 3-6 sd along 1-3 random features."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d)) / np.sqrt(d)
    X = rng.standard_normal((n, d)) @ (np.eye(d) + A)
    y = (rng.random(n) < rate).astype(np.int8)
    for i in np.flatnonzero(y):
        cols = rng.choice(d, size=rng.integers(1, 4), replace=False)
        X[i, cols] += rng.choice([-1.0, 1.0], size=cols.size) * rng.uniform(3, 6, size=cols.size)
    return X, y, [f"f{j}" for j in range(d)]


def load(path: Path, label: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from outlierd.core.errors import InvalidInputError
    from outlierd.training.data import load_dataset

    ds = load_dataset(path, label_column=label)
    if ds.labels is None:
        raise InvalidInputError(f"{path}: no label column {label!r} (pass --label NAME)")
    return ds.X, ds.labels.astype(np.int8), list(ds.feature_names)


def datasets(data_dir: Path | None, label: str) -> list[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    from outlierd.core.errors import InvalidInputError

    if data_dir is None:
        return [("synthetic-gaussian-2pct", *synthetic())]
    if not data_dir.is_dir():
        raise InvalidInputError(f"--data {data_dir}: not a directory")
    files = sorted(p for p in data_dir.iterdir() if p.suffix in (".csv", ".parquet") or p.name.endswith(".csv.gz"))
    if not files:
        raise InvalidInputError(f"--data {data_dir}: no .csv, .csv.gz or .parquet file in it")
    return [(p.name, *load(p, label)) for p in files]


def _split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        train.append(idx[: idx.size // 2])
        test.append(idx[idx.size // 2:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _cap(idx: np.ndarray, seed: int) -> np.ndarray:
    if idx.size <= MAX_EVAL_ROWS:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=MAX_EVAL_ROWS, replace=False))


def prequential(X: np.ndarray, y: np.ndarray, river_rows: int, seed: int = 0) -> dict[str, Any]:
    """Half-Space Trees (River's defaults: 10 trees, height 8, window 250, min-max scaling) run
    prequentially over the dataset in file order: each record scored, then learned. ROC-AUC / PR-AUC
    of those scores, and records/s against River's HalfSpaceTrees on the first ``river_rows`` records
    (same seed, so the same trees: its scores are checked equal to ours before they are compared)."""
    import time

    from sklearn.metrics import average_precision_score, roc_auc_score

    from outlierd.core.hst import HalfSpaceTrees

    Xs = np.nan_to_num(np.asarray(X, dtype=np.float64), nan=0.0)
    HalfSpaceTrees.new(Xs.shape[1], seed=seed).score_update(Xs[:300])  # JIT warm-up, not timed
    t = time.perf_counter()
    s = HalfSpaceTrees.new(Xs.shape[1], seed=seed).score_update(Xs)
    ours_s = time.perf_counter() - t
    out: dict[str, Any] = {"detector": "hst (outlierd, 10 trees, height 8, window 250)", "roc_auc": float(roc_auc_score(y, s)),
                           "pr_auc": float(average_precision_score(y, s)), "records": int(len(y)), "records_per_s": len(y) / ours_s}
    try:
        from river import anomaly, compose, preprocessing
    except ImportError:
        out["river"] = "River is not installed: no peer"
        return out
    k = min(river_rows, len(Xs))
    theirs = compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=250, seed=seed))
    t = time.perf_counter()
    ref = []
    for x in Xs[:k]:
        rec = {j: float(v) for j, v in enumerate(x)}
        ref.append(theirs.score_one(rec))
        theirs.learn_one(rec)
    river_s = time.perf_counter() - t
    t = time.perf_counter()
    mine = HalfSpaceTrees.new(Xs.shape[1], seed=seed).score_update(Xs[:k])
    mine_s = time.perf_counter() - t
    diff = float(np.max(np.abs(mine - np.asarray(ref))))
    if diff > 1e-9:
        raise AssertionError(f"prequential HST differs from River's by {diff:.3g}")
    out["river"] = {"records": k, "records_per_s": k / river_s, "ours_records_per_s": k / mine_s, "ratio": river_s / mine_s,
                    "max_abs_diff": diff}
    return out


def run(data_dir: Path | None, label: str, workdir: Path, progress: Progress, detectors: tuple[str, ...] = DETECTORS,
        seed: int = 0, river_rows: int = 2000) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.metrics import average_precision_score, roc_auc_score

    from outlierd.core import load_model
    from outlierd.training.train import train

    out: dict[str, Any] = {"split": "50/50 stratified, seeded; trained unsupervised on the first half, graded on the second",
                           "detectors": list(detectors), "datasets": []}
    for name, X, y, features in datasets(data_dir, label):
        tr, te = _split(y, seed)
        tr, te = _cap(tr, seed), _cap(te, seed + 1)
        if y[te].min() == y[te].max():
            out["datasets"].append({"name": name, "error": "the graded half holds one class only"})
            continue
        path = workdir / f"quality-{len(out['datasets'])}.parquet"
        pq.write_table(pa.table({f: X[tr, j] for j, f in enumerate(features)}), path)
        entry: dict[str, Any] = {"name": name, "rows": int(y.size), "features": len(features), "anomaly_rate": float(y.mean()),
                                 "train_rows": int(tr.size), "test_rows": int(te.size), "results": {}}
        for det in detectors:
            progress.say(f"quality: {name}, {det}")
            try:
                res = train(path, workdir / "quality-registry", f"q{len(out['datasets'])}-{det}", detector=det, quiet=True, seed=seed)
                s = load_model(res.path).score(X[te])
            except Exception as e:  # noqa: BLE001 - one detector failing on one dataset is a result, not the end
                entry["results"][det] = {"error": str(e).splitlines()[0][:200]}
                continue
            entry["results"][det] = {"roc_auc": float(roc_auc_score(y[te], s)), "pr_auc": float(average_precision_score(y[te], s)),
                                     "base_rate": float(y[te].mean())}
        progress.say(f"quality: {name}, prequential hst (and River's)")
        entry["prequential"] = prequential(X, y, river_rows, seed)
        out["datasets"].append(entry)
    return out
