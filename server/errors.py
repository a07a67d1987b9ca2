"""The one place where domain errors become gRPC status codes, for unary and streaming handlers."""

from __future__ import annotations

import grpc

from outlierd.core.errors import OutlierdError


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
    code = getattr(error, "code", "INTERNAL")
    return getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL) if isinstance(code, str) else grpc.StatusCode.INTERNAL


def message(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, LookupError) and len(error.args) == 1 else str(error)
