"""A small synchronous client for the Scorer service (tests, benchmarks, the demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Iterable, Iterator, Sequence

import grpc
import numpy as np

from outlierd.core.errors import InvalidInputError
from outlierd.v1 import scoring_pb2 as pb
from outlierd.v1 import scoring_pb2_grpc as pb_grpc


@dataclass
class Scored:
    """One response: scores (higher = more anomalous), flags, and the version that scored them."""

    scores: np.ndarray
    anomalous: np.ndarray
    version: int | None
    model: str
    ids: list[str]
    request_id: int
    error: str = ""


def request(X: np.ndarray, *, ids: Sequence[str] | None = None, model: str = "", request_id: int = 0, raw: bool = True) -> pb.ScoreRequest:
    """Pack records ``X`` (n, d) into one ScoreRequest: little-endian float32 bytes, or ``values``."""
    X = np.ascontiguousarray(X, dtype="<f4")
    if X.ndim != 2:
        raise InvalidInputError(f"X must be 2-D (n_records, n_features); got shape {X.shape}")
    kw = {"raw_values": X.tobytes()} if raw else {"values": X.ravel()}
    return pb.ScoreRequest(model=model, n_features=X.shape[1], ids=list(ids or ()), request_id=request_id, **kw)


def scored(resp: pb.ScoreResponse) -> Scored:
    return Scored(np.asarray(resp.scores, dtype=np.float64), np.asarray(resp.anomalous, dtype=bool),
                  int(resp.version) if resp.version else None, resp.model, list(resp.ids), resp.request_id, resp.error)


class ScorerClient:
    def __init__(self, target: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 server_name: str | None = None, timeout: float | None = 30.0, max_message_bytes: int = 64 * 1024 * 1024):
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.ScorerStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout

    def __enter__(self) -> ScorerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def score(self, X: np.ndarray, *, ids: Sequence[str] | None = None, model: str = "", request_id: int = 0, raw: bool = True) -> Scored:
        resp = self.stub.Score(request(X, ids=ids, model=model, request_id=request_id, raw=raw),
                               timeout=self.timeout, metadata=self.metadata)
        return scored(resp)

    def score_stream(self, batches: Iterable[np.ndarray], *, model: str = "", raw: bool = True, timeout: float | None = None) -> Iterator[Scored]:
        """Stream batches; yields one result per batch, in order (``error`` set for a rejected one)."""
        reqs = (request(X, model=model, request_id=i, raw=raw) for i, X in enumerate(batches))
        for resp in self.stub.ScoreStream(reqs, timeout=timeout, metadata=self.metadata):
            yield scored(resp)

    def model_info(self, model: str = "") -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.ModelInfoRequest(model=model), timeout=self.timeout, metadata=self.metadata)
