"""The NAB scorer (monitoring/nab.py): the paper's reference points on the real corpus and a
hand-computed series; and the time-series detector's state round trip."""

from __future__ import annotations

import math
import numpy as np
import pytest

from outlierd.core.timeseries import KnnCad
from outlierd.monitoring.nab import STANDARD, Profile, corpus_score, load_corpus, scaled_sigmoid, series_points

from conftest import DATASETS

NAB = DATASETS / "nab"


def test_scaled_sigmoid_matches_the_paper():
    assert scaled_sigmoid(-1.0) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert scaled_sigmoid(0.0) == 0.0
    assert scaled_sigmoid(3.5) == -1.0


def test_hand_computed_series():
    # 100 rows: probation = 15 rows; one window rows 40..49 (width 10)
    s = series_points("x", 100, [(40, 49)])
    assert s.rows[0] == 15 and s.n_windows == 1
    max_tp = scaled_sigmoid(-1.0)
    det = np.zeros(100)
    det[[42, 45, 20, 60]] = 1.0  # earliest in-window detection row 42; FP before the window (-1), FP after it
    r = corpus_score([s], [det], STANDARD)
    tp = scaled_sigmoid(-(49 - 42 + 1) / 10) / max_tp
    fp = -0.11 * 1.0 + 0.11 * scaled_sigmoid((60 - 49) / 9)
    assert r["raw"] == pytest.approx(tp + fp)
    assert r["score"] == pytest.approx(100 * (tp + fp + 1) / 2)
    det[[3]] = 1.0  # in probation: ignored
    assert corpus_score([s], [det], STANDARD)["raw"] == pytest.approx(tp + fp)


@pytest.mark.skipif(not (NAB / "labels_combined_windows.json").is_file(), reason=f"NAB corpus not found under {NAB}")
def test_null_and_perfect_detectors_score_0_and_100_on_the_corpus():
    names, values, series = load_corpus(NAB)
    assert len(names) == 55
    profiles = Profile.load(NAB / "profiles.json")
    perfect = []
    for s, v in zip(series, values):
        p = np.zeros(len(v))
        for w in range(s.n_windows):
            p[s.rows[s.window == w][0]] = 1.0
        perfect.append(p)
    for prof in profiles.values():
        assert corpus_score(series, [np.zeros(len(v)) for v in values], prof)["score"] == 0.0
        assert corpus_score(series, perfect, prof)["score"] == pytest.approx(100.0)
    rand = corpus_score(series, [np.random.default_rng(0).random(len(v)) for v in values], profiles["standard"])["score"]
    assert 0 < rand < 25  # NAB's published random detector: 11.0


def test_knncad_state_round_trip_and_spike(tmp_path):
    rng = np.random.default_rng(0)
    x = np.sin(np.arange(3000) * 2 * np.pi / 50) + 0.05 * rng.standard_normal(3000)
    x[2000] += 3.0
    a = KnnCad.new(P=300)
    s1 = a.score_update(x[:1500])
    np.savez(tmp_path / "k.npz", **a.arrays())
    with np.load(tmp_path / "k.npz", allow_pickle=False) as f:
        b = KnnCad.from_arrays(dict(f))
    rest_a, rest_b = a.score_update(x[1500:]), b.score_update(x[1500:])
    assert np.array_equal(rest_a, rest_b)
    scores = np.concatenate([s1, rest_a])
    assert scores[2000:2019].max() >= 0.9965  # the spike (in the next 19 lag vectors) alerts
    assert 0.0 <= scores.min() and scores.max() <= 1.0
