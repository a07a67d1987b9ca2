"""``outlierd demo`` (raw events by default; ``--events`` names it too): trained on and streaming raw
payment events through the shipped spec; every injected fraud kind is caught."""

from __future__ import annotations

import io

import pytest

from outlierd import demo_events
from outlierd.demo_events import SPEC, run_events_demo
from outlierd.payments import FRAUD_KINDS


def test_events_demo_catches_every_fraud_kind(tmp_path):
    out = io.StringIO()
    s = run_events_demo(tmp_path / "reg", records=20000, train_records=30000, cards=500, incidents=40, seed=3, out=out)
    text = out.getvalue()
    assert s.events > 20000 and s.ok
    for kind in FRAUD_KINDS:
        caught, total = s.incidents[kind]
        assert total == 10 and caught >= 8, (kind, caught, text)
        assert kind in text
    assert s.flagged / s.events < 0.1  # alerts stay rare
    assert "demo OK" in text
    assert (tmp_path / "reg" / ".demo-data" / "server.log").is_file()  # the demo's files stay out of the registry's names


def test_cli_demo_defaults_to_raw_events(monkeypatch):
    from outlierd import cli

    seen: list[dict] = []

    class Done:
        ok = True

    def fake(registry, **kw):
        seen.append(dict(kw, registry=registry))
        return Done()

    monkeypatch.setattr(demo_events, "run_events_demo", fake)
    assert cli.main(["demo"]) == 0  # what `make demo` runs, less --registry
    assert cli.main(["demo", "--events", "--records", "5000", "--seconds", "3", "--anomaly-rate", "0.05", "--batch", "64",
                     "--train-records", "2000", "--alert-rate", "0.02", "--seed", "7", "--port", "0"]) == 0
    d, given = seen
    assert d["registry"] is None and d["records"] == 100_000 and d["train_records"] == 100_000 and d["batch"] == 256
    # 200 incidents per 100,000 payments, as before the default changed
    assert round(d["anomaly_rate"] * d["records"] / demo_events._EVENTS_PER_INCIDENT) == 200
    assert given == dict(registry=None, records=5000, train_records=2000, batch=64, seconds=3.0, anomaly_rate=0.05,
                         alert_rate=0.02, port=0, seed=7)
    with pytest.raises(SystemExit):  # one demo or the other
        cli.main(["demo", "--events", "--vectors"])


def test_events_demo_rejects_bad_bounds(tmp_path):
    with pytest.raises(ValueError, match="--seconds"):
        run_events_demo(tmp_path, seconds=0)
    with pytest.raises(ValueError, match="--anomaly-rate"):
        run_events_demo(tmp_path, anomaly_rate=0.7)
    with pytest.raises(ValueError, match="--records"):
        run_events_demo(tmp_path, records=10)


def test_the_packaged_spec_is_the_repository_s():
    from conftest import ROOT

    assert SPEC.read_bytes() == (ROOT / "data" / "payments.features.json").read_bytes()
