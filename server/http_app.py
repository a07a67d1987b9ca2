"""The HTTP door (``--http-port``), in the worker's own event loop beside gRPC: FastAPI on uvicorn.

* The Open Inference Protocol's REST routes (``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{name}[/versions/{v}]``, ``…/ready``, ``…/infer``), JSON tensors and Triton's binary
  tensor extension (``Inference-Header-Content-Length``), so ``tritonclient.http`` works as is.
* Plain JSON for people: ``POST /v1/models/{name}/score`` and ``POST /v1/models/{name}/feedback``;
  ``GET /v1/models`` lists the served models.
* The OpenAPI document at ``/openapi.json``, its page at ``/docs``.

The same bearer token as gRPC (health routes exempt: probes carry no secret), the same TLS files,
the same data plane and so the same scoring metrics. Errors: ``{"error": message}`` with 400 (bad
input), 401, 404 (unknown model or version), 429 (overloaded), 503; FastAPI's 422 names the field
of a JSON body that does not fit its schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_json

from outlierd.core.errors import OutlierdError
from outlierd.monitoring.review import review_queue
from outlierd.v1 import scoring_pb2 as spb

from . import oip
from .errors import RequestError
from .feedback import FeedbackService, FieldLimits, label_row
from .plane import DataPlane
from .results import Explain, ScoreResult
from .settings import ServeSettings

log = logging.getLogger("outlierd.http")
HEADER_LENGTH = "inference-header-content-length"
_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
           "UNAVAILABLE": 503, "FAILED_PRECONDITION": 409, "DEADLINE_EXCEEDED": 504}
_LABELS = {"anomaly": spb.ANOMALY, "normal": spb.NORMAL}

# -- JSON bodies (their schemas are the OpenAPI document's) ---------------------------------------


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[list[float]] = Field(description="records, each a list of n_features numbers (NaN as null is refused)")
    ids: list[str] = Field(default=[], description="one id per record (for feedback), or none")
    explain: bool = Field(default=False, description="add each record's top_k features and contributions")
    top_k: int = Field(default=0, ge=0, description="features per explained record (0: the server's default)")
    explain_flagged_only: bool = False


class Explanation(BaseModel):
    record: int
    features: list[str]
    contributions: list[float]


class ScoreAnswer(BaseModel):
    model: str
    version: str
    alias: str
    device: str
    threshold: float
    scores: list[float]
    anomalous: list[bool]
    ids: list[str] = []
    explanations: list[Explanation] = []


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    record_id: str = Field(min_length=1)
    label: str = Field(pattern="^(anomaly|normal)$")
    reviewer: str = ""
    note: str = ""


class FeedbackAnswer(BaseModel):
    record_id: str
    stored: bool
    known_record: bool


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


_TENSOR_SCHEMA = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
    "datatype": {"type": "string"}, "parameters": {"type": "object"}, "data": {"type": "array"}}}
_INFER_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}}}}}}}}

# -- errors and auth ----------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _error_response(plane: DataPlane, e: Exception) -> JSONResponse:
    plane.count_error(e)
    if isinstance(e, OutlierdError):
        return _error(_STATUS.get(getattr(e, "code", "INVALID_ARGUMENT"), 400), str(e))
    log.error("internal error while serving http: %s", e, exc_info=e)
    return _error(500, f"internal error: {e}")


_BEARER = Depends(HTTPBearer(auto_error=False))  # FastAPI reads a dependency from the default


class TokenCheck:
    """The bearer token (``Authorization: Bearer <token>``), compared in constant time; 401 otherwise."""

    def __init__(self, token: str | None) -> None:
        self.token = token.encode() if token else None

    async def __call__(self, credentials: HTTPAuthorizationCredentials | None = _BEARER) -> None:
        if self.token is None:
            return
        got = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(got, self.token):
            raise _Unauthorized()


class _Unauthorized(Exception):
    pass


# -- decoding and encoding ----------------------------------------------------------------------


def _json_values(tensor: dict[str, Any], datatype: str) -> np.ndarray:
    data = tensor.get("data")
    if not isinstance(data, list):
        raise RequestError(f"inputs[{oip.INPUT}].data must be an array of numbers (or send binary data)", reason="shape")
    try:
        values = np.asarray(data, dtype=oip.DTYPES[datatype] if datatype in oip.DTYPES else np.float64)
    except (ValueError, TypeError, OverflowError) as e:
        raise RequestError(f"inputs[{oip.INPUT}].data holds something that is not a number of one nesting depth: {e}",
                           reason="shape") from e
    if values.dtype == object:
        raise RequestError(f"inputs[{oip.INPUT}].data is ragged", reason="shape")
    return values.ravel()


def _infer_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part of an infer request and the binary part after it (the binary extension)."""
    split = len(body)
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError as e:
            raise RequestError(f"header Inference-Header-Content-Length is not an integer: {header_length[:32]!r}",
                               reason="decode") from e
        if not 0 <= split <= len(body):
            raise RequestError(f"header Inference-Header-Content-Length is {split}; the body has {len(body)} bytes",
                               reason="decode")
    try:
        doc = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not JSON: {e}", reason="decode") from e
    if not isinstance(doc, dict):
        raise RequestError("the body must be a JSON object with 'inputs'", reason="decode")
    return doc, body[split:]


def _decode_infer(plane: DataPlane, name: str, version: str, doc: dict[str, Any], binary: bytes):
    served = plane.resolve(name)
    handle = plane.route(served)
    oip.check_version(handle, version)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise RequestError("inputs must be a non-empty array of tensors", reason="shape")
    i = oip.pick_input([str(t.get("name", "")) for t in inputs])
    offset = 0
    raw: bytes | None = None
    for j, t in enumerate(inputs):  # binary inputs follow the JSON in input order
        params = t.get("parameters") if isinstance(t.get("parameters"), dict) else {}
        size = params.get("binary_data_size")
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise RequestError(f"inputs[{j}].parameters.binary_data_size is {str(size)[:32]}; {len(binary) - offset} bytes "
                               "of binary data are left", reason="shape")
        if j == i:
            raw = binary[offset:offset + size]
        offset += size
    tensor = inputs[i]
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(datatype, str):
        raise RequestError(f"inputs[{oip.INPUT}].datatype must be a string (FP32 or FP64)", reason="shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise RequestError(f"inputs[{oip.INPUT}].shape must be an array of integers", reason="shape")
    values = oip.from_bytes(datatype, raw) if raw is not None else _json_values(tensor, datatype)
    X = oip.records(handle, datatype, shape, values)
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError("parameters must be an object", reason="decode")
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                and isinstance(o.get("parameters", {}), dict) for o in outputs):
        raise RequestError("outputs must be an array of objects with a 'name' (and optional 'parameters' object)", reason="shape")
    explain = oip.explain_of(params)
    with np.errstate(over="ignore"):  # beyond float32: inf, then the model's non-finite policy
        X = np.asarray(X, dtype=np.float32)
    return handle, X, explain, params, outputs


def _encode_infer(doc: dict[str, Any], result: ScoreResult, params: dict[str, Any], outputs: list[dict[str, Any]]) -> Response:
    binary_all = params.get("binary_data_output") is True
    wants = {o["name"]: (o.get("parameters") or {}).get("binary_data") is True for o in outputs}
    answer: dict[str, Any] = {"model_name": result.handle.name, "model_version": str(result.handle.version), "outputs": []}
    if "id" in doc:
        answer["id"] = str(doc["id"])
    blobs = []
    for out in oip.outputs(result, list(wants)):
        tensor: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if binary_all or wants.get(out.name):
            blob = out.data.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = out.data.ravel().tolist()
        answer["outputs"].append(tensor)
    head = json.dumps(answer).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(b"".join((head, *blobs)), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def _score_answer(result: ScoreResult, ids: list[str]) -> dict[str, Any]:
    handle = result.handle
    answer: dict[str, Any] = {"model": handle.name, "version": str(handle.version), "alias": handle.alias, "device": result.device,
                              "threshold": handle.threshold, "scores": result.scores.tolist(), "anomalous": result.flags.tolist(),
                              "ids": ids, "explanations": []}
    if result.explanation is not None:
        features, contributions = result.explanation
        names = handle.model.feature_names
        for r in np.flatnonzero(features[:, 0] >= 0).tolist():
            answer["explanations"].append({"record": r, "features": [names[j] for j in features[r].tolist()],
                                           "contributions": contributions[r].tolist()})
    return answer


# -- the app ------------------------------------------------------------------------------------


def build_app(plane: DataPlane, *, token: str | None = None, feedback: FeedbackService | None = None,
              metrics: Any = None, registry: Any = None) -> FastAPI:
    """The FastAPI app on ``plane`` (routes above). ``registry`` (a core.registry.Registry): the
    review queue explains each alert with the version that scored it."""
    app = FastAPI(title="outlierd", version="0.1.0", description="Anomaly scores over the Open Inference Protocol (REST v2) and JSON.")
    auth = [Depends(TokenCheck(token))]
    latency = metrics.request_latency.labels("http") if metrics is not None else None

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse({"error": "missing or invalid bearer token (header 'Authorization: Bearer <token>')"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v2/health/live", tags=["health"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"])
    async def ready() -> JSONResponse:
        ok = all(m.slot.current is not None for m in plane.models.values())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2", tags=["oip"], dependencies=auth)
    async def server_metadata() -> dict[str, Any]:
        return {"name": oip.PLATFORM, "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    def metadata(name: str, version: str = "") -> Any:
        try:
            handle = plane.info(name)
            oip.check_version(handle, version)
        except RequestError as e:
            return _error_response(plane, e)
        inputs, outputs = oip.tensor_metadata(handle)
        return {"name": handle.name, "versions": [str(handle.version)], "platform": oip.PLATFORM, "inputs": inputs, "outputs": outputs}

    def model_ready(name: str, version: str = "") -> JSONResponse:
        served = plane.models.get(name)
        handle = served.slot.current if served is not None else None
        ok = handle is not None and (not version or version == str(handle.version))
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else (404 if served is None else 503))

    async def infer(request: Request, name: str, version: str = "") -> Response:
        t0 = time.perf_counter()
        try:
            doc, binary = _infer_request(await request.body(), request.headers.get(HEADER_LENGTH))
            handle, X, explain, params, outputs = _decode_infer(plane, name, version, doc, binary)
            result = await plane.submit(handle, X, explain=explain)
            response = _encode_infer(doc, result, params, outputs)
        except Exception as e:
            return _error_response(plane, e)
        if latency is not None:
            latency.observe(time.perf_counter() - t0)
        return response

    responses: dict[int | str, dict[str, Any]] = {400: {"description": "bad input, named"}, 404: {"description": "unknown model"}}
    app.get("/v2/models/{name}", tags=["oip"], dependencies=auth, response_model=ModelMetadata, responses=responses)(metadata)
    app.get("/v2/models/{name}/versions/{version}", tags=["oip"], dependencies=auth, response_model=ModelMetadata,
            responses=responses)(metadata)
    app.get("/v2/models/{name}/ready", tags=["oip"], dependencies=auth)(model_ready)
    app.get("/v2/models/{name}/versions/{version}/ready", tags=["oip"], dependencies=auth)(model_ready)
    app.post("/v2/models/{name}/infer", tags=["oip"], dependencies=auth, openapi_extra=_INFER_SCHEMA, responses=responses)(infer)
    app.post("/v2/models/{name}/versions/{version}/infer", tags=["oip"], dependencies=auth, openapi_extra=_INFER_SCHEMA,
             responses=responses)(infer)

    @app.get("/v1/models", tags=["json"], dependencies=auth)
    async def list_models() -> dict[str, Any]:
        return {"models": [{"name": m.name, "version": str(m.current.version), "alias": m.current.alias}
                           for m in plane.models.values() if m.slot.current is not None]}

    # NOTE: the body is parsed and validated by pydantic-core straight from the bytes (one pass in
    # Rust), not by FastAPI (json.loads, then validation of the Python objects): measured ~1.4x the
    # records/s at 256 records per request. The schema in the OpenAPI document is ScoreBody's all the same.
    score_schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": ScoreBody.model_json_schema()}}}}

    @app.post("/v1/models/{name}/score", tags=["json"], dependencies=auth, response_model=ScoreAnswer, responses={
        **responses, 422: {"description": "the body does not fit the schema: detail names the field"}}, openapi_extra=score_schema)
    async def score(name: str, request: Request) -> Any:
        t0 = time.perf_counter()
        try:
            body = ScoreBody.model_validate_json(await request.body())
        except ValidationError as e:
            plane.count_error(RequestError(str(e), reason="decode"))
            return JSONResponse({"detail": e.errors(include_url=False, include_input=False)}, status_code=422)
        try:
            if not body.records:
                X = np.empty((0, plane.resolve(name).current.model.n_features), dtype=np.float32)
            elif len({len(r) for r in body.records}) != 1:
                raise RequestError("records: every record must have the same number of values", reason="shape")
            else:
                with np.errstate(over="ignore"):  # beyond float32: inf, then the model's non-finite policy
                    X = np.asarray(body.records, dtype=np.float32)
            explain = Explain(body.top_k, body.explain_flagged_only) if body.explain else None
            result = await plane.score(name, X, ids=body.ids, explain=explain)
        except Exception as e:
            return _error_response(plane, e)
        if latency is not None:
            latency.observe(time.perf_counter() - t0)
        return Response(to_json(_score_answer(result, body.ids)), media_type="application/json")

    @app.post("/v1/models/{name}/feedback", tags=["json"], dependencies=auth, response_model=FeedbackAnswer, responses=responses)
    async def submit_feedback(name: str, body: FeedbackBody) -> Any:
        try:
            if feedback is None:
                raise RequestError("feedback is not enabled on this server", code="UNAVAILABLE", reason="feedback")
            plane.resolve(name)
            req = spb.FeedbackRequest(model=name, record_id=body.record_id, label=_LABELS[body.label], reviewer=body.reviewer,
                                      note=body.note)
            known = (await feedback.store([label_row(req, feedback.limits or FieldLimits())], [name]))[0]
        except Exception as e:
            return _error_response(plane, e)
        return {"record_id": body.record_id, "stored": True, "known_record": known}

    @app.get("/v1/models/{name}/review-queue", tags=["json"], dependencies=auth)
    async def review(name: str, since_s: float | None = None, limit: int = 50, top_k: int = 3) -> Any:
        """Captured alerts not labelled yet, newest first (``outlierd feedback queue``): ``since_s``
        seconds back (default: all), at most ``limit``, ``top_k`` explaining features each."""
        try:
            if feedback is None or registry is None:
                raise RequestError("feedback is not enabled on this server", code="UNAVAILABLE", reason="feedback")
            plane.resolve(name)
            if since_s is not None and not since_s > 0:
                raise RequestError(f"since_s must be > 0 seconds; got {since_s}", reason="feedback")
            since = None if since_s is None else time.time() - since_s

            def read() -> list[dict[str, Any]]:
                return review_queue(registry, feedback.opener.get(), name, since=since, limit=limit, top_k=top_k)

            rows = await asyncio.get_running_loop().run_in_executor(None, read)  # the store is never read on the event loop
        except Exception as e:
            return _error_response(plane, e)
        return {"model": name, "alerts": rows}

    return app


# -- serving it ---------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the worker handles SIGTERM / SIGINT itself and stops this server


def _socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # several workers share the port, as they do the gRPC one
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # accepted connections inherit it: without it a kept-alive connection's answers wait on the
    # client's delayed ACK (about 40 ms per call, measured by `outlierd bench`)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class HttpServer:
    """uvicorn serving ``app`` on an already bound socket, in the running event loop."""

    def __init__(self, app: FastAPI, settings: ServeSettings) -> None:
        assert settings.http_port is not None
        try:
            self.sock = _socket(settings.host, settings.http_port, settings.workers > 1)
        except OSError as e:
            raise OSError(f"cannot listen on {settings.host}:{settings.http_port} (--http-port): {e}") from e
        self.port = self.sock.getsockname()[1]
        tls: dict[str, Any] = {}
        if settings.tls_cert is not None:
            tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
            if settings.tls_client_ca is not None:
                tls.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=max(1, round(settings.grace_s)),
                                **tls)
        self.server = _Server(config)
        self.task: Any = None

    async def start(self) -> None:
        import asyncio

        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]), name="outlierd-http")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it stopped
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task
        self.sock.close()
