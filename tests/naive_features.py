"""A slow, obviously correct pandas oracle of the feature engine (docs/features.md's meanings)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from outlierd.core.features.spec import FeatureSpec

R = 6371.0088


def _km(lat1, lon1, lat2, lon2):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * R * math.asin(min(1.0, math.sqrt(a)))


def oracle(df: pd.DataFrame, spec: FeatureSpec, train: pd.DataFrame | None = None) -> pd.DataFrame:
    """Features of every row of ``df`` (epoch-second times), in input order."""
    train = df if train is None else train
    key = df[list(spec.entity)].astype(str).agg("\x1f".join, axis=1).tolist()
    times = df[spec.time].to_numpy(dtype=float)
    order = np.argsort(times, kind="stable")
    cols = {c: df[c].tolist() for c in df.columns}
    freqs = {c: (train[c].astype(str).value_counts() / len(train)).to_dict() for c in train.columns}
    rows: dict[int, dict[str, float]] = {}
    history: dict[str, list[int]] = {}
    for i in order:
        e = key[i]
        past = history.setdefault(e, [])
        t = float(times[i])
        past.append(i)
        out: dict[str, float] = {}
        prev = past[-2] if len(past) > 1 else None
        for f in spec.features:
            if f.kind == "numeric":
                x = float(cols[f.column[0]][i])
                out[f.name] = math.log1p(x) if f.transform == "log1p" else min(max(x, f.clip[0]), f.clip[1])
            elif f.kind == "category":
                out[f.name] = float(freqs[f.column[0]].get(str(cols[f.column[0]][i]), 0.0))
            elif f.kind == "new_for_entity":
                col = cols[f.column[0]]
                out[f.name] = float(str(col[i]) not in {str(col[j]) for j in past[:-1]})
            elif f.kind == "time_of_day":
                a = 2 * math.pi * (t % 86400) / 86400
                out[f.name + "_sin"], out[f.name + "_cos"] = math.sin(a), math.cos(a)
            elif f.kind == "day_of_week":
                a = 2 * math.pi * ((math.floor(t / 86400) + 3) % 7) / 7
                out[f.name + "_sin"], out[f.name + "_cos"] = math.sin(a), math.cos(a)
            elif f.kind == "since_last":
                out[f.name] = math.nan if prev is None else t - float(times[prev])
            elif f.kind in ("distance_from_last", "speed_from_last"):
                if prev is None:
                    out[f.name] = math.nan
                    continue
                la, lo = f.column
                km = _km(cols[la][prev], cols[lo][prev], cols[la][i], cols[lo][i])
                dt = t - float(times[prev])
                out[f.name] = km if f.kind == "distance_from_last" else (km / (dt / 3600) if dt > 0 else math.nan)
            else:
                inside = [j for j in past if float(times[j]) > t - f.window]
                if f.agg == "count":
                    out[f.name] = float(len(inside))
                    continue
                col = cols[f.column[0]]
                if f.agg == "distinct":
                    out[f.name] = float(len({str(col[j]) for j in inside}))
                    continue
                v = np.array([col[j] for j in inside], dtype=float)
                out[f.name] = {"sum": v.sum(), "mean": v.mean(), "min": v.min(), "max": v.max(), "std": v.std(),
                               "relative": v[-1] / v.mean() if v.mean() != 0 else math.nan}[f.agg]
        rows[i] = out
    return pd.DataFrame([rows[i] for i in range(len(df))], columns=spec.output_names)
