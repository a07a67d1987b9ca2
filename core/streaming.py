"""Detectors that learn while they score: one scorer interface and their checkpoints.

A streaming detector (``core.hst.HalfSpaceTrees``, ``core.rshash.RSHash``) has ``score(X)``
(state unchanged), ``update(X)`` (learn, in order) and ``score_update(X)`` (prequential: score each
record, then learn it), and keeps its state as fixed-size arrays plus a stream position.
:class:`StreamingScorer` puts one behind :class:`core.model.Model` with the artifact's
preprocessing, and a lock: a detector's state has exactly one writer at a time.

A checkpoint is a directory written under a temporary name and renamed into place (atomic):
``state.npz`` (the arrays, the position among them) and ``checkpoint.json`` (model, version, kind,
position, sha256 of state.npz). Never pickle. Restoring it and feeding the records after its
position gives the same scores, to the bit, as never having stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .artifact import fsync_dir, load_npz, sha256_file
from .errors import ArtifactError, UnsupportedError
from .preprocess import Preprocessing

STATE = "state.npz"
META = "checkpoint.json"


class Detector(Protocol):
    position: int

    def score(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray: ...
    def update(self, X: np.ndarray, parallel: bool | None = None) -> None: ...
    def score_update(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray: ...
    def arrays(self) -> dict[str, np.ndarray]: ...


class StreamingScorer:
    """A streaming detector behind the artifact's preprocessing. Calling it scores without learning
    (probe checks, ``Model.score``); ``score_update`` is what a server runs."""

    backend, device = "numba", "cpu"

    def __init__(self, detector: Detector, prep: Preprocessing, rebuild: Any) -> None:
        self.detector = detector
        self.prep = prep
        self._rebuild = rebuild  # arrays -> a detector of the same kind and parameters
        self.lock = threading.Lock()

    def __call__(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        Xp = self.prep.transform(X)
        with self.lock:
            return self.detector.score(Xp, parallel)

    def score_update(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        Xp = self.prep.transform(X)
        with self.lock:
            return self.detector.score_update(Xp, parallel)

    def update(self, X: np.ndarray, parallel: bool | None = None) -> None:
        Xp = self.prep.transform(X)
        with self.lock:
            self.detector.update(Xp, parallel)

    def snapshot(self) -> tuple[dict[str, np.ndarray], int]:
        """A consistent copy of the state and its position (taken under the lock)."""
        with self.lock:
            return {k: np.array(v, copy=True) for k, v in self.detector.arrays().items()}, int(self.detector.position)

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        det = self._rebuild(arrays)
        with self.lock:
            self.detector = det

    def explain(self, X: np.ndarray, top_k: int, threshold: float, flagged_only: bool,
                parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise UnsupportedError("streaming detectors have no explanation kernel")


def checkpoint_path(root: str | os.PathLike, model: str, version: int) -> Path:
    return Path(root) / model / f"v{version}"


def write_checkpoint(root: str | os.PathLike, model: str, version: int, kind: str, arrays: dict[str, np.ndarray],
                     position: int) -> Path:
    """Write ``arrays`` (a :meth:`StreamingScorer.snapshot`) as the checkpoint of ``model`` version
    ``version``, replacing the previous one atomically. Returns its directory."""
    dest = checkpoint_path(root, model, version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        with open(tmp / STATE, "wb") as f:
            named: dict[str, Any] = dict(arrays)  # Any: not savez's allow_pickle
            np.savez(f, **named)
            f.flush()
            os.fsync(f.fileno())
        meta = {"model": model, "version": int(version), "kind": kind, "position": int(position),
                "written_at": time.time(), "sha256": {STATE: sha256_file(tmp / STATE)}}
        with open(tmp / META, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        old = dest.with_name(dest.name + ".old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(dest, old)  # a crash between the two renames leaves .old, which read_checkpoint falls back to
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_checkpoint(root: str | os.PathLike, model: str, version: int) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """``(meta, arrays)`` of the checkpoint of ``model`` version ``version``, or None when there is
    none. A checkpoint whose checksum does not match is refused (ArtifactError)."""
    dest = checkpoint_path(root, model, version)
    for d in (dest, dest.with_name(dest.name + ".old")):
        if (d / META).is_file():
            break
    else:
        return None
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
        want = meta["sha256"][STATE]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{d / META} is unreadable: {e}") from e
    if sha256_file(d / STATE) != want:
        raise ArtifactError(f"{d / STATE} does not match its checksum in {META}: the checkpoint is corrupt")
    return meta, load_npz(d / STATE)
