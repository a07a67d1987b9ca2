"""Streaming RS-Hash against the slow oracle (tests/naive.py), its state round trip, and quality."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from naive import rshash_prequential
from outlierd.core.rshash import RSHash

from conftest import load_csv


def test_rshash_equals_oracle_record_for_record(rng):
    X = rng.standard_normal((3000, 5))
    X[::97] *= 6.0
    m = RSHash.new(5, n_components=7, n_rows=2, n_buckets=64, window_size=100, seed=int(rng.integers(1 << 31)))
    ref = rshash_prequential(m.dims, m.alpha, m.f, m.mult, 100, 64, 2, X)
    got = np.concatenate([m.score_update(X[i:i + 333]) for i in range(0, len(X), 333)])
    assert np.max(np.abs(got - ref)) <= 1e-12


def test_rshash_state_round_trip(rng, tmp_path):
    X = rng.standard_normal((2000, 4))
    a = RSHash.new(4, n_components=10, window_size=128, seed=2)
    a.score_update(X[:900])
    np.savez(tmp_path / "r.npz", **a.arrays())
    with np.load(tmp_path / "r.npz", allow_pickle=False) as f:
        b = RSHash.from_arrays(dict(f), 4, a.params())
    assert np.array_equal(a.score_update(X[900:]), b.score_update(X[900:]))
    assert np.array_equal(a.score(X[:50]), a.score(X[:50]))  # scoring alone learns nothing


def test_rshash_prequential_quality_on_shuttle():
    X, y = load_csv("shuttle")
    s = RSHash.new(X.shape[1], seed=0).score_update(X)
    assert roc_auc_score(y, s) >= 0.9


def test_train_rshash_cli_serves_prequentially(tmp_path):
    from outlierd.core.registry import Registry

    from conftest import run_cli

    rng = np.random.default_rng(0)
    data = tmp_path / "d.csv"
    np.savetxt(data, rng.standard_normal((600, 3)), delimiter=",", header="a,b,c", comments="")
    r = run_cli("train", "--data", str(data), "--registry", str(tmp_path / "reg"), "--model", "r", "--detector", "rshash", "--quiet")
    assert r.returncode == 0, r.stderr
    model = Registry(tmp_path / "reg").load("r", 1)
    assert model.streaming and model.kind == "rshash"
    X = rng.standard_normal((300, 3))
    twin = RSHash.from_arrays({k: v for k, v in model.stream.snapshot()[0].items()}, 3, model.manifest["detector"]["params"])
    assert np.array_equal(model.score_update(X), twin.score_update(X))
