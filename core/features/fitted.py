"""A model's feature engine in its artifact: ``features.json`` holds the spec and what training
learned (category frequencies), checksummed with the other artifact files. JSON, never pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from .engine import FeatureEngine, FittedCategories
from .spec import FeatureSpec, SpecError, parse_spec

FEATURES_FILE = "features.json"
FORMAT = 1


def features_json(spec: FeatureSpec, fitted: FittedCategories) -> bytes:
    """The bytes of ``features.json`` for an artifact's ``extra_files``."""
    body = {"format": FORMAT, "spec": spec.to_json(), "categories": fitted.to_json()}
    return (json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def parse_features(obj: Any, where: str) -> tuple[FeatureSpec, FittedCategories]:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ArtifactError(f"{where}: not a features file of format {FORMAT}")
    try:
        return parse_spec(obj["spec"]), FittedCategories.from_json(obj.get("categories", {}))
    except (SpecError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: invalid feature spec: {e}") from e


def load_features(artifact: str | os.PathLike | None) -> tuple[FeatureSpec, FittedCategories] | None:
    """The spec and fitted categories of an artifact directory, or None when it takes feature vectors."""
    if artifact is None:
        return None
    path = Path(artifact) / FEATURES_FILE
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable: {e}") from e
    return parse_features(obj, str(path))


def engine_for(artifact: str | os.PathLike | None) -> FeatureEngine | None:
    """A fresh engine for the artifact's spec, or None when the model takes feature vectors."""
    loaded = load_features(artifact)
    return None if loaded is None else FeatureEngine(*loaded)
