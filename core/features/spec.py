"""The feature spec: a small JSON file naming the entity key, the event time and the features.

A public contract (users write these files; tools outside the project read them). Shape::

    {"version": 1, "entity": "card_id" | ["a", "b"], "time": "ts",
     "features": [{"name": ..., <one kind key>: ..., <options>}, ...],
     "state": {"max_entities": 1000000, "max_events": 256, "seen_values": 32}}   # optional

Kinds (the key that names the kind, and its options):

* ``numeric: COL`` with ``transform``: ``none`` (default), ``log1p``, ``clip`` (``min``/``max``);
* ``category: COL`` with ``encode``: ``frequency`` (share of the training events; unseen 0),
  ``ordinal`` (1..k in training order of frequency; unseen 0), ``hash`` (``buckets``, default 1024);
* ``new_for_entity: COL``: 1.0 when the entity has not had this value among its last
  ``state.seen_values`` distinct values, else 0.0;
* ``time_of_day: true`` / ``day_of_week: true``: two features, ``<name>_sin`` and ``<name>_cos`` (UTC);
* ``since_last: true``: seconds since the entity's previous event (NaN on its first);
* ``window: "10m"|"1h"|"24h"|seconds`` with ``agg``: ``count``, ``sum``, ``mean``, ``min``,
  ``max``, ``std`` (population, ddof 0), ``relative`` (the event's value / the window mean) and
  ``distinct`` (distinct values of a category column); every agg but count needs ``of: COL``.
  The window of an event at time t holds the entity's events with time in (t - w, t], itself
  included; equal times count in input order;
* ``distance_from_last: [LAT, LON]`` (km, haversine, R = 6371.0088) and ``speed_from_last: [LAT, LON]``
  (km/h; NaN when no time has passed): NaN on the entity's first event.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..errors import InvalidInputError

SPEC_VERSION = 1
KINDS = ("numeric", "category", "new_for_entity", "time_of_day", "day_of_week", "since_last", "window",
         "distance_from_last", "speed_from_last")
AGGS = ("count", "sum", "mean", "min", "max", "std", "relative", "distinct")
TRANSFORMS = ("none", "log1p", "clip")
ENCODINGS = ("frequency", "ordinal", "hash")
CYCLIC = ("time_of_day", "day_of_week")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_STATE_DEFAULTS = {"max_entities": 1_000_000, "max_events": 256, "seen_values": 32}


class SpecError(InvalidInputError):
    """A feature spec is malformed: the message names the feature and the key."""


def parse_window(value: Any, where: str) -> float:
    """Seconds of a window given as ``"90s"``, ``"10m"``, ``"1h"``, ``"7d"`` or a positive number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise SpecError(f"{where}: window must be like \"10m\", \"1h\", \"24h\", \"7d\" or a number of seconds; got {value!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise SpecError(f"{where}: window must be positive; got {value!r}")
    return seconds


@dataclass(frozen=True)
class Feature:
    """One feature of the spec (``kind`` is the key that named it; ``column`` its input column or
    columns; ``options`` the rest, validated)."""

    name: str
    kind: str
    column: tuple[str, ...] = ()
    window: float = 0.0
    agg: str = ""
    transform: str = "none"
    encode: str = ""
    buckets: int = 0
    clip: tuple[float, float] = (-math.inf, math.inf)

    @property
    def outputs(self) -> list[str]:
        return [f"{self.name}_sin", f"{self.name}_cos"] if self.kind in CYCLIC else [self.name]


@dataclass(frozen=True)
class FeatureSpec:
    entity: tuple[str, ...]
    time: str
    features: tuple[Feature, ...]
    max_entities: int = _STATE_DEFAULTS["max_entities"]
    max_events: int = _STATE_DEFAULTS["max_events"]
    seen_values: int = _STATE_DEFAULTS["seen_values"]
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    @cached_property
    def output_names(self) -> list[str]:
        """The replay's columns, in spec order (a cyclic feature gives ``_sin`` then ``_cos``)."""
        return [n for f in self.features for n in f.outputs]

    @cached_property
    def windows(self) -> list[float]:
        """Distinct window lengths in seconds, ascending."""
        return sorted({f.window for f in self.features if f.kind == "window"})

    @cached_property
    def value_columns(self) -> list[str]:
        """Numeric columns the windows aggregate (kept per event in the state), in first-use order."""
        cols: list[str] = []
        for f in self.features:
            if f.kind == "window" and f.agg not in ("count", "distinct") and f.column[0] not in cols:
                cols.append(f.column[0])
        return cols

    @cached_property
    def hashed_columns(self) -> list[str]:
        """Category columns kept per event (``distinct``) or per entity (``new_for_entity``) as hashes."""
        cols: list[str] = []
        for f in self.features:
            if (f.kind == "new_for_entity" or (f.kind == "window" and f.agg == "distinct")) and f.column[0] not in cols:
                cols.append(f.column[0])
        return cols

    @cached_property
    def geo_columns(self) -> tuple[str, str] | None:
        for f in self.features:
            if f.kind in ("distance_from_last", "speed_from_last"):
                return f.column[0], f.column[1]
        return None

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical JSON: the state of one spec is only ever restored into the same spec."""
        return hashlib.sha256(json.dumps(self.source, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return dict(self.source)


def _column(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: {key!r} must name a column (a non-empty string); got {value!r}")
    return value


def _feature(obj: Any, i: int, geo: list[tuple[str, ...]]) -> Feature:
    where = f"features[{i}]"
    if not isinstance(obj, dict):
        raise SpecError(f"{where} must be an object like {{\"name\": ..., \"window\": \"1h\", \"agg\": \"count\"}}; got {obj!r}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}: 'name' must be a non-empty string; got {name!r}")
    where = f"features[{i}] ({name!r})"
    kinds = [k for k in KINDS if k in obj]
    if len(kinds) != 1:
        raise SpecError(f"{where}: give exactly one of {', '.join(KINDS)}; got {kinds or 'none'}")
    kind = kinds[0]
    allowed = {"name", kind, *{"numeric": ("transform", "min", "max"), "category": ("encode", "buckets"),
                                "window": ("agg", "of")}.get(kind, ())}
    extra = sorted(set(obj) - allowed)
    if extra:
        raise SpecError(f"{where}: unknown key(s) {extra} for a {kind} feature; allowed: {sorted(allowed)}")
    value = obj[kind]
    if kind == "numeric":
        transform = obj.get("transform", "none")
        if transform not in TRANSFORMS:
            raise SpecError(f"{where}: transform must be one of {', '.join(TRANSFORMS)}; got {transform!r}")
        lo, hi = obj.get("min", -math.inf), obj.get("max", math.inf)
        if transform == "clip" and ("min" not in obj and "max" not in obj):
            raise SpecError(f"{where}: transform clip needs 'min' and/or 'max'")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo <= hi:
            raise SpecError(f"{where}: 'min' and 'max' must be numbers with min <= max; got {lo!r}, {hi!r}")
        return Feature(name, kind, (_column(value, where, kind),), transform=transform, clip=(float(lo), float(hi)))
    if kind == "category":
        encode = obj.get("encode", "frequency")
        if encode not in ENCODINGS:
            raise SpecError(f"{where}: encode must be one of {', '.join(ENCODINGS)}; got {encode!r}")
        buckets = obj.get("buckets", 1024 if encode == "hash" else 0)
        if encode == "hash" and (not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1):
            raise SpecError(f"{where}: buckets must be a positive integer; got {buckets!r}")
        return Feature(name, kind, (_column(value, where, kind),), encode=encode, buckets=int(buckets))
    if kind == "new_for_entity":
        return Feature(name, kind, (_column(value, where, kind),))
    if kind in (*CYCLIC, "since_last"):
        if value is not True:
            raise SpecError(f"{where}: {kind!r} must be true; got {value!r}")
        return Feature(name, kind)
    if kind in ("distance_from_last", "speed_from_last"):
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(c, str) and c for c in value)):
            raise SpecError(f"{where}: {kind!r} must be [LATITUDE_COLUMN, LONGITUDE_COLUMN]; got {value!r}")
        geo.append(tuple(value))
        return Feature(name, kind, tuple(value))
    # window
    seconds = parse_window(value, where)
    agg = obj.get("agg")
    if agg not in AGGS:
        raise SpecError(f"{where}: agg must be one of {', '.join(AGGS)}; got {agg!r}")
    if agg == "count":
        if "of" in obj:
            raise SpecError(f"{where}: agg count takes no 'of' (it counts the entity's events)")
        return Feature(name, kind, (), window=seconds, agg=agg)
    return Feature(name, kind, (_column(obj.get("of"), where, "of"),), window=seconds, agg=agg)


def parse_spec(obj: Any) -> FeatureSpec:
    """A :class:`FeatureSpec` from the parsed JSON, or :class:`SpecError` naming what is wrong."""
    if not isinstance(obj, dict):
        raise SpecError(f"a feature spec is a JSON object with version, entity, time and features; got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"version", "entity", "time", "features", "state", "description"})
    if unknown:
        raise SpecError(f"unknown top-level key(s) {unknown}; allowed: version, entity, time, features, state, description")
    if obj.get("version") != SPEC_VERSION:
        raise SpecError(f"'version' must be {SPEC_VERSION}; got {obj.get('version')!r}")
    entity = obj.get("entity")
    entities = [entity] if isinstance(entity, str) else entity
    if not (isinstance(entities, list) and entities and all(isinstance(c, str) and c for c in entities)):
        raise SpecError(f"'entity' must be a column name or a list of column names; got {entity!r}")
    time_col = _column(obj.get("time"), "the spec", "time")
    features = obj.get("features")
    if not isinstance(features, list) or not features:
        raise SpecError("'features' must be a non-empty list of feature objects")
    geo: list[tuple[str, ...]] = []
    parsed = tuple(_feature(f, i, geo) for i, f in enumerate(features))
    names = [n for f in parsed for n in f.outputs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"feature names must be unique; repeated: {dup}")
    if len(set(geo)) > 1:
        raise SpecError(f"distance_from_last and speed_from_last must use the same [lat, lon] columns; got {sorted(set(geo))}")
    state = obj.get("state", {})
    if not isinstance(state, dict) or set(state) - set(_STATE_DEFAULTS):
        raise SpecError(f"'state' must be an object with keys among {sorted(_STATE_DEFAULTS)}; got {state!r}")
    limits = {**_STATE_DEFAULTS, **state}
    for key, v in limits.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SpecError(f"state.{key} must be a positive integer; got {v!r}")
    return FeatureSpec(tuple(entities), time_col, parsed, limits["max_entities"], limits["max_events"], limits["seen_values"],
                       source=json.loads(json.dumps(obj)))


def load_spec(path: str | os.PathLike) -> FeatureSpec:
    """Read and validate a spec file (:class:`SpecError` with the file name on any problem)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise SpecError(f"cannot read feature spec {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise SpecError(f"feature spec {path} is not valid JSON: {e}") from e
    try:
        return parse_spec(obj)
    except SpecError as e:
        raise SpecError(f"feature spec {path}: {e.message}") from e
