"""`outlierd demo` end to end, small: train, serve (real `outlierd serve` subprocess), stream with
injected anomalies, retrain and move the alias mid-stream, stop with SIGTERM."""

import io
import re

import numpy as np
import pytest

from outlierd.core.registry import Registry
from outlierd import demo


def test_generate_payments_injects_known_anomalies():
    X, kind = demo.generate_payments(20_000, np.random.default_rng(0), anomaly_rate=0.05)
    assert X.shape == (20_000, len(demo.FEATURES)) and np.isfinite(X).all()
    assert kind.dtype == np.int8 and set(np.unique(kind)) == {-1, 0, 1, 2, 3}
    assert 0.04 < (kind >= 0).mean() < 0.06
    col = {name: X[:, j] for j, name in enumerate(demo.FEATURES)}
    normal = kind < 0
    # each kind breaks the structure it is named after
    assert col["log_amount_vs_typical"][kind == 0].min() > np.percentile(col["log_amount_vs_typical"][normal], 99)
    assert col["log_speed_kmh"][kind == 1].min() > np.percentile(col["log_speed_kmh"][normal], 99)
    assert col["txns_last_1h"][kind == 2].min() > col["txns_last_1h"][normal].max()
    _, clean = demo.generate_payments(20_000, np.random.default_rng(0))
    assert (clean < 0).all()  # no anomaly_rate: clean traffic


def test_demo_end_to_end(tmp_path):
    out = io.StringIO()
    reg = tmp_path / "registry"
    s = demo.run_demo(reg, records=50_000_000, seconds=5.0, batch=128, train_records=3_000, retrain_at=0.1, seed=3, out=out)
    text = out.getvalue()
    assert s.ok, text
    # it streamed, answered every message, and stopped gracefully
    assert s.records > 10_000 and s.errors == 0 and s.records == s.messages * 128, text
    assert s.server_exit_code == 0, text
    # the injected anomalies are found, and most flags are real
    assert s.injected > 0 and s.recall > 0.7 and s.precision > 0.4, text
    assert sum(k["injected"] for k in s.by_kind.values()) == s.injected
    assert s.by_kind["card_testing_burst"]["caught"] / s.by_kind["card_testing_burst"]["injected"] > 0.9, text
    # the switch: version 1, then version 2 after the alias move, seen within a few seconds
    assert s.versions_seen == [1, 2], text
    assert 0 < s.switch_latency_s < 5.0, text
    assert Registry(reg).resolve(demo.MODEL, demo.ALIAS) == 2
    assert ">>> SWITCH" in text and "responses now come from version 2" in text
    assert re.search(r"t=\s*\d+\.\ds\s+v1\s+[\d,]+ records", text), text
    assert "demo OK" in text
    assert (reg / ".demo-data" / "server.log").is_file()


def test_demo_rejects_bad_bounds(tmp_path):
    with pytest.raises(ValueError, match="--records"):
        demo.run_demo(tmp_path, records=0)
    with pytest.raises(ValueError, match="--seconds"):
        demo.run_demo(tmp_path, seconds=0)


def test_cli_demo_parses_and_dispatches(monkeypatch):
    from outlierd import cli

    seen = {}

    class Done:
        ok = True

    def fake(registry, **kw):
        seen.update(kw, registry=registry)
        return Done()

    monkeypatch.setattr(demo, "run_demo", fake)
    # the vector demo is --vectors since raw events became the default (tests/test_demo_events.py)
    assert cli.main(["demo", "--vectors", "--records", "1000", "--seconds", "2", "--port", "0"]) == 0
    assert seen["registry"] is None and seen["records"] == 1000 and seen["seconds"] == 2.0 and seen["port"] == 0
    assert seen["train_records"] == demo.DEFAULT_TRAIN_RECORDS and seen["anomaly_rate"] == demo.DEFAULT_ANOMALY_RATE
