"""The Scorer's request decoding: a ScoreRequest's packed values as a float32 ``(n, d)`` array.

Only what is particular to the protobuf message is checked here (``n_features``, ``values`` or
``raw_values``, whole records); the checks every front door shares (size, ids, non-finite values)
are the data plane's (``DataPlane.check``)."""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import numpy as np

from .errors import RequestError
from .reload import ModelHandle

_F32 = np.dtype("<f4")


class Undecodable:
    """What a lenient deserializer hands a handler for bytes that are not a valid message (a
    truncated field, invalid UTF-8 in a string): the handler answers it with INVALID_ARGUMENT, and
    on a stream answers that message and goes on. (gRPC itself would answer a unary call UNKNOWN
    with a traceback in the log, and end a stream with OK, silently dropping the rest of it.)"""

    __slots__ = ("error", "type_name")

    def __init__(self, error: str, type_name: str) -> None:
        self.error, self.type_name = error, type_name

    def refuse(self, where: str = "the request") -> RequestError:
        return RequestError(f"{where} is not a valid {self.type_name} message: {self.error}", reason="decode")


def lenient(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: the parsed message, or :class:`Undecodable`."""
    parse, type_name = message_class.FromString, message_class.DESCRIPTOR.full_name

    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # DecodeError, invalid UTF-8: the handler answers it
            return Undecodable(str(e) or type(e).__name__, type_name)

    return parse_or_mark


def refuse_undecodable(req: Any, where: str = "the request") -> None:
    """Raise the RequestError for a message that did not decode (no-op for a decoded one)."""
    if type(req) is Undecodable:
        raise req.refuse(where)


def decode(req: Any, handle: ModelHandle) -> np.ndarray:
    """The request's records as a ``(n, n_features)`` float32 array (a read-only view of
    ``raw_values``, or a copy of ``values``), or a :class:`RequestError` naming what is wrong (its
    ``reason`` labels the invalid-input metric)."""
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
        return np.frombuffer(raw, dtype=_F32).reshape(-1, d)
    n_values = len(req.values)
    if n_values % d:
        raise RequestError(f"values holds {n_values} numbers: not a multiple of n_features={d}", reason="shape")
    return np.asarray(req.values, dtype=np.float32).reshape(-1, d)
