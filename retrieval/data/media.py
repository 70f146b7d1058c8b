"""Decoders for user media: colour fundus photos (CF) and FFA videos.

Every reader takes a path or the raw bytes of an upload, checks the size the header
declares against a pixel limit *before* any pixel data is decoded, and returns uint8
arrays: a CF photo as (H, W, 3) RGB, an FFA video as (T, H, W) grayscale. Whatever
cannot be decoded raises `UnreadableImage`, `UnreadableVideo` or `MediaTooLarge`,
naming the file (or the upload) and the reason.

Which library decodes what:
- PNG, JPEG: Pillow (lazy open -> size check -> load), EXIF orientation applied.
- TIFF: tifffile wherever it decodes the page exactly (any bit depth, float, 16-bit
  RGB, multi-frame stacks); Pillow otherwise (LZW/JPEG compression without
  imagecodecs, palette, CMYK, YCbCr ...). Pillow reads 16-bit RGB as its high byte.
- Videos (mp4 / avi / mov / mkv): PyAV, the luma plane as gray.
- A folder of frames: each file decoded as an image, in natural sort order.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import tifffile
from PIL import ExifTags, Image, ImageOps, ImageSequence, UnidentifiedImageError

from retrieval.errors import MediaTooLarge, UnreadableImage, UnreadableMedia, UnreadableVideo

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS: int = 50_000_000  # per image / per frame
DEFAULT_MAX_FRAMES: int = 10_000
TIFF_SUFFIXES = (".tif", ".tiff")
CF_SUFFIXES = (".png", ".jpg", ".jpeg", *TIFF_SUFFIXES)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
FFA_SUFFIXES = (*VIDEO_SUFFIXES, *TIFF_SUFFIXES)  # files; a folder of frames also works
FRAME_SUFFIXES = CF_SUFFIXES  # the files of a folder of frames
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601: JPEG's Y, Pillow's "L"

Source = str | os.PathLike[str] | bytes

_PIL_FORMATS = ("PNG", "JPEG", "TIFF")  # JPEG also opens multi-picture (MPO) files
_VIDEO_DEMUXERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "avi", "matroska,webm"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_TIFF_PHOTOMETRIC = (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)
# What Pillow and tifffile raise on corrupt or truncated data.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_TIFF_ERRORS = (tifffile.TiffFileError, OSError, ValueError, KeyError, EOFError, struct.error)
_AV_ERRORS = (av.error.FFmpegError, OSError)


@dataclass(frozen=True)
class _Input:
    """One file or upload, and how its errors name it."""

    label: str  # the path, or the upload's name
    error: type[UnreadableMedia]  # UnreadableImage or UnreadableVideo
    path: Path | None = None
    data: bytes | None = None

    def handle(self) -> str | io.BytesIO:
        """What Pillow, tifffile and PyAV open: the path, or a fresh stream over the bytes."""
        return io.BytesIO(self.data) if self.data is not None else str(self.path)

    def head(self, n: int = 8) -> bytes:
        if self.data is not None:
            return self.data[:n]
        try:
            with open(self.path, "rb") as f:
                return f.read(n)
        except OSError as e:
            raise self.fail(f"cannot open: {e.strerror or e}") from e

    def fail(self, reason: str) -> UnreadableMedia:
        return self.error(self.label, reason)

    def check_pixels(self, width: int, height: int, max_pixels: int) -> None:
        if width * height > max_pixels:
            raise MediaTooLarge(self.label, width * height, max_pixels)


# --------------------------------------------------------------------------- public API


def read_cf(
    source: Source, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """A colour fundus photo (png / jpg / tif, or the bytes of one) as (H, W, 3) uint8 RGB.

    Gray is replicated to 3 channels, alpha dropped, 16-bit and float scaled to 8 bits,
    EXIF orientation applied. `name` is what errors call a bytes upload.
    """
    src = _source(source, name, UnreadableImage)
    if src.path is not None:
        _check_file(src, CF_SUFFIXES)
    image = _decode_image(src, max_pixels)  # (H, W) or (H, W, 3)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)  # (H, W, 3)
    logger.debug("read CF %s: %s", src.label, image.shape)
    return np.ascontiguousarray(image)


def read_ffa(
    source: Source,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> np.ndarray:
    """An FFA video as (T, H, W) uint8 grayscale, T >= 1 (callers decide how many they need).

    `source` is a video (mp4 / avi / mov / mkv), a multi-frame TIFF, a folder of frame
    images, or the bytes of a video or TIFF upload. RGB frames become gray by luma.
    """
    src = _source(source, name, UnreadableVideo)
    if src.path is not None and src.path.is_dir():
        frames = _read_frame_folder(src, max_pixels, max_frames)
    else:
        if src.path is not None:
            _check_file(src, FFA_SUFFIXES)
        if _is_tiff(src.head()):
            frames = _decode_tiff_stack(src, max_pixels, max_frames)
        else:
            frames = _decode_video(src, max_pixels, max_frames)
    logger.debug("read FFA %s: %s", src.label, frames.shape)
    return frames


def probe_cf(source: Source, *, name: str | None = None) -> tuple[int, int]:
    """(width, height) of a CF photo as `read_cf` would return it, from the header only."""
    src = _source(source, name, UnreadableImage)
    if src.path is not None:
        _check_file(src, CF_SUFFIXES)
    if _is_tiff(src.head()):
        with _open_tiff(src) as tif:
            page = _first_page(tif, src)
            if _tifffile_decodes(page):
                return _oriented_size(page.imagewidth, page.imagelength, _tiff_orientation(page))
    with _open_pil(src) as im:
        return _oriented_size(im.width, im.height, _header_orientation(im))


def probe_ffa(source: Source, *, name: str | None = None) -> tuple[int, int, int]:
    """(frames, width, height) of an FFA video from headers, without decoding frames.

    The frame count comes from the container header, or from demuxing (no decoding)
    when the container does not declare it (mkv).
    """
    src = _source(source, name, UnreadableVideo)
    if src.path is not None and src.path.is_dir():
        files = _frame_files(src)
        width, height = probe_cf(files[0])
        return len(files), width, height
    if src.path is not None:
        _check_file(src, FFA_SUFFIXES)
    if _is_tiff(src.head()):
        with _open_tiff(src) as tif:
            _first_page(tif, src)
            shapes = [_tiff_layout(s.axes, s.shape, src)[1] for s in tif.series]
            return sum(t for t, *_ in shapes), shapes[0][2], shapes[0][1]
    with _open_video(src) as container:
        stream = container.streams.video[0]
        try:
            frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        except _AV_ERRORS as e:
            raise src.fail(f"corrupt or truncated: {e}") from e
        return frames, stream.codec_context.width, stream.codec_context.height


# --------------------------------------------------------------------------- inputs


def _source(source: Source, name: str | None, error: type[UnreadableMedia]) -> _Input:
    if isinstance(source, bytes | bytearray | memoryview):
        data, label = bytes(source), name or "upload"
        if not data:
            raise error(label, "the upload is empty")
        return _Input(label, error, data=data)
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"expected a path or bytes, got {type(source).__name__}")
    path = Path(source)
    return _Input(str(path), error, path=path)


def _check_file(src: _Input, suffixes: tuple[str, ...]) -> None:
    path = src.path
    if not path.exists():
        raise src.fail("no such file")
    if path.is_dir():
        raise src.fail("is a folder, not a file")
    if not path.is_file():
        raise src.fail("not a regular file")
    if path.suffix.lower() not in suffixes:
        shown = repr(path.suffix) if path.suffix else "(none)"
        raise src.fail(f"unsupported suffix {shown}; expected one of {', '.join(suffixes)}")


def _is_tiff(head: bytes) -> bool:
    return head[:4] in _TIFF_MAGIC


# --------------------------------------------------------------------------- pixels


def _to_uint8(arr: np.ndarray, bits: int, src: _Input) -> np.ndarray:
    """Scale integer data of `bits` significant bits, bool, or float to uint8 (no wraparound)."""
    if arr.dtype == np.uint8 and bits >= 8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind in "ui":
        top = np.iinfo(arr.dtype).max
        if 0 < bits < arr.dtype.itemsize * 8:
            top = min(top, 2**bits - 1)
        return _scale_int(arr, int(top))
    if arr.dtype.kind == "f":
        return _scale_float(arr, src)
    raise src.fail(f"unsupported pixel type {arr.dtype}")


def _scale_int(arr: np.ndarray, top: int) -> np.ndarray:
    """round(value * 255 / top), values clipped to [0, top]."""
    clipped = np.clip(arr, 0, top)
    if top * 255 + top // 2 < 2**32:  # exact integer rounding in uint32
        work = clipped.astype(np.uint32)
        work *= 255
        work += top // 2
        work //= top
        return work.astype(np.uint8)
    return np.rint(clipped.astype(np.float64) * (255 / top)).astype(np.uint8)


def _scale_float(arr: np.ndarray, src: _Input) -> np.ndarray:
    """Floats in [0, 1] scale to [0, 255]; floats in [0, 255] are kept; NaN/inf become 0."""
    work = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(work.max()) if work.size else 0.0
    if top > 255.0:
        raise src.fail(f"float pixel values up to {top:g}; expected [0, 1] or [0, 255]")
    if top <= 1.0:
        work *= 255.0
    np.clip(work, 0.0, 255.0, out=work)
    return np.rint(work, out=work).astype(np.uint8)


def luma(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3+) RGB picture → its luma (H, W) as float32, unrounded (ITU-R 601)."""
    return np.asarray(image[..., :3], np.float32) @ LUMA


def _to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W) stays; (H, W, 3) RGB becomes luma (ITU-R 601, as Pillow's convert('L'))."""
    if image.ndim == 2:
        return image
    return np.array(Image.fromarray(image).convert("L"))


def _oriented_size(width: int, height: int, orientation: int | None) -> tuple[int, int]:
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _orient(image: np.ndarray, orientation: int | None) -> np.ndarray:
    """Apply an EXIF/TIFF orientation (2..8) to an (H, W[, 3]) uint8 array, through Pillow."""
    if orientation in (None, 1):
        return image
    im = Image.fromarray(image)
    im.getexif()[ExifTags.Base.Orientation] = orientation
    ImageOps.exif_transpose(im, in_place=True)
    return np.array(im)


# --------------------------------------------------------------------------- images


def _decode_image(src: _Input, max_pixels: int) -> np.ndarray:
    """One image as uint8 (H, W) gray or (H, W, 3) RGB."""
    if _is_tiff(src.head()):
        image = _decode_tiff_page(src, max_pixels)
        if image is not None:
            return image
        logger.debug("%s: tifffile cannot decode this TIFF exactly; using Pillow", src.label)
    with _open_pil(src, max_pixels) as im:
        src.check_pixels(im.width, im.height, max_pixels)
        try:
            ImageOps.exif_transpose(im, in_place=True)  # loads the pixels
            return _pil_array(im, src)
        except _PIL_ERRORS as e:
            raise src.fail(f"corrupt or truncated image data: {e}") from e


def _open_pil(src: _Input, max_pixels: int | None = None) -> Image.Image:
    """Open lazily (header only); Pillow's own bomb check becomes MediaTooLarge."""
    try:
        return Image.open(src.handle(), formats=_PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _pil_bomb(src, e, max_pixels) from e
    except UnidentifiedImageError as e:
        raise src.fail("not a PNG, JPEG or TIFF image") from e
    except _PIL_ERRORS as e:
        raise src.fail(f"corrupt image header: {e}") from e


def _header_orientation(im: Image.Image) -> int | None:
    """EXIF orientation without decoding pixels (Pillow loads a PNG to look for a late eXIf)."""
    if im.format == "PNG" and "exif" not in im.info:
        return None
    return im.getexif().get(ExifTags.Base.Orientation)


def _pil_bomb(src: _Input, e: Exception, max_pixels: int | None) -> UnreadableMedia:
    """Pillow refuses sizes above 2 * Image.MAX_IMAGE_PIXELS at open, before our check."""
    numbers = re.findall(r"\d+", str(e))  # "Image size (P pixels) exceeds limit of L pixels"
    if len(numbers) < 2:
        return src.fail(f"refused as a possible decompression bomb: {e}")
    pixels, pil_limit = int(numbers[0]), int(numbers[1])
    ours = max_pixels is not None and pixels > max_pixels
    return MediaTooLarge(src.label, pixels, max_pixels if ours else pil_limit)


def _pil_array(im: Image.Image, src: _Input) -> np.ndarray:
    """A loaded Pillow image as uint8 (H, W) gray or (H, W, 3) RGB."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.array(im)
    if mode == "1":
        return np.array(im.convert("L"))
    if mode in ("LA", "La"):
        return np.array(im.getchannel("L"))
    if mode.startswith("I;16"):
        return _to_uint8(np.array(im), 16, src)
    if mode in ("I", "F"):
        bits = getattr(im, "tag_v2", {}).get(258, (16,))  # TIFF BitsPerSample
        return _to_uint8(np.array(im), int(bits[0]), src)
    return np.array(im.convert("RGB"))  # RGBA, RGBX, P, PA, CMYK, YCbCr, LAB ...


# --------------------------------------------------------------------------- TIFF


def _open_tiff(src: _Input) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(src.handle())
    except _TIFF_ERRORS as e:
        raise src.fail(f"not a readable TIFF: {e}") from e


def _first_page(tif: tifffile.TiffFile, src: _Input) -> tifffile.TiffPage:
    if not len(tif.pages) or not tif.series:
        raise src.fail("the TIFF holds no images")
    return tif.pages.first


def _tifffile_decodes(page: tifffile.TiffPage) -> bool:
    """Whether tifffile (without imagecodecs) decodes this page exactly."""
    return page.compression in tifffile.TIFF.DECOMPRESSORS and page.photometric in _TIFF_PHOTOMETRIC


def _tiff_orientation(page: tifffile.TiffPage) -> int | None:
    return page.tags.valueof(ExifTags.Base.Orientation)


def _tiff_layout(
    axes: str, shape: tuple[int, ...], src: _Input
) -> tuple[list[int], tuple[int, int, int, int]]:
    """The transpose that puts TIFF axes in (frames..., Y, X, S) order, and the (T, H, W, S)
    shape after flattening every non-image axis (I, Q, T, Z, C ...) into frames."""
    if "Y" not in axes or "X" not in axes:
        raise src.fail(f"TIFF axes {axes!r} lack Y and X")
    image_axes = [axes.index(a) for a in "YXS" if a in axes]
    perm = [i for i in range(len(axes)) if i not in image_axes] + image_axes
    frames = int(np.prod([shape[i] for i in perm[: -len(image_axes)]], dtype=np.int64))
    samples = shape[axes.index("S")] if "S" in axes else 1
    return perm, (frames, shape[axes.index("Y")], shape[axes.index("X")], samples)


def _pick_samples(stack: np.ndarray, rgb: bool, src: _Input) -> np.ndarray:
    """(T, H, W, S) -> (T, H, W) gray or (T, H, W, 3) RGB; alpha and extra samples dropped."""
    samples = stack.shape[-1]
    if rgb and samples >= 3:
        return stack[..., :3]
    if not rgb and samples <= 2:
        return stack[..., 0]
    kind = "RGB" if rgb else "gray"
    raise src.fail(f"unsupported TIFF layout: {samples} samples per pixel in a {kind} image")


def _decode_tiff_page(src: _Input, max_pixels: int) -> np.ndarray | None:
    """The first page as uint8 (H, W) or (H, W, 3); None where Pillow must decode it."""
    with _open_tiff(src) as tif:
        page = _first_page(tif, src)
        if not _tifffile_decodes(page):
            return None
        src.check_pixels(page.imagewidth, page.imagelength, max_pixels)
        perm, shape = _tiff_layout(page.axes, page.shape, src)
        try:
            raw = page.asarray()
        except _TIFF_ERRORS as e:
            raise src.fail(f"corrupt TIFF data: {e}") from e
        stack = _to_uint8(raw.transpose(perm).reshape(shape), page.bitspersample, src)
        image = _pick_samples(stack, page.photometric == tifffile.PHOTOMETRIC.RGB, src)[0]
        return _orient(np.ascontiguousarray(image), _tiff_orientation(page))


def _decode_tiff_stack(src: _Input, max_pixels: int, max_frames: int) -> np.ndarray:
    """Every image of a multi-frame TIFF as (T, H, W) uint8 gray."""
    with _open_tiff(src) as tif:
        page = _first_page(tif, src)
        if _tifffile_decodes(page):
            layouts = [_tiff_layout(s.axes, s.shape, src) for s in tif.series]
            sizes = sorted({(w, h, s) for _, (_, h, w, s) in layouts})
            if len(sizes) > 1:
                shown = ", ".join(f"{w}x{h}" + (f"x{s}" if s > 1 else "") for w, h, s in sizes)
                raise src.fail(f"frames of different sizes: {shown}")
            _, height, width, _ = layouts[0][1]
            src.check_pixels(width, height, max_pixels)
            _check_frame_count(src, sum(shape[0] for _, shape in layouts), max_frames)
            try:
                raw = [
                    s.asarray().transpose(perm).reshape(shape)  # (t, H, W, S)
                    for s, (perm, shape) in zip(tif.series, layouts, strict=True)
                ]
            except _TIFF_ERRORS as e:
                raise src.fail(f"corrupt TIFF data: {e}") from e
            stack = _to_uint8(np.concatenate(raw), page.bitspersample, src)  # (T, H, W, S)
            stack = _pick_samples(stack, page.photometric == tifffile.PHOTOMETRIC.RGB, src)
            return np.stack([_to_gray(f) for f in stack]) if stack.ndim == 4 else stack
    logger.debug("%s: tifffile cannot decode this TIFF exactly; using Pillow", src.label)
    return _decode_pil_stack(src, max_pixels, max_frames)


def _decode_pil_stack(src: _Input, max_pixels: int, max_frames: int) -> np.ndarray:
    """A multi-frame TIFF through Pillow, frame by frame."""
    with _open_pil(src, max_pixels) as im:
        src.check_pixels(im.width, im.height, max_pixels)
        _check_frame_count(src, getattr(im, "n_frames", 1), max_frames)
        frames = []
        try:
            for frame in ImageSequence.Iterator(im):
                if frame.size != im.size:
                    sizes = f"{_wxh(frame.size)}, frame 0 is {_wxh(im.size)}"
                    raise src.fail(f"frames of different sizes: frame {len(frames)} is {sizes}")
                frames.append(_to_gray(_pil_array(frame, src)))
        except _PIL_ERRORS as e:
            raise src.fail(f"corrupt or truncated image data in frame {len(frames)}: {e}") from e
    return np.stack(frames)


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _check_frame_count(src: _Input, frames: int, max_frames: int) -> None:
    if frames > max_frames:
        raise src.fail(f"{frames} frames exceeds the limit of {max_frames}")


# --------------------------------------------------------------------------- videos


def _open_video(src: _Input) -> av.container.InputContainer:
    """Open with PyAV and check it is a container we accept with a video stream."""
    try:
        container = av.open(src.handle(), mode="r")
    except _AV_ERRORS as e:
        raise src.fail(f"not a readable video: {e}") from e
    if container.format.name not in _VIDEO_DEMUXERS:
        container.close()
        raise src.fail(f"content is {container.format.name!r}, not an MP4, AVI, MOV or MKV video")
    if not container.streams.video:
        container.close()
        raise src.fail("the file has no video stream")
    return container


def _decode_video(src: _Input, max_pixels: int, max_frames: int) -> np.ndarray:
    """Every frame's luma plane as (T, H, W) uint8."""
    with _open_video(src) as container:
        stream = container.streams.video[0]
        src.check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
        _check_frame_count(src, stream.frames, max_frames)
        frames: list[np.ndarray] = []  # each (H, W)
        try:
            for frame in container.decode(stream):
                _check_frame_count(src, len(frames) + 1, max_frames)
                src.check_pixels(frame.width, frame.height, max_pixels)
                if frames and (frame.height, frame.width) != frames[0].shape:
                    first = _wxh(frames[0].shape[::-1])
                    sizes = f"{_wxh((frame.width, frame.height))}, frame 0 is {first}"
                    raise src.fail(f"frames of different sizes: frame {len(frames)} is {sizes}")
                frames.append(frame.to_ndarray(format="gray"))
        except _AV_ERRORS as e:
            raise src.fail(f"corrupt or truncated after {len(frames)} frame(s): {e}") from e
        declared = stream.frames
    if not frames:
        raise src.fail("no frames could be decoded")
    if declared and len(frames) < declared:
        raise src.fail(f"truncated: the header declares {declared} frames, {len(frames)} decoded")
    return np.stack(frames)


# --------------------------------------------------------------------------- folders


def _natural_key(path: Path) -> tuple[list[int | str], str]:
    """frame2 < frame10: digit runs compare as numbers."""
    parts = re.split(r"(\d+)", path.name)
    return [int(p) if p.isdigit() else p.casefold() for p in parts], path.name


def _frame_files(src: _Input) -> list[Path]:
    files = [
        p
        for p in src.path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES
    ]
    if not files:
        raise src.fail(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in the folder")
    return sorted(files, key=_natural_key)


def _read_frame_folder(src: _Input, max_pixels: int, max_frames: int) -> np.ndarray:
    """A folder of frame images as (T, H, W) uint8 gray; every frame the same size."""
    files = _frame_files(src)
    _check_frame_count(src, len(files), max_frames)
    out: np.ndarray | None = None  # (T, H, W)
    for i, path in enumerate(files):
        frame = _to_gray(_decode_image(_Input(str(path), UnreadableVideo, path=path), max_pixels))
        if out is None:
            out = np.empty((len(files), *frame.shape), np.uint8)
        elif frame.shape != out.shape[1:]:
            sizes = f"{_wxh(frame.shape[::-1])}, {files[0].name} is {_wxh(out.shape[:0:-1])}"
            raise src.fail(f"frames of different sizes: {path.name} is {sizes}")
        out[i] = frame
    return out
