"""The FastAPI application: `create_app(settings)` builds it; its lifespan opens the Engine.

Every error is JSON `{"detail": "...", "request_id": ...}` (`schemas.ErrorResponse`):
bad input is 4xx naming the parameter, file or case; anything unexpected is a 500
that says nothing about the request but its id (the traceback goes to the log).

Logging: one line per request — request id, method, route *template* (never the
path: it may hold a case id), status, milliseconds, bytes in and out. Upload
content, file names, case and patient ids are never logged.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from index import IndexStoreError
from index.errors import FilterError
from retrieval.search.engine import Engine
from retrieval.version import VERSION

from ..errors import (
    DuplicateCase,
    Fundus2VideoError,
    IndexChanged,
    MediaTooLarge,
    PersistError,
    QueryError,
    UnknownCase,
    UnreadableMedia,
)
from .access import RATE_LIMITED, WRITE_ERRORS, Access, AccessGuard
from .deps import require_api_key, require_write_key
from .fastpath import SimilarFastPath
from .metrics import REFUSAL_STATE, ApiMetrics, MetricsMiddleware
from .routes import cases, explain, generate, health, insights, media, search, stats
from .schemas import ErrorResponse
from .settings import Settings, get_settings
from .synthetic import SyntheticStore
from .uploads import UploadRefused

log = logging.getLogger("fundus2video.api")

FREEZE_FROM_CASES = 10_000
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when one is needed)."},
    422: {"model": ErrorResponse, "description": "A parameter or file is invalid (`detail`)."},
    503: {"model": ErrorResponse, "description": "No index loaded, or an update not saved."},
}
DESCRIPTION = (
    "Search past cases by a colour fundus photo (CF), a fluorescein angiography (FFA) "
    "video or a case id, directly or through a synthesized FFA video; browse and update "
    "the catalog. Every synthesized video is marked SYNTHETIC (in its frames, and "
    "`synthetic: true` in JSON). Uploads are processed in memory and never stored, "
    "except the media of cases added with POST /cases."
)
TAGS = [
    {"name": "search", "description": "Ranked cases for an upload or an indexed case."},
    {"name": "cases", "description": "The catalog: browse, read, add, delete cases."},
    {"name": "media", "description": "CF photos (PNG) and FFA videos (MP4, range requests)."},
    {"name": "generate", "description": "Synthesized FFA videos, always marked SYNTHETIC."},
    {
        "name": "system",
        "description": "Liveness, readiness, Prometheus metrics, statistics, the model and "
        "the embedding map.",
    },
]


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The API over `settings.index` (opened at startup), or over an already open `engine`."""
    settings = settings or get_settings()
    # Keep uploads in memory: Starlette spools a file part to disk above this size. The
    # body itself is bounded by max_upload_bytes (RequestGuard), so memory stays bounded.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes)
    app = FastAPI(
        title="fundus2video",
        version=VERSION,
        summary="Retinal multimodal retrieval: CF photos and FFA videos in one search engine.",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=_lifespan,
        responses=COMMON_ERRORS,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.load_state = None  # "loading", "loaded" or "failed" once an index is opened
    app.state.synthetic = SyntheticStore(settings.synthetic_cache_size, settings.synthetic_ttl_s)
    app.state.map_cache = {}
    app.state.access = Access(settings)  # keys, rate limits, audit log
    app.state.metrics = ApiMetrics(lambda: getattr(app.state, "engine", None))
    _add_error_handlers(app)
    secured = [Depends(require_api_key)]
    app.include_router(health.router)
    app.include_router(
        health.metrics_router, dependencies=[] if settings.metrics_public else secured
    )
    for module in (search, cases, media, generate, stats, insights, explain):
        limited = RATE_LIMITED if module in (search, generate, explain) else None
        app.include_router(module.router, dependencies=secured, responses=limited)
    app.include_router(
        cases.write_router, dependencies=[Depends(require_write_key)], responses=WRITE_ERRORS
    )
    if settings.fast_path:
        app.add_middleware(SimilarFastPath, api=app)  # inside the guard: logged, limited
    app.add_middleware(AccessGuard, access=app.state.access)  # limits both paths; audit
    if settings.cors_origins:  # outside the fast path and the limits: their answers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "X-Synthetic", "X-Frame-Times", "Retry-After"],
        )
    app.add_middleware(RequestGuard, max_body=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=lambda: app.routes)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open `settings.index` unless the app was given an engine; close what it opened.

    With `settings.load_in_background` the app answers at once while the index loads
    (`app.state.load_state`: "loading", then "loaded" or "failed"; /ready says which);
    otherwise startup waits for the index, and a bad one stops it."""
    settings, loader = app.state.settings, None
    if app.state.engine is None and settings.index is not None:
        loader = asyncio.create_task(_open_engine(app))
        if not settings.load_in_background:
            await loader
    else:
        _take_engine(app, app.state.engine)
    yield
    if loader is not None and not loader.done():
        loader.cancel()  # the loading thread finishes on its own; its engine is dropped
    app.state.metrics.detach(app.state.engine)
    if loader is not None and app.state.engine is not None:
        app.state.engine.close()
        app.state.engine = None


async def _open_engine(app: FastAPI) -> None:
    """Open `settings.index` in a worker thread and take it; record a failure."""
    settings = app.state.settings
    app.state.load_state = "loading"
    try:
        engine = await run_in_threadpool(Engine.open, settings.index, use_gpu=settings.use_gpu)
    except Exception:
        app.state.load_state = "failed"
        log.exception("could not open the index folder %s", settings.index)
        if not settings.load_in_background:
            raise
        return
    _take_engine(app, engine)


def _take_engine(app: FastAPI, engine: Engine | None) -> None:
    """Serve `engine` (None: nothing to serve)."""
    if engine is not None and engine.case_count >= FREEZE_FROM_CASES:
        # The catalog lookups are ~5 long-lived objects per case (half a million at 100k
        # cases): a full collection walks them all (~0.3 s) and stalls every request.
        gc.collect()
        gc.freeze()
    app.state.metrics.attach(engine)
    app.state.engine = engine
    app.state.load_state = "loaded" if engine is not None else None


# --------------------------------------------------------------------------- middleware


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, size: int | None, limit: int):
        what = f"{size:,} bytes" if size is not None else "more bytes"
        super().__init__(
            413,
            f"request body of {what} exceeds the upload limit of {limit:,} bytes "
            "(FUNDUS2VIDEO_MAX_UPLOAD_BYTES)",
        )


class RequestGuard:
    """Request ids, the body-size limit, and one log line per request (pure ASGI: cheap)."""

    def __init__(self, app: ASGIApp, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if given and _REQUEST_ID.fullmatch(given) else os.urandom(8).hex()
        scope.setdefault("state", {})["request_id"] = rid
        sizes = {"in": 0, "out": 0, "status": 500}
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            sizes["in"] = int(declared)
            response = _error_response(BodyTooLarge(int(declared), self.max_body), rid)
            await response(scope, _empty_receive, _send_with_id(send, rid, sizes))
            self._log(scope, rid, sizes, t0)
            return

        async def receive_limited() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                sizes["in"] += len(message.get("body", b""))
                if sizes["in"] > self.max_body:
                    raise BodyTooLarge(None, self.max_body)
            return message

        try:
            await self.app(scope, receive_limited, _send_with_id(send, rid, sizes))
        finally:
            self._log(scope, rid, sizes, t0)

    @staticmethod
    def _log(scope: Scope, rid: str, sizes: dict[str, int], t0: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "(unrouted)"
        log.info(
            "%s %s %s %d %.1fms in=%dB out=%dB",
            rid,
            scope["method"],
            route,
            sizes["status"],
            (time.perf_counter() - t0) * 1000,
            sizes["in"],
            sizes["out"],
        )


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _send_with_id(send: Send, rid: str, sizes: dict[str, int]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            sizes["status"] = message["status"]
            message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
        elif message["type"] == "http.response.body":
            sizes["out"] += len(message.get("body", b""))
        await send(message)

    return wrapped


# --------------------------------------------------------------------------- errors

_STATUS: list[tuple[type[Exception], int]] = [
    (MediaTooLarge, 413),
    (UnreadableMedia, 422),
    (UnknownCase, 404),
    (DuplicateCase, 409),
    (IndexChanged, 409),
    (QueryError, 422),
    (FilterError, 422),
    (PersistError, 503),
]


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _error_response(exc: StarletteHTTPException, rid: str | None) -> JSONResponse:
    body = ErrorResponse(detail=str(exc.detail), request_id=rid).model_dump()
    return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, UploadRefused):  # for the rejected-uploads metric
            setattr(request.state, REFUSAL_STATE, exc.reason)
        return _error_response(exc, _request_id(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_field_error(e) for e in exc.errors()]
        detail = "; ".join(_describe(e) for e in errors) or "invalid request"
        body = ErrorResponse(detail=detail, errors=errors, request_id=_request_id(request))
        return JSONResponse(body.model_dump(), 422)

    @app.exception_handler(Fundus2VideoError)
    async def domain_error(request: Request, exc: Fundus2VideoError) -> JSONResponse:
        return _mapped(request, exc)

    @app.exception_handler(IndexStoreError)
    async def index_error(request: Request, exc: IndexStoreError) -> JSONResponse:
        return _mapped(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = _request_id(request)
        log.error("%s unexpected %s", rid, type(exc).__name__, exc_info=exc)
        body = ErrorResponse(detail=f"internal error (request id {rid})", request_id=rid)
        return JSONResponse(body.model_dump(), 500)


def _mapped(request: Request, exc: Exception) -> JSONResponse:
    rid = _request_id(request)
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    if status == 500:
        log.error("%s %s", rid, type(exc).__name__, exc_info=exc)
    body = ErrorResponse(detail=str(exc), request_id=rid, duplicates=getattr(exc, "matches", None))
    return JSONResponse(body.model_dump(), status)


def _field_error(error: dict[str, Any]) -> dict[str, Any]:
    loc = [p if isinstance(p, int) else str(p) for p in error.get("loc", ())]
    got = error.get("input")
    msg = str(error.get("msg", "invalid"))
    if isinstance(got, str | int | float) and not isinstance(got, bool) and len(repr(got)) <= 60:
        msg += f" (got {got!r})"
    return {"loc": loc, "msg": msg, "type": str(error.get("type", "value_error"))}


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"] if p not in ("body", "query", "path", "header"))
    return f"{where}: {error['msg']}" if where else error["msg"]
