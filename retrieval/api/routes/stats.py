"""GET /stats: counts per modality, index types, device, encoder, limits."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import EngineDep, SettingsDep
from ..schemas import Stats

router = APIRouter(tags=["system"])
_INDEX_FIELDS = ("count", "key", "dim", "device", "tombstones", "recall_estimate", "search_params")


@router.get("/stats", response_model=Stats, summary="Index and catalog statistics, and limits")
def stats(engine: EngineDep, settings: SettingsDep) -> dict:
    body = engine.stats()
    body["modalities"] = {
        m: {f: s[f] for f in _INDEX_FIELDS} for m, s in body["modalities"].items()
    }
    body["limits"] = {
        "max_k": settings.max_k,
        "max_page": settings.max_page,
        "max_upload_bytes": settings.max_upload_bytes,
        "max_pixels": settings.max_pixels,
        "max_frames": settings.max_frames,
        "max_video_pixels": settings.max_video_pixels,
        "accepted_types": {k: list(settings.accepted_types(k)) for k in ("cf", "ffa")},
    }
    return body
