"""The data plane: decoded records for a named model in, a typed :class:`ScoreResult` out.

No transport here. Every front door (the gRPC ``Scorer`` today; HTTP, the Open Inference Protocol
and broker consumers next) decodes its wire format into a float32 ``(n, d)`` array plus ids and
calls the same plane, so routing (champion / split challenger), validation, explanations, the
device policy with its GPU fallback, capture, shadow scoring, drift and the scoring metrics behave
alike whichever way a record came in.

A plane holds one :class:`ServedModel` per model name (a hot-reloading champion slot, and the
rollout with its challenger). It owns the micro-batcher and gives it the scoring function and the
observers at construction: drift before the answer, capture and shadow scoring after it, all on
the scoring thread.

Two ways in:

* ``submit(handle, X, ...)`` is synchronous: it validates and queues, binding the request to the
  handle serving *now*, and returns a future. Streams use it so that their messages bind versions
  in order (``resolve`` and ``route`` pick the handle first, so the door can decode against it).
* ``await score(model, X, ...)`` does all of it for a door that has a decoded 2-D array.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any
from collections.abc import Iterable, Sequence

import numpy as np

from outlierd.core.errors import InvalidInputError

from .batcher import PARALLEL_MIN_ROWS, MicroBatcher
from .errors import RequestError
from .observers import CaptureObserver, drift_observer
from .reload import ModelHandle, ModelSlot
from .results import BatchOutput, CaptureTag, Explain, ScoreResult
from .rollout import Rollout

log = logging.getLogger("outlierd.plane")
DEFAULT_TOP_K = 3  # Explain.top_k = 0: features per explained record
# reasons of outlierd_invalid_inputs_total; every series exists at 0 from the start
INVALID_REASONS = ("n_features", "shape", "both_values", "ids", "too_large", "non_finite", "unknown_model", "explain", "internal",
                   "decode", "events")


ECHO_CHARS = 64  # a client's string quoted in an error message is cut to this many characters


def echo(text: str, limit: int = ECHO_CHARS) -> str:
    """``repr(text)`` for an error message, cut to ``limit`` characters with an ellipsis: a client
    string is never echoed whole (a 1 MB model name would otherwise come back in the status)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


def utf8_size(text: str, limit: int) -> int:
    """``text``'s size in UTF-8 bytes, encoding it only when that is needed to compare it with
    ``limit``: a character takes 1 to 4 bytes, so up to ``limit // 4`` characters are within it,
    and an ASCII string (``isascii`` is O(1) in CPython) is as many bytes as characters."""
    n = len(text)
    return n if n <= limit // 4 or text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class ServedModel:
    """One model name's serving state: the champion slot (hot reload) and its rollout (the
    challenger slot, split routing, shadow scoring). ``router``: the rollout when its mode is not
    ``off`` (None: the champion answers everything and nothing is shadowed)."""

    def __init__(self, slot: ModelSlot, rollout: Rollout | None = None) -> None:
        self.name = slot.name
        self.slot = slot
        self.rollout = rollout
        self.router = rollout if rollout is not None and rollout.mode != "off" else None

    @property
    def current(self) -> ModelHandle:
        handle = self.slot.current
        if handle is None:  # a slot is loaded before its plane serves
            raise RequestError(f"model {self.name!r} is not loaded yet", code="UNAVAILABLE", reason="internal")
        return handle


class DataPlane:
    def __init__(self, models: Iterable[ServedModel], *, threads: int = 2, max_batch: int = 1024, max_delay_us: int = 0,
                 max_queue_records: int = 262144, max_request_records: int = 1048576, max_id_bytes: int = 256,
                 metrics: Any = None, capture: Any = None, trim_after_bytes: int = 0) -> None:
        self.models: dict[str, ServedModel] = {m.name: m for m in models}
        if not self.models:
            raise InvalidInputError("a data plane needs at least one model")
        self.default = next(iter(self.models.values()))  # requests with an empty model name get it
        self.max_request_records = max_request_records
        self.max_id_bytes = max_id_bytes
        self.metrics = metrics
        self.capture = capture  # monitoring.capture.CaptureWriter or None
        shadowing = any(m.router is not None for m in self.models.values())
        self._tagging = capture is not None or shadowing
        self.batcher = MicroBatcher(
            self._score_batch, threads=threads, max_batch=max_batch, max_delay_us=max_delay_us,
            max_queue_records=max_queue_records, metrics=metrics, on_scored=(drift_observer,),
            on_answered=(CaptureObserver(capture),) if self._tagging else (), trim_after_bytes=trim_after_bytes)
        # metric children per handle (labels() takes a lock): (handle, records, anomalies); written on
        # the scoring threads, a plain dict store; a new threshold or version comes as a new handle
        self._counters: dict[int, tuple[ModelHandle, Any, Any]] = {}
        if metrics is not None:
            for reason in INVALID_REASONS:
                metrics.invalid_inputs.labels(reason)

    def add(self, served: ServedModel) -> None:
        """Serve one more model (``--models all`` found it); requests name it from now on."""
        self.models[served.name] = served

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scoring threads (on the event loop that will serve)."""
        self.batcher.start()

    async def close(self) -> None:
        """Let running batches finish, then stop the scoring threads and the rollouts' shadows."""
        await self.batcher.close()
        for m in self.models.values():
            if m.rollout is not None:
                m.rollout.close()

    # -- the way in -----------------------------------------------------------------------------------

    def resolve(self, model: str) -> ServedModel:
        """The served model called ``model`` ("" : the default one), or NOT_FOUND."""
        if not model:
            return self.default
        served = self.models.get(model)
        if served is None:
            names = ", ".join(repr(n) for n in self.models)
            raise RequestError(f"unknown model {echo(model)}; this server serves {names}", code="NOT_FOUND", reason="unknown_model")
        return served

    @staticmethod
    def route(served: ServedModel, ids: Sequence[str] = (), request_id: int = 0) -> ModelHandle:
        """The handle that answers a request: the champion's, or in split mode the challenger's for
        the routed share of messages (by the first record id or the request id)."""
        handle = served.current
        if served.router is not None:
            handle = served.router.route(ids, request_id, handle)
        return handle

    def check(self, handle: ModelHandle, X: np.ndarray, ids: Sequence[str] = ()) -> None:
        """Validate decoded records against the handle that will score them (RequestError naming
        what is wrong; its ``reason`` labels the invalid-input metric)."""
        d = handle.model.n_features
        if X.ndim != 2 or X.shape[1] != d:
            got = X.shape[1] if X.ndim == 2 else f"an array of shape {X.shape}"
            raise RequestError(f"n_features is {got}; model {handle.name!r} version {handle.version} expects {d}", reason="n_features")
        n = X.shape[0]
        if n > self.max_request_records:
            raise RequestError(f"request holds {n} records; the limit is {self.max_request_records} per request: split it",
                               reason="too_large")
        if ids:
            if len(ids) != n:
                raise RequestError(f"ids has {len(ids)} entries for {n} records: send one id per record or none", reason="ids")
            # NOTE: one pass of len() over the ids (~5 us for 256 str, ~12 us from a protobuf container,
            # which makes each str); bytes are counted only for ids long enough to be over the limit
            if max(map(len, ids)) > self.max_id_bytes // 4:
                self._check_id_sizes(ids)
        if handle.model.preprocessing.reject and n and not np.isfinite(X).all():
            bad = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
            raise RequestError(
                f"record {bad} contains NaN or inf and model {handle.name!r} version {handle.version} rejects non-finite values",
                reason="non_finite")

    def _check_id_sizes(self, ids: Sequence[str]) -> None:
        limit = self.max_id_bytes
        for i, record_id in enumerate(ids):
            size = utf8_size(record_id, limit)
            if size > limit:
                raise RequestError(f"ids[{i}] is {size} bytes; the limit is {limit} bytes per id (--max-id-bytes on the server)",
                                   reason="ids")

    @staticmethod
    def explain_spec(handle: ModelHandle, explain: Explain) -> Explain:
        """``explain`` with its ``top_k`` resolved against the model (0: the default), or a
        RequestError when it is out of range."""
        d = handle.model.n_features
        top_k = explain.top_k or min(DEFAULT_TOP_K, d)
        if not 1 <= top_k <= d:
            raise RequestError(f"explain: top_k must be in [1, {d}] (the model's number of features; 0 means "
                               f"{min(DEFAULT_TOP_K, d)}); got {explain.top_k}", reason="explain")
        return explain if top_k == explain.top_k else Explain(top_k, explain.flagged_only)

    def submit(self, handle: ModelHandle, X: np.ndarray, *, ids: Sequence[str] = (), request_id: int = 0,
               explain: Explain | None = None) -> asyncio.Future:
        """Validate ``X`` (float32 ``(n, d)``) and queue it for ``handle`` (from :meth:`route`); the
        future resolves to a :class:`ScoreResult`. Synchronous, so the messages of one stream bind
        handles in order. Raises RequestError (bad input) or Overloaded (RESOURCE_EXHAUSTED)."""
        self.check(handle, X, ids)
        if explain is not None:  # scored and explained in one kernel pass on a scoring thread
            explain = self.explain_spec(handle, explain)
        tag = None
        if self._tagging:
            # captured on the scoring thread after the answer; shadow: the challenger scores X then
            router = self.models[handle.name].router
            then = router.after(ids, request_id, X, handle) if router is not None else None
            if self.capture is not None or then is not None:
                tag = CaptureTag(ids, request_id, then)
        return self.batcher.submit(X, handle, explain, tag)

    async def score(self, model: str, X: np.ndarray, *, ids: Sequence[str] = (), request_id: int = 0,
                    explain: Explain | None = None) -> ScoreResult:
        """Score decoded records ``X`` (``(n, d)``, converted to float32) with model ``model``."""
        X = np.asarray(X, dtype=np.float32)
        handle = self.route(self.resolve(model), ids, request_id)
        return await self.submit(handle, X, ids=ids, request_id=request_id, explain=explain)

    def info(self, model: str = "") -> ModelHandle:
        """The handle the champion of ``model`` serves now (name, version, alias, threshold, features)."""
        return self.resolve(model).current

    # -- errors ---------------------------------------------------------------------------------------

    def count_error(self, error: BaseException) -> None:
        """Count a refused or failed request in ``outlierd_invalid_inputs_total``: a RequestError by
        its reason, any other failure while scoring as ``internal``. Overload is the server's state,
        not bad input: it has its own counter."""
        if self.metrics is None or getattr(error, "code", None) == "RESOURCE_EXHAUSTED":
            return
        reason = error.reason if isinstance(error, RequestError) else "internal"
        self.metrics.invalid_inputs.labels(reason).inc()

    # -- the scoring function (on a scoring thread) ----------------------------------------------------------

    def _score_batch(self, handle: ModelHandle, X: np.ndarray, explain: Explain | None) -> BatchOutput:
        """Score one batch where the device policy says: with ``explain``, scores and attributions in
        one pass of the CPU kernels (the GPU backends' attributions are the CPU kernel's anyway);
        otherwise on the GPU when the handle has one and the batch is large enough, falling back to
        the CPU kernel (counted and logged) when the GPU fails."""
        explanation = None
        scores = None
        device = "cpu"
        n = X.shape[0]
        parallel = n > PARALLEL_MIN_ROWS  # the pool's threads already use the cores: one per batch unless huge
        t0 = time.perf_counter()
        if handle.model.streaming:  # learns as it scores: one batch at a time holds the model's lock
            if explain is not None:
                raise RequestError(f"explain: model {handle.name!r} ({handle.model.kind}) learns while it scores and has "
                                   "no explanations; send the request without explain", reason="explain")
            scores = handle.model.score_update(X, parallel=parallel)
        elif explain is not None:  # flagged_only cuts at the threshold in force, as the flags do
            scores, features, contributions = handle.model.score_explain(
                X, explain.top_k, explain.flagged_only, threshold=handle.threshold, parallel=parallel)
            explanation = (features, contributions)
            device = handle.model.device
        elif handle.gpu_model is not None and n >= handle.gpu_min_rows:
            try:
                scores, device = handle.gpu_model.score(X), "cuda"
            except Exception as e:  # a GPU failure falls back to the CPU kernel: counted and logged
                log.error("cuda scoring failed, falling back to cpu model=%s version=%d error=%s", handle.name, handle.version, e)
                if self.metrics is not None:
                    self.metrics.device_fallbacks.labels(handle.name).inc()
        if scores is None:
            scores = handle.model.score(X, parallel=parallel)
            device = handle.model.device
        kernel_us = (time.perf_counter() - t0) * 1e6 / n if n else math.nan
        flags = scores >= handle.threshold
        if self.metrics is not None and n:
            counters = self._counters.get(id(handle))
            if counters is None or counters[0] is not handle:
                counters = self._counters_for(handle)
            counters[1].inc(n)
            counters[2].inc(int(np.count_nonzero(flags)))
        return BatchOutput(scores, flags, device, explanation, kernel_us)

    def _counters_for(self, handle: ModelHandle) -> tuple[ModelHandle, Any, Any]:
        if len(self._counters) > 8:  # old handles (reloads): keep the cache small
            self._counters.clear()
        v = str(handle.version)
        counters = (handle, self.metrics.records_scored.labels(handle.name, v), self.metrics.anomalies.labels(handle.name, v))
        self._counters[id(handle)] = counters
        return counters
