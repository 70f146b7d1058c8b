"""Media: GET /cases/{case_id}/cf (PNG), /cases/{case_id}/ffa (MP4), /synthetic/{token} (MP4).

Videos answer HTTP range requests (206) so browsers can seek. Stored PNG / MP4 files
are streamed as they are; other stored formats are converted in memory (and kept in
a small cache).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mp4_bytes, png_bytes

from ..deps import EngineDep, SyntheticDep
from ..ranges import RANGE_RESPONSES, range_response
from ..schemas import ErrorResponse
from .search import CASE_ERRORS, CaseId

router = APIRouter(tags=["media"])

PNG = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
MP4 = {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}}
MISSING = {404: {"model": ErrorResponse, "description": "Unknown case, or its file is missing."}}


class _Converted:
    """A few converted media in memory, by (path, mtime, kind)."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, kind: str, make: Callable[[], bytes]) -> bytes:
        key = (str(path), path.stat().st_mtime_ns, kind)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = make()
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return data


_converted = _Converted()


def _existing(path: Path, case_id: str, what: str) -> Path:
    if not path.is_file() and not path.is_dir():
        raise HTTPException(404, f"the {what} of case {case_id!r} is missing on the server")
    return path


@router.get(
    "/cases/{case_id}/cf",
    response_class=Response,
    summary="A case's CF photo (PNG)",
    responses={200: PNG, **CASE_ERRORS, **MISSING},
)
def case_cf(case_id: CaseId, engine: EngineDep) -> Response:
    case = engine.case(case_id)
    path = _existing(case.cf_path, case_id, "CF photo")
    headers = {"Cache-Control": "private, max-age=300"}
    if path.suffix.lower() == ".png":
        return Response(path.read_bytes(), media_type="image/png", headers=headers)
    data = _converted.get(path, "png", lambda: png_bytes(read_cf(path)))
    return Response(data, media_type="image/png", headers=headers)


@router.get(
    "/cases/{case_id}/ffa",
    response_class=Response,
    summary="A case's FFA video (MP4; range requests for seeking)",
    responses={200: MP4, **RANGE_RESPONSES, **CASE_ERRORS, **MISSING},
)
def case_ffa(case_id: CaseId, engine: EngineDep, request: Request) -> Response:
    case = engine.case(case_id)
    path = _existing(case.ffa_path, case_id, "FFA video")
    headers = {"Cache-Control": "private, max-age=300"}
    if case.ffa_times_s is not None:
        headers["X-Frame-Times"] = ",".join(f"{t:g}" for t in case.ffa_times_s)
    if path.is_file() and path.suffix.lower() == ".mp4":
        return range_response(request, path, "video/mp4", headers)
    data = _converted.get(path, "mp4", lambda: mp4_bytes(read_ffa(path)))
    return range_response(request, data, "video/mp4", headers)


@router.get(
    "/synthetic/{token}",
    response_class=Response,
    summary="A synthesized query video from a search (MP4, marked SYNTHETIC; expires)",
    responses={
        200: MP4,
        **RANGE_RESPONSES,
        404: {"model": ErrorResponse, "description": "Unknown or expired token."},
    },
)
def synthetic_video(
    token: Annotated[
        str, PathParam(max_length=64, description="From `synthetic_query.video_url`.")
    ],
    store: SyntheticDep,
    request: Request,
) -> Response:
    found = store.mp4(token)
    if found is None:
        raise HTTPException(404, "unknown or expired synthetic video token (search again)")
    data, entry = found
    headers = {
        "X-Synthetic": "true",
        "X-Frame-Times": ",".join(f"{t:g}" for t in entry.times_s),
        "Cache-Control": "no-store",
    }
    return range_response(request, data, "video/mp4", headers)
