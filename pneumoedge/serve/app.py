"""The ASGI app: the page, the JSON API and health checks around one loaded Ensemble.

FastAPI (over Starlette) for the OpenAPI schema and typed query parameters; request bodies
are read by `pneumoedge.serve.uploads` (streamed, size-limited, in memory). The interactive
docs pages (/docs, /redoc) are turned off: FastAPI loads Swagger UI and ReDoc from a CDN and
clinic networks are often offline; the schema itself is served at /api/v1/openapi.json.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles

from pneumoedge import __version__
from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.serve.limits import HTTPProblem, WorkQueue
from pneumoedge.serve.middleware import ServeMiddleware
from pneumoedge.serve.model_info import NOTICE, describe_model
from pneumoedge.serve.predict import predict_upload, response_status
from pneumoedge.serve.settings import ServeSettings
from pneumoedge.serve.uploads import RAW_TYPES, keep, read_uploads

STATIC = Path(__file__).resolve().parent / "static"

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            }
        },
        **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in sorted(RAW_TYPES)},
    },
}


def create_app(ensemble: Ensemble, settings: Optional[ServeSettings] = None) -> ServeMiddleware:
    """The web service for `ensemble` (loaded once, by the caller), wrapped in `ServeMiddleware`."""
    settings = settings or ServeSettings()
    queue = WorkQueue(settings.queue_limit, settings.threads)
    model = describe_model(ensemble)
    model["server"] = {
        "max_upload_bytes": settings.max_upload_bytes,
        "max_files": settings.max_files,
        "queue_limit": settings.queue_limit,
        "auth": settings.token is not None,
        "version": __version__,
    }
    can_explain = bool(model["can_explain"])

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        queue.start()
        yield
        queue.stop()

    app = FastAPI(
        title="pneumoedge",
        version=__version__,
        description=f"Chest X-ray pneumonia classification. {NOTICE}",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
        lifespan=lifespan,
    )
    app.state.queue = queue

    @app.exception_handler(HTTPProblem)
    async def _problem(_request: Request, exc: HTTPProblem) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status, headers=exc.headers)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)  # browsers ask for one; nothing to fetch from elsewhere

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="The model is loaded and requests are accepted")
    async def readyz() -> JSONResponse:
        busy = queue.pending >= queue.limit
        return JSONResponse({"status": "busy" if busy else "ready", "model": model["name"]}, status_code=503 if busy else 200)

    @app.get("/api/v1/model", summary="The loaded model: members, sha256, labels, threshold, provenance")
    async def model_info() -> dict[str, Any]:
        return model

    @app.post(
        "/api/v1/predict",
        summary="Classify one or several images",
        description="multipart/form-data with one or more file fields, or one image as the body with its "
        "Content-Type. Returns one row per file with the fields of `pneumoedge infer`'s JSONL rows "
        f"(`path` is the uploaded file name). {NOTICE}",
        openapi_extra={"requestBody": _UPLOAD_BODY},
        responses={400: {}, 408: {}, 413: {}, 415: {}, 422: {}, 503: {}},
    )
    async def predict(
        request: Request,
        explain: bool = Query(False, description="Also return each image's heatmap overlay as a PNG data URL in `overlay`."),
    ) -> Response:
        request_id = request.state.request_id
        try:
            with queue.admit():
                uploads = await read_uploads(request, settings)
                request.state.files = len(uploads)
                if settings.keep_uploads is not None:
                    await queue.run(keep, uploads, settings.keep_uploads, request_id)
                done = await asyncio.gather(
                    *(queue.run(predict_upload, ensemble, upload, explain and can_explain) for upload in uploads)
                )
        except ClientDisconnect:
            request.state.outcome = "client disconnected"
            return Response(status_code=499)
        rows = [row for row, _ in done]
        body = {
            "request_id": request_id,
            "results": rows,
            "model": {"name": model["name"], "sha256": [m["sha256"][:12] for m in model["members"]]},
            "explain": {"requested": explain, "available": can_explain, "note": model["explain_note"]},
            "notice": NOTICE,
        }
        return JSONResponse(body, status_code=response_status([code for _, code in done]))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return ServeMiddleware(app, token=settings.token)
