"""Open Inference Protocol clients run in their own process by tests/test_oip.py:
``python tests/oip_clients.py grpc|http|kserve TARGET MODEL IN.npz OUT.npz``.

Each calls health, metadata and infer (typed and raw contents, FP32 and FP64, the records of
IN.npz's ``one`` and ``many``) and stream infer (grpc), and writes every answer's scores and flags
to OUT.npz plus a JSON summary of the metadata (``meta``), for the test to compare with the model."""

from __future__ import annotations

import json
import queue
import sys

import numpy as np


def grpc_client(target: str, model: str, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import grpc
    import tritonclient.grpc as tc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    client = tc.InferenceServerClient(target)
    meta = client.get_model_metadata(model, as_json=True)
    config = client.get_model_config(model, as_json=True)
    summary = {"live": client.is_server_live(), "ready": client.is_server_ready(), "model_ready": client.is_model_ready(model),
               "server": client.get_server_metadata(as_json=True), "meta": meta, "config": config}
    out: dict[str, np.ndarray] = {}
    for key, X in data.items():
        for dtype, datatype in ((np.float32, "FP32"), (np.float64, "FP64")):
            x = X.astype(dtype)
            inp = tc.InferInput("X", list(x.shape), datatype)
            inp.set_data_from_numpy(x)  # raw contents
            res = client.infer(model, [inp])
            out[f"raw-{key}-{datatype}"] = res.as_numpy("score")
            out[f"raw-{key}-{datatype}-flags"] = res.as_numpy("anomalous")
            summary[f"version-{key}-{datatype}"] = res.get_response().model_version
    # typed contents: the generated stub directly (tritonclient always sends raw contents)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for key, X in data.items():
            for datatype, field in (("FP32", "fp32_contents"), ("FP64", "fp64_contents")):
                req = pb.ModelInferRequest(model_name=model)
                t = req.inputs.add(name="X", datatype=datatype, shape=list(X.shape))
                getattr(t.contents, field).extend(X.ravel().tolist())
                resp = stub.ModelInfer(req)
                names = [o.name for o in resp.outputs]
                out[f"typed-{key}-{datatype}"] = np.frombuffer(resp.raw_output_contents[names.index("score")], "<f8")
        try:
            stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))
        except grpc.RpcError as e:
            summary["statistics"] = e.code().name
    # stream infer: several messages, answered in order
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    X = data["many"]
    chunks = np.array_split(X, 8)
    for i, chunk in enumerate(chunks):
        inp = tc.InferInput("X", list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk.astype(np.float32))
        client.async_stream_infer(model, [inp], request_id=str(i))
    got = [answers.get(timeout=30) for _ in chunks]
    client.stop_stream()
    summary["stream_ids"] = [r.get_response().id for r, _ in got]
    summary["stream_errors"] = [str(e) for _, e in got if e is not None]
    out["stream-many-FP32"] = np.concatenate([r.as_numpy("score") for r, _ in got])
    out["meta"] = np.array(json.dumps(summary))
    return out


def http_client(target: str, model: str, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tritonclient.http as th

    client = th.InferenceServerClient(target)
    summary = {"live": client.is_server_live(), "ready": client.is_server_ready(), "model_ready": client.is_model_ready(model),
               "server": client.get_server_metadata(), "meta": client.get_model_metadata(model)}
    out: dict[str, np.ndarray] = {}
    for key, X in data.items():
        for dtype, datatype in ((np.float32, "FP32"), (np.float64, "FP64")):
            for binary in (True, False):  # binary tensor extension, or JSON data
                x = X.astype(dtype)
                inp = th.InferInput("X", list(x.shape), datatype)
                inp.set_data_from_numpy(x, binary_data=binary)
                outputs = [th.InferRequestedOutput("score", binary_data=binary), th.InferRequestedOutput("anomalous", binary_data=binary)]
                res = client.infer(model, [inp], outputs=outputs)
                kind = "raw" if binary else "typed"
                out[f"{kind}-{key}-{datatype}"] = res.as_numpy("score")
                out[f"{kind}-{key}-{datatype}-flags"] = res.as_numpy("anomalous")
                summary[f"version-{key}-{datatype}"] = res.get_response()["model_version"]
    out["meta"] = np.array(json.dumps(summary))
    return out


def kserve_client(target: str, model: str, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """KServe's own clients (``kserve`` package): gRPC on TARGET, REST on the URL in KSERVE_REST_URL."""
    import asyncio
    import os

    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest
    from kserve.inference_client import RESTConfig

    async def run() -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        grpc_client = InferenceGRPCClient(target)
        rest = InferenceRESTClient(RESTConfig(protocol="v2"))
        base = os.environ["KSERVE_REST_URL"]
        summary = {"live": await grpc_client.is_server_live(), "ready": await grpc_client.is_server_ready(),
                   "model_ready": await grpc_client.is_model_ready(model), "rest_ready": await rest.is_server_ready(base)}
        for key, X in data.items():
            for dtype, datatype in ((np.float32, "FP32"), (np.float64, "FP64")):
                x = X.astype(dtype)
                for kind, binary in (("raw", True), ("typed", False)):
                    inp = InferInput("X", list(x.shape), datatype)
                    inp.set_data_from_numpy(x, binary_data=binary)
                    res = await grpc_client.infer(InferRequest(model, [inp]))
                    by_name = {o.name: o for o in res.outputs}
                    out[f"{kind}-{key}-{datatype}"] = by_name["score"].as_numpy()
                    out[f"{kind}-{key}-{datatype}-flags"] = by_name["anomalous"].as_numpy()
                    summary[f"version-{key}-{datatype}"] = res.model_version
                inp = InferInput("X", list(x.shape), datatype)
                inp.set_data_from_numpy(x, binary_data=False)
                res = await rest.infer(base, InferRequest(model, [inp]), model_name=model)
                out[f"rest-{key}-{datatype}"] = {o.name: o for o in res.outputs}["score"].as_numpy()
        await grpc_client.close()
        await rest.close()
        out["meta"] = np.array(json.dumps(summary))
        return out

    return asyncio.run(run())


def main() -> None:
    kind, target, model, src, dst = sys.argv[1:6]
    with np.load(src) as f:
        data = {k: f[k] for k in f.files}
    out = {"grpc": grpc_client, "http": http_client, "kserve": kserve_client}[kind](target, model, data)
    np.savez(dst, **out)


if __name__ == "__main__":
    main()
