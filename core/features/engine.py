"""The feature engine: one stateful object that turns raw events into feature rows, used alike by
the offline replay (training, ``outlierd features replay``) and the server (raw events in).

``transform(events)`` processes a batch in input order and updates the per-entity state: that is
the online path. ``replay(events)`` sorts a batch by event time (stable: equal times keep input
order), runs ``transform`` on it and puts the rows back in input order: each event sees exactly
what the online path would have seen at that moment, never a later event. Same code, same state,
so a stream sent in event-time order gets bit-equal features online and offline.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import Any

import numpy as np

from . import kernel as K
from .events import Categories, EventBatch, decode_events, hash_text
from .spec import FeatureSpec

STATE_FORMAT = 1
_GROW = 1024  # first capacity in entities; doubled as needed up to spec.max_entities


class FittedCategories:
    """What training learns for ``category`` features: each column's values with their share of the
    training events (``frequency``) and their code (``ordinal``: 1..k by descending frequency)."""

    def __init__(self, columns: dict[str, dict[str, float]] | None = None) -> None:
        self.columns = columns or {}
        # per column: the values' hashes sorted, with each one's frequency and ordinal code
        self._tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._index: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        for c, table in self.columns.items():
            h = hash_text(list(table))
            order = np.argsort(h)
            freq = np.fromiter(table.values(), dtype=np.float64, count=len(table))
            self._tables[c] = (h[order], freq[order], (np.arange(len(table), dtype=np.float64) + 1.0)[order])
            # the serving path's lookup: a hash table on the values in training order
            self._index[c] = (*K.hash_index(h), freq, np.arange(len(table), dtype=np.float64) + 1.0)

    def _lookup(self, column: str, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(known?, frequency, code) of every row."""
        table = self._tables.get(column)
        if table is None or table[0].size == 0:
            z = np.zeros(hashes.shape[0])
            return z.astype(bool), z, z
        keys, freq, code = table
        at = np.minimum(np.searchsorted(keys, hashes), keys.size - 1)
        known = keys[at] == hashes
        return known, np.where(known, freq[at], 0.0), np.where(known, code[at], 0.0)

    @classmethod
    def fit(cls, spec: FeatureSpec, batch: EventBatch) -> FittedCategories:
        out: dict[str, dict[str, float]] = {}
        for f in spec.features:
            if f.kind == "category" and f.encode in ("frequency", "ordinal") and f.column[0] not in out:
                values, counts = batch.categories[f.column[0]].value_counts()
                order = np.lexsort((np.asarray(values, dtype=object).astype(str), -counts))
                n = max(batch.n, 1)
                out[f.column[0]] = {values[j]: float(counts[j]) / n for j in order if counts[j] > 0}
        return cls(out)

    def encode(self, column: str, how: str, cats: Categories, buckets: int, out: np.ndarray | None = None) -> np.ndarray:
        """Each row's code (``out``: written there, e.g. a column of the feature matrix)."""
        hashes = cats.hashes()
        if out is None:
            out = np.empty(hashes.shape[0])
        if how == "hash":
            out[:] = hashes.view(np.uint64) % np.uint64(buckets)
            return out
        index = self._index.get(column)
        if index is None:
            out[:] = 0.0
            return out
        keys, pos, freq, code = index
        K.lookup(keys, pos, freq if how == "frequency" else code, hashes, out)
        return out

    def unseen(self, column: str, cats: Categories) -> np.ndarray:
        """Per row: True when the value was not in training (for the categorical monitoring)."""
        return ~self._lookup(column, cats.hashes())[0]

    def to_json(self) -> dict[str, Any]:
        return {c: {"values": list(t), "frequency": list(t.values())} for c, t in self.columns.items()}

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the learned values and shares (two versions trained on the same events agree)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FittedCategories:
        return cls({c: dict(zip(t["values"], map(float, t["frequency"]))) for c, t in obj.items()})


class FeatureEngine:
    """Raw events -> float64 feature rows (``spec.output_names``), with per-entity state as arrays."""

    def __init__(self, spec: FeatureSpec, fitted: FittedCategories | None = None) -> None:
        self.spec = spec
        self.fitted = fitted or FittedCategories()
        self.windows = np.asarray(spec.windows, dtype=np.float64)
        self.value_cols = spec.value_columns
        self.hash_cols = spec.hashed_columns
        self.state: dict[str, np.ndarray] = {}
        self._bytes_of: tuple[dict[str, np.ndarray], int] | None = None
        self._allocate(0)
        self._plan_cache = self._plan()
        # the stateless features' columns, worked out once: (feature, first output column)
        self._stateless_plan = [(f, k) for f, k in zip(spec.features, np.cumsum([0] + [len(f.outputs) for f in spec.features]).tolist())
                                if f.kind in ("numeric", "category", "time_of_day", "day_of_week")]

    # -- state -------------------------------------------------------------------------------------

    def _allocate(self, cap: int) -> None:
        spec, old = self.spec, self.state
        Kr = 1 << (spec.max_events - 1).bit_length() if len(self.windows) else 1  # a power of two
        V, C, M = len(self.value_cols), len(self.hash_cols), spec.seen_values
        table = 1 << max(4, (2 * max(cap, 1) - 1).bit_length())
        new = {
            "meta": np.zeros(K.META_SIZE, dtype=np.int64),
            "tab_key": np.zeros(table, dtype=np.int64), "tab_slot": np.full(table, K.EMPTY, dtype=np.int64),
            "slot_key": np.zeros(cap, dtype=np.int64), "used": np.full(cap, K.EMPTY, dtype=np.int64),
            "free": np.zeros(cap, dtype=np.int64), "head": np.zeros(cap, dtype=np.int64), "size": np.zeros(cap, dtype=np.int64),
            "ring_t": np.zeros((cap, Kr), dtype=np.float64), "ring_v": np.zeros((cap, Kr, V), dtype=np.float64),
            "ring_h": np.zeros((cap, Kr, C), dtype=np.int64), "last_t": np.full(cap, np.nan),
            "last_lat": np.full(cap, np.nan), "last_lon": np.full(cap, np.nan),
            "seen": np.zeros((cap, C, M), dtype=np.int64), "seen_n": np.zeros((cap, C), dtype=np.int64),
        }
        if old:
            n = old["used"].shape[0]
            for name, arr in old.items():
                if name in ("tab_key", "tab_slot"):
                    continue
                if name == "meta":
                    new[name][:] = arr
                else:
                    new[name][:n] = arr
            K.rebuild_table(new["tab_key"], new["tab_slot"], new["slot_key"], new["used"], int(new["meta"][K.N_ALLOC]))
        self.state = new

    @property
    def capacity(self) -> int:
        return int(self.state["used"].shape[0])

    def stats(self) -> dict[str, int]:
        """Entities held, evicted (least recently seen, over ``max_entities``), late events, ring
        overflows (more than ``max_events`` in the longest window), and the state's bytes."""
        m = self.state["meta"]
        return {"entities": int(m[K.LIVE]), "evicted": int(m[K.EVICTED]), "late": int(m[K.LATE]),
                "overflow": int(m[K.OVERFLOW]), "capacity": self.capacity,
                "bytes": int(sum(a.nbytes for a in self.state.values()))}

    @property
    def state_bytes(self) -> int:
        # read per served message (a gauge): summed once per state object, which changes only when
        # the arrays grow or a checkpoint is restored
        state = self.state
        cached = self._bytes_of
        if cached is None or cached[0] is not state:
            cached = self._bytes_of = (state, int(sum(a.nbytes for a in state.values())))
        return cached[1]

    def bytes_per_entity(self) -> float:
        per = sum(a.nbytes / max(a.shape[0], 1) for k, a in self.state.items() if k not in ("meta", "tab_key", "tab_slot"))
        return per + 2 * 16  # the hash table holds two slots per entity, 16 bytes each

    def snapshot(self) -> dict[str, np.ndarray]:
        """A copy of the state (for a checkpoint: ``np.savez``) tagged with the spec's digest."""
        arrays = {k: v.copy() for k, v in self.state.items()}
        arrays["spec_digest"] = np.frombuffer(bytes.fromhex(self.spec.digest), dtype=np.uint8).copy()
        arrays["format"] = np.array([STATE_FORMAT], dtype=np.int64)
        return arrays

    def restore(self, arrays: dict[str, np.ndarray]) -> bool:
        """Load a :meth:`snapshot`; False (state unchanged) when it was taken for another spec."""
        digest = arrays.get("spec_digest")
        if digest is None or bytes(np.asarray(digest, dtype=np.uint8)).hex() != self.spec.digest:
            return False
        if int(np.asarray(arrays.get("format", [0]))[0]) != STATE_FORMAT:
            return False
        state = {k: np.array(arrays[k]) for k in self.state}
        self.state = state
        return True

    # -- features ----------------------------------------------------------------------------------

    def transform(self, events: Any, offset: int = 0, fitted: FittedCategories | None = None) -> np.ndarray:
        """Features of ``events`` in input order (the online path); updates the state. ``fitted``:
        another version's learned categories over this state (a reload with the same spec)."""
        return self.transform_batch(decode_events(events, self.spec, offset), fitted)

    def replay(self, events: Any, offset: int = 0) -> np.ndarray:
        """Features of ``events`` computed in event-time order, returned in input order (offline)."""
        return self.replay_batch(decode_events(events, self.spec, offset))

    def replay_batch(self, batch: EventBatch) -> np.ndarray:
        """:meth:`replay` of a decoded batch."""
        order = np.argsort(batch.time, kind="stable")
        if np.all(order[1:] > order[:-1]):
            return self.transform_batch(batch)
        out = np.empty((batch.n, len(self.spec.output_names)))
        out[order] = self.transform_batch(take_batch(batch, order))
        return out

    def _plan(self) -> dict[str, Any]:
        """Where the kernel writes each feature it computes (-1: not asked for)."""
        spec = self.spec
        W, V, C = len(self.windows), len(self.value_cols), len(self.hash_cols)
        wi = {w: j for j, w in enumerate(self.windows.tolist())}
        plan: dict[str, Any] = {"count": np.full(W, -1, dtype=np.int64), "agg": np.full((W, V, 6), -1, dtype=np.int64),
                                "distinct": np.full((W, C), -1, dtype=np.int64), "new": np.full(C, -1, dtype=np.int64),
                                "since": -1, "km": -1, "speed": -1}
        k = 0
        for f in spec.features:
            if f.kind == "window":
                w = wi[f.window]
                if f.agg == "count":
                    plan["count"][w] = k
                elif f.agg == "distinct":
                    plan["distinct"][w, self.hash_cols.index(f.column[0])] = k
                else:
                    plan["agg"][w, self.value_cols.index(f.column[0]), K.AGG_INDEX[f.agg]] = k
            elif f.kind == "new_for_entity":
                plan["new"][self.hash_cols.index(f.column[0])] = k
            elif f.kind in ("since_last", "distance_from_last", "speed_from_last"):
                plan[{"since_last": "since", "distance_from_last": "km", "speed_from_last": "speed"}[f.kind]] = k
            k += len(f.outputs)
        return plan

    def transform_batch(self, b: EventBatch, fitted: FittedCategories | None = None) -> np.ndarray:
        """Features of a decoded batch in its order (``(n, n_features)`` float64, C order: a row is
        an event, as the scorer takes it)."""
        n = b.n
        V, C = len(self.value_cols), len(self.hash_cols)
        vals = np.empty((n, V))
        for j, c in enumerate(self.value_cols):
            vals[:, j] = b.numeric[c]
        hashes = np.empty((n, C), dtype=np.int64)
        for j, c in enumerate(self.hash_cols):
            hashes[:, j] = b.categories[c].hashes()
        lat, lon = b.geo if b.geo is not None else (np.empty(0), np.empty(0))
        out = np.empty((n, len(self.spec.output_names)))
        plan = self._plan_cache
        start = 0
        while True:
            st = self.state
            start = K.run(start, b.entity, b.time, vals, hashes, lat, lon, self.windows, self.spec.max_entities,
                          st["meta"], st["tab_key"], st["tab_slot"], st["slot_key"], st["used"], st["free"], st["head"],
                          st["size"], st["ring_t"], st["ring_v"], st["ring_h"], st["last_t"], st["last_lat"], st["last_lon"],
                          st["seen"], st["seen_n"], plan["count"], plan["agg"], plan["distinct"], plan["new"],
                          plan["since"], plan["km"], plan["speed"], out)
            if start >= n:
                break
            self._allocate(min(self.spec.max_entities, max(_GROW, 2 * self.capacity)))
        self._stateless(b, fitted or self.fitted, out)
        return out

    def _stateless(self, b: EventBatch, fitted: FittedCategories, out: np.ndarray) -> None:
        """The features that need no entity state, a column at a time (``out[:, k]``)."""
        for f, k in self._stateless_plan:
            if f.kind == "numeric":
                x = b.numeric[f.column[0]]
                if f.transform == "log1p":
                    with np.errstate(invalid="ignore", divide="ignore"):
                        np.log1p(x, out=out[:, k])
                elif f.transform == "clip":
                    np.clip(x, f.clip[0], f.clip[1], out=out[:, k])
                else:
                    out[:, k] = x
            elif f.kind == "category":
                fitted.encode(f.column[0], f.encode, b.categories[f.column[0]], f.buckets, out=out[:, k])
            elif f.kind == "time_of_day":
                angle = np.mod(b.time, 86400.0)
                angle *= 2.0 * math.pi / 86400.0
                np.sin(angle, out=out[:, k])
                np.cos(angle, out=out[:, k + 1])
            elif f.kind == "day_of_week":
                dow = np.mod(np.floor(b.time / 86400.0) + 3.0, 7.0)  # 1970-01-01 was a Thursday; Monday = 0
                angle = (2.0 * math.pi / 7.0) * dow
                np.sin(angle, out=out[:, k])
                np.cos(angle, out=out[:, k + 1])


def take_batch(b: EventBatch, order: np.ndarray) -> EventBatch:
    cats = {c: Categories(v.row_hashes[order]) for c, v in b.categories.items()}
    geo = (b.geo[0][order], b.geo[1][order]) if b.geo is not None else None
    return EventBatch(int(order.shape[0]), b.entity[order], b.time[order], {c: v[order] for c, v in b.numeric.items()}, cats, geo)
