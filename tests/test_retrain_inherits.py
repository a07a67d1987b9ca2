"""Retraining inherits the champion's training options; a challenger with other features is
refused at publish (issue 14 item 8).

Before: ``retrain-policy`` ignored the champion's label column, so ``label`` became an extra
feature, and the challenger was published, only to be refused by every server that loaded it.
"""

from __future__ import annotations

import pytest
from conftest import run_cli

from outlierd.core.errors import ArtifactError
from outlierd.core.registry import Registry
from outlierd.training.export import export_sklearn


def _data(path, rng, n=600, extra=False):
    X = rng.standard_normal((n, 4))
    y = (rng.random(n) < 0.05).astype(int)
    cols = ["a", "b", "c", "d"] + (["e"] if extra else []) + ["label"]
    rows = [list(map(float, x)) + ([1.0] if extra else []) + [int(t)] for x, t in zip(X, y)]
    path.write_text(",".join(cols) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def test_retrain_policy_trains_like_the_champion(tmp_path, rng):
    reg_dir = tmp_path / "reg"
    first = run_cli("train", "--data", str(_data(tmp_path / "d1.csv", rng)), "--registry", str(reg_dir), "--model", "m",
                    "--label-column", "label", "--detector", "hbos", "--alert-rate", "0.02", "--alias", "champion", "--quiet")
    assert first.returncode == 0, first.stderr
    # new data with one more column: the challenger keeps the champion's features, detector, labels, alert rate
    res = run_cli("retrain-policy", "--registry", str(reg_dir), "--model", "m", "--now",
                  "--data", str(_data(tmp_path / "d2.csv", rng, extra=True)))
    assert res.returncode == 0, res.stderr
    reg = Registry(reg_dir)
    champ, chal = (reg.get("m", a)["manifest"] for a in ("champion", "challenger"))
    assert [f["name"] for f in chal["features"]] == [f["name"] for f in champ["features"]] == ["a", "b", "c", "d"]
    params = chal["lineage"]["parameters"]
    assert (params["detector"], params["label_column"], params["alert_rate"]) == ("hbos", "label", 0.02)
    # a flag still overrides what is inherited
    res = run_cli("retrain-policy", "--registry", str(reg_dir), "--model", "m", "--now", "--detector", "iforest",
                  "--data", str(_data(tmp_path / "d3.csv", rng)))
    assert res.returncode == 0, res.stderr
    assert reg.get("m", "challenger")["manifest"]["lineage"]["parameters"]["detector"] == "iforest"


def test_a_challenger_with_other_features_is_refused_at_publish(tmp_path, rng):
    from sklearn.ensemble import IsolationForest

    reg = Registry(tmp_path / "reg")
    X4, X5 = rng.standard_normal((300, 4)), rng.standard_normal((300, 5))
    reg.publish("m", export_sklearn(IsolationForest(n_estimators=5).fit(X4), tmp_path / "a4", X_train=X4), aliases=("champion",))
    other = export_sklearn(IsolationForest(n_estimators=5).fit(X5), tmp_path / "a5", X_train=X5)
    with pytest.raises(ArtifactError, match=r"a challenger must have the champion's features \(version 1: 4 features\); this one has 5"):
        reg.publish("m", other, aliases=("challenger",))
    assert reg.aliases("m") == {"champion": 1} and len(reg.versions("m")) == 1  # nothing written
    # without the challenger alias it is an ordinary version; moving the alias to it is refused too
    v = reg.publish("m", other)
    res = run_cli("registry", "alias", "--registry", str(reg.root), "--model", "m", "challenger", str(v))
    assert res.returncode == 2 and "a challenger must have the champion's features" in res.stderr
    assert len(reg.versions("m")) == 2
