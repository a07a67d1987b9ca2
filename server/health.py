"""grpc.health.v1 with one change: Watch streams end once shutdown has begun.

The stock aio servicer keeps every Watch open until the server's grace runs out, so a client that
watches health (client-side health checking does) would make every SIGTERM last the full grace.
Here a watcher receives NOT_SERVING and then its stream ends, and ``server.stop`` need only wait for
real work.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as _AioHealthServicer


class HealthServicer(_AioHealthServicer):
    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:  # noqa: N802 - gRPC name
        # mirrors the parent's Watch (grpc_health.v1._async), plus the return on shutdown
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]
