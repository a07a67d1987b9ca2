"""Bearer-token check for every RPC but health checks (orchestrators probe without secrets)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

from outlierd.core.errors import InvalidInputError

# probes carry no secret: gRPC health, and the Open Inference Protocol's server liveness and readiness
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/inference.GRPCInferenceService/ServerLive",
                   "/inference.GRPCInferenceService/ServerReady")


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def abort_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort_unary), grpc.stream_stream_rpc_method_handler(abort_stream)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise InvalidInputError("the auth token must not be empty")
        self._token = token.encode()
        self._deny_unary, self._deny_stream = _deny("missing or invalid bearer token (metadata 'authorization: Bearer <token>')")

    def _authorized(self, value: str | bytes) -> bool:
        """``authorization: Bearer <token>``; the scheme is case-insensitive (RFC 6750, RFC 9110 §11.1)."""
        got = value.encode() if isinstance(value, str) else value
        scheme, _, token = got.partition(b" ")
        # compared in constant time whatever the scheme, so a wrong scheme takes as long as a wrong token
        return hmac.compare_digest(token.lstrip(b" "), self._token) & (scheme.lower() == b"bearer")

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method.startswith(EXEMPT_PREFIXES):
            return await continuation(details)
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and self._authorized(value):
                return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        return self._deny_stream if handler.request_streaming else self._deny_unary


def read_token(path: str | None, env_value: str | None) -> str | None:
    """The token from a file (first line, stripped) or from the environment."""
    if path:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
        if not token:
            raise InvalidInputError(f"token file {path} is empty")
        return token
    return env_value or None
