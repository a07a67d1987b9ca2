"""The NAB score (Lavin & Ahmad, "Evaluating Real-time Anomaly Detection Algorithms - the Numenta
Anomaly Benchmark", ICMLA 2015), written from the paper and NAB's scoring rules.

Per series: each labelled anomaly window rewards its **earliest** detection with a scaled sigmoid of
the detection's position in the window (``tp_weight`` at the window's first point, about 0 at its
end); a window without detection costs ``fn_weight``; a detection outside every window costs
``fp_weight`` times the scaled sigmoid of its distance past the previous window (``-fp_weight`` when
no window precedes it). The first 15% of a series (at most 750 points) is a probationary period:
nothing there is scored. A detector's scores become detections with one threshold for the whole
corpus, the one that maximises the corpus' raw score (NAB's optimiser: a sweep over every score);
the raw score is normalised to 100 * (raw - null) / (perfect - null), where the null detector
detects nothing (every window missed: ``-fn_weight`` each) and the perfect one detects every window
at its first point (``tp_weight`` each).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROBATION_PERCENT = 0.15


@dataclass(frozen=True)
class Profile:
    tp_weight: float
    fp_weight: float
    fn_weight: float

    @classmethod
    def load(cls, path: str | Path) -> dict[str, Profile]:
        raw = json.loads(Path(path).read_text())
        return {name: cls(p["CostMatrix"]["tpWeight"], p["CostMatrix"]["fpWeight"], p["CostMatrix"]["fnWeight"])
                for name, p in raw.items()}


STANDARD = Profile(1.0, 0.11, 1.0)


def scaled_sigmoid(y: float) -> float:
    """NAB's ``2 * sigmoid(-5 y) - 1``, and -1 beyond 3 window lengths."""
    if y > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def probation_length(n: int) -> int:
    return int(min(math.floor(PROBATION_PERCENT * n), PROBATION_PERCENT * 5000))


@dataclass
class Series:
    """One series' scorable points: ``weight[i]`` the points a detection at row i earns (before the
    profile's weights: ``in_window`` rows carry the true-positive sigmoid, others the false-positive
    one), ``window[i]`` the window's index (-1 outside), rows in the probationary period dropped."""

    name: str
    rows: np.ndarray  # original row index of each scorable point
    tp_unweighted: np.ndarray
    fp_unweighted: np.ndarray
    window: np.ndarray
    n_windows: int


def series_points(name: str, n: int, windows: list[tuple[int, int]]) -> Series:
    """Points of a series of ``n`` rows with anomaly windows given as ``(first_row, last_row)``."""
    max_tp = scaled_sigmoid(-1.0)
    tp = np.zeros(n)
    fp = np.zeros(n)
    win = np.full(n, -1, dtype=np.int64)
    inside = np.zeros(n, dtype=bool)
    for j, (lo, hi) in enumerate(windows):
        width = hi - lo + 1
        for i in range(lo, hi + 1):
            tp[i] = scaled_sigmoid(-(hi - i + 1) / width) / max_tp
            win[i] = j
            inside[i] = True
    prev_hi: int | None = None
    prev_width = 0
    wi = 0
    for i in range(n):
        while wi < len(windows) and windows[wi][1] < i:
            prev_hi, prev_width = windows[wi][1], windows[wi][1] - windows[wi][0] + 1
            wi += 1
        if not inside[i]:
            fp[i] = -1.0 if prev_hi is None else scaled_sigmoid(abs(prev_hi - i) / (prev_width - 1))
    keep = np.arange(probation_length(n), n)
    scored_windows = set(win[keep][win[keep] >= 0].tolist())
    # windows wholly in probation are not scored; renumber the others 0..k-1
    remap = {w: k for k, w in enumerate(sorted(scored_windows))}
    w_keep = np.array([remap.get(int(w), -1) for w in win[keep]], dtype=np.int64)
    return Series(name, keep, tp[keep], fp[keep], w_keep, len(remap))


def corpus_score(series: list[Series], scores: list[np.ndarray], profile: Profile = STANDARD) -> dict[str, float]:
    """NAB's normalised score of ``scores`` (one array per series, all rows, higher = more
    anomalous) at the best single threshold over the corpus: ``{"score", "threshold", "raw",
    "null", "perfect", "tp", "fp", "fn"}``. Detections are ``score >= threshold``."""
    pts_score, pts_gain, pts_win = [], [], []
    offset = 0
    n_windows = 0
    for s, sc in zip(series, scores):
        sc = np.asarray(sc, dtype=np.float64)[s.rows]
        pts_score.append(sc)
        inside = s.window >= 0
        pts_gain.append(np.where(inside, s.tp_unweighted * profile.tp_weight, s.fp_unweighted * profile.fp_weight))
        pts_win.append(np.where(inside, s.window + offset, -1))
        offset += s.n_windows
        n_windows += s.n_windows
    score = np.concatenate(pts_score)
    gain = np.concatenate(pts_gain)
    win = np.concatenate(pts_win)
    null = -profile.fn_weight * n_windows
    perfect = profile.tp_weight * n_windows
    order = np.argsort(-score, kind="stable")
    best_tp = np.full(n_windows, -np.inf)
    total = null
    fp_sum = 0.0
    best = (total, math.inf, 0, 0)
    n_tp = n_fp = 0
    i = 0
    n = len(order)
    while i < n:
        # every point with this score value becomes a detection together
        v = score[order[i]]
        while i < n and score[order[i]] == v:
            k = order[i]
            w = win[k]
            if w < 0:
                fp_sum += gain[k]
                n_fp += 1
            elif gain[k] > best_tp[w]:
                if best_tp[w] == -np.inf:
                    total += profile.fn_weight + gain[k]
                    n_tp += 1
                else:
                    total += gain[k] - best_tp[w]
                best_tp[w] = gain[k]
            i += 1
        if total + fp_sum > best[0]:
            best = (total + fp_sum, float(v), n_tp, n_fp)
    raw, threshold, tp, fp = best
    return {"score": 100.0 * (raw - null) / (perfect - null), "threshold": threshold, "raw": raw, "null": null,
            "perfect": perfect, "tp": tp, "fp": fp, "fn": n_windows - tp}


def load_corpus(root: str | Path) -> tuple[list[str], list[np.ndarray], list[Series]]:
    """The NAB corpus under ``root`` (``data/<category>/<series>.csv``, ``labels_combined_windows.json``):
    names, values and the scorable points of each series, in sorted order."""
    root = Path(root)
    windows = json.loads((root / "labels_combined_windows.json").read_text())
    names, values, series = [], [], []
    for name in sorted(windows):
        path = root / "data" / name
        if not path.is_file():
            continue
        ts, vals = _read_series(path)
        idx = [(int(np.searchsorted(ts, np.datetime64(a.replace(" ", "T")))), int(np.searchsorted(ts, np.datetime64(b.replace(" ", "T")))))
               for a, b in windows[name]]
        names.append(name)
        values.append(vals)
        series.append(series_points(name, len(vals), idx))
    return names, values, series


def _read_series(path: Path) -> tuple[np.ndarray, np.ndarray]:
    ts, vals = [], []
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            a, b = line.rstrip("\n").split(",")
            ts.append(np.datetime64(a.replace(" ", "T")))
            vals.append(float(b))
    return np.array(ts), np.array(vals)
