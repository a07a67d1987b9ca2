"""Checkpoints of the streaming models a worker serves (``--checkpoint-dir``).

A streaming model (``Model.streaming``) learns every record it scores. Every
``--checkpoint-interval-s`` the worker copies its state under the model's lock and writes it with
``core.streaming.write_checkpoint`` (off the event loop); it writes a last one on a graceful stop.
When a model version starts serving and ``<dir>/<model>/v<version>`` exists, its state is restored
before the first record is scored, so a restarted server (SIGKILL included) resumes at the
checkpoint's stream position: the records it learned after that checkpoint are lost, the client
replays them from that position (the position is in ``checkpoint.json`` and in the log).

One worker owns a streaming model's state: several workers would each learn a different part of the
stream, and their states (and scores) would diverge; ``serve`` refuses ``--workers`` > 1 for one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from pathlib import Path
from typing import Any

from outlierd.core.errors import ArtifactError, InvalidInputError
from outlierd.core.streaming import read_checkpoint, write_checkpoint

from .reload import ModelHandle

log = logging.getLogger("outlierd.checkpoint")
STREAMING_KINDS = ("hst", "rshash")


def refuse_several_workers(settings: Any) -> None:
    """InvalidInputError when ``settings`` asks several workers for a streaming model (checked
    before any worker starts)."""
    if settings.workers <= 1:
        return
    from outlierd.core.artifact import read_manifest
    from outlierd.core.registry import Registry

    try:
        kind = read_manifest(Registry(settings.registry).path(settings.model, settings.alias))["detector"]["kind"]
    except Exception:  # an unknown model or alias: the worker's own start reports it
        return
    if kind in STREAMING_KINDS:
        raise InvalidInputError(f"--workers {settings.workers}: model {settings.model!r} ({kind}) learns while it scores and "
                                "its state has one owner; serve it with --workers 1 (several workers' states would diverge)")


class Checkpointer:
    """Restores and saves the checkpoints of one plane's streaming models."""

    def __init__(self, root: Path, interval_s: float) -> None:
        self.root = Path(root)
        self.interval_s = interval_s
        # weak: a version replaced by a hot reload is not kept alive here
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()  # models already restored (or started fresh)
        self._saved: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # model -> position of its last checkpoint

    def restore(self, handle: ModelHandle) -> int | None:
        """Restore ``handle``'s checkpoint if there is one (once per loaded model); its position."""
        model = handle.model
        if not model.streaming or model in self._seen:
            return None
        self._seen.add(model)
        try:
            found = read_checkpoint(self.root, handle.name, handle.version)
            if found is None:
                log.info("no checkpoint model=%s version=%d: starting from the artifact's state", handle.name, handle.version)
                return None
            meta, arrays = found
            model.stream.restore(arrays)
        except (ArtifactError, InvalidInputError, OSError) as e:
            log.error("checkpoint not restored model=%s version=%d error=%s", handle.name, handle.version, e)
            return None
        self._saved[model] = int(meta["position"])
        log.info("restored checkpoint model=%s version=%d position=%d", handle.name, handle.version, meta["position"])
        return int(meta["position"])

    def save(self, handle: ModelHandle) -> Path | None:
        """Write ``handle``'s state if it learned anything since its last checkpoint (blocking)."""
        model = handle.model
        if not model.streaming:
            return None
        arrays, position = model.stream.snapshot()
        if self._saved.get(model) == position:
            return None
        t0 = time.perf_counter()
        path = write_checkpoint(self.root, handle.name, handle.version, model.kind, arrays, position)
        self._saved[model] = position
        log.info("checkpoint model=%s version=%d position=%d seconds=%.3f", handle.name, handle.version, position,
                 time.perf_counter() - t0)
        return path

    async def run(self, handles: Any) -> None:
        """Save every ``interval_s`` the handles ``handles()`` returns; errors are logged, never fatal."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            for h in handles():
                try:
                    await loop.run_in_executor(None, self.save, h)
                except OSError as e:
                    log.error("checkpoint failed model=%s version=%d error=%s", h.name, h.version, e)
