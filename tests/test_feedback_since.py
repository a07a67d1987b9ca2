"""``outlierd feedback stats --since``: quality over a recent window (issue 14, the README list)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pytest
from conftest import run_cli
from sklearn.ensemble import IsolationForest

from outlierd.core.registry import Registry
from outlierd.feedback_cli import parse_duration
from outlierd.monitoring.store import LabelRow, open_store
from outlierd.training.export import export_sklearn

DAY = 86400.0


def test_stats_since_counts_only_the_window(tmp_path, rng):
    X = rng.standard_normal((300, 3))
    reg = Registry(tmp_path / "reg")
    reg.publish("m", export_sklearn(IsolationForest(n_estimators=5).fit(X), tmp_path / "a", X_train=X), aliases=("champion",))
    store = open_store(reg.root / "feedback.sqlite")
    now = time.time()
    for tag, ts, n_flagged in (("old", now - 3 * DAY, 8), ("new", now - 60, 4)):
        n = 20
        flagged = np.arange(n) < n_flagged
        store.add_predictions("m", 1, "champion", [f"{tag}{i}" for i in range(n)], X[:n].astype(np.float32), rng.random(n),
                              flagged, ~flagged, 5.0, ts, sample_rate=0.5)
        store.add_labels("m", [LabelRow(f"{tag}{i}", "anomaly" if i % 2 == 0 else "normal", ts=ts) for i in range(n_flagged)])
    store.close()
    common = ("feedback", "stats", "--registry", str(reg.root), "--model", "m", "--json")
    everything = json.loads(run_cli(*common).stdout)
    recent = run_cli(*common, "--since", "1d")
    assert recent.returncode == 0, recent.stderr
    window = json.loads(recent.stdout)
    assert (everything["labels"], everything["captured_flagged"]) == (12, 12)
    assert (window["labels"], window["captured_flagged"], window["reviewed_flagged"]) == (4, 4, 4)
    assert abs(window["since"] - (now - DAY)) < 60
    text = run_cli("feedback", "stats", "--registry", str(reg.root), "--model", "m", "--since", "24h").stdout
    assert "captures and labels of the last 1d" in text
    with pytest.raises(argparse.ArgumentTypeError, match="'soon' is not a duration"):
        parse_duration("soon")
    assert [parse_duration(t) for t in ("90s", "30m", "24h", "7d", "15")] == [90, 1800, 86400, 7 * 86400, 15]
