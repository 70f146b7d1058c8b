"""POST /generate: a CF photo → its synthesized FFA video (MP4, every frame marked SYNTHETIC)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.responses import Response

from retrieval.data.media_write import mp4_bytes

from ..deps import EngineDep, SettingsDep
from ..uploads import parse_times, read_upload
from .media import MP4
from .search import UPLOAD_ERRORS

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    response_class=Response,
    summary="Synthesize an FFA video from a CF photo (marked SYNTHETIC)",
    responses={
        200: {
            **MP4,
            "description": "An MP4 with SYNTHETIC burned into every frame.",
            "headers": {
                "X-Synthetic": {"description": "Always `true`.", "schema": {"type": "string"}},
                "X-Frame-Times": {
                    "description": "Seconds after injection of each frame, comma-separated.",
                    "schema": {"type": "string"},
                },
            },
        },
        **UPLOAD_ERRORS,
    },
)
def generate(
    engine: EngineDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="A CF photo (PNG, JPEG, TIFF).")],
    times: Annotated[
        str | None,
        Form(
            description="Frame times, comma-separated seconds (default: the model's).",
            examples=["0,12,15,20,30,60,300,600"],
        ),
    ] = None,
) -> Response:
    parsed = parse_times(times)
    if parsed is not None and len(parsed) > settings.max_synth_frames:
        raise HTTPException(
            422, f"times: at most {settings.max_synth_frames} frames (got {len(parsed)})"
        )
    image = read_upload(file, settings, field="file", expect="cf")
    frames, used = engine.generate(image.array, parsed)
    headers = {
        "X-Synthetic": "true",
        "X-Frame-Times": ",".join(f"{t:g}" for t in used),
        "Content-Disposition": 'inline; filename="synthetic-ffa.mp4"',
        "Cache-Control": "no-store",
    }
    return Response(mp4_bytes(frames), media_type="video/mp4", headers=headers)
