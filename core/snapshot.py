"""Freeze a streaming model's checkpoint as an artifact, to publish as a new registry version
(``outlierd registry snapshot``): a drifting stream's state can then be compared, served from
elsewhere, or rolled back to, like any version."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .artifact import ARRAYS, PROBE, REFERENCE, load_json, load_npz, read_manifest, write_artifact
from .errors import ArtifactError
from .model import load_model
from .streaming import read_checkpoint


def snapshot_artifact(src: str | os.PathLike, checkpoint_dir: str | os.PathLike, model: str, version: int,
                      dest: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """Write a copy of the artifact ``src`` (model ``model`` version ``version``) whose state is the
    checkpoint of that version under ``checkpoint_dir``; its probe scores are recomputed from that
    state. Returns ``(artifact directory, checkpoint meta)``; ArtifactError when there is no checkpoint."""
    src = Path(src)
    found = read_checkpoint(checkpoint_dir, model, version)
    if found is None:
        raise ArtifactError(f"no checkpoint of model {model!r} version {version} under {checkpoint_dir}")
    meta, state = found
    manifest = read_manifest(src)
    m = load_model(src)
    if not m.streaming:
        raise ArtifactError(f"model {model!r} version {version} ({m.kind}) does not learn while it scores: nothing to snapshot")
    m.stream.restore(state)
    arrays = {**load_npz(src / ARRAYS), **state}
    probe = load_npz(src / PROBE)
    lineage = {**manifest.get("lineage", {}),
               "snapshot": {"of_version": version, "position": int(meta["position"]), "checkpoint_written_at": meta.get("written_at")}}
    out = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="outlierd-snapshot-")) / "artifact"
    write_artifact(out, detector=manifest["detector"], feature_names=[f["name"] for f in manifest["features"]],
                   preprocessing=manifest.get("preprocessing", {}), threshold=float(manifest["threshold"]), arrays=arrays,
                   probe_X=probe["X"], probe_expected=m.score(probe["X"]),
                   probe_tolerance=manifest.get("probe", {"atol": 1e-9, "rtol": 1e-9}), reference=load_json(src / REFERENCE),
                   lineage=lineage, metrics=manifest.get("metrics"))
    return out, meta
