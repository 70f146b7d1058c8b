"""Uploaded media: checked and decoded in memory (never written to disk, never logged).

The kind is decided by the content (magic bytes), not by the file name or the
declared type; a declared type outside the accepted ones is refused (415). Sizes
are checked from the headers before any pixel is decoded (413).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException, UploadFile

from retrieval.data.media import probe_cf, probe_ffa, read_cf, read_ffa

from ..errors import MediaTooLarge, UnreadableMedia
from .settings import Settings

_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class UploadRefused(HTTPException):
    """An upload refused (4xx); `reason` (one of `metrics.REFUSAL_REASONS`) labels it in
    the rejected-uploads metric."""

    def __init__(self, status: int, detail: str, reason: str):
        super().__init__(status, detail)
        self.reason = reason


@dataclass(frozen=True)
class Upload:
    modality: str  # cf | ffa
    array: np.ndarray  # uint8 (H, W, 3) for cf, (T, H, W) for ffa
    bytes: int

    @property
    def width(self) -> int:
        return int(self.array.shape[2] if self.modality == "ffa" else self.array.shape[1])

    @property
    def height(self) -> int:
        return int(self.array.shape[1] if self.modality == "ffa" else self.array.shape[0])


def sniff(data: bytes) -> str | None:
    """png | jpeg | tiff | video (mp4/mov, avi, mkv/webm) | None, from the first bytes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in _TIFF:
        return "tiff"
    if data[4:8] == b"ftyp" or data.startswith(b"\x1a\x45\xdf\xa3"):
        return "video"
    if data.startswith(b"RIFF") and data[8:12] == b"AVI ":
        return "video"
    return None


def read_upload(
    file: UploadFile, settings: Settings, *, field: str, expect: str | None = None
) -> Upload:
    """Decode `file` as a CF image (`expect="cf"`), an FFA video ("ffa"), or either (None)."""
    label = f"upload {field!r}"
    declared = (file.content_type or "").split(";")[0].strip().lower()
    if declared and declared not in settings.accepted_types(expect or "any"):
        accepted = ", ".join(settings.accepted_types(expect or "any"))
        raise UploadRefused(
            415, f"{label}: content type {declared!r} is not one of {accepted}", "bad_type"
        )
    data = file.file.read()
    if not data:
        raise UploadRefused(422, f"{label} is empty", "undecodable")
    kind = sniff(data)
    if kind is None:
        raise UploadRefused(
            415,
            f"{label} is not a PNG, JPEG or TIFF image nor an MP4, MOV, AVI or MKV video",
            "bad_type",
        )
    try:
        modality = _modality(data, kind, expect, label)
        if modality == "cf":
            width, height = probe_cf(data, name=label)
            _check_size(label, width, height, settings)
            array = read_cf(data, name=label, max_pixels=settings.max_pixels)
        else:
            frames, width, height = probe_ffa(data, name=label)
            _check_size(label, width, height, settings)
            limit = min(settings.max_frames, settings.max_video_pixels // max(width * height, 1))
            if frames > limit:
                raise UploadRefused(
                    413,
                    f"{label}: {frames} frames of {width}x{height} exceed the limit of {limit} "
                    f"frames ({settings.max_frames} frames, {settings.max_video_pixels:,} pixels)",
                    "too_many_frames",
                )
            array = read_ffa(data, name=label, max_pixels=settings.max_pixels, max_frames=limit)
    except MediaTooLarge as err:
        message = str(err)
        if err.pixels > settings.max_pixels:  # ours, even where Pillow's own check fired first
            message = (
                f"{label}: {err.pixels:,} pixels exceeds the limit of {settings.max_pixels:,} "
                "(FUNDUS2VIDEO_MAX_PIXELS)"
            )
        raise UploadRefused(413, message, "too_many_pixels") from err
    except UnreadableMedia as err:
        raise UploadRefused(422, str(err), "undecodable") from err
    return Upload(modality, array, len(data))


def _modality(data: bytes, kind: str, expect: str | None, label: str) -> str:
    if kind == "tiff":  # one page: a photo; several: a video
        found = "ffa" if probe_ffa(data, name=label)[0] > 1 else "cf"
        return expect or found
    found = "ffa" if kind == "video" else "cf"
    if expect is not None and found != expect:
        wanted = "a CF image (PNG, JPEG, TIFF)" if expect == "cf" else "an FFA video"
        got = "a video" if found == "ffa" else "an image"
        raise UploadRefused(415, f"{label} must be {wanted}; it is {got}", "bad_type")
    return found


def _check_size(label: str, width: int, height: int, settings: Settings) -> None:
    if width * height > settings.max_pixels:
        raise MediaTooLarge(label, width * height, settings.max_pixels)  # before decoding
    if min(width, height) < settings.min_side:
        raise UploadRefused(
            422,
            f"{label}: {width}x{height} pixels is smaller than {settings.min_side} a side",
            "too_small",
        )


def parse_times(text: str | None, what: str = "times") -> list[float] | None:
    """'0, 15, 30.5' → [0.0, 15.0, 30.5]; None or blank → None."""
    if text is None or not text.strip():
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise HTTPException(
            422, f"{what} must be comma-separated seconds, e.g. 0,15,30; got {text[:80]!r}"
        ) from err


def split_values(values: list[str] | None) -> list[str] | None:
    """Repeated form/query values, each possibly comma-separated → one flat list (or None)."""
    if not values:
        return None
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return out or None
