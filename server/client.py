"""A small synchronous client for the Scorer service (tests, benchmarks, the demo)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    explanations: list[Explained] = field(default_factory=list)
    features: np.ndarray | None = None  # score_events(return_features=True): the server's feature rows (float64)


@dataclass
class Explained:
    """The features that made one record's score, most contributing first."""

    record: int                 # the record's position in its request
    features: list[int]
    feature_names: list[str]
    contributions: list[float]


def request(X: np.ndarray, *, ids: Sequence[str] | None = None, model: str = "", request_id: int = 0, raw: bool = True,
            explain: bool = False, top_k: int = 0, explain_flagged_only: bool = False) -> pb.ScoreRequest:
    """Pack records ``X`` (n, d) into one ScoreRequest: little-endian float32 bytes, or ``values``;
    ``ids`` one per record (needed to label them later); ``explain``: ask for the ``top_k`` features
    of each record (0: the server's default), or of the flagged ones only."""
    X = np.ascontiguousarray(X, dtype="<f4")
    if X.ndim != 2:
        raise InvalidInputError(f"X must be 2-D (n_records, n_features); got shape {X.shape}")
    kw = {"raw_values": X.tobytes()} if raw else {"values": X.ravel()}
    return pb.ScoreRequest(model=model, n_features=X.shape[1], ids=list(ids or ()), request_id=request_id, explain=explain,
                           top_k=top_k, explain_flagged_only=explain_flagged_only, **kw)


def events_request(table: Any, *, ids: Sequence[str] | None = None, id_column: str | None = None, model: str = "",
                   request_id: int = 0, return_features: bool = False) -> pb.ScoreRequest:
    """Pack raw events (an Arrow table or record batch, a pandas frame, a dict of columns) into one
    ScoreRequest as an Arrow IPC stream; ids from ``ids`` or the ``id_column`` (sent as ids, and as a column)."""
    import pyarrow as pa

    if not isinstance(table, pa.Table):
        table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else (
            pa.Table.from_pandas(table, preserve_index=False) if hasattr(table, "columns") and hasattr(table, "to_dict") else pa.table(table))
    if id_column is not None:
        ids = [str(v) for v in table.column(id_column).to_pylist()]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pb.ScoreRequest(model=model, arrow_events=sink.getvalue().to_pybytes(), ids=list(ids or ()), request_id=request_id,
                           return_features=return_features)


def scored(resp: pb.ScoreResponse) -> Scored:
    features = None
    if resp.features:
        n = len(resp.scores)
        features = np.frombuffer(resp.features, dtype="<f8").reshape(n, -1) if n else np.empty((0, 0))
    return Scored(np.asarray(resp.scores, dtype=np.float64), np.asarray(resp.anomalous, dtype=bool),
                  int(resp.version) if resp.version else None, resp.model, list(resp.ids), resp.request_id, resp.error,
                  [Explained(e.record, list(e.features), list(e.feature_names), list(e.contributions)) for e in resp.explanations],
                  features)


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

    def score(self, X: np.ndarray, *, ids: Sequence[str] | None = None, model: str = "", request_id: int = 0, raw: bool = True,
              explain: bool = False, top_k: int = 0, explain_flagged_only: bool = False) -> Scored:
        resp = self.stub.Score(request(X, ids=ids, model=model, request_id=request_id, raw=raw, explain=explain, top_k=top_k,
                                       explain_flagged_only=explain_flagged_only),
                               timeout=self.timeout, metadata=self.metadata)
        return scored(resp)

    def score_stream(self, batches: Iterable[np.ndarray | tuple[np.ndarray, Sequence[str]]], *, model: str = "", raw: bool = True,
                     timeout: float | None = None, explain: bool = False, top_k: int = 0,
                     explain_flagged_only: bool = False) -> Iterator[Scored]:
        """Stream batches; yields one result per batch, in order (``error`` set for a rejected one).
        A batch is ``X``, or ``(X, ids)`` with one id per record (to label them later)."""
        def requests() -> Iterator[pb.ScoreRequest]:
            for i, batch in enumerate(batches):
                X, ids = batch if isinstance(batch, tuple) else (batch, None)
                yield request(X, ids=ids, model=model, request_id=i, raw=raw, explain=explain, top_k=top_k,
                              explain_flagged_only=explain_flagged_only)

        for resp in self.stub.ScoreStream(requests(), timeout=timeout, metadata=self.metadata):
            yield scored(resp)

    def score_events(self, table: Any, *, ids: Sequence[str] | None = None, id_column: str | None = None, model: str = "",
                     request_id: int = 0, return_features: bool = False) -> Scored:
        """Score raw events (a model trained with a feature spec): the server computes each event's
        features from its entity's state. ``return_features``: the features come back too."""
        resp = self.stub.Score(events_request(table, ids=ids, id_column=id_column, model=model, request_id=request_id,
                                              return_features=return_features), timeout=self.timeout, metadata=self.metadata)
        return scored(resp)

    def score_events_stream(self, tables: Iterable[Any], *, id_column: str | None = None, model: str = "",
                            return_features: bool = False, timeout: float | None = None) -> Iterator[Scored]:
        """Stream event tables; one result per table, in order (``error`` set for a rejected one)."""
        def requests() -> Iterator[pb.ScoreRequest]:
            for i, table in enumerate(tables):
                yield events_request(table, id_column=id_column, model=model, request_id=i, return_features=return_features)

        for resp in self.stub.ScoreStream(requests(), timeout=timeout, metadata=self.metadata):
            yield scored(resp)

    def model_info(self, model: str = "") -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.ModelInfoRequest(model=model), timeout=self.timeout, metadata=self.metadata)
