"""The HTTP floor: FastAPI on uvicorn answering ``POST /v1/models/{name}/score`` as outlierd's HTTP
door does (the body parsed with the same schema, one score of 0.0 and one ``false`` flag per
record), with no scoring. ``GET /v2/health/ready`` answers once it listens.

    python -m outlierd.bench.http_echo --port 8099 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import sys

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic_core import to_json

from outlierd.server.http_app import ScoreBody


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/models/{name}/score")
    async def score(name: str, request: Request) -> Response:
        body = ScoreBody.model_validate_json(await request.body())
        n = len(body.records)
        answer = {"model": name, "version": "1", "alias": "echo", "device": "cpu", "threshold": 0.0,
                  "scores": [0.0] * n, "anomalous": [False] * n, "ids": body.ids, "explanations": []}
        return Response(to_json(answer), media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    uvicorn.run(build_app(), host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
