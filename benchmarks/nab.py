"""NAB scores (standard, reward_low_FP_rate, reward_low_FN_rate) of outlierd's time-series detector
on the NAB corpus in ../shared/datasets/nab, with the scorer in ``outlierd.monitoring.nab``.

    python benchmarks/nab.py [--out .benchmarks/nab.json]

Detectors: ``knncad`` (``core.timeseries.KnnCad`` with the published KNN-CAD parameters: training
period = NAB's probationary length, 19 lags, 27 neighbours, alert 0.9965; nothing tuned on NAB), and
the scorer's own reference points: null (0), perfect (100) and random scores. As in NAB, each
profile's threshold is the one that maximises that profile's corpus score. Published (numenta/NAB
README, standard profile): HTM 70.5, CAD OSE 69.9, KNN CAD 58.0, Relative Entropy 54.6, Random Cut
Forest 51.7, Windowed Gaussian 39.6, random 11.0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from outlierd.core.timeseries import KnnCad
from outlierd.monitoring.nab import Profile, corpus_score, load_corpus, probation_length

NAB = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "nab"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(NAB))
    ap.add_argument("--out", default=".benchmarks/nab.json")
    args = ap.parse_args(argv)
    profiles = Profile.load(Path(args.root) / "profiles.json")
    names, values, series = load_corpus(args.root)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    knn = [KnnCad.new(P=probation_length(len(v))).score_update(v) for v in values]
    knn_s = time.perf_counter() - t0
    perfect = []
    for s, v in zip(series, values):
        p = np.zeros(len(v))
        for w in range(s.n_windows):
            p[s.rows[s.window == w][0]] = 1.0
        perfect.append(p)
    dets = {"knncad": knn, "null": [np.zeros(len(v)) for v in values], "perfect": perfect,
            "random": [rng.random(len(v)) for v in values]}
    result: dict = {"series": len(names), "points": int(sum(len(v) for v in values)), "knncad_seconds": knn_s, "scores": {}}
    print(f"{len(names)} series, {result['points']:,} points; knncad ran in {knn_s:.1f} s")
    print(f"{'detector':10} " + " ".join(f"{p:>20}" for p in profiles))
    for name, scores in dets.items():
        row = {p: corpus_score(series, scores, prof) for p, prof in profiles.items()}
        result["scores"][name] = row
        print(f"{name:10} " + " ".join(f"{row[p]['score']:20.1f}" for p in profiles))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
