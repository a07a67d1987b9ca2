"""Observers of scored batches, handed to the batcher at construction; they run on the scoring
thread (the kernel has just released the GIL there, and the event loop never pays for them).

* :class:`DriftObserver` (``on_scored``, before the answer): drift and data-quality windows.
* :class:`CaptureObserver` (``on_answered``, after the answer): flagged records and a sample into
  the capture writer, then each request's hook (shadow scoring takes the champion's selection).
"""

from __future__ import annotations

import logging
from typing import Any

from outlierd.core.registry import CHALLENGER, CHAMPION

from .results import CaptureTag, ScoredBatch

log = logging.getLogger("outlierd.batcher")
_UNTAGGED = CaptureTag((), 0)


def drift_observer(batch: ScoredBatch) -> None:
    """Feed the handle's drift monitor (``handle.monitor``, one per loaded version) with the batch."""
    handle = batch.handle
    monitor = handle.monitor
    if monitor is None:
        return
    try:
        monitor.observe(batch.X, batch.out.scores, handle.threshold)
    except Exception:  # monitoring must never fail scoring
        log.exception("drift monitor failed model=%s version=%d", handle.name, handle.version)


class CaptureObserver:
    """Capture a scored batch's flagged records and sample (one Numba call into the writer's ring
    and one append to its queue: ``CaptureWriter.capture_batch``), then call the tags' hooks.
    ``writer`` None: capture is off, the hooks (shadow scoring) are still called, with None."""

    def __init__(self, writer: Any = None) -> None:
        self.writer = writer  # monitoring.capture.CaptureWriter or None

    def __call__(self, batch: ScoredBatch) -> None:
        # NOTE: every Python step here costs several times its quiet-process cost (the kernel just
        # ran on this thread): the usual case, one tagged request and no hook, takes few
        items = batch.items
        one = items[0].tag if len(items) == 1 else None
        if one is None and all(it.tag is None for it in items):
            return
        handle, scores = batch.handle, batch.out.scores
        sel = None
        cap = self.writer
        if cap is not None and scores.shape[0]:
            role = CHALLENGER if handle.alias == CHALLENGER else CHAMPION
            if one is not None:
                sel = cap.capture_batch(handle, role, batch.X, scores, handle.threshold, (one,), None, batch.out.kernel_us)
            else:  # untagged requests (none from the plane) get generated ids
                sel = cap.capture_batch(handle, role, batch.X, scores, handle.threshold, [it.tag or _UNTAGGED for it in items],
                                        [it.X.shape[0] for it in items], batch.out.kernel_us)
        if one is not None:
            if one.then is not None:
                one.then(sel)
            return
        start = 0
        for it in items:
            if it.tag is not None and it.tag.then is not None:
                it.tag.then(None if sel is None else sel._replace(start=start))
            start += it.X.shape[0]
