"""The one place where errors become gRPC statuses: one decorator for unary handlers, one for
streams, and the text a stream message's ``error`` field carries.

Every error the project raises on purpose is an :class:`OutlierdError` and answers with its own
``code`` and message (an InvalidInputError raised while scoring is INVALID_ARGUMENT, an
ArtifactError or DeviceError FAILED_PRECONDITION, ...). Anything else is unexpected: it is logged
once, with its traceback, and answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, TypeVar
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from outlierd.core.errors import OutlierdError

log = logging.getLogger("outlierd.errors")
S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class RequestError(OutlierdError):
    """A request the service refuses; ``reason`` labels the invalid-input metric."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT", reason: str = "invalid"):
        super().__init__(message)
        self.code = code
        self.reason = reason


class Overloaded(RequestError):
    def __init__(self, message: str):
        super().__init__(message, code="RESOURCE_EXHAUSTED", reason="overloaded")


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an error raised while handling a request."""
    code = getattr(error, "code", "INTERNAL") if isinstance(error, OutlierdError) else "INTERNAL"
    return getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL) if isinstance(code, str) else grpc.StatusCode.INTERNAL


def message(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, LookupError) and len(error.args) == 1 else str(error)


def expected(error: BaseException) -> bool:
    """Raised on purpose (answered with its own status), as opposed to a bug or a library failure."""
    return isinstance(error, OutlierdError)


def describe(error: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """``(status, details)`` for an error raised while ``what`` (e.g. "scoring"): an OutlierdError
    answers with its own code and message; anything else is logged with its traceback and answered
    INTERNAL."""
    if expected(error):
        return status_code(error), message(error)
    log.error("internal error while %s: %s", what, error, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error while {what}: {error}"


def message_error(error: BaseException) -> str:
    """The ``error`` text of one stream message's answer ("CODE: message"), the stream going on;
    an unexpected error is logged with its traceback and answered INTERNAL."""
    if expected(error):
        return f"{status_code(error).name}: {message(error)}"
    log.error("internal error: %s", error, exc_info=error)
    return f"INTERNAL: internal error: {error}"


async def _abort(servicer: Any, context: grpc.aio.ServicerContext, error: BaseException, what: str, count: bool) -> None:
    """End the call with ``error``'s status (counted first by the servicer's ``count_error`` when
    ``count``); raises, as ``context.abort`` does."""
    counter = getattr(servicer, "count_error", None) if count else None
    if counter is not None:
        counter(error)
    code, details = describe(error, what)
    # NOTE: grpc's aborted-call objects form reference cycles that keep the AbortError, and through its
    # context this error's traceback, until a gc pass: its frames hold the request (32 MB or more).
    error.__traceback__ = None
    await context.abort(code, details)


def unary_errors(what: str, *, count: bool = False) -> Callable[[Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[Resp]]],
                                        Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[Resp]]]:
    """Decorate a unary handler of a servicer: an error it raises ends the call with its status
    (see :func:`describe`); with ``count``, it is first counted by the servicer's ``count_error``."""

    def decorate(handler: Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[Resp]]
                 ) -> Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
        @functools.wraps(handler)
        async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            try:
                return await handler(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                error = e
            del request  # this frame is in the abort's traceback (see _abort): it must not hold the request
            await _abort(self, context, error, what, count)
            raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

        return wrapper

    return decorate


def stream_errors(what: str, *, count: bool = False) -> Callable[[Callable[[S, Any, grpc.aio.ServicerContext], AsyncIterator[Resp]]],
                                         Callable[[S, Any, grpc.aio.ServicerContext], AsyncIterator[Resp]]]:
    """Decorate a streaming handler (an async generator): an error that escapes it ends the stream
    with its status (see :func:`describe`), counted as in :func:`unary_errors`. Errors a handler
    answers per message (``message_error``) never reach here: the stream goes on."""

    def decorate(handler: Callable[[S, Any, grpc.aio.ServicerContext], AsyncIterator[Resp]]
                 ) -> Callable[[S, Any, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
        @functools.wraps(handler)
        async def wrapper(self: S, request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
            try:
                async for response in handler(self, request_iterator, context):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                await _abort(self, context, e, what, count)

        return wrapper

    return decorate
