"""`outlierd retrain-policy` and monitoring.trigger: on demand, sustained drift, schedule, failures.

Drift triggers are tested against a real HTTP server on 127.0.0.1 that answers canned ``/metrics``
expositions -- written by the service's own ``DriftGauges`` -- one per scrape.
"""

import http.server
import os
import signal
import socket
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import DriftGauges
from outlierd.monitoring.trigger import AUDIT_ACTION, CHALLENGER, DriftTracker, RetrainPolicy, WindowView, parse_window
from outlierd.cli import main
from outlierd.training.train import train

MODEL = "pay"
FEATURES = ("x0", "x1", "x2", "x3")
FAST = {"detector": "robust_z"}


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def setup(tmp_path):
    """A registry whose champion is version 1, and a small training file."""
    rng = np.random.default_rng(0)
    data = tmp_path / "train.csv"
    with open(data, "w") as f:
        f.write(",".join(FEATURES) + "\n")
        np.savetxt(f, rng.normal(size=(300, len(FEATURES))), delimiter=",")
    reg = tmp_path / "reg"
    train(data, reg, MODEL, detector="robust_z", alias="champion", quiet=True)
    return Registry(reg), data


def exposition(drift=(), records=2000, model=MODEL):
    """The service's /metrics text for one evaluated window: features in ``drift`` at state 2."""
    r = CollectorRegistry()
    g = DriftGauges(r)
    for f in FEATURES:
        g.state.labels(model, f).set(2 if f in drift else 0)
        g.psi.labels(model, f).set(0.41 if f in drift else 0.01)
        g.wasserstein.labels(model, f).set(0.0)
    g.score_ks.labels(model).set(0.05)
    g.alert_rate.labels(model).set(0.01)
    g.alert_rate_p.labels(model).set(0.5)
    g.window_records.labels(model).set(records)
    return generate_latest(r).decode()


class CannedMetrics:
    """/metrics on 127.0.0.1: the n-th scrape gets pages[n] (the last page once they run out); the
    first scrape past the pages calls ``then`` (e.g. a policy's stop), so tests do not race a clock."""

    def __init__(self, pages, then=None):
        self.pages, self.scrapes, self.then = list(pages), 0, then
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                page = outer.pages[min(outer.scrapes, len(outer.pages) - 1)]
                outer.scrapes += 1
                if outer.scrapes == len(outer.pages) + 1 and outer.then is not None:
                    outer.then()  # before answering: this is the client's last scrape
                body = page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _policy(reg, data, lines, **kw):
    kw.setdefault("interval", 0.05)
    return RetrainPolicy(reg.root, MODEL, data, train=train, train_kwargs=FAST, log=lines.append, **kw)


def _triggers(reg):
    return [r for r in reg.audit(MODEL) if r["action"] == AUDIT_ACTION]


# ---------------------------------------------------------------------------------- pure logic


def test_parse_window_reads_the_service_exposition():
    w = parse_window(exposition(drift=("x3",), records=1500) + exposition(drift=("x1",), model="other"), MODEL)
    assert w.records == 1500 and w.judged
    assert w.states == {"x0": 0, "x1": 0, "x2": 0, "x3": 2}
    assert w.psi["x3"] == pytest.approx(0.41) and w.score_ks == pytest.approx(0.05)
    assert parse_window(exposition(), "absent") is None
    assert parse_window("# nothing here\n", MODEL) is None


def test_tracker_counts_consecutive_judged_windows_per_feature():
    t = DriftTracker(3)

    def win(*drift, records=2000):
        return WindowView(records, {f: 2 if f in drift else 1 for f in FEATURES}, {f: 0.3 for f in drift})

    assert t.update(win("x3")) == [] and t.update(win("x3")) == []
    assert t.update(win("x1")) == []  # x3's run ends; the same feature must drift N windows in a row
    assert t.update(win("x1", "x3")) == [] and t.update(win("x1", "x3")) == ["x1"]
    t.reset()
    assert t.update(win("x1")) == [] and t.update(win("x1")) == []
    assert t.update(win("x1", records=0)) == []  # an empty (unjudged) window breaks the run
    assert t.update(win("x1")) == [] and t.update(None) == [] and t.update(win("x1")) == []
    with pytest.raises(ValueError, match="sustained"):
        DriftTracker(0)


# ---------------------------------------------------------------------------------- triggers


def test_on_demand_publishes_a_challenger_and_audits(setup, capsys):
    reg, data = setup
    rc, out, err = _run(capsys, "retrain-policy", "--registry", reg.root, "--model", MODEL, "--data", data, "--now",
                        "--detector", "robust_z")
    assert rc == 0, err
    assert out.strip() == f"challenger: {MODEL} version 2 (on_demand: on demand)"
    assert reg.aliases(MODEL) == {"champion": 1, "challenger": 2}
    last = reg.audit(MODEL)[-1]
    assert last["action"] == AUDIT_ACTION and last["reason"] == "on demand" and last["kind"] == "on_demand"
    assert last["version"] == 2 and last["alias"] == CHALLENGER and last["result"] == "published"
    assert last["data"] == str(data.resolve()) and last["model"] == MODEL and "time" in last
    assert "retrain-policy " in err and "event=published" in err and "version=2" in err


def test_drift_for_two_windows_then_ok_does_not_trigger(setup):
    reg, data = setup
    pages = [exposition(("x3",)), exposition(("x3",)), exposition()] * 3 + [exposition()]
    lines = []
    with CannedMetrics(pages) as srv:
        policy = _policy(reg, data, lines, metrics_url=srv.url, sustained=3, max_seconds=30)
        srv.then = policy.stop
        got = policy.run()
    assert got == [] and srv.scrapes == len(pages) + 1 and "reason=stopped" in lines[-1]
    assert _triggers(reg) == [] and reg.aliases(MODEL) == {"champion": 1}
    assert any("drifting=x3:2" in ln for ln in lines) and not any("drifting=x3:3" in ln for ln in lines)


def test_three_consecutive_drifted_windows_trigger_exactly_once(setup):
    reg, data = setup
    # ok, then x3 drifts for 5 windows (3 to trigger, 2 more that must not re-trigger after the reset), then ok
    pages = [exposition()] + [exposition(("x3",))] * 5 + [exposition()]
    lines = []
    with CannedMetrics(pages) as srv:
        policy = _policy(reg, data, lines, metrics_url=srv.url, sustained=3, max_seconds=30)
        srv.then = policy.stop
        got = policy.run()
    assert srv.scrapes == len(pages) + 1
    assert len(got) == 1 and got[0].ok and got[0].kind == "drift" and got[0].version == 2
    assert got[0].reason == "drift sustained over 3 windows on x3 (psi 0.410)"
    [audit] = _triggers(reg)
    assert audit["reason"] == got[0].reason and audit["version"] == 2 and audit["kind"] == "drift"
    assert reg.aliases(MODEL) == {"champion": 1, "challenger": 2}
    # the trigger happened on the 4th scrape (1 ok + 3 drifted windows)
    window_lines = [ln for ln in lines if "event=window" in ln or "event=trigger" in ln]
    assert "event=trigger" in window_lines[4] and "drifting=x3:3" in window_lines[3]


def test_sustained_drift_through_the_cli(setup, capsys):
    reg, data = setup
    with CannedMetrics([exposition(("x1", "x2"))]) as srv:
        rc, out, err = _run(capsys, "retrain-policy", "--registry", reg.root, "--model", MODEL, "--data", data,
                            "--metrics-url", srv.url, "--sustained", 2, "--interval", 0.05, "--max-triggers", 1,
                            "--max-seconds", 10, "--detector", "robust_z")
    assert rc == 0, err
    assert srv.scrapes == 2
    assert out.strip() == f"challenger: {MODEL} version 2 (drift: drift sustained over 2 windows on x1 (psi 0.410), x2 (psi 0.410))"
    assert "event=stop" in err and "reason=max_triggers" in err
    assert reg.aliases(MODEL)["champion"] == 1


def test_schedule_triggers(setup):
    reg, data = setup
    lines = []
    got = _policy(reg, data, lines, every=0.2, max_triggers=2, max_seconds=10).run()
    assert [(t.kind, t.reason, t.version) for t in got] == [("schedule", "schedule", 2), ("schedule", "schedule", 3)]
    assert [(a["reason"], a["version"]) for a in _triggers(reg)] == [("schedule", 2), ("schedule", 3)]
    assert reg.aliases(MODEL) == {"champion": 1, "challenger": 3}


def test_unreachable_metrics_url_is_logged_and_retried(setup):
    reg, data = setup
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines = []
    got = _policy(reg, data, lines, metrics_url=f"http://127.0.0.1:{port}/metrics", max_seconds=0.4).run()
    assert got == [] and _triggers(reg) == []
    failed = [ln for ln in lines if "event=scrape_failed" in ln]
    assert len(failed) >= 2 and "level=warning" in failed[0]
    assert "reason=max_seconds" in lines[-1]


def test_sigterm_stops_the_loop(setup):
    reg, data = setup
    lines = []
    policy = _policy(reg, data, lines, every=3600, max_seconds=20)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    with policy.handle_signals():
        timer.start()
        assert policy.run() == []
    timer.join()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert "reason=SIGTERM" in lines[-1]


def test_failed_training_is_audited_and_the_loop_goes_on(setup, tmp_path):
    reg, _ = setup
    bad = tmp_path / "captures"
    bad.mkdir()  # a capture directory with no data file yet
    lines = []
    got = _policy(reg, bad, lines, every=0.1, max_triggers=2, max_seconds=10).run()
    assert len(got) == 2 and not any(t.ok for t in got) and "holds no data file" in got[0].error
    assert [a["result"] for a in _triggers(reg)] == ["failed", "failed"]
    assert reg.aliases(MODEL) == {"champion": 1}
    # a capture arrives: the next trigger trains on the newest file of the directory
    # (with the champion's four features: a challenger with others is refused at publish)
    (bad / "old.csv").write_text("x0,x1,x2,x3\n" + "\n".join(f"{i},{i % 7},{i % 3},{i % 11}" for i in range(200)) + "\n")
    newest = bad / "new.csv"
    newest.write_text("x0,x1,x2,x3\n" + "\n".join(f"{i % 5},{i},{i % 13},{i % 2}" for i in range(200)) + "\n")
    os.utime(bad / "old.csv", (1, 1))
    t = _policy(reg, bad, lines, every=1).trigger_now()
    assert t.ok and t.data == str(newest.resolve()) and reg.aliases(MODEL)["challenger"] == t.version


# ---------------------------------------------------------------------------------- CLI errors


def test_cli_missing_data_is_one_error_line(setup, capsys, tmp_path):
    reg, _ = setup
    rc, out, err = _run(capsys, "retrain-policy", "--registry", reg.root, "--model", MODEL,
                        "--data", tmp_path / "nope.csv", "--now")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outlierd: error: data ") and "nope.csv" in lines[0]
    assert "no such file or directory" in lines[0]
    assert _triggers(reg) == []


def test_cli_nothing_to_trigger_on(setup, capsys):
    reg, data = setup
    rc, out, err = _run(capsys, "retrain-policy", "--registry", reg.root, "--model", MODEL, "--data", data)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("outlierd: error: nothing to trigger on")
    rc, out, err = _run(capsys, "retrain-policy", "--registry", reg.root, "--model", MODEL, "--data", data,
                        "--metrics-url", "127.0.0.1:9100/metrics")
    assert rc == 2 and "http://" in err


def test_registry_record_validates_and_appends(setup):
    reg, _ = setup
    reg.record(MODEL, "note", reason="manual check", n=3)
    last = reg.audit(MODEL)[-1]
    assert (last["action"], last["model"], last["reason"], last["n"]) == ("note", MODEL, "manual check", 3)
    for bad in ({"time": "x"}, {"obj": object()}):
        with pytest.raises(ValueError):
            reg.record(MODEL, "note", **bad)
    with pytest.raises(ValueError):
        reg.record(MODEL, "")
    assert reg.audit(MODEL)[-1] == last
