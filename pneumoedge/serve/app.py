"""The ASGI app: the page, the JSON API and health checks around one loaded Ensemble.

FastAPI (over Starlette) for the OpenAPI schema and typed query parameters; request bodies
are read by `pneumoedge.serve.uploads` (streamed, size- and time-limited, in memory). The
interactive docs pages (/docs, /redoc) are turned off: FastAPI loads Swagger UI and ReDoc from
a CDN and clinic networks are often offline; the schema itself is served at /api/v1/openapi.json.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles

from pneumoedge import __version__
from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.serve.limits import HTTPProblem, WorkQueue
from pneumoedge.serve.middleware import ServeMiddleware
from pneumoedge.serve.model_info import NOTICE, describe_model
from pneumoedge.serve.predict import predict_upload, response_status
from pneumoedge.serve.schema import ErrorBody, Health, ModelInfo, PredictFailure, PredictResponse, Readiness
from pneumoedge.serve.settings import ServeSettings
from pneumoedge.serve.uploads import RAW_TYPES, keep, must_close, read_uploads

STATIC = Path(__file__).resolve().parent / "static"

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary", "minLength": 1}, "minItems": 1}},
                "required": ["file"],
            }
        },
        **{kind: {"schema": {"type": "string", "format": "binary", "minLength": 1}} for kind in sorted(RAW_TYPES)},
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


#: Answers any route can give.
_COMMON = {400: _error("Unknown Host header (serve --allowed-host), or an invalid request")}
_PROTECTED = {**_COMMON, 401: _error("The server was started with a token and the request did not carry it")}
_PREDICT_RESPONSES = {
    **_PROTECTED,
    200: {"model": PredictResponse, "description": "At least one file was classified: one row per file, in order"},
    403: _error("A browser page from another origin tried to send images"),
    408: _error("The upload stalled, was too slow or took too long"),
    413: _error("The body is over the upload limit, or holds too many files"),
    415: {"model": PredictFailure, "description": "No file is an image format pneumoedge reads, or the Content-Type is not accepted"},
    422: {"model": PredictFailure, "description": "Every file failed to decode, the request holds no file, or a parameter is invalid"},
    503: {
        "description": "The server is busy (queue or connection limit); retry after Retry-After",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}, "text/plain": {"schema": {"type": "string"}}},
    },
}


def create_app(ensemble: Ensemble, settings: Optional[ServeSettings] = None) -> ServeMiddleware:
    """The web service for `ensemble` (loaded once, by the caller), wrapped in `ServeMiddleware`."""
    settings = settings or ServeSettings()
    queue = WorkQueue(settings.queue_limit, settings.threads)
    model = _describe(ensemble, settings)

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
    _add_error_handlers(app)
    _add_pages(app)
    _add_status_routes(app, queue, model)
    _add_predict_route(app, ensemble, settings, queue, model)
    app.openapi = _openapi_with_security(app, settings)  # type: ignore[method-assign]
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return ServeMiddleware(app, token=settings.token, hosts=settings.hosts)


def _describe(ensemble: Ensemble, settings: ServeSettings) -> dict[str, Any]:
    """GET /api/v1/model's body: the model, and the limits this server enforces."""
    model = describe_model(ensemble)
    model["server"] = {
        "max_upload_bytes": settings.max_upload_bytes,
        "max_files": settings.max_files,
        "queue_limit": settings.queue_limit,
        "auth": settings.token is not None,
        "version": __version__,
    }
    return model


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPProblem)
    async def _problem(_request: Request, exc: HTTPProblem) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The documented error body (a sentence), not FastAPI's list of pydantic errors.
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors())
        headers = {"Connection": "close"} if must_close(request, 422) else None
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422, headers=headers)


def _add_pages(app: FastAPI) -> None:
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)  # browsers ask for one; nothing to fetch from elsewhere


def _add_status_routes(app: FastAPI, queue: WorkQueue, model: dict[str, Any]) -> None:
    """/healthz and /readyz (open, for probes), and the protected model description."""
    open_route = {"security": []}

    @app.get("/healthz", summary="The process is alive", response_model=Health, responses=_COMMON, openapi_extra=open_route)
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/readyz",
        summary="The model is loaded and requests are accepted",
        response_model=Readiness,
        responses={**_COMMON, 503: {"model": Readiness, "description": "The queue is full"}},
        openapi_extra=open_route,
    )
    async def readyz() -> JSONResponse:
        busy = queue.pending >= queue.limit
        return JSONResponse({"status": "busy" if busy else "ready", "model": model["name"]}, status_code=503 if busy else 200)

    @app.get(
        "/api/v1/model",
        summary="The loaded model: members, sha256, labels, threshold, provenance",
        response_model=ModelInfo,
        responses=_PROTECTED,
    )
    async def model_info() -> JSONResponse:
        return JSONResponse(model)


def _add_predict_route(app: FastAPI, ensemble: Ensemble, settings: ServeSettings, queue: WorkQueue, model: dict[str, Any]) -> None:
    can_explain = bool(model["can_explain"])

    @app.post(
        "/api/v1/predict",
        summary="Classify one or several images",
        description="multipart/form-data with one or more `file` fields, or one image as the body with its "
        "Content-Type. Returns one row per file with the fields of `pneumoedge infer`'s JSONL rows "
        f"(`path` is the uploaded file name). {NOTICE}",
        openapi_extra={"requestBody": _UPLOAD_BODY},
        response_model=PredictResponse,
        responses=_PREDICT_RESPONSES,
    )
    async def predict(
        request: Request,
        explain: bool = Query(False, description="Also return each image's heatmap overlay as a PNG data URL in `overlay`."),
    ) -> Response:
        request_id = request.state.request_id
        try:
            try:
                uploads = await read_uploads(request, settings)
            except HTTPProblem as exc:
                # The body may be partly unread: close rather than read a large rest to find the next request.
                if must_close(request, exc.status):
                    exc.headers["Connection"] = "close"
                raise
            request.state.files = len(uploads)
            # Only now, with the whole body in hand, does the request take a slot: slow uploads
            # never hold the model's queue.
            with queue.admit():
                if settings.keep_uploads is not None:
                    await queue.run(keep, uploads, settings.keep_uploads, request_id)
                done = await asyncio.gather(
                    *(queue.run(predict_upload, ensemble, upload, explain and can_explain) for upload in uploads)
                )
        except ClientDisconnect:
            request.state.outcome = "client disconnected"
            return Response(status_code=499)
        rows = [row for row, _ in done]
        status = response_status([code for _, code in done])
        if status != 200:
            reasons = "; ".join(f"{row['path']}: {row['error']}" for row in rows)
            return JSONResponse({"detail": f"no file could be classified: {reasons}", "request_id": request_id, "results": rows}, status_code=status)
        body = {
            "request_id": request_id,
            "results": rows,
            "model": {"name": model["name"], "sha256": [m["sha256"][:12] for m in model["members"]]},
            "explain": {"requested": explain, "available": can_explain, "note": model["explain_note"]},
            "notice": NOTICE,
        }
        return JSONResponse(body)


def _openapi_with_security(app: FastAPI, settings: ServeSettings) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the two ways to give the token (declared only when one is required)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer TOKEN (serve --token)"}
            schemes["basic"] = {"type": "http", "scheme": "basic", "description": "Any user name, the token as password (browsers)"}
            if settings.token is not None:
                schema["security"] = [{"bearer": []}, {"basic": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
