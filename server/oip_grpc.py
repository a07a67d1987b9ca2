"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` (KServe v2, as Triton
extends it) on the same port as ``outlierd.v1.Scorer``.

The protobuf modules are the ones ``tritonclient`` ships (installed without its ``[grpc]`` extra,
which pins protobuf below 7): one copy of the ``inference`` descriptors per process (kserve#3099).
Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (typed
and raw contents), ModelStreamInfer (in order) and ModelConfig; every other method answers
UNIMPLEMENTED (the generated base class). The protocol's rules are in ``oip.py``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any
from collections.abc import AsyncIterator

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from . import oip
from .errors import RequestError, message_error, stream_errors, unary_errors
from .plane import DataPlane
from .requests import Undecodable, lenient

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_VERSION = "0.1.0"
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}
_CONFIG_TYPES = {"FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64, "BOOL": mc.TYPE_BOOL, "INT64": mc.TYPE_INT64}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (string, bytes, message, packed repeated)."""
    return b"".join((_varint(number << 3 | 2), _varint(len(data)), data))


@functools.lru_cache(maxsize=64)
def _head(name: str, version: int) -> bytes:
    """ModelInferResponse fields 1 and 2: the model's name and version."""
    return _field(1, name.encode()) + _field(2, str(version).encode())


def _tensor(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """One ModelInferResponse.outputs entry (field 5): name, datatype, shape."""
    dims = b"".join(_varint(d) for d in shape)
    return _field(5, _field(1, name.encode()) + _field(2, datatype.encode()) + _field(3, dims))


@functools.lru_cache(maxsize=256)
def _default_tensors(n: int) -> bytes:
    return _tensor("score", "FP64", (n,)) + _tensor("anomalous", "BOOL", (n,))


def _serialize(message: Any) -> bytes:
    """Responses may come as bytes already (ModelInfer's, written in wire format)."""
    return message if type(message) is bytes else message.SerializeToString()


def _param(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, *, stream_inflight: int = 8, metrics: Any = None) -> None:
        self.plane, self.metrics = plane, metrics
        self.stream_inflight = stream_inflight
        self._latency = {m: metrics.request_latency.labels(m) for m in ("ModelInfer", "ModelStreamInfer")} if metrics else {}

    def count_error(self, error: BaseException) -> None:
        self.plane.count_error(error)

    # -- decoding and encoding ------------------------------------------------------------------

    def _start(self, req: pb.ModelInferRequest) -> asyncio.Future:
        """Decode one request and hand it to the plane (synchronously: a stream binds in order)."""
        if type(req) is Undecodable:
            raise req.refuse()
        plane = self.plane
        served = plane.resolve(req.model_name)
        handle = plane.route(served, (), 0)
        oip.check_version(handle, req.model_version)
        i = oip.pick_input([t.name for t in req.inputs])
        tensor = req.inputs[i]
        if req.raw_input_contents:
            if len(req.raw_input_contents) != len(req.inputs):
                raise RequestError(f"raw_input_contents has {len(req.raw_input_contents)} entries for {len(req.inputs)} inputs",
                                   reason="shape")
            values = oip.from_bytes(tensor.datatype, req.raw_input_contents[i])
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise RequestError(f"inputs[{oip.INPUT}].datatype is {tensor.datatype[:16]!r}; expected FP32 or FP64",
                                   reason="shape")
            values = np.asarray(getattr(tensor.contents, field), dtype=oip.DTYPES[tensor.datatype])
        X = oip.records(handle, tensor.datatype, tensor.shape, values)
        explain = oip.explain_of({k: _param(v) for k, v in req.parameters.items()}) if req.parameters else None
        if X.dtype != np.float32:
            with np.errstate(over="ignore"):  # FP64 beyond float32: inf, then the model's non-finite policy
                X = X.astype(np.float32)
        return plane.submit(handle, X, explain=explain)

    @staticmethod
    def _response(req: pb.ModelInferRequest, result: Any) -> bytes:
        """The serialized ModelInferResponse, outputs as raw contents (what Triton answers).

        NOTE: written in protobuf's wire format directly (as ``servicer._packed_scores`` does):
        building the message costs ~27 us for the two outputs, these bytes ~5 us, a difference that
        is most of ModelInfer's extra latency over Score at one record. tests/test_oip.py parses it."""
        handle = result.handle
        if req.outputs or result.explanation is not None:
            outputs = oip.outputs(result, [o.name for o in req.outputs])
            tensors = [(o.name, o.datatype, o.shape, o.data.tobytes()) for o in outputs]
            parts = [_head(handle.name, handle.version)]
            if req.id:
                parts.append(_field(3, req.id.encode()))
            parts.extend(_tensor(name, datatype, shape) for name, datatype, shape, _ in tensors)
            parts.extend(_field(6, raw) for *_, raw in tensors)
            return b"".join(parts)
        # the common case, score and anomalous: the parts before the values are cached
        n = result.scores.shape[0]
        ident = _field(3, req.id.encode()) if req.id else b""
        return b"".join((_head(handle.name, handle.version), ident, _default_tensors(n), _field(6, result.scores.astype("<f8", copy=False).tobytes()),
                         _field(6, result.flags.tobytes())))

    def _observe(self, method: str, t0: float) -> None:
        if self.metrics is not None:
            self._latency[method].observe(time.perf_counter() - t0)

    # -- health and metadata --------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=all(m.slot.current is not None for m in self.plane.models.values()))

    @unary_errors("reading model readiness")
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:  # noqa: N802
        served = self.plane.models.get(request.name)
        handle = served.slot.current if served is not None else None
        ready = handle is not None and (not request.version or request.version == str(handle.version))
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=oip.PLATFORM, version=SERVER_VERSION, extensions=[])

    @unary_errors("reading model metadata")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        handle = self.plane.info(request.name)
        oip.check_version(handle, request.version)
        inputs, outputs = oip.tensor_metadata(handle)
        resp = pb.ModelMetadataResponse(name=handle.name, versions=[str(handle.version)], platform=oip.PLATFORM)
        for t in inputs:
            resp.inputs.add(**t)
        for t in outputs:
            resp.outputs.add(**t)
        return resp

    @unary_errors("reading model config")
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:  # noqa: N802
        handle = self.plane.info(request.name)
        oip.check_version(handle, request.version)
        inputs, outputs = oip.tensor_metadata(handle)
        # max_batch_size 0: shapes are given whole, the first dimension (-1) being the records
        config = mc.ModelConfig(name=handle.name, platform=oip.PLATFORM, backend=oip.PLATFORM, max_batch_size=0)
        for t in inputs:
            config.input.add(name=t["name"], data_type=_CONFIG_TYPES[t["datatype"]], dims=t["shape"])
        for t in outputs[:2]:  # the explain outputs come only when asked for
            config.output.add(name=t["name"], data_type=_CONFIG_TYPES[t["datatype"]], dims=t["shape"])
        return pb.ModelConfigResponse(config=config)

    # -- inference ------------------------------------------------------------------------------

    @unary_errors("scoring", count=True)
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        t0 = time.perf_counter()
        response = self._response(request, await self._start(request))
        self._observe("ModelInfer", t0)
        return response

    @stream_errors("scoring", count=True)
    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],  # noqa: N802
                               context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # A reader queues messages as they arrive (up to stream_inflight ahead); this generator
        # answers them in order. A bad message gets an error_message and the stream goes on.
        pending: asyncio.Queue = asyncio.Queue(self.stream_inflight)

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    t0 = time.perf_counter()
                    entry: tuple[Any, float, asyncio.Future | None, Exception | None]
                    try:
                        entry = (req, t0, self._start(req), None)
                    except Exception as e:
                        self.count_error(e)
                        entry = (req, t0, None, e)
                    await pending.put(entry)
            finally:
                await pending.put(None)

        task = asyncio.get_running_loop().create_task(reader())
        try:
            while (entry := await pending.get()) is not None:
                req, t0, fut, err = entry
                if err is None:
                    try:
                        response = self._response(req, await fut)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        self.count_error(e)
                        err = e
                if err is not None:
                    yield pb.ModelStreamInferResponse(error_message=message_error(err), infer_response=pb.ModelInferResponse(
                        model_name=getattr(req, "model_name", ""), id=getattr(req, "id", "")))
                    continue
                yield _field(2, response)  # ModelStreamInferResponse.infer_response
                self._observe("ModelStreamInfer", t0)
        finally:
            task.cancel()


def add_to_server(servicer: OipServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as ``inference.GRPCInferenceService`` on ``server`` (as the generated
    ``add_GRPCInferenceServiceServicer_to_server`` does), with responses that may be bytes already,
    and lenient request deserializers for the inference methods (bytes that are not a request are
    answered INVALID_ARGUMENT; a stream answers that message and goes on)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming, method.server_streaming)]
        parse = lenient(request_class) if method.name in ("ModelInfer", "ModelStreamInfer") else request_class.FromString
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=parse, response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
