"""Bounds on long-lived streams, so that idle or greedy clients cannot hold every RPC slot.

A worker accepts ``--max-concurrent-rpcs`` calls at once; an open stream holds one slot for as long
as it lives, messages or not. Three bounds keep capacity for other clients:

* per connection and per client address: :meth:`StreamGuard.admit` refuses a stream beyond
  ``--max-streams-per-connection`` open ones on its connection, or ``--max-streams-per-peer`` from
  its address, with RESOURCE_EXHAUSTED. (Not HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS: gRPC
  clients answer streams beyond it with a reset, and unary calls would hit it too.)
* in time: :class:`IdleTimer` closes a stream with no message and nothing unanswered for
  ``--stream-idle-s`` (UNAVAILABLE: a client reconnects when it has records again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from .errors import RequestError


def peer_address(peer: str) -> str:
    """The client address of a gRPC peer string (``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``,
    ``ipv6:[::1]:51234`` -> ``[::1]``); other forms (unix sockets) as given."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


class IdleTimer:
    """Calls ``on_idle`` once when ``touch`` was not called for ``idle_s`` and ``busy()`` is false.

    NOTE: one timer per stream, re-armed only when it fires (never per message): a message costs
    one attribute store (``touch``)."""

    __slots__ = ("last", "fired", "_loop", "_idle_s", "_busy", "_on_idle", "_handle")

    def __init__(self, idle_s: float, on_idle: Callable[[], object], busy: Callable[[], bool] = lambda: False) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle_s, self._busy, self._on_idle = idle_s, busy, on_idle
        self.last = self._loop.time()
        self.fired = False
        self._handle = self._loop.call_later(idle_s, self._check)

    def touch(self) -> None:
        self.last = self._loop.time()

    def _check(self) -> None:
        now = self._loop.time()
        due = self.last + self._idle_s
        if now < due or self._busy():
            self._handle = self._loop.call_later(max(due - now, self._idle_s / 10), self._check)
            return
        self.fired = True
        self._on_idle()

    def cancel(self) -> None:
        self._handle.cancel()

    def closed_error(self) -> RequestError:
        return RequestError(f"stream idle for {self._idle_s:g} s (no message, nothing unanswered): closed to keep "
                            "capacity for other clients (--stream-idle-s); open a new stream when there are records",
                            code="UNAVAILABLE", reason="idle")


class StreamGuard:
    """Open streams per client address, bounded; and the idle timeout streams get."""

    def __init__(self, max_per_peer: int = 1024, max_per_connection: int = 256, idle_s: float = 0.0) -> None:
        self.max_per_peer, self.max_per_connection = max_per_peer, max_per_connection
        self.idle_s = idle_s
        self._open: dict[str, int] = {}  # by address ("10.0.0.7") and by connection ("ipv4:10.0.0.7:51234")

    @contextlib.contextmanager
    def admit(self, context: Any) -> Iterator[None]:
        """Count a stream of ``context``'s connection and address while it lives;
        RESOURCE_EXHAUSTED beyond either bound."""
        connection = context.peer()
        address = peer_address(connection)
        for key, limit, what, flag in ((connection, self.max_per_connection, "on this connection", "connection"),
                                       (address, self.max_per_peer, f"from {address}", "peer")):
            n = self._open.get(key, 0)
            if n >= limit:
                raise RequestError(f"too many open streams {what}: {n} (limit {limit}, --max-streams-per-{flag}); close idle "
                                   "streams or send more messages on fewer", code="RESOURCE_EXHAUSTED", reason="streams")
        keys = (connection, address) if connection != address else (connection,)
        for key in keys:
            self._open[key] = self._open.get(key, 0) + 1
        try:
            yield
        finally:
            for key in keys:
                left = self._open[key] - 1
                if left:
                    self._open[key] = left
                else:
                    del self._open[key]

    def timer(self, on_idle: Callable[[], object], busy: Callable[[], bool] = lambda: False) -> IdleTimer | None:
        """An :class:`IdleTimer` for a new stream (None when idle streams are never closed)."""
        return IdleTimer(self.idle_s, on_idle, busy) if self.idle_s > 0 else None
