"""The Open Inference Protocol (KServe v2) mapped onto the data plane, with no transport in it.

Both doors of the protocol, gRPC (``oip_grpc.py``) and REST (``http_app.py``), decode their wire
format into the plain values here and encode what comes back; the rules (which input, which
datatypes and shapes, which parameters, which outputs) live once, in this module.

A model takes one input ``X`` of shape ``[-1, n_features]``, FP32 or FP64, and answers ``score``
(FP64, ``[n]``, higher = more anomalous) and ``anomalous`` (BOOL, ``[n]``). With the request
parameter ``explain`` set (and optionally ``top_k``, ``explain_flagged_only``) it also answers
``explain_features`` (INT64, ``[n, k]``, -1: record not explained) and ``explain_contributions``
(FP64, ``[n, k]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import RequestError
from .reload import ModelHandle
from .results import Explain, ScoreResult

PLATFORM = "outlierd"
INPUT = "X"
DTYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
OUTPUTS = {"score": "FP64", "anomalous": "BOOL", "explain_features": "INT64", "explain_contributions": "FP64"}
EXPLAIN_OUTPUTS = ("explain_features", "explain_contributions")


@dataclass(frozen=True, slots=True)
class Output:
    """One output tensor: its name, datatype, shape and values (a NumPy array of that datatype)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


def tensor_metadata(handle: ModelHandle) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(inputs, outputs)`` of a model's metadata: name, datatype, shape (-1: any number of records)."""
    d = handle.model.n_features
    inputs = [{"name": INPUT, "datatype": "FP32", "shape": [-1, d]}]
    outputs = [{"name": "score", "datatype": "FP64", "shape": [-1]}, {"name": "anomalous", "datatype": "BOOL", "shape": [-1]},
               {"name": "explain_features", "datatype": "INT64", "shape": [-1, -1]},
               {"name": "explain_contributions", "datatype": "FP64", "shape": [-1, -1]}]
    return inputs, outputs


def check_version(handle: ModelHandle, version: str) -> None:
    """NOT_FOUND unless ``version`` is empty or the version the model serves now."""
    if version and version != str(handle.version):
        raise RequestError(f"model {handle.name!r} serves version {handle.version}, not {version[:32]!r}",
                           code="NOT_FOUND", reason="unknown_model")


def pick_input(names: Sequence[str]) -> int:
    """The index of the records' input: the one named ``X``, or the only one."""
    if INPUT in names:
        return list(names).index(INPUT)
    if len(names) == 1:
        return 0
    raise RequestError(f"inputs: expected one input named {INPUT!r}; got {len(names)} named {list(names)[:8]}",
                       reason="shape")


def records(handle: ModelHandle, datatype: str, shape: Sequence[int], values: np.ndarray) -> np.ndarray:
    """The input's values as an ``(n, n_features)`` array, or a RequestError naming what is wrong.
    ``values``: the flat values (already of ``datatype``)."""
    d = handle.model.n_features
    if datatype not in DTYPES:
        raise RequestError(f"inputs[{INPUT}].datatype is {datatype[:16]!r}; expected FP32 or FP64", reason="shape")
    if len(shape) != 2 or shape[1] != d:
        raise RequestError(f"inputs[{INPUT}].shape is {list(shape)[:8]}; model {handle.name!r} version {handle.version} "
                           f"expects [n, {d}]", reason="n_features")
    if shape[0] < 0 or values.size != shape[0] * d:
        raise RequestError(f"inputs[{INPUT}] holds {values.size} values; shape {list(shape)} needs {max(shape[0], 0) * d}",
                           reason="shape")
    return values.reshape(shape[0], d)


def from_bytes(datatype: str, raw: bytes) -> np.ndarray:
    """Raw (little-endian) contents as a flat array of ``datatype``."""
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise RequestError(f"inputs[{INPUT}].datatype is {datatype[:16]!r}; expected FP32 or FP64", reason="shape")
    if len(raw) % dtype.itemsize:
        raise RequestError(f"inputs[{INPUT}] raw contents hold {len(raw)} bytes: not a whole number of {datatype} values",
                           reason="shape")
    return np.frombuffer(raw, dtype=dtype)


def explain_of(params: Mapping[str, Any]) -> Explain | None:
    """The explain request in a request's parameters (``explain``, ``top_k``, ``explain_flagged_only``), or None."""
    explain = params.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError(f"parameters.explain must be a boolean; got {str(explain)[:32]!r}", reason="explain")
    if not explain:
        return None
    top_k = params.get("top_k", 0)
    flagged = params.get("explain_flagged_only", False)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise RequestError(f"parameters.top_k must be an integer >= 0; got {str(top_k)[:32]!r}", reason="explain")
    if not isinstance(flagged, bool):
        raise RequestError(f"parameters.explain_flagged_only must be a boolean; got {str(flagged)[:32]!r}", reason="explain")
    return Explain(top_k, flagged)


def outputs(result: ScoreResult, requested: Sequence[str] = ()) -> list[Output]:
    """The response's tensors, in the order asked for (``requested``; empty: every one there is)."""
    n = result.scores.shape[0]
    have: dict[str, Output] = {
        "score": Output("score", "FP64", (n,), result.scores.astype("<f8", copy=False)),
        "anomalous": Output("anomalous", "BOOL", (n,), result.flags),
    }
    if result.explanation is not None:
        features, contributions = result.explanation
        have["explain_features"] = Output("explain_features", "INT64", features.shape, features.astype("<i8", copy=False))
        have["explain_contributions"] = Output("explain_contributions", "FP64", contributions.shape,
                                               contributions.astype("<f8", copy=False))
    if not requested:
        return list(have.values())
    out = []
    for name in requested:
        if name not in have:
            hint = " (set parameters.explain to get it)" if name in EXPLAIN_OUTPUTS else ""
            raise RequestError(f"outputs: unknown output {name[:64]!r}{hint}; this model answers {list(OUTPUTS)}",
                               reason="shape")
        out.append(have[name])
    return out
