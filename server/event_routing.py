"""Raw events with several worker processes: each entity's state has one owner.

Worker ``i`` of ``n`` owns the entities whose key hash is ``i`` modulo ``n``. SO_REUSEPORT hands a
client's connection to any worker; that worker validates the whole message (errors still name the
message's rows), computes the rows it owns, and sends every other worker its rows over a local
Unix socket (``<tmp>/outlierd-<port>-w<i>.sock``), one ordered stream per pair of workers: a
worker's messages reach each owner in the order they arrived, so an entity's events are applied in
order, as with one worker. The answer is assembled in the message's order and scored by the worker
that received it.

Cost: a message whose entities are spread over n workers pays (n - 1)/n of its rows in one local
round trip (Arrow IPC out, float64 features back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa

from .errors import RequestError

log = logging.getLogger("outlierd.events")
METHOD = "/outlierd.internal.EventFeatures/Compute"
_OK, _ERROR = b"\x00", b"\x01"


def socket_path(port: int, index: int) -> Path:
    return Path(tempfile.gettempdir()) / f"outlierd-{port}-w{index}.sock"


def _identity(b: bytes) -> bytes:
    return b


def ipc_bytes(table: pa.Table | pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return sink.getvalue().to_pybytes()


class _Link:
    """One ordered stream to another worker: requests go out in the order :meth:`send` was called,
    answers resolve the futures in that order."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self._out: deque[bytes] = deque()
        self._pending: deque[asyncio.Future] = deque()
        self._wake = asyncio.Event()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, data: bytes) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        self._out.append(data)
        self._wake.set()
        return fut

    async def _requests(self) -> AsyncIterator[bytes]:
        while True:
            while self._out:
                yield self._out.popleft()
            self._wake.clear()
            await self._wake.wait()

    async def _run(self) -> None:
        stub = self.channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)
        self._call = call = stub(self._requests())
        try:
            async for answer in call:
                self._pending.popleft().set_result(answer)
        except Exception as e:  # the owner went away: every unanswered message fails, the next send reconnects
            while self._pending:
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_exception(RequestError(f"the worker owning some of these entities is not reachable: {e}",
                                                   code="UNAVAILABLE", reason="events"))
            raise

    @property
    def broken(self) -> bool:
        return self._task.done()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        await self.channel.close()


class EventRouter:
    """Owner routing of raw events between ``n`` workers of one server (this one is ``index``)."""

    def __init__(self, index: int, n: int, port: int, compute: Callable[[str, pa.Table], np.ndarray]) -> None:
        self.index, self.n, self.port = index, n, port
        self.compute = compute  # (model name, this worker's rows) -> features from its own state
        self._links: dict[int, _Link] = {}
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        path = socket_path(self.port, self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(self._serve, request_deserializer=_identity, response_serializer=_identity)
        service, method = METHOD.rsplit("/", 1)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.strip("/"), {method: handler}),))
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        for link in self._links.values():
            await link.close()
        if self._server is not None:
            await self._server.stop(1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(self.port, self.index))

    async def _serve(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # in order: each message's rows are applied to this worker's state before the next one's
        async for data in requests:
            try:
                size = int.from_bytes(data[:2], "little")  # the model name, then the Arrow IPC stream
                model = data[2:2 + size].decode()
                with pa.ipc.open_stream(pa.py_buffer(data[2 + size:])) as reader:
                    table = reader.read_all()
                yield _OK + np.ascontiguousarray(self.compute(model, table), dtype="<f8").tobytes()
            except Exception as e:
                yield _ERROR + str(getattr(e, "message", e)).encode()

    def _link(self, owner: int) -> _Link:
        link = self._links.get(owner)
        if link is None or link.broken:
            link = self._links[owner] = _Link(f"unix:{socket_path(self.port, owner)}")
        return link

    def owners(self, entity_hashes: np.ndarray) -> np.ndarray:
        return (entity_hashes.view(np.uint64) % np.uint64(self.n)).astype(np.int64)

    def send(self, owner: int, model: str, table: pa.Table | pa.RecordBatch) -> asyncio.Future:
        """Queue ``table``'s rows of ``model`` for ``owner`` (synchronously: order is kept); the future gives bytes."""
        name = model.encode()
        return self._link(owner).send(len(name).to_bytes(2, "little") + name + ipc_bytes(table))

    @staticmethod
    def features(answer: bytes, rows: int) -> np.ndarray:
        if answer[:1] != _OK:
            raise RequestError(f"arrow_events: {answer[1:].decode(errors='replace')}", reason="events")
        return np.frombuffer(answer, dtype="<f8", offset=1).reshape(rows, -1)
