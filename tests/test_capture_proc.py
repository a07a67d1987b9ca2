"""The capture store in a child process (monitoring/capture_proc.py): frames round-trip, the rows
stored are the ones offered, a store that cannot be written and a child that dies are counted as
dropped and capture resumes, and nothing is lost on close."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from outlierd.monitoring import capture_proc
from outlierd.monitoring.capture import CaptureWriter
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.monitoring.store import open_store


def _handle(d: int, name: str = "m", version: int = 3):
    return SimpleNamespace(name=name, version=version, model=SimpleNamespace(n_features=d))


def _value(reg: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_frames_round_trip(rng):
    ks, d = [3, 4, 2], 5
    n = sum(ks)
    X = rng.standard_normal((n, d)).astype(np.float32)
    scores, flagged = rng.random(n), rng.random(n) < 0.5
    local = np.array([0, 5, 9, 1, 2, 3, 7, 4, 250])
    ids = [["a\n\"é", "b", "c"], None, ["x", "y"]]  # any text survives (JSON); None: generated in the child
    frame = capture_proc.pack("m", 4, "challenger", "tok", ks, ids, [(0, 0), (17, 99), (0, 0)], X, scores, flagged, local,
                              rng.random(n), 12.5, 0.01, 9)
    hlen, blen = capture_proc._PREFIX.unpack(frame[:8])
    assert len(frame) == 8 + hlen + blen
    h, a = capture_proc.unpack(frame[8:8 + hlen], frame[8 + hlen:])
    assert (h["seq"], h["model"], h["version"], h["role"], h["ts"], h["sample_rate"]) == (9, "m", 4, "challenger", 12.5, 0.01)
    assert capture_proc.record_ids(h, a["local"]) == ["a\n\"é", "b", "c", "gen:tok:17:99:1", "gen:tok:17:99:2", "gen:tok:17:99:3",
                                                      "gen:tok:17:99:7", "x", "y"]
    np.testing.assert_array_equal(a["X"], X)
    np.testing.assert_array_equal(a["scores"], scores)
    np.testing.assert_array_equal(a["flagged"].astype(bool), flagged)
    with pytest.raises(ValueError, match="body"):
        capture_proc.unpack(frame[8:8 + hlen], frame[8 + hlen:] + b"x")


def test_child_process_stores_every_flagged_record_and_the_sample(tmp_path, rng):
    reg = CollectorRegistry()
    metrics = ServiceMetrics(reg)
    path = tmp_path / "fb.sqlite"
    w = CaptureWriter.in_process(path, sample_rate=0.05, metrics=metrics, seed=int(rng.integers(2**31))).start()
    h, d = _handle(6), 6
    sent = {}
    for k in range(30):
        X = rng.standard_normal((300, d)).astype(np.float32)
        scores = rng.random(300)
        flagged = scores > 0.98
        ids = [f"k{k}-{i}" for i in range(300)]
        assert w.offer(h, "champion", ids, X, scores, flagged, 3.0, k)
        sent.update({ids[i]: (X[i], scores[i], flagged[i]) for i in range(300)})
    assert w.flush(30)
    w.close()
    s = open_store(path)
    p = s.predictions("m")
    s.close()
    assert {r for r, f in zip(p.record_id, p.flagged) if f} == {r for r, v in sent.items() if v[2]}
    assert p.sampled.sum() > 0 and (p.flagged ^ p.sampled).all()
    for i, rid in enumerate(p.record_id):
        np.testing.assert_array_equal(p.X[i], sent[rid][0])
        assert p.score[i] == sent[rid][1]
    assert set(p.version) == {3} and set(p.role) == {"champion"} and (p.latency_us == 3.0).all()
    assert w.captured == len(p) == _value(reg, "outlierd_captured_total", {"model": "m", "role": "champion"})
    assert w.dropped == 0


def test_unwritable_store_is_counted_as_dropped_and_scoring_never_waits(tmp_path):
    reg = CollectorRegistry()
    metrics = ServiceMetrics(reg)
    (tmp_path / "dir.sqlite").mkdir()  # SQLite cannot open a directory (chmod does not stop root)
    w = CaptureWriter.in_process(tmp_path / "dir.sqlite", sample_rate=0.0, metrics=metrics).start()
    h = _handle(2)
    flagged = np.array([True, False, True])
    t0 = time.perf_counter()
    for k in range(50):
        assert w.offer(h, "champion", [f"a{k}-{i}" for i in range(3)], np.zeros((3, 2), np.float32), np.ones(3), flagged)
    assert time.perf_counter() - t0 < 1.0  # offers never wait for the store
    assert w.flush(30)
    w.close()
    assert w.captured == 0 and w.dropped == 100
    assert _value(reg, "outlierd_capture_dropped_total", {"model": "m", "reason": "write_error"}) == 100


def test_a_killed_child_is_counted_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_proc, "RESTART_BACKOFF_S", 0.0)
    path = tmp_path / "fb.sqlite"
    w = CaptureWriter.in_process(path, sample_rate=0.0).start()
    h = _handle(2)
    flagged = np.ones(4, dtype=bool)

    def send(tag: str) -> None:
        w.offer(h, "champion", [f"{tag}{i}" for i in range(4)], np.zeros((4, 2), np.float32), np.ones(4), flagged)

    send("a")
    assert w.flush(30) and w.captured == 4
    first = w._process._proc
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    send("b")  # written to a dead pipe, or lost with the child: either way counted, never raised
    assert w.flush(30)
    deadline = time.monotonic() + 30
    resends = 0
    while w.captured < 8 and time.monotonic() < deadline:  # a new child takes the next writes
        send("c")
        resends += 1
        assert w.flush(30)
    w.close()
    assert w._process._proc is not first
    s = open_store(path)
    stored = s.predictions("m").record_id
    s.close()
    assert stored[:4] == ["a0", "a1", "a2", "a3"] and len(stored) >= 8  # captures after the kill landed
    assert w.captured == len(stored)  # every counted capture is in the store ...
    assert w.captured + w.dropped == 4 * (2 + resends)  # ... and every other record was counted as dropped


def test_the_child_generates_ids_for_records_sent_without(tmp_path, rng):
    path = tmp_path / "fb.sqlite"
    w = CaptureWriter.in_process(path, sample_rate=1.0, token="tok").start()
    h = _handle(3)
    Xs = [rng.standard_normal((n, 3)).astype(np.float32) for n in (2, 4)]
    w.offer(h, "champion", [], Xs[0], rng.random(2), np.zeros(2, bool), request_id=5)
    w.offer(h, "champion", ["own0", "own1", "own2", "own3"], Xs[1], rng.random(4), np.zeros(4, bool), request_id=6)
    w.offer(h, "champion", [], Xs[0], rng.random(2), np.zeros(2, bool), request_id=5)  # same request_id: still unique
    assert w.flush(30)
    w.close()
    s = open_store(path)
    p = s.predictions("m")
    s.close()
    assert p.record_id == ["gen:tok:1:5:0", "gen:tok:1:5:1", "own0", "own1", "own2", "own3", "gen:tok:2:5:0", "gen:tok:2:5:1"]
    np.testing.assert_array_equal(p.X, np.concatenate([Xs[0], Xs[1], Xs[0]]))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_the_child_runs_only_on_idle_cpu_behind_a_wide_pipe(tmp_path, rng):
    w = CaptureWriter.in_process(tmp_path / "fb.sqlite", sample_rate=1.0).start()
    try:
        w.offer(_handle(2), "champion", ["a", "b"], rng.standard_normal((2, 2)).astype(np.float32), rng.random(2), np.zeros(2, bool))
        assert w.flush(30) and w.captured == 2
        child = w._process._proc
        assert child is not None and child.poll() is None
        assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE  # the server's threads always come first
        import fcntl

        cap = int(open("/proc/sys/fs/pipe-max-size").read())
        assert fcntl.fcntl(child.stdin.fileno(), fcntl.F_GETPIPE_SZ) >= min(capture_proc.PIPE_BYTES, cap)  # a frame fits at once
    finally:
        w.close()
