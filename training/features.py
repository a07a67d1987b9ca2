"""Raw events for training and the offline replay: read events, learn the category frequencies,
replay every event in event-time order through the same engine the server runs, and put the spec
with what it learned into the artifact (``features.json``, checksummed like every other file)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from outlierd.core.artifact import read_manifest, rewrite_manifest, sha256_file
from outlierd.core.errors import DataError
from outlierd.core.features import (FEATURES_FILE, FeatureEngine, FeatureSpec, FittedCategories, decode_events, features_json,
                                    load_spec)

from .batch import data_files
from .data import read_table


def read_events(path: str | os.PathLike) -> pa.Table:
    """A file (.csv, .csv.gz, .tsv, .parquet) or a directory of them, as one table (files in path order)."""
    p = Path(path)
    if p.is_dir():
        files = data_files(p)
        if not files:
            raise DataError(f"events directory {p} holds no .csv, .tsv, .parquet or .pq files")
        tables = [read_table(f) for f in files]
        try:
            return pa.concat_tables(tables, promote_options="permissive")
        except pa.ArrowException as e:
            raise DataError(f"{p}: the event files do not share one schema: {e}") from e
    return read_table(p)


@dataclass
class Replayed:
    spec: FeatureSpec
    fitted: FittedCategories
    features: np.ndarray  # (n, len(spec.output_names)) float64, input order
    seconds: float
    stats: dict[str, int]


def replay(spec: FeatureSpec, events: pa.Table, fitted: FittedCategories | None = None) -> Replayed:
    """Every event's features as the online path would have computed them at that moment;
    ``fitted`` None: learn the category frequencies from ``events`` (training)."""
    t0 = time.perf_counter()
    batch = decode_events(events, spec)
    if fitted is None:
        fitted = FittedCategories.fit(spec, batch)
    engine = FeatureEngine(spec, fitted)
    out = engine.replay_batch(batch)
    return Replayed(spec, fitted, out, time.perf_counter() - t0, engine.stats())


def features_table(r: Replayed, events: pa.Table, keep: list[str]) -> pa.Table:
    """The replayed features as a table, ``keep`` columns of the events (ids, labels) first."""
    cols = {c: events.column(c) for c in keep}
    for j, name in enumerate(r.spec.output_names):
        cols[name] = pa.array(r.features[:, j])
    return pa.table(cols)


def load_feature_spec(path: str | os.PathLike) -> FeatureSpec:
    return load_spec(path)


def add_to_artifact(artifact: str | os.PathLike, spec: FeatureSpec, fitted: FittedCategories) -> None:
    """Write ``features.json`` into an unpublished artifact and list it (sha256) in the manifest."""
    root = Path(artifact)
    (root / FEATURES_FILE).write_bytes(features_json(spec, fitted))
    files = dict(read_manifest(root)["files"])
    files[FEATURES_FILE] = {"sha256": sha256_file(root / FEATURES_FILE), "bytes": (root / FEATURES_FILE).stat().st_size}
    rewrite_manifest(root, files=files, feature_spec={"file": FEATURES_FILE, "digest": spec.digest})
