"""Which models a server serves: ``--model A`` (one), ``--model A --model B`` / ``--models A,B``
(several), ``--models all`` (every registry model that has the served alias; one added later is
picked up by :class:`Discovery` without a restart). Each gets its own slot, hot reload, threshold,
rollout, drift state and metrics labels (``ServedModel``); the first is the default model (requests
with an empty model name)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from outlierd.core.errors import InvalidInputError
from outlierd.core.registry import Registry

from .plane import DataPlane, ServedModel

log = logging.getLogger("outlierd.discovery")
ALL = "all"
DISCOVER_INTERVAL_S = 1.0  # how often --models all looks for new models
RETRY_S = 30.0  # a discovered model that failed to load is tried again after this long


def listed(model: str, models: str | None) -> list[str]:
    """The names given (``model`` first, then ``models``' comma-separated names), without repeats;
    empty for ``--models all`` without ``--model``."""
    names = [model] if model else []
    if models and models != ALL:
        names += [n.strip() for n in models.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def with_alias(registry: Registry, alias: str) -> list[str]:
    """Every model of the registry whose ``alias`` exists, in name order."""
    names = []
    for name in registry.models():
        try:
            if alias in registry.aliases(name):
                names.append(name)
        except (OSError, ValueError) as e:  # a model directory being written or damaged: not served, said
            log.warning("registry model unreadable, not served model=%s error=%s", name, e)
    return names


def served_names(registry: Registry, model: str, models: str | None, alias: str) -> list[str]:
    """The names to serve at start (InvalidInputError when there are none)."""
    names = listed(model, models)
    if models == ALL:
        names = list(dict.fromkeys(names + with_alias(registry, alias)))
    if not names:
        raise InvalidInputError(f"no model to serve: no model in registry {registry.root} has the alias {alias!r}"
                                if models == ALL else "no model to serve: give --model NAME")
    return names


class Discovery:
    """``--models all``: adds models that gain the served alias to the running plane (loaded off
    the event loop by ``start``); a model that fails to load keeps being retried every RETRY_S."""

    def __init__(self, registry: Registry, alias: str, plane: DataPlane,
                 start: Callable[[str], Awaitable[ServedModel]]) -> None:
        self.registry, self.alias, self.plane, self.start = registry, alias, plane, start
        self._next = 0.0
        self._failed: dict[str, float] = {}  # name -> when to try again

    async def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + DISCOVER_INTERVAL_S
        names = await asyncio.get_running_loop().run_in_executor(None, with_alias, self.registry, self.alias)
        for name in names:
            if name in self.plane.models or self._failed.get(name, 0.0) > now:
                continue
            try:
                served = await self.start(name)
            except Exception as e:  # the others keep serving; said once per try
                log.error("new model could not be loaded, retrying in %.0fs model=%s error=%s", RETRY_S, name, e)
                self._failed[name] = now + RETRY_S
                continue
            self._failed.pop(name, None)
            self.plane.add(served)
            log.info("serving new model=%s version=%d", name, served.current.version)
