"""GET /health (liveness), GET /ready (readiness) and GET /metrics (Prometheus).

/health and /ready never need the API key; /metrics needs it unless `metrics_public`
(main.py includes `metrics_router` accordingly).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from retrieval.search.engine import Engine
from retrieval.version import VERSION

from ..deps import LoadedEngineDep
from ..schemas import Health

router = APIRouter(tags=["system"])
metrics_router = APIRouter(tags=["system"])

READY_EXAMPLE = {
    "ready": True,
    "model_loaded": True,
    "index_loaded": True,
    "last_save_ok": True,
    "cases": 128,
    "missing": [],
    "detail": None,
}
NOT_LOADED_EXAMPLE = {
    "ready": False,
    "model_loaded": False,
    "index_loaded": False,
    "last_save_ok": True,
    "cases": None,
    "missing": ["model", "index"],
    "detail": "not ready: no model and no index are loaded",
}
LOADING_EXAMPLE = {
    **NOT_LOADED_EXAMPLE,
    "detail": "loading: the model and the index are being loaded",
}
LOAD_FAILED_EXAMPLE = {
    **NOT_LOADED_EXAMPLE,
    "detail": "not ready: the index folder could not be loaded (see the server log)",
}
NOT_LOADED = {None: NOT_LOADED_EXAMPLE, "loading": LOADING_EXAMPLE, "failed": LOAD_FAILED_EXAMPLE}
SAVE_FAILED_EXAMPLE = {
    "ready": False,
    "model_loaded": True,
    "index_loaded": True,
    "last_save_ok": False,
    "cases": 128,
    "missing": ["index_save"],
    "detail": "not ready: the last save of the index folder failed (see the server log); "
    "searches still answer from the last saved index",
}
METRICS_EXAMPLE = (
    "# HELP fundus2video_http_requests_total HTTP requests answered.\n"
    "# TYPE fundus2video_http_requests_total counter\n"
    'fundus2video_http_requests_total{method="GET",route="/cases/{case_id}/similar",'
    'status="200"} 42.0\n'
    "# HELP fundus2video_cases Indexed cases per modality.\n"
    "# TYPE fundus2video_cases gauge\n"
    'fundus2video_cases{modality="cf"} 128.0\n'
)


class Readiness(BaseModel):
    """Whether the service can answer searches and save updates."""

    model_config = ConfigDict(json_schema_extra={"example": READY_EXAMPLE})

    ready: bool = Field(description="True when the model and index are loaded and saving works.")
    model_loaded: bool = Field(description="Whether the query encoder is loaded.")
    index_loaded: bool = Field(description="Whether the index folder is loaded.")
    last_save_ok: bool = Field(
        description="False after a failed save of the index folder, until a save succeeds."
    )
    cases: int | None = Field(None, description="Indexed cases (null while none is loaded).")
    missing: list[str] = Field(description="What is not ready: model, index, index_save.")
    detail: str | None = Field(None, description="What is missing, in words (null when ready).")


@router.get("/health", response_model=Health, summary="Liveness and what is loaded")
def health(engine: LoadedEngineDep) -> dict:
    if engine is None:
        return {"version": VERSION, "loaded": False}
    return {
        "version": VERSION,
        "loaded": True,
        "encoder_id": engine.encoder_id,
        "cases": engine.case_count,
        "modalities": list(engine.modalities),
    }


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: model and index loaded, last save succeeded",
    description=(
        "200 when the service can take traffic: the model and the index are loaded and the "
        "last save of the index folder (after an add or delete) succeeded. 503 otherwise, "
        "with `missing` naming what is not ready. Use it as the readiness probe; `/health` "
        "is the liveness probe (200 whenever the process answers). Never needs the API key."
    ),
    responses={
        200: {"content": {"application/json": {"example": READY_EXAMPLE}}},
        503: {
            "model": Readiness,
            "description": "Not ready: the index is loading, failed to load or was not "
            "given, or the last save failed.",
            "content": {
                "application/json": {
                    "examples": {
                        "loading": {"summary": "Still loading", "value": LOADING_EXAMPLE},
                        "load_failed": {"summary": "Loading failed", "value": LOAD_FAILED_EXAMPLE},
                        "not_loaded": {"summary": "No index given", "value": NOT_LOADED_EXAMPLE},
                        "save_failed": {"summary": "Save failed", "value": SAVE_FAILED_EXAMPLE},
                    }
                }
            },
        },
    },
)
async def ready(request: Request, engine: LoadedEngineDep) -> JSONResponse:
    body = readiness(engine, getattr(request.app.state, "load_state", None))
    return JSONResponse(body.model_dump(), 200 if body.ready else 503)


def readiness(engine: Engine | None, load_state: str | None = None) -> Readiness:
    """The readiness of the service over `engine` (None: nothing loaded; then
    `load_state` says whether it is loading or failed to load)."""
    if engine is None:
        return Readiness(**NOT_LOADED.get(load_state, NOT_LOADED_EXAMPLE))
    if engine.save_error is not None:
        return Readiness(**{**SAVE_FAILED_EXAMPLE, "cases": engine.case_count})
    return Readiness(**{**READY_EXAMPLE, "cases": engine.case_count})


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    description=(
        "Request counts and latency per route template and status, search latency by `via` "
        "and `target`, cases per modality, model and index load seconds, adds and deletes "
        "by result, rejected uploads by reason, readiness. Needs the API key (when one is "
        "set) unless FUNDUS2VIDEO_METRICS_PUBLIC=true."
    ),
    response_class=Response,
    responses={200: {"content": {"text/plain": {"example": METRICS_EXAMPLE}}}},
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    text = await run_in_threadpool(generate_latest, registry)  # reads the engine's lock
    return Response(text, media_type=CONTENT_TYPE_LATEST)
