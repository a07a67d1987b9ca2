"""Request decoding and validation, done once per message before anything is queued."""

from __future__ import annotations

import numpy as np

from .errors import RequestError
from .reload import ModelHandle

_F32 = np.dtype("<f4")


def decode(req, handle: ModelHandle, default_model: str, max_records: int) -> np.ndarray:
    """The request's records as a ``(n, n_features)`` float32 array, or a :class:`RequestError`
    naming what is wrong (its ``reason`` labels the invalid-input metric)."""
    if req.model and req.model != default_model:
        raise RequestError(f"unknown model {req.model!r}; this server serves {default_model!r}", code="NOT_FOUND", reason="unknown_model")
    d = handle.model.n_features
    if req.n_features != d:
        raise RequestError(
            f"n_features is {req.n_features}; model {handle.name!r} version {handle.version} expects {d}",
            reason="n_features")
    raw = req.raw_values  # a bytes field: every access copies it, so once
    has_values, has_raw = len(req.values) > 0, len(raw) > 0
    if has_values and has_raw:
        raise RequestError("set either values or raw_values, not both", reason="both_values")
    if has_raw:
        if len(raw) % (4 * d):
            raise RequestError(
                f"raw_values holds {len(raw)} bytes: not a whole number of records of {d} little-endian float32 "
                f"({4 * d} bytes each)", reason="shape")
        X = np.frombuffer(raw, dtype=_F32).reshape(-1, d)
    else:
        n_values = len(req.values)
        if n_values % d:
            raise RequestError(f"values holds {n_values} numbers: not a multiple of n_features={d}", reason="shape")
        X = np.asarray(req.values, dtype=np.float32).reshape(-1, d)
    n = X.shape[0]
    if n > max_records:
        raise RequestError(f"request holds {n} records; the limit is {max_records} per request: split it", reason="too_large")
    if req.ids and len(req.ids) != n:
        raise RequestError(f"ids has {len(req.ids)} entries for {n} records: send one id per record or none", reason="ids")
    if handle.model.preprocessing.reject and n and not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise RequestError(
            f"record {bad} contains NaN or inf and model {handle.name!r} version {handle.version} rejects non-finite values",
            reason="non_finite")
    return X
