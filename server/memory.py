"""Give the heap back to the OS once a worker is idle after large requests.

A 32 MB request passes through several buffers of its size (the message, the decoded records, the
scores, the answer). glibc's malloc serves them from per-thread arenas and keeps the pages after
they are freed: its mmap threshold rises to the largest block freed, so later blocks of that size
come from the arenas too, and an arena only shrinks from its top. After a burst of large requests a
worker stayed at several times its resting size for good (issue 14 item 22). ``malloc_trim(0)``
returns every free page of every arena (``MADV_DONTNEED``); it is run on a scoring thread when no
record is in flight any more, so no request waits for it, and at most once per ``min_interval_s``.

NOTE: a fixed, low mmap threshold (``M_MMAP_THRESHOLD``) bounds memory as well, but every large
block then costs fresh page faults on every request: 250k-record requests were 25-60% slower.
Trimming when idle pays the faults only after a quiet moment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger("outlierd.memory")


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` (1 when memory was released), or None where the C library has none
    (musl, macOS): there is then nothing to do."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: int(fn(0))  # ctypes releases the GIL for the call


class IdleTrim:
    """Decides when to trim: after a request of at least ``min_bytes``, once the worker has been idle
    for ``idle_s``, and once more after ``settle_s`` more of idleness (what the capture writer and
    other background threads free after the answers went out), never twice within ``min_interval_s``.

    ``large(nbytes)`` is told every admitted request's size; ``retry_in()`` says how long to wait,
    once idle, before looking again (None: no trim pending); ``due()`` whether to trim now;
    ``started()`` that a trim runs. Event loop only: no locks."""

    def __init__(self, min_bytes: int, idle_s: float = 1.0, settle_s: float = 5.0, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.min_bytes = min_bytes
        self.idle_s = idle_s
        self.settle_s = settle_s
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._pending = 0  # trims still to run: 2 after a large request (idle, then settled), 1, 0
        self._last = -float("inf")
        self.trims = 0

    def large(self, nbytes: int) -> None:
        if self.min_bytes and nbytes >= self.min_bytes:
            self._pending = 2

    def retry_in(self) -> float | None:
        if not self._pending:
            return None
        wait = self.idle_s if self._pending == 2 else self.settle_s
        return max(wait, self.min_interval_s - (self._clock() - self._last))

    def due(self) -> bool:
        return self._pending > 0 and self._clock() - self._last >= self.min_interval_s

    def started(self) -> None:
        self._pending -= 1
        self._last = self._clock()
        self.trims += 1
