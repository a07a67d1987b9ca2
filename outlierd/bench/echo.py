"""The transport floor: a bare grpc.aio server for ``outlierd.v1.Scorer`` that scores nothing.

It answers each ScoreRequest with a ScoreResponse of the same shape as outlierd's (one score of 0.0
and one ``anomalous=False`` per record, the ids and request_id echoed, model / version / device set),
so a load generator sees the same message sizes as from the real server. Per message it counts the
records (``len(raw_values) / (4 * n_features)`` or ``len(values) / n_features``) and builds the
response; nothing else. It also serves grpc.health.v1 (SERVING once it listens), so the benchmark
waits for it exactly as it waits for ``outlierd serve``.

    python -m outlierd.bench.echo --port 50099 [--host 127.0.0.1]   (or benchmarks/echo_server.py)

Stops on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


from outlierd.v1 import scoring_pb2 as pb  # noqa: E402
from outlierd.v1 import scoring_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = pb.DESCRIPTOR.services_by_name["Scorer"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # as outlierd's default --max-message-bytes


class EchoScorer(pb_grpc.ScorerServicer):
    """Same messages as outlierd, no decode, no scoring: zeros of the right length."""

    def __init__(self, model: str = "echo", version: str = "1"):
        self.model, self.version = model, version
        self._zeros: dict[int, tuple[list[float], list[bool]]] = {}

    def _answer(self, req: pb.ScoreRequest) -> pb.ScoreResponse:
        d = req.n_features or 1
        n = len(req.raw_values) // (4 * d) if req.raw_values else len(req.values) // d
        z = self._zeros.get(n)
        if z is None:
            z = self._zeros[n] = ([0.0] * n, [False] * n)
        return pb.ScoreResponse(request_id=req.request_id, model=self.model, version=self.version,
                                scores=z[0], anomalous=z[1], ids=req.ids, device="cpu")

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return self._answer(request)

    async def ScoreStream(self, request_iterator: AsyncIterator[pb.ScoreRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResponse]:
        async for req in request_iterator:
            yield self._answer(req)

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(model=self.model, version=self.version, alias="echo")


async def serve(host: str, port: int) -> None:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_ScorerServicer_to_server(EchoScorer(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"echo_server: cannot bind {host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"echo_server listening {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
