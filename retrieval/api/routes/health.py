"""GET /health: liveness and what is loaded (never needs the API key)."""

from __future__ import annotations

from fastapi import APIRouter

from retrieval.version import VERSION

from ..deps import LoadedEngineDep
from ..schemas import Health

router = APIRouter(tags=["system"])


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
