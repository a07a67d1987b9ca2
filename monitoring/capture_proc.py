"""The capture store in a child process: SQLite's work off the server's GIL.

:class:`ProcessStore` is what the server's :class:`~monitoring.capture.CaptureWriter` writes to. Its
``add_predictions`` packs the rows into one frame and writes it to a child process
(``python -m monitoring.capture_proc PATH``), which stores them with
:meth:`~monitoring.store.SQLiteStore.add_predictions` and answers one status line per frame. A reader
thread turns those lines into the writer's counts (captured, or dropped with reason ``write_error``).

NOTE: why a process. In the server, the writer thread's inserts (a few microseconds of SQLite per
record, with the GIL taken and released around every statement) competed with the event loop for
the GIL: capture cost 14-22% of streaming throughput on 256-record messages (benchmarks/
test_bench_capture.py). In the child, SQLite runs on its own interpreter; the server's share is
packing arrays into bytes and one pipe write per transaction.

Frames (no pickle): ``<u4 header length><u4 body length>`` + a JSON header + the body, the arrays
named in the header in order (little-endian). Status lines are JSON. The child exits when its input
closes (the server stopped or died), after storing what it had read.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger("outlierd.capture")

_PREFIX = struct.Struct("<II")
# (name, dtype) of the body's arrays, in order; X is (n, d)
_ARRAYS = (("X", "<f4"), ("scores", "<f8"), ("flagged", "u1"), ("sampled", "u1"), ("latency_us", "<f8"))
RESTART_BACKOFF_S = 1.0
START_TIMEOUT_S = 60.0


def pack(model: str, version: int, role: str, record_ids: Sequence[str], X: np.ndarray, scores: np.ndarray,
         flagged: np.ndarray, sampled: np.ndarray, latency_us: np.ndarray, ts: float, sample_rate: float, seq: int) -> bytes:
    n = len(record_ids)
    X = np.ascontiguousarray(X, dtype="<f4").reshape(n, -1)
    arrays = (X, np.asarray(scores, dtype="<f8"), np.asarray(flagged, dtype=np.uint8), np.asarray(sampled, dtype=np.uint8),
              np.broadcast_to(np.asarray(latency_us, dtype="<f8"), (n,)))
    header = json.dumps({"seq": seq, "model": model, "version": int(version), "role": role, "n": n, "d": X.shape[1],
                         "ts": float(ts), "sample_rate": None if sample_rate != sample_rate else float(sample_rate),
                         "ids": list(record_ids)}).encode()
    body = b"".join(a.tobytes() for a in arrays)
    return b"".join((_PREFIX.pack(len(header), len(body)), header, body))


def unpack(header: bytes, body: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    h = json.loads(header)
    n, d = h["n"], h["d"]
    out, at = {}, 0
    for name, dtype in _ARRAYS:
        count = n * d if name == "X" else n
        a = np.frombuffer(body, dtype=dtype, count=count, offset=at)
        at += a.nbytes
        out[name] = a.reshape(n, d) if name == "X" else a
    if at != len(body):
        raise ValueError(f"capture frame body is {len(body)} bytes; its header describes {at}")
    return h, out


class ProcessStore:
    """The write side of the capture store, in a child process (see the module docstring).

    ``add_predictions`` returns once the frame is in the pipe (it blocks only while the pipe is full:
    that is the writer thread waiting, never scoring). ``on_result(model, role, n, error)`` is called
    from the reader thread for every frame, with ``error`` None once the rows are stored."""

    def __init__(self, path: str | os.PathLike, on_result: Callable[[str, str, int, str | None], None]):
        self.path = Path(path)
        self.on_result = on_result
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Condition()
        self._sent = 0      # frames written to the current child
        self._done = 0      # frames it answered
        self._pending: dict[int, tuple[str, str, int]] = {}  # seq -> (model, role, n): answered or lost
        self._seq = 0
        self._failed_at = -1e9
        self._closed = False

    # -- the writer thread's side -----------------------------------------------------------------

    def add_predictions(self, model: str, version: int, role: str, record_ids: Sequence[str], X: np.ndarray,
                        scores: np.ndarray, flagged: np.ndarray, sampled: np.ndarray, latency_us: float | np.ndarray,
                        ts: float | None = None, *, sample_rate: float = float("nan")) -> None:
        """Hand rows to the child. Raises OSError (nothing was sent) when no child runs and one
        cannot be started now."""
        proc = self._child()
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._pending[seq] = (model, role, len(record_ids))
        frame = pack(model, version, role, record_ids, X, scores, flagged, sampled, latency_us,
                     time.time() if ts is None else ts, sample_rate, seq)
        try:
            proc.stdin.write(frame)  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        except (OSError, ValueError) as e:  # the child died: this frame and any unanswered ones are lost
            self._child_lost(proc)
            raise OSError(f"capture process exited: {e}") from e

    def sync(self, timeout: float) -> bool:
        """Wait until the child answered every frame sent (stored or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Close the child's input: it stores what it read and exits."""
        self._closed = True
        proc = self._proc
        if proc is None:
            return
        try:
            proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("capture process still busy after %.1fs; killing it", timeout)
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(timeout)

    # -- the child -------------------------------------------------------------------------------

    def _child(self) -> subprocess.Popen:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return proc
        if self._closed:
            raise OSError("capture store is closed")
        if time.monotonic() - self._failed_at < RESTART_BACKOFF_S:
            raise OSError("capture process not running (restarting shortly)")
        if proc is not None:
            self._child_lost(proc)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the child keeps no metrics; the parent counts its answers
        try:
            proc = subprocess.Popen([sys.executable, "-m", "monitoring.capture_proc", str(self.path)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, bufsize=1 << 20)
        except OSError as e:
            self._failed_at = time.monotonic()
            raise OSError(f"cannot start the capture process: {e}") from e
        self._proc = proc
        self._reader = threading.Thread(target=self._read, args=(proc,), name="outlierd-capture-status", daemon=True)
        self._reader.start()
        return proc

    def _child_lost(self, proc: subprocess.Popen) -> None:
        """Every frame the child did not answer is reported lost (once)."""
        self._failed_at = time.monotonic()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        with self._lock:
            lost, self._pending = self._pending, {}
            self._lock.notify_all()
        for model, role, n in lost.values():
            self.on_result(model, role, n, "capture process exited")

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                entry = self._pending.pop(int(msg.get("seq", -1)), None)
                self._lock.notify_all()
            if entry is not None:
                self.on_result(entry[0], entry[1], entry[2], msg.get("error"))
        if not self._closed and proc is self._proc:
            log.error("capture process exited code=%s; restarting it on the next write", proc.poll())
            self._child_lost(proc)


# -- the child process ---------------------------------------------------------------------------


def _read_exactly(f, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        b = f.read(left)
        if not b:
            return None
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def main(argv: list[str] | None = None) -> int:
    from .store import StoreOpener

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m monitoring.capture_proc STORE_PATH", file=sys.stderr)
        return 2
    opener = StoreOpener(args[0])
    src, out = sys.stdin.buffer, sys.stdout
    try:
        while True:
            prefix = _read_exactly(src, _PREFIX.size)
            if prefix is None:
                return 0
            hlen, blen = _PREFIX.unpack(prefix)
            header, body = _read_exactly(src, hlen), _read_exactly(src, blen)
            if header is None or body is None:
                return 0
            h, a = unpack(header, body)
            error = None
            try:
                opener.get().add_predictions(h["model"], h["version"], h["role"], h["ids"], a["X"], a["scores"], a["flagged"].astype(bool),
                                             a["sampled"].astype(bool), a["latency_us"], h["ts"],
                                             sample_rate=float("nan") if h["sample_rate"] is None else h["sample_rate"])
            except Exception as e:  # reported to the server, which counts and logs it; the next frame is tried
                error = f"{type(e).__name__}: {e}"
            out.write(json.dumps({"seq": h["seq"], "error": error}) + "\n")
            out.flush()
    finally:
        opener.close()


if __name__ == "__main__":
    sys.exit(main())
