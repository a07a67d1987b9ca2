"""Label-aware training: reviewers' labels (a partially labelled column and/or the feedback store)
used to (1) leave known anomalies out of the unsupervised fit, (2) choose among detectors and
settings by out-of-fold PR-AUC on the labelled records, and (3) fit a semi-supervised ``stacked``
model (core/stacked.py) when there are enough labels of both kinds.

Out of fold: the labelled records are split into k stratified folds; for fold f every detector is
fitted on the training rows minus the known anomalies minus fold f, and scores fold f. So every
labelled record is judged by models that never saw it, and the metrics stored in the manifest come
from those scores (``metrics["label_eval"]`` says how). Scores: higher = more anomalous.

Choosing (``--detector auto``): the labelled records are mostly the unsupervised model's own alerts
plus a small random sample, so on them every detector looks good and their PR-AUC differences are
noisy. Hence iforest is kept among the unsupervised candidates unless another beats it with
confidence (a stratified bootstrap of the labelled records, :data:`SELECT_CONFIDENCE`); and once
there are ``min_labels`` labels of each kind the stacked model is taken (it keeps the unsupervised
rank with weight ``1 - alpha``, ``alpha`` growing with the labelled anomalies), whatever the
labelled records say of it: they cannot tell what the labels add on the population
(:data:`STACKED_GUARD`). ``benchmarks/label_quality.py`` measures the result on held-back records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np

from outlierd.core.errors import InvalidInputError
from outlierd.core.model import Model, build_model
from outlierd.core.preprocess import Preprocessing
from outlierd.core.stacked import KIND as STACKED, Combination, base_prefix, rank_normalise, rank_table

from .detectors import MAD_TO_SIGMA, MEANAD_TO_SIGMA, fit_hbos, fit_iforest, fit_knn, fit_lof, fit_robust_z
from .export import export_detector, export_sklearn, forest_from_sklearn
from .fit import fit_and_export
from .labels import LabelledData
from .lineage import base_lineage

# Per class, for the stacked (semi-supervised) model. 3, not 5: with 3 or 4 labelled anomalies the
# blend keeps most of the unsupervised rank (alpha = 3/13 .. 4/14) and still gains; measured with
# ``benchmarks/label_quality.py --dev`` (the training split only, never the reported held-back one):
# cardio's ratio to the unsupervised model went from 0.98 (iforest minus the known anomalies) to
# 1.16 over 10 seeds, 9 of which had 3 to 6 labelled anomalies.
MIN_LABELS = 3
MIN_SELECT_LABELS = 2   # per class, to compare detectors out of fold at all
DEFAULT_FOLDS = 5
BLEND_KAPPA = 10.0      # alpha = anomalies / (anomalies + kappa): few labels -> close to unsupervised
LOGREG_C = 1.0
CLIP = 5.0
CALIBRATION_ROWS = 4096
# A candidate replaces the default (or the best unsupervised one, for the stacked model) only when
# it wins on at least this share of bootstrap resamples of the labelled records: a dozen labels
# cannot tell close detectors apart, and then the default stays.
SELECT_CONFIDENCE = 0.9
BOOTSTRAP_ROUNDS = 200
# Unlabelled records as weak normals in the stacked model's logistic part (positive-unlabelled
# learning, as DevNet treats its unlabelled data): the labelled normals are mostly the unsupervised
# model's own alerts, so alone they teach the label model what separates anomalies from alerts, not
# from the population it will score. A seeded sample of at most UNLABELLED_NORMALS unlabelled records
# joins the normals, held out of the fold fits like the labelled records (out-of-fold base ranks),
# with a total weight of UNLABELLED_WEIGHT times that of the labelled normals.
# Measured on --dev (benchmarks/label_dev_study.py, 10 seeds, both splits): no gain on cardio, a loss on
# satellite (a third of its records are anomalies, so the weak normals are not) and on mammography;
# hence off (0), kept for design studies (label_quality.py --unlabelled-normals).
UNLABELLED_NORMALS = 0
UNLABELLED_WEIGHT = 1.0
# The stacked model used to be dropped for the best unsupervised detector when that one ranked the
# labelled records better on at least this share of bootstrap resamples. Those records are mostly
# the unsupervised model's own alerts and hold a few anomalies, so the comparison says little about
# the population. On --dev (benchmarks/label_dev_study.py, 10 seeds, both splits) it fired in 1 of 78
# runs where the stacked model could be fitted (satellite: kept 0.698 PR-AUC where the stacked model
# scored 0.798 on the held-back records; elsewhere the share reached 0.82), and its share tracked the
# held-back gain only weakly (Spearman -0.28 and -0.17); on the reported split it had fired in 4 of
# 80 runs, each time costing the labels' gain. None: no guard (the stacked model is taken
# whenever there are enough labels of each kind); a share in (0.5, 1] restores the old rule.
STACKED_GUARD: float | None = None


# --- candidates -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def fit(self, Xp: np.ndarray, seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
        """``(detector manifest entry, arrays, fitted sklearn forest or None)`` on preprocessed rows."""
        p = dict(self.params)
        if self.kind == "iforest":
            forest = fit_iforest(Xp, seed=seed, **p)
            layout = forest_from_sklearn(forest)
            spec = {"kind": "iforest", "params": {"n_trees": layout.n_trees, "depth": layout.depth,
                                                  "max_samples": int(forest._max_samples), "random_state": seed}}
            return spec, layout.arrays(), forest
        if self.kind in ("knn", "lof"):
            spec, arrays = (fit_knn if self.kind == "knn" else fit_lof)(Xp, seed=seed, **p)
        elif self.kind == "robust_z":
            spec, arrays = fit_robust_z(Xp, **p)
        elif self.kind == "hbos":
            spec, arrays = fit_hbos(Xp, **p)
        else:
            raise InvalidInputError(f"{self.kind} cannot be fitted here")
        return spec, arrays, None


CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("iforest", "iforest"),
    Candidate("iforest_1024", "iforest", (("max_samples", 1024),)),
    Candidate("robust_z", "robust_z"),
    Candidate("hbos", "hbos"),
    Candidate("knn", "knn"),
    Candidate("lof", "lof"),
)}
# what --detector auto compares (lof: quadratic reference tables; autoencoder: minutes per fit)
DEFAULT_SELECT = ("iforest", "iforest_1024", "robust_z", "hbos", "knn", STACKED)


def parse_select(select: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--select`` as a tuple of candidate names (a comma-separated string or a sequence)."""
    if select is None:
        return ()
    items = [s.strip() for s in (select.split(",") if isinstance(select, str) else select)]
    items = [s for s in items if s]
    allowed = (*CANDIDATES, STACKED)
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise InvalidInputError(f"--select takes a comma-separated list of {', '.join(allowed)}; got {bad or select!r}")
    if items == [STACKED]:
        raise InvalidInputError("--select stacked needs at least one unsupervised candidate to stack, e.g. --select iforest,hbos,stacked")
    return tuple(dict.fromkeys(items))


def _in_memory(spec: dict[str, Any], arrays: dict[str, np.ndarray], prep: Preprocessing, d: int) -> Model:
    manifest = {"detector": spec, "features": [{"name": f"x{j}"} for j in range(d)], "threshold": 0.0,
                "preprocessing": prep.manifest()}
    return build_model(manifest, {**prep.arrays(), **arrays})


def _fit_prep(X: np.ndarray) -> Preprocessing:
    with np.errstate(all="ignore"):
        median = np.nanmedian(np.where(np.isfinite(X), X, np.nan), axis=0)
    return Preprocessing.identity(X.shape[1], median=np.where(np.isfinite(median), median, 0.0))


def _standardiser(Xp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and 1 / robust scale per feature (MAD, falling back as robust_z does)."""
    med = np.median(Xp, axis=0)
    dev = np.abs(Xp - med)
    scale = MAD_TO_SIGMA * np.median(dev, axis=0)
    meanad = MEANAD_TO_SIGMA * dev.mean(axis=0)
    scale = np.where(scale > 0, scale, np.where(meanad > 0, meanad, 1.0))
    return med, 1.0 / scale


@dataclass
class OutOfFold:
    labelled: np.ndarray          # indices of the labelled rows
    y: np.ndarray                 # their labels (0/1)
    folds: np.ndarray             # fold of each labelled row
    k: int
    raw: dict[str, np.ndarray] = field(default_factory=dict)   # candidate -> out-of-fold scores
    rank: dict[str, np.ndarray] = field(default_factory=dict)  # candidate -> rank-normalised ones
    # unlabelled records taken as weak normals by the stacked model (see UNLABELLED_NORMALS): their
    # indices, folds and out-of-fold ranks per candidate; never used to compare detectors
    unlabelled: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    unlabelled_folds: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    unlabelled_rank: dict[str, np.ndarray] = field(default_factory=dict)


def make_folds(y: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    from sklearn.model_selection import StratifiedKFold

    lab = np.flatnonzero(y >= 0)
    yl = y[lab].astype(np.int64)
    k = int(min(k, np.sum(yl == 1), np.sum(yl == 0)))
    if k < 2:
        raise InvalidInputError("out-of-fold scoring needs at least 2 labelled anomalies and 2 labelled normals")
    fold = np.empty(lab.size, dtype=np.int64)
    for f, (_, test) in enumerate(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(lab, yl)):
        fold[test] = f
    return lab, yl, fold, k


def calibration_rows(n: int, seed: int, max_rows: int = CALIBRATION_ROWS) -> np.ndarray:
    """The rows whose scores give each detector's rank table (a seeded sample)."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed + 7919).choice(n, size=max_rows, replace=False))


def unlabelled_sample(y: np.ndarray, k: int, seed: int, max_rows: int = UNLABELLED_NORMALS) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, folds)``: a seeded sample of at most ``max_rows`` unlabelled rows (``y < 0``), each
    given one of ``k`` folds in turn (a fold's detectors are fitted without its rows)."""
    rows = np.flatnonzero(y < 0)
    if max_rows <= 0 or rows.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed + 15485863)
    if rows.size > max_rows:
        rows = np.sort(rng.choice(rows, size=max_rows, replace=False))
    return rows, rng.permutation(rows.size) % k


def out_of_fold(X: np.ndarray, y: np.ndarray, names: Sequence[str], *, folds: int = DEFAULT_FOLDS, seed: int = 0,
                log: Any = None, unlabelled: int = 0) -> OutOfFold:
    """Score every labelled record with each candidate fitted without it (and without any known
    anomaly): raw scores and ranks against the fold model's scores on the calibration rows. With
    ``unlabelled`` > 0, as many unlabelled rows at most (a seeded sample) are held out and ranked
    the same way (:attr:`OutOfFold.unlabelled_rank`)."""
    lab, yl, fold, k = make_folds(y, folds, seed)
    oof = OutOfFold(lab, yl, fold, k)
    oof.unlabelled, oof.unlabelled_folds = unlabelled_sample(y, k, seed, unlabelled)
    urows, ufold = oof.unlabelled, oof.unlabelled_folds
    base_fit = y != 1
    calib = calibration_rows(X.shape[0], seed)
    d = X.shape[1]
    for name in names:
        cand = CANDIDATES[name]
        raw, rank, urank = np.empty(lab.size), np.empty(lab.size), np.empty(urows.size)
        for f in range(k):
            held, uheld = lab[fold == f], urows[ufold == f]
            fit_rows = base_fit.copy()
            fit_rows[held] = False
            fit_rows[uheld] = False
            prep = _fit_prep(X[fit_rows])
            spec, arrays, _ = cand.fit(prep.transform(X[fit_rows]), seed)
            m = _in_memory(spec, arrays, prep, d)
            knots, levels = rank_table(m.score(X[calib]))
            s = m.score(X[held])
            raw[fold == f], rank[fold == f] = s, rank_normalise(s, knots, levels)
            if uheld.size:
                urank[ufold == f] = rank_normalise(m.score(X[uheld]), knots, levels)
        oof.raw[name], oof.rank[name] = raw, rank
        if urows.size:
            oof.unlabelled_rank[name] = urank
        if log:
            log(f"  {name:<14} out-of-fold PR-AUC {pr_auc(yl, raw):.4f}")
    return oof


def pr_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision (scikit-learn's definition: ties form one threshold), NumPy only so the
    bootstrap below stays cheap."""
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # the last index of each distinct score
    tps = np.cumsum(y)[last].astype(np.float64)
    if tps[-1] == 0:
        return 0.0
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def beats(y: np.ndarray, a: np.ndarray, b: np.ndarray, *, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> float:
    """Share of stratified bootstrap resamples of the labelled records on which scores ``a`` have
    a higher PR-AUC than scores ``b`` (ties count half): how sure the labels are that ``a`` ranks
    better. With a dozen labels this stays near 0.5 unless the difference is large."""
    rng = np.random.default_rng(seed + 104729)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    wins = 0.0
    for _ in range(rounds):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        da, db = pr_auc(y[idx], a[idx]), pr_auc(y[idx], b[idx])
        wins += 1.0 if da > db else 0.5 if da == db else 0.0
    return wins / rounds


def blend_alpha(anomalies: int, kappa: float = BLEND_KAPPA) -> float:
    """The labels' weight in the stacked score: 0 with no labelled anomaly, towards 1 with many."""
    return float(anomalies / (anomalies + kappa))


def label_weights(y: np.ndarray, unlabelled: int, share: float | None = None) -> np.ndarray:
    """Sample weights for the logistic model on ``y`` (the labelled records, 0/1) followed by
    ``unlabelled`` weak normals: the classes weigh the same in total (scikit-learn's "balanced"
    over the labelled records), and within the normals the unlabelled ones weigh ``share`` times
    the labelled ones in total."""
    share = UNLABELLED_WEIGHT if share is None else share
    y = np.asarray(y)
    n, na = y.size, int(np.sum(y == 1))
    nn = n - na
    u = unlabelled if nn and share > 0 else 0
    neg = n / 2.0 / (1.0 + (share if u else 0.0))
    w = np.where(y == 1, n / (2.0 * na), neg / max(nn, 1))
    return np.r_[w, np.full(u, share * neg / u) if u else np.empty(0)]


def _logreg(F: np.ndarray, y: np.ndarray, C: float, seed: int, weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Logistic regression on features ``F`` and 0/1 labels ``y``; ``weight``: per-row weights
    (default: "balanced" classes)."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=C, class_weight=None if weight is not None else "balanced", max_iter=2000, random_state=seed)
    lr.fit(F, y, sample_weight=weight)
    return lr.coef_.ravel().astype(np.float64), float(lr.intercept_[0])


def _with_unlabelled(F: np.ndarray, y: np.ndarray, Fu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The logistic model's training set: the labelled rows, plus the unlabelled ones as weak
    normals (weighted by :func:`label_weights`) when there are any."""
    if Fu.shape[0] == 0 or not np.any(y == 0):
        return F, y, None
    return np.vstack([F, Fu]), np.r_[y, np.zeros(Fu.shape[0], dtype=y.dtype)], label_weights(y, Fu.shape[0])


def stacked_features(rank: np.ndarray, Xp: np.ndarray, center: np.ndarray, scale_inv: np.ndarray, clip: float = CLIP) -> np.ndarray:
    return np.hstack([rank, np.clip((Xp - center) * scale_inv, -clip, clip)])


def unlabelled_features(oof: OutOfFold, bases: Sequence[str], Xp_u: np.ndarray, center: np.ndarray,
                        scale_inv: np.ndarray) -> np.ndarray:
    """The logistic model's inputs for the unlabelled weak normals (``Xp_u``: their preprocessed rows)."""
    if oof.unlabelled.size == 0:
        return np.empty((0, len(bases) + center.size))
    return stacked_features(np.column_stack([oof.unlabelled_rank[b] for b in bases]), Xp_u, center, scale_inv)


def stacked_out_of_fold(oof: OutOfFold, bases: Sequence[str], primary: int, Xp_lab: np.ndarray, center: np.ndarray,
                        scale_inv: np.ndarray, alpha: float, *, C: float = LOGREG_C, seed: int = 0,
                        Xp_u: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold stacked scores of the labelled records: for fold f the logistic model is fitted
    on the other folds' (out-of-fold) base ranks and features (and the other folds' unlabelled
    weak normals, ``Xp_u`` their preprocessed rows), then blended with the primary rank."""
    R = np.column_stack([oof.rank[b] for b in bases])
    F = stacked_features(R, Xp_lab, center, scale_inv)
    Fu = unlabelled_features(oof, bases, Xp_u, center, scale_inv) if Xp_u is not None else np.empty((0, F.shape[1]))
    out = np.empty(oof.y.size)
    from outlierd.core.stacked import sigmoid

    for f in range(oof.k):
        tr, te = oof.folds != f, oof.folds == f
        if np.unique(oof.y[tr]).size < 2:
            out[te] = R[te, primary]
            continue
        Fu_tr = Fu[oof.unlabelled_folds != f] if Fu.shape[0] else Fu
        Ft, yt, wt = _with_unlabelled(F[tr], oof.y[tr], Fu_tr)
        coef, b = _logreg(Ft, yt, C, seed, wt)
        out[te] = (1.0 - alpha) * R[te, primary] + alpha * sigmoid(F[te] @ coef + b)
    return out


# --- the pipeline ---------------------------------------------------------------------------

@dataclass
class Plan:
    chosen: str                           # a candidate name, STACKED, or a DETECTORS entry
    bases: tuple[str, ...] = ()
    primary: int = 0
    alpha: float = 0.0
    oof: OutOfFold | None = None
    oof_scores: np.ndarray | None = None  # the chosen model's out-of-fold scores of the labelled rows
    selection: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # when no detector was given: what the default resolved to and why (recorded in the lineage)
    detector_choice: dict[str, Any] | None = None


def plan(ld: LabelledData, *, detector: str, select: Sequence[str], min_labels: int = MIN_LABELS,
         folds: int = DEFAULT_FOLDS, seed: int = 0, log: Any = None, confidence: float = SELECT_CONFIDENCE) -> Plan:
    """Decide what to fit: ``detector`` exactly, or (``auto`` / ``select``) by out-of-fold PR-AUC
    on the labelled records: among the unsupervised candidates the first (the default) stays
    unless another beats it on ``confidence`` of bootstrap resamples; with ``min_labels`` labelled
    anomalies and normals, the stacked model over them is taken (with :data:`STACKED_GUARD` set:
    unless the best unsupervised one beats it on that share of bootstrap resamples; the share is
    recorded in the plan's notes either way)."""
    na, nn = ld.anomalies, ld.normals
    selecting = detector == "auto" or bool(select) or detector == STACKED
    if not selecting:
        p = Plan(detector)
        if detector in CANDIDATES and na >= MIN_SELECT_LABELS and nn >= MIN_SELECT_LABELS:
            p.oof = out_of_fold(ld.X, ld.y, [detector], folds=folds, seed=seed, log=log)
            p.oof_scores = p.oof.raw[detector]
        else:
            p.notes.append("too few labels of each kind for out-of-fold evaluation" if detector in CANDIDATES
                           else f"{detector}: no out-of-fold evaluation (each fit takes too long)")
        return p
    names = tuple(select) if select else (DEFAULT_SELECT if detector == "auto" else tuple(c for c in DEFAULT_SELECT if c != STACKED))
    if detector == STACKED and STACKED not in names:
        names = (*names, STACKED)
    explicit = bool(select) or detector == STACKED
    if na < MIN_SELECT_LABELS or nn < MIN_SELECT_LABELS:
        what = "--detector stacked" if detector == STACKED else "--select" if select else "--detector auto"
        msg = (f"{what} compares detectors on labelled records and needs at least {MIN_SELECT_LABELS} labelled anomalies "
               f"and {MIN_SELECT_LABELS} labelled normals; got {na} anomalies and {nn} normals (label more records, "
               "or choose a detector with --detector)")
        if explicit:
            raise InvalidInputError(msg)
        p = Plan("iforest", notes=[msg + "; fell back to iforest"])
        if log:
            log("warning: " + p.notes[0])
        return p
    unsup = tuple(c for c in names if c != STACKED)
    stacking = STACKED in names and na >= min_labels and nn >= min_labels
    oof = out_of_fold(ld.X, ld.y, unsup, folds=folds, seed=seed, log=log, unlabelled=UNLABELLED_NORMALS if stacking else 0)
    selection = {c: pr_auc(oof.y, oof.raw[c]) for c in unsup}
    # the default is the first candidate (iforest in the default list); another one must beat it
    # with confidence, and the best of those that do is taken
    default = unsup[0]
    confident = [c for c in unsup[1:] if selection[c] > selection[default]
                 and beats(oof.y, oof.raw[c], oof.raw[default], seed=seed) >= confidence]
    best = max(confident, key=lambda c: selection[c]) if confident else default
    p = Plan(best, oof=oof, oof_scores=oof.raw[best], selection=selection)
    if log and best != max(unsup, key=lambda c: selection[c]):
        log(f"  kept {best}: no candidate beats it on {confidence:.0%} of bootstrap resamples of the labels")
    if STACKED in names:
        if na < min_labels or nn < min_labels:
            msg = (f"stacked model needs at least {min_labels} labelled anomalies and {min_labels} normals "
                   f"(--min-labels); got {na} and {nn}")
            if detector == STACKED:
                raise InvalidInputError(msg)
            p.notes.append(msg + ": not fitted")
        else:
            bases = unsup
            primary = bases.index(best)
            prep = _fit_prep(ld.X[ld.y != 1])
            Xp = prep.transform(ld.X)
            center, scale_inv = _standardiser(Xp)
            alpha = blend_alpha(na)
            s = stacked_out_of_fold(oof, bases, primary, Xp[oof.labelled], center, scale_inv, alpha, seed=seed,
                                    Xp_u=Xp[oof.unlabelled])
            selection[STACKED] = pr_auc(oof.y, s)
            if log:
                log(f"  {STACKED:<14} out-of-fold PR-AUC {selection[STACKED]:.4f} (primary {best}, alpha {alpha:.2f})")
            # The labelled records were mostly picked by the unsupervised model (its alerts plus a
            # small sample), so on them every detector looks nearly perfect and out-of-fold PR-AUC
            # cannot show what the labels add on the population. The stacked model keeps the
            # unsupervised rank with weight 1 - alpha; it is taken (see STACKED_GUARD), and how
            # the labelled records compare it with the best unsupervised detector is recorded.
            worse = beats(oof.y, oof.raw[best], s, seed=seed)
            guard = STACKED_GUARD
            compared = (f"{best} ranks the labelled records better than the stacked model on {worse:.0%} of "
                        "bootstrap resamples")
            if detector == STACKED or guard is None or worse < guard:
                p = Plan(STACKED, bases=bases, primary=primary, alpha=alpha, oof=oof, oof_scores=s,
                         selection=selection, notes=[*p.notes, compared])
            else:
                p.notes.append(f"stacked model not taken: {compared}")
    return p


def export_candidate(name: str, X_fit: np.ndarray, names: list[str], seed: int, dest: Path, lineage: dict[str, Any]) -> Path:
    """Fit candidate ``name`` on ``X_fit`` and write its artifact (the same way ``outlierd train``
    writes that detector)."""
    prep = _fit_prep(X_fit)
    cand = CANDIDATES.get(name)
    if cand is None or (cand.kind == name and not cand.params):
        return fit_and_export(name if cand is None else cand.kind, X_fit, names, prep, seed, dest, lineage)
    if cand.kind != "iforest":
        raise InvalidInputError(f"no exporter for candidate {name}")
    forest = fit_iforest(prep.transform(X_fit), seed=seed, **dict(cand.params))
    return export_sklearn(forest, dest, names, X_train=X_fit, lineage=lineage)


def export_stacked(ld: LabelledData, p: Plan, seed: int, dest: Path, lineage: dict[str, Any], C: float = LOGREG_C) -> Path:
    """Fit the bases on every row but the known anomalies, the logistic model on the labelled
    records' out-of-fold base ranks, and write the ``stacked`` artifact."""
    assert p.oof is not None
    X_fit = ld.X[ld.y != 1]
    prep = _fit_prep(X_fit)
    d = ld.X.shape[1]
    Xp_fit, Xp = prep.transform(X_fit), prep.transform(ld.X)
    calib = calibration_rows(ld.X.shape[0], seed)
    arrays: dict[str, np.ndarray] = {}
    bases, knots, levels = [], [], []
    for i, name in enumerate(p.bases):
        spec, arr, _ = CANDIDATES[name].fit(Xp_fit, seed)
        k, lv = rank_table(_in_memory(spec, arr, prep, d).score(ld.X[calib]))
        knots.append(k)
        levels.append(lv)
        prefix = base_prefix(i)
        arrays.update({prefix + key: v for key, v in {**prep.arrays(), **arr}.items()})
        bases.append({"name": name, "kind": spec["kind"], "params": spec.get("params", {}), "prefix": prefix,
                      "preprocessing": prep.manifest()})
    center, scale_inv = _standardiser(Xp)
    R = np.column_stack([p.oof.rank[b] for b in p.bases])
    Fu = unlabelled_features(p.oof, p.bases, Xp[p.oof.unlabelled], center, scale_inv)
    Ft, yt, wt = _with_unlabelled(stacked_features(R, Xp[p.oof.labelled], center, scale_inv), p.oof.y, Fu)
    coef, intercept = _logreg(Ft, yt, C, seed, wt)
    comb = Combination(knots, levels, center, scale_inv, coef, intercept, p.primary, p.alpha, CLIP)
    arrays.update(comb.arrays())
    spec = {"kind": STACKED, "params": {
        "bases": bases, "primary": p.primary, "alpha": p.alpha, "clip": CLIP, "C": C,
        "unlabelled_normals": int(p.oof.unlabelled.size),
        "unlabelled_weight": UNLABELLED_WEIGHT if p.oof.unlabelled.size else 0.0,
        "inputs": [f"rank({b})" for b in p.bases] + [f"z({n})" for n in ld.feature_names],
        "score": "(1 - alpha) * rank(primary) + alpha * sigmoid(logistic model on base ranks and standardised features)"}}
    return export_detector(dest, detector=spec, arrays=arrays, prep=prep, feature_names=ld.feature_names, threshold=0.0,
                           X_train=ld.X, lineage=base_lineage(**lineage), seed=seed)
