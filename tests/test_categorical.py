"""Categorical monitoring: unseen rate and PSI on the top values + other, against a NumPy oracle."""

from __future__ import annotations

import numpy as np

from outlierd.core.features.events import hash_text
from outlierd.monitoring.categorical import CategoryMonitor
from outlierd.monitoring.drift import EPS


def _oracle_psi(values: list[str], ref: dict[str, float], top: int) -> tuple[float, float]:
    tops = sorted(ref, key=lambda v: (-ref[v], v))[:top]
    r = np.array([ref[v] for v in tops] + [1 - sum(ref[v] for v in tops)])
    c = np.array([sum(x == v for x in values) for v in tops] + [sum(x not in tops for x in values)]) / len(values)
    c, r = np.maximum(c, EPS), np.maximum(r, EPS)
    return float(np.sum((c - r) * np.log(c / r))), sum(x not in ref for x in values) / len(values)


def test_window_psi_and_unseen_match_the_oracle():
    rng = np.random.default_rng(0)
    ref_values = [f"v{i}" for i in range(30)]
    p = 1 / np.arange(1, 31)
    p /= p.sum()
    ref = dict(zip(ref_values, p.tolist()))
    served = list(rng.choice(ref_values + ["new1", "new2"], 5000, p=np.append(p * 0.9, [0.05, 0.05])))
    monitor = CategoryMonitor({"mcc": ref}, top=10, window=5000)
    closed = monitor.observe({"mcc": hash_text(served[:2500])}) + monitor.observe({"mcc": hash_text(served[2500:])})
    assert len(closed) == 1
    d = closed[0]
    want_psi, want_unseen = _oracle_psi(served, ref, 10)
    assert d.events == 5000 and abs(d.unseen - want_unseen) < 1e-12 and abs(d.psi - want_psi) < 1e-9
    # the reference's own distribution has a small PSI; a shifted one a large one
    same = list(rng.choice(ref_values, 20000, p=p))
    assert CategoryMonitor({"mcc": ref}).report({"mcc": hash_text(same)})[0].psi < 0.01
    shifted = list(rng.choice(ref_values, 20000, p=p[::-1]))
    assert CategoryMonitor({"mcc": ref}).report({"mcc": hash_text(shifted)})[0].psi > 0.5
