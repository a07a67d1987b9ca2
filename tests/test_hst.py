"""Half-Space Trees kernels against the slow oracle (tests/naive.py) and against River."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from naive import hst_prequential
from outlierd.core.hst import HalfSpaceTrees

from conftest import load_csv


def _stream(rng, n, d=4):
    X = rng.random((n, d))
    X[rng.integers(0, n, n // 500)] *= 5.0
    X[rng.integers(0, n, n // 300)] = 0.5  # exact ties with earlier records
    return X


def _chunks(rng, n):
    # uneven batches, single records included: state must carry across calls exactly
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(60, n - 1), replace=False))
    return np.split(np.arange(n), cuts)


def test_hst_equals_naive_oracle_100k_records(rng):
    X = _stream(rng, 100_000)
    m = HalfSpaceTrees.new(4, n_trees=3, height=5, window_size=64, seed=int(rng.integers(1 << 31)))
    ref = hst_prequential(m.feat, m.thr, X, 64)
    got = np.concatenate([m.score_update(X[idx], parallel=bool(j % 2)) for j, idx in enumerate(_chunks(rng, len(X)))])
    assert np.max(np.abs(got - ref)) <= 1e-12
    assert m.position == len(X)


def test_hst_without_scaler_equals_oracle(rng):
    X = _stream(rng, 20_000)
    m = HalfSpaceTrees.new(4, n_trees=4, height=6, window_size=100, minmax=False, seed=7)
    assert np.max(np.abs(m.score_update(X) - hst_prequential(m.feat, m.thr, X, 100, minmax=False))) <= 1e-12


def test_hst_equals_river_record_for_record(rng):
    river = pytest.importorskip("river", reason="River (the reference implementation) is not installed")
    from river import anomaly, compose, preprocessing

    X = rng.random((4000, 3))
    X[::397] += 2.0
    for minmax in (True, False):
        ours = HalfSpaceTrees.new(3, n_trees=5, height=6, window_size=50, minmax=minmax, seed=42)
        theirs = anomaly.HalfSpaceTrees(n_trees=5, height=6, window_size=50, seed=42)
        if minmax:
            theirs = compose.Pipeline(preprocessing.MinMaxScaler(), theirs)
        expected = []
        for x in X:
            rec = {j: float(v) for j, v in enumerate(x)}
            expected.append(theirs.score_one(rec))
            theirs.learn_one(rec)
        assert np.array_equal(ours.score_update(X), np.array(expected, dtype=np.float64)), river.__version__


def test_score_leaves_state_alone_and_update_then_score_is_prequential(rng):
    X = _stream(rng, 3000)
    a = HalfSpaceTrees.new(4, n_trees=4, height=5, window_size=50, seed=1)
    b = HalfSpaceTrees.new(4, n_trees=4, height=5, window_size=50, seed=1)
    preq = a.score_update(X)
    one_by_one = []
    for i in range(len(X)):
        s1 = b.score(X[i:i + 1])
        assert np.array_equal(s1, b.score(X[i:i + 1]))  # scoring twice: same answer, nothing learned
        one_by_one.append(s1[0])
        b.update(X[i:i + 1])
    assert np.array_equal(preq, np.array(one_by_one))
    # a batch scored without learning: every record against the same state
    batch = b.score(X[:700])
    assert np.array_equal(batch, np.concatenate([b.score(X[i:i + 1]) for i in range(700)]))


def test_state_round_trip_gives_identical_later_scores(rng, tmp_path):
    X = _stream(rng, 6000)
    a = HalfSpaceTrees.new(4, n_trees=5, height=6, window_size=70, seed=3)
    a.score_update(X[:2500])
    np.savez(tmp_path / "s.npz", **a.arrays())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        b = HalfSpaceTrees.from_arrays(dict(f), 4, a.params())
    assert np.array_equal(a.score(X[2500:3000]), b.score(X[2500:3000]))  # the compact trees rebuilt from saved state
    assert np.array_equal(a.score_update(X[2500:]), b.score_update(X[2500:]))


def test_saved_state_no_window_can_leave_is_refused(rng):
    from outlierd.core.errors import ArtifactError

    a = HalfSpaceTrees.new(4, n_trees=3, height=5, window_size=64, seed=1)
    a.score_update(_stream(rng, 1000))
    leaf_goes_on = a.arrays()
    leaf_goes_on["hst_stop"] = leaf_goes_on["hst_stop"].copy()
    leaf_goes_on["hst_stop"][1, :] = False  # no node stops: a walk would run past the leaves
    with pytest.raises(ArtifactError, match="tree 1 is not one a window can leave"):
        HalfSpaceTrees.from_arrays(leaf_goes_on, 4, a.params())
    assert np.array_equal(HalfSpaceTrees.from_arrays(a.arrays(), 4, a.params()).score(np.full((3, 4), 0.5)), a.score(np.full((3, 4), 0.5)))


def test_prequential_roc_auc_on_shuttle():
    X, y = load_csv("shuttle")
    s = HalfSpaceTrees.new(X.shape[1], n_trees=25, height=15, window_size=250, seed=0).score_update(X)
    assert roc_auc_score(y, s) >= 0.95  # River's MinMaxScaler | HalfSpaceTrees: 0.958 here


def test_bad_parameters_and_shapes_are_clear():
    from outlierd.core.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="height"):
        HalfSpaceTrees.new(3, height=0)
    m = HalfSpaceTrees.new(3, n_trees=2, height=3)
    with pytest.raises(InvalidInputError, match=r"\(n_records, 3\)"):
        m.score(np.zeros((2, 4)))
    with pytest.raises(InvalidInputError, match="record 1 has NaN"):
        m.score_update(np.array([[0.1, 0.2, 0.3], [0.1, np.nan, 0.3]]))
    assert m.position == 0
