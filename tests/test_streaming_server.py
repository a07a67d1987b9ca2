"""A served streaming model (Half-Space Trees): it learns as it scores, checkpoints its state, and a
server killed with SIGKILL resumes from its last checkpoint with the scores of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from outlierd.core.model import load_model
from outlierd.core.preprocess import Preprocessing
from outlierd.core.registry import Registry
from outlierd.server.client import ScorerClient
from outlierd.training.detectors import fit_hst
from outlierd.training.export import export_detector
from outlierd.v1 import scoring_pb2 as pb

from conftest import ROOT, run_cli

D = 4


def _publish(root: Path, X_train: np.ndarray, alias: str = "champion") -> Path:
    spec, arrays = fit_hst(X_train, n_trees=6, height=7, window_size=50, seed=11)
    art = export_detector(root / "art", detector=spec, arrays=arrays, prep=Preprocessing.identity(D, np.median(X_train, axis=0)),
                          feature_names=[f"f{j}" for j in range(D)], threshold=0.9, X_train=X_train)
    reg = Registry(root / "reg")
    reg.publish("s", art, aliases=(alias,))
    return reg.path("s", 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(tmp: Path, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    log = open(tmp / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "outlierd", "serve", "--registry", str(tmp / "reg"), "--model", "s",
                             "--host", "127.0.0.1", "--metrics-port", "0", "--no-capture", "--no-drift", *args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _wait_ready(client: ScorerClient, proc, tmp: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        try:
            client.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=1.0)
            return
        except Exception:
            assert time.monotonic() < deadline, (tmp / "server.log").read_text()[-3000:]
            time.sleep(0.2)


def test_sigkill_resumes_from_last_checkpoint_with_uninterrupted_scores(tmp_path, rng):
    X_train = rng.random((300, D))
    art = _publish(tmp_path, X_train)
    stream = rng.random((3000, D)).astype(np.float32)
    stream[::211] += 1.5  # a few anomalies
    batches = np.array_split(np.arange(len(stream)), 60)  # 50 records a request
    # the uninterrupted run: the same artifact fed every record in order (float32, as the wire carries them)
    expected = load_model(art).score_update(stream)
    ckdir = tmp_path / "ck"
    meta_path = ckdir / "s" / "v1" / "checkpoint.json"
    port = _free_port()
    args = ("--port", str(port), "--checkpoint-dir", str(ckdir), "--checkpoint-interval-s", "0.2")
    got = np.full(len(stream), np.nan)
    with _serve(tmp_path, *args) as proc, ScorerClient(f"127.0.0.1:{port}") as client:
        _wait_ready(client, proc, tmp_path)
        for b in batches[:40]:
            got[b] = client.score(stream[b]).scores
        deadline = time.monotonic() + 20
        while not (meta_path.is_file() and json.loads(meta_path.read_text())["position"] >= 300 + 40 * 50 - 50):
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
        for b in batches[40:45]:  # learned, maybe not checkpointed: lost with the kill, replayed below
            got[b] = client.score(stream[b]).scores
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # scores before the kill are the uninterrupted run's
    assert np.array_equal(got[:45 * 50], expected[:45 * 50])
    position = json.loads(meta_path.read_text())["position"] - len(X_train)  # the artifact learned the training rows
    assert 0 < position <= 45 * 50
    with _serve(tmp_path, *args) as proc, ScorerClient(f"127.0.0.1:{port}") as client:
        _wait_ready(client, proc, tmp_path)
        after = np.concatenate([client.score(stream[i:i + 50]).scores for i in range(position, len(stream), 50)])
    assert "restored checkpoint model=s version=1" in (tmp_path / "server.log").read_text()
    assert np.array_equal(after, expected[position:])


def test_checkpoint_files_round_trip_and_corruption_is_refused(tmp_path, rng):
    from outlierd.core.errors import ArtifactError
    from outlierd.core.streaming import read_checkpoint, write_checkpoint

    art = _publish(tmp_path, rng.random((200, D)))
    a, b = load_model(art), load_model(art)
    X = rng.random((1000, D))
    a.score_update(X[:400])
    arrays, pos = a.stream.snapshot()
    write_checkpoint(tmp_path / "ck", "s", 1, "hst", arrays, pos)
    meta, restored = read_checkpoint(tmp_path / "ck", "s", 1)
    assert meta["position"] == 600 and meta["kind"] == "hst"
    b.stream.restore(restored)
    assert np.array_equal(a.score_update(X[400:]), b.score_update(X[400:]))
    state = tmp_path / "ck" / "s" / "v1" / "state.npz"
    state.write_bytes(state.read_bytes()[:-7] + b"corrupt")
    with pytest.raises(ArtifactError, match="checksum"):
        read_checkpoint(tmp_path / "ck", "s", 1)


def test_several_workers_refused_for_a_streaming_model(tmp_path, rng):
    _publish(tmp_path, rng.random((100, D)))
    r = run_cli("serve", "--registry", str(tmp_path / "reg"), "--model", "s", "--workers", "2", "--port", str(_free_port()),
                "--metrics-port", "0")
    assert r.returncode == 2
    assert "learns while it scores" in r.stderr and "--workers 1" in r.stderr
    assert "Traceback" not in r.stderr


def test_registry_snapshot_publishes_the_checkpointed_state(tmp_path, rng):
    from outlierd.core.streaming import write_checkpoint

    art = _publish(tmp_path, rng.random((200, D)))
    live = load_model(art)
    X = rng.random((1500, D))
    live.score_update(X[:900])
    arrays, pos = live.stream.snapshot()
    write_checkpoint(tmp_path / "ck", "s", 1, "hst", arrays, pos)
    r = run_cli("registry", "snapshot", "--registry", str(tmp_path / "reg"), "--model", "s", "--checkpoint-dir",
                str(tmp_path / "ck"), "--alias", "frozen")
    assert r.returncode == 0, r.stderr
    assert "version 2" in r.stdout and "position 1100" in r.stdout
    reg = Registry(tmp_path / "reg")
    assert reg.resolve("s", "frozen") == 2
    frozen = reg.load("s", "frozen")  # probe verified against the snapshot's state
    assert frozen.manifest["lineage"]["snapshot"] == {**frozen.manifest["lineage"]["snapshot"], "of_version": 1, "position": 1100}
    assert np.array_equal(frozen.score_update(X[900:]), live.score_update(X[900:]))
    r = run_cli("registry", "snapshot", "--registry", str(tmp_path / "reg"), "--model", "s", "--checkpoint-dir",
                str(tmp_path / "nothing"))
    assert r.returncode != 0 and "no checkpoint of model 's' version 1" in r.stderr and "Traceback" not in r.stderr
