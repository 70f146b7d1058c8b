"""Media responses with HTTP range requests (RFC 9110), so browsers can seek videos.

One range per request (a multi-range request gets its first range); a malformed
Range header is ignored (the whole body, 200), an unsatisfiable one is 416.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import Response, StreamingResponse

CHUNK = 256 * 1024
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*(?:,.*)?", re.IGNORECASE | re.DOTALL)

RANGE_RESPONSES = {
    206: {"description": "Partial content (a Range request)."},
    416: {"description": "The requested range is outside the file."},
}


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a satisfiable range; None for no/malformed range (whole)."""
    if not header:
        return None
    match = _RANGE.fullmatch(header)
    if match is None or (match[1] == "" and match[2] == ""):
        return None
    if match[1] == "":  # the last N bytes
        length = int(match[2])
        if length == 0 or size == 0:
            _unsatisfiable(header, size)
        return max(0, size - length), size - 1
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    if match[2] and int(match[2]) < start:
        return None  # syntactically invalid: ignore
    if start >= size:
        _unsatisfiable(header, size)
    return start, end


def _unsatisfiable(header: str, size: int) -> None:
    raise HTTPException(
        416,
        f"range {header.strip()[:60]!r} is outside the {size} bytes of the file",
        headers={"Content-Range": f"bytes */{size}"},
    )


def range_response(
    request: Request, source: bytes | Path, media_type: str, headers: dict[str, str] | None = None
) -> Response:
    """The bytes (or the file) as 200, or the requested range as 206."""
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    base = {"Accept-Ranges": "bytes", **(headers or {})}
    span = parse_range(request.headers.get("range"), size)
    start, end = span if span is not None else (0, size - 1)
    status = 200 if span is None else 206
    if span is not None:
        base["Content-Range"] = f"bytes {start}-{end}/{size}"
    if isinstance(source, bytes):
        return Response(source[start : end + 1], status, base, media_type)
    base["Content-Length"] = str(end - start + 1)
    return StreamingResponse(_read(source, start, end), status, base, media_type)


def _read(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
