"""The data plane's value types: what a scored request resolves to, what a scored batch hands its
observers, and what capture needs of a request. No transport and no behaviour here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple
from collections.abc import Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .reload import ModelHandle


@dataclass(frozen=True, slots=True)
class Explain:
    """An explain request: ``top_k`` features per explained record (0: the plane's default) and
    whether only flagged records are explained."""

    top_k: int = 0
    flagged_only: bool = False


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """One request's answer. ``scores``: float64 (or float32, as the kernel returns), higher = more
    anomalous; ``flags``: ``scores >= threshold`` of the handle that scored them; ``device``: where
    they ran (``cpu`` / ``cuda``); ``explanation``: ``(features (n, k) int64, contributions (n, k))``
    when asked for (feature -1: that record was not explained)."""

    handle: ModelHandle
    scores: np.ndarray
    flags: np.ndarray
    device: str
    explanation: tuple[np.ndarray, np.ndarray] | None = None
    features: np.ndarray | None = None  # raw events with return_features: the engine's float64 rows

    @property
    def model(self) -> str:
        return self.handle.name

    @property
    def version(self) -> int:
        return self.handle.version

    @property
    def alias(self) -> str:
        return self.handle.alias

    @property
    def threshold(self) -> float:
        return self.handle.threshold

    @property
    def feature_names(self) -> list[str]:
        return list(self.handle.model.feature_names)


class CaptureTag(NamedTuple):
    """What capture needs of a request beyond its records and scores: the message's ``ids`` (one
    per record, or empty: generated), its ``request_id``, and ``then``, called on the scoring thread
    with the request's capture selection (or None) once capture is done (shadow scoring: the
    challenger samples the records the champion's sample picked)."""

    ids: Sequence[str]
    request_id: int
    then: Callable[[Any], None] | None = None


class BatchOutput(NamedTuple):
    """What the plane's scoring function returns for one batch, on a scoring thread."""

    scores: np.ndarray
    flags: np.ndarray
    device: str
    explanation: tuple[np.ndarray, np.ndarray] | None
    kernel_us: float  # kernel time per record (NaN for an empty batch)


@dataclass(slots=True)
class Pending:
    """A request admitted by the batcher and not yet answered: its records, the handle it is bound
    to, the future its caller awaits (None for work nobody awaits), and its capture tag."""

    X: np.ndarray
    handle: ModelHandle
    future: asyncio.Future | None = field(repr=False)
    tag: CaptureTag | None = None


class ScoredBatch(NamedTuple):
    """What an observer of scored batches receives, on the scoring thread: the handle that scored
    them, the batch's records (the requests' records back to back), the output, and the requests."""

    handle: ModelHandle
    X: np.ndarray
    out: BatchOutput
    items: Sequence[Pending]
