"""Design study for the default path with a few labels (issue 14 item 11), on ``--dev`` data only.

The same runs as ``label_quality.py --dev --default-only`` (the training split of each data set, its
own 30% held back; the unsupervised model; 1% of labels revealed as a reviewer sees them), but the
expensive part (out-of-fold scoring of every candidate, the final base detectors) is done once per
run and shared by several variants of the stacked model's last step, all scored on the same held-back
records:

- ``guard``: as ``training/semi.py`` did before (labelled records only; the bootstrap guard may keep
  the best unsupervised detector);
- ``noguard``: the stacked model whenever there are enough labels of each kind;
- ``pu``, ``pu_noguard``: unlabelled records as weak normals (``UNLABELLED_NORMALS``) in the logistic
  part, with and without the guard; ``pu_w3``: their weight 3x the labelled normals'.

Never run on the reported held-back split (it only reads the training split). Run::

    PYTHONPATH=. .venv/bin/python benchmarks/label_dev_study.py [--seeds 10] [--stratified] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

import label_quality as lq  # noqa: E402

from outlierd.core import load_model  # noqa: E402
from outlierd.core.stacked import rank_normalise, rank_table, sigmoid  # noqa: E402
from outlierd.training import semi  # noqa: E402
from outlierd.training.labels import load_labelled_data  # noqa: E402
from outlierd.training.train import train  # noqa: E402

VARIANTS = ("guard", "noguard", "pu", "pu_noguard", "pu_w3")


def one_run(name: str, X: np.ndarray, y: np.ndarray, feats: list[str], seed: int, args: argparse.Namespace,
            work: Path) -> dict:
    rng = np.random.default_rng(seed)
    te, tr = lq.split(len(y), args.test_share, y=y if args.stratified else None)
    Xtr, ytr = X[tr], y[tr]
    u = train(lq.write(work / f"{name}-{seed}-u.csv", Xtr, feats), work / f"{name}-{seed}", "u", seed=seed, quiet=True)
    mu = load_model(u.path)
    flagged = mu.score(Xtr) >= mu.threshold
    rest = np.flatnonzero(~flagged)
    sample = rng.choice(rest, size=max(1, int(round(args.sample_rate * rest.size))), replace=False)
    pool = np.concatenate([np.flatnonzero(flagged), sample])
    reveal = rng.choice(pool, size=min(pool.size, max(1, int(round(args.label_share * len(tr))))), replace=False)
    labels: list = [None] * len(tr)
    for i in reveal:
        labels[i] = int(ytr[i])
    ld = load_labelled_data(lq.write(work / f"{name}-{seed}-l.csv", Xtr, feats, labels), "label")
    out = {"dataset": name, "seed": seed, "unsupervised": float(average_precision_score(y[te], mu.score(X[te]))),
           "anomalies": ld.anomalies, "normals": ld.normals}
    na, nn = ld.anomalies, ld.normals
    X_fit = ld.X[ld.y != 1]
    prep = semi._fit_prep(X_fit)
    Xp_fit = prep.transform(X_fit)
    d = X.shape[1]
    if na < semi.MIN_SELECT_LABELS or nn < semi.MIN_SELECT_LABELS:
        spec, arr, _ = semi.CANDIDATES["iforest"].fit(Xp_fit, seed)
        ap = float(average_precision_score(y[te], semi._in_memory(spec, arr, prep, d).score(X[te])))
        return {**out, **{v: ap for v in VARIANTS}, "why": "iforest minus known"}
    unsup = tuple(c for c in semi.DEFAULT_SELECT if c != semi.STACKED)
    oof = semi.out_of_fold(ld.X, ld.y, unsup, seed=seed, unlabelled=args.unlabelled_normals)
    selection = {c: semi.pr_auc(oof.y, oof.raw[c]) for c in unsup}
    confident = [c for c in unsup[1:] if selection[c] > selection[unsup[0]]
                 and semi.beats(oof.y, oof.raw[c], oof.raw[unsup[0]], seed=seed) >= semi.SELECT_CONFIDENCE]
    best = max(confident, key=lambda c: selection[c]) if confident else unsup[0]
    # the final bases (every row but the known anomalies), their held-back scores and ranks
    calib = semi.calibration_rows(ld.X.shape[0], seed)
    R_te, S_te = [], {}
    for c in unsup:
        spec, arr, _ = semi.CANDIDATES[c].fit(Xp_fit, seed)
        m = semi._in_memory(spec, arr, prep, d)
        knots, levels = rank_table(m.score(ld.X[calib]))
        S_te[c] = m.score(X[te])
        R_te.append(rank_normalise(S_te[c], knots, levels))
    ap_best = float(average_precision_score(y[te], S_te[best]))
    if na < semi.MIN_LABELS or nn < semi.MIN_LABELS:
        return {**out, **{v: ap_best for v in VARIANTS}, "why": f"{best}: too few to stack"}
    primary = unsup.index(best)
    Xp = prep.transform(ld.X)
    center, scale_inv = semi._standardiser(Xp)
    alpha = semi.blend_alpha(na)
    F_te = semi.stacked_features(np.column_stack(R_te), prep.transform(X[te]), center, scale_inv)
    R = np.column_stack([oof.rank[b] for b in unsup])
    F = semi.stacked_features(R, Xp[oof.labelled], center, scale_inv)
    Fu_all = semi.unlabelled_features(oof, unsup, Xp[oof.unlabelled], center, scale_inv)
    out["best"], out["alpha"] = best, alpha
    for v in VARIANTS:
        pu = v.startswith("pu")
        semi.UNLABELLED_WEIGHT = 3.0 if v == "pu_w3" else args.unlabelled_weight
        s_oof = semi.stacked_out_of_fold(oof, unsup, primary, Xp[oof.labelled], center, scale_inv, alpha, seed=seed,
                                         Xp_u=Xp[oof.unlabelled] if pu else None)
        worse = semi.beats(oof.y, oof.raw[best], s_oof, seed=seed)
        if "noguard" not in v and v != "pu_w3" and worse >= semi.SELECT_CONFIDENCE:
            out[v], out[f"{v}_kept"] = ap_best, best
            continue
        Ft, yt, wt = semi._with_unlabelled(F, oof.y, Fu_all if pu else Fu_all[:0])
        coef, b = semi._logreg(Ft, yt, semi.LOGREG_C, seed, wt)
        score = (1 - alpha) * F_te[:, primary] + alpha * sigmoid(F_te @ coef + b)
        out[v] = float(average_precision_score(y[te], score))
        out[f"{v}_guard"] = round(worse, 3)
    semi.UNLABELLED_WEIGHT = args.unlabelled_weight
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(lq.NAMES))
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--label-share", type=float, default=0.01)
    p.add_argument("--sample-rate", type=float, default=0.01)
    p.add_argument("--test-share", type=float, default=0.3)
    p.add_argument("--stratified", action="store_true")
    p.add_argument("--unlabelled-normals", type=int, default=256, help="weak normals for the pu variants")
    p.add_argument("--unlabelled-weight", type=float, default=1.0)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    runs = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="outlierd-labeldev-") as tmp:
        for name in args.datasets.split(","):
            X, y, feats = lq.load(name)
            _, tr = lq.split(len(y), args.test_share, y=y if args.stratified else None)  # the training split only
            X, y = X[tr], y[tr]
            for seed in range(args.seeds):
                r = one_run(name, X, y, feats, seed, args, Path(tmp))
                runs.append(r)
                print(f"[dev] {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})} "
                      f"[+{time.perf_counter() - t0:.0f}s]", file=sys.stderr, flush=True)
    print("| dataset | unsupervised | " + " | ".join(VARIANTS) + " |")
    print("|---|---:|" + "---:|" * len(VARIANTS))
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for name in args.datasets.split(","):
        rs = [r for r in runs if r["dataset"] == name]
        u = np.mean([r["unsupervised"] for r in rs])
        cells = []
        for v in VARIANTS:
            m = float(np.mean([r[v] for r in rs]))
            ratios[v].append(m / u)
            cells.append(f"{m:.3f} ({m / u:.2f}x, {sum(r[v] > r['unsupervised'] for r in rs)}/{len(rs)})")
        print(f"| {name} | {u:.3f} | " + " | ".join(cells) + " |")
    print("| mean ratio (min) | | " + " | ".join(f"{np.mean(ratios[v]):.3f} ({np.min(ratios[v]):.2f})" for v in VARIANTS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
