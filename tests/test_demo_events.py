"""``outlierd demo --events``: trained on and streaming raw payment events through the shipped spec;
every injected fraud kind is caught."""

from __future__ import annotations

import io

from outlierd.demo_events import run_events_demo
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
