"""Decoders for user media: every format round-trips, every bad file is named and refused."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import tifffile
from PIL import ExifTags, Image, ImageFile

from retrieval.data.media import (
    CF_SUFFIXES,
    DEFAULT_MAX_PIXELS,
    FFA_SUFFIXES,
    probe_cf,
    probe_ffa,
    read_cf,
    read_ffa,
)
from retrieval.data.media_write import mp4_bytes, png_bytes, write_mp4, write_png
from retrieval.errors import MediaTooLarge, UnreadableImage, UnreadableVideo

H, W = 48, 64


def rgb_image(h: int = H, w: int = W) -> np.ndarray:
    """A smooth (H, W, 3) uint8 test card: distinct channels, no two pixels alike in a row."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=-1).astype(
        np.uint8
    )


def gray_video(t: int = 6, h: int = H, w: int = W) -> np.ndarray:
    """(T, H, W) uint8: a smooth ramp that brightens frame by frame."""
    ramp = np.linspace(0, 1, w)[None, :] * np.linspace(0.5, 1, h)[:, None]
    return np.stack([np.round(ramp * 255 * (i + 1) / t) for i in range(t)]).astype(np.uint8)


def scale16(v: np.ndarray) -> np.ndarray:
    """The documented 16 -> 8 bit rule: round(v * 255 / 65535)."""
    return np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)


def save_pil(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def write_av(path: Path, frames: np.ndarray, *, fmt: str, codec: str, pix_fmt: str) -> Path:
    """Write (T, H, W) gray frames with PyAV in any container/codec."""
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(4))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="gray").reformat(format=pix_fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def png_declaring(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR is patched (with a fixed CRC) to declare width x height."""
    data = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --------------------------------------------------------------------------- CF photos


def test_suffix_constants():
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff"} == set(CF_SUFFIXES)
    assert {".mp4", ".avi", ".mov", ".mkv", ".tif", ".tiff"} == set(FFA_SUFFIXES)
    assert DEFAULT_MAX_PIXELS == 50_000_000


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_cf_rgb_and_gray_8bit_exact(tmp_path, suffix):
    rgb = rgb_image()
    out = read_cf(save_pil(tmp_path / f"rgb{suffix}", rgb))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    np.testing.assert_array_equal(out, rgb)
    gray = rgb[..., 0]
    out = read_cf(save_pil(tmp_path / f"gray{suffix}", gray))
    assert out.shape == (H, W, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_cf_16bit_png_gray_scaled_by_rule(tmp_path):
    v = np.array([[0, 1, 128, 129, 257, 32767, 32768, 65534, 65535]], np.uint16)
    out = read_cf(save_pil(tmp_path / "g16.png", v))
    np.testing.assert_array_equal(out[..., 0], scale16(v))
    np.testing.assert_array_equal(out[..., 2], scale16(v))


def test_cf_16bit_tiff_gray_and_rgb_scaled_by_rule(tmp_path):
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tiff", rgb16, photometric="rgb")
    np.testing.assert_array_equal(read_cf(tmp_path / "rgb16.tiff"), scale16(rgb16))
    tifffile.imwrite(tmp_path / "g16.tif", rgb16[..., 1])
    np.testing.assert_array_equal(read_cf(tmp_path / "g16.tif")[..., 0], scale16(rgb16[..., 1]))


def test_cf_tiff_float_and_bit_depth(tmp_path):
    f = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    tifffile.imwrite(tmp_path / "f.tif", f)
    np.testing.assert_array_equal(read_cf(tmp_path / "f.tif")[..., 0], np.round(f * 255))
    tifffile.imwrite(tmp_path / "big.tif", f * 1000)
    with pytest.raises(UnreadableImage, match=r"big\.tif.*float"):
        read_cf(tmp_path / "big.tif")


def test_cf_tiffs_tifffile_cannot_do_fall_back_to_pillow(tmp_path):
    rgb = rgb_image()
    path = save_pil(tmp_path / "lzw.tif", rgb, compression="tiff_lzw")  # tifffile needs imagecodecs
    np.testing.assert_array_equal(read_cf(path), rgb)
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "palette.TIFF")  # photometric palette; upper-case suffix
    np.testing.assert_array_equal(read_cf(tmp_path / "palette.TIFF"), pal.convert("RGB"))


def png_rgb16(image: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one), chunk by chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    h, w, _ = image.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in image)  # filter 0
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_cf_16bit_rgb_png_within_one_level():
    rgb16 = np.random.default_rng(3).integers(0, 65536, (H, W, 3), dtype=np.uint16)
    out = read_cf(png_rgb16(rgb16), name="rgb16.png")
    # Pillow reads 16-bit RGB PNG as the high byte (v >> 8), not round(v * 255 / 65535).
    np.testing.assert_array_equal(out, rgb16 >> 8)
    assert np.abs(out.astype(int) - scale16(rgb16)).max() <= 1


def test_cf_alpha_palette_and_bilevel(tmp_path):
    rgb = rgb_image()
    rgba = np.dstack([rgb, np.full((H, W), 7, np.uint8)])
    np.testing.assert_array_equal(read_cf(save_pil(tmp_path / "a.png", rgba)), rgb)
    la = Image.fromarray(rgb[..., 0]).convert("LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_cf(tmp_path / "la.png")[..., 1], rgb[..., 0])
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_cf(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    bits = rgb[..., 0] > 127
    Image.fromarray(bits).save(tmp_path / "bw.png")
    np.testing.assert_array_equal(read_cf(tmp_path / "bw.png")[..., 0], bits * 255)


def test_cf_jpeg_is_close(tmp_path):
    rgb = rgb_image()
    for suffix in (".jpg", ".jpeg"):
        out = read_cf(save_pil(tmp_path / f"x{suffix}", rgb, quality=95))
        assert out.shape == (H, W, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - rgb).mean() < 3


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_cf_exif_orientation_6_rotates(tmp_path, suffix):
    rgb = rgb_image()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # display = stored rotated 90 degrees clockwise
    path = save_pil(tmp_path / f"o6{suffix}", rgb, exif=exif, quality=95)
    out = read_cf(path)
    assert out.shape == (W, H, 3)
    assert probe_cf(path) == (H, W)
    assert np.abs(out.astype(int) - np.rot90(rgb, k=-1)).mean() < 3


def test_cf_tiff_orientation_tag(tmp_path):
    rgb = rgb_image()
    tifffile.imwrite(tmp_path / "o6.tif", rgb, extratags=[(274, "H", 1, 6, True)])
    np.testing.assert_array_equal(read_cf(tmp_path / "o6.tif"), np.rot90(rgb, k=-1))


def test_cf_bytes_input(tmp_path):
    rgb = rgb_image()
    np.testing.assert_array_equal(read_cf(png_bytes(rgb)), rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    assert np.abs(read_cf(buf.getvalue()).astype(int) - rgb).mean() < 3
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb.astype(np.uint16) * 257, photometric="rgb")  # 16-bit RGB TIFF
    np.testing.assert_array_equal(read_cf(buf.getvalue(), name="scan.tif"), rgb)


def test_retina_photo_png_and_jpeg(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    retina = skdata.retina()  # CC0 colour fundus photo shipped with scikit-image
    write_png(tmp_path / "retina.png", retina)
    out = read_cf(tmp_path / "retina.png")
    assert out.shape == (1411, 1411, 3)
    np.testing.assert_array_equal(out, retina)
    save_pil(tmp_path / "retina.jpg", retina, quality=90)
    out = read_cf(tmp_path / "retina.jpg")
    assert out.shape == (1411, 1411, 3)
    assert np.abs(out.astype(int) - retina).mean() < 3


# --------------------------------------------------------------------------- CF errors


def test_cf_errors_name_the_file(tmp_path):
    with pytest.raises(UnreadableImage, match=r"nowhere\.png: no such file"):
        read_cf(tmp_path / "nowhere.png")
    (tmp_path / "photos.png").mkdir()
    with pytest.raises(UnreadableImage, match=r"photos\.png: is a folder"):
        read_cf(tmp_path / "photos.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnreadableImage, match=r"notes\.txt: unsupported suffix '\.txt'"):
        read_cf(tmp_path / "notes.txt")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    with pytest.raises(UnreadableImage, match=r"bad\.png"):
        read_cf(tmp_path / "bad.png")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(UnreadableImage, match=r"noise\.jpg: not a PNG, JPEG or TIFF"):
        read_cf(tmp_path / "noise.jpg")


def test_cf_truncated_png_and_bytes_errors(tmp_path):
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match=r"cut\.png: corrupt or truncated"):
        read_cf(tmp_path / "cut.png")
    with pytest.raises(UnreadableImage, match=r"photo\.png: not a PNG"):
        read_cf(b"plain text, not an image", name="photo.png")
    with pytest.raises(UnreadableImage, match=r"upload: the upload is empty"):
        read_cf(b"")
    buf = io.BytesIO()
    Image.fromarray(rgb_image()).save(buf, format="GIF")
    with pytest.raises(UnreadableImage, match=r"anim\.gif: not a PNG, JPEG or TIFF"):
        read_cf(buf.getvalue(), name="anim.gif")


def test_cf_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    (tmp_path / "bomb.png").write_bytes(png_declaring(30_000, 30_000))  # 900 MP
    with pytest.raises(MediaTooLarge, match=r"bomb\.png") as e:
        read_cf(tmp_path / "bomb.png")
    assert e.value.pixels == 900_000_000 and e.value.limit == DEFAULT_MAX_PIXELS
    (tmp_path / "big.png").write_bytes(png_declaring(8_000, 8_000))  # 64 MP: our check
    with pytest.raises(MediaTooLarge, match=r"big\.png: 64,000,000 pixels exceeds"):
        read_cf(tmp_path / "big.png")
    with pytest.raises(MediaTooLarge, match=r"up\.png"):
        read_cf(png_declaring(30_000, 30_000), name="up.png")
    assert probe_cf(tmp_path / "big.png") == (8_000, 8_000)  # headers only


def test_cf_pillow_bomb_warning_as_error_is_media_too_large():
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(MediaTooLarge, match=r"w\.png: 100,000,000 pixels") as e:
            read_cf(png_declaring(10_000, 10_000), name="w.png")  # PIL warns above ~89 MP
    assert e.value.limit == DEFAULT_MAX_PIXELS


def test_outputs_are_writable_arrays(tmp_path):
    rgb = rgb_image()
    tifffile.imwrite(tmp_path / "o6.tif", rgb, extratags=[(274, "H", 1, 6, True)])
    outputs = [read_cf(png_bytes(rgb[..., 0])), read_cf(tmp_path / "o6.tif")]
    outputs += [read_ffa(mp4_bytes(gray_video())), read_ffa(tifffile_bytes(gray_video()))]
    for out in outputs:
        assert out.flags.writeable and out.flags.c_contiguous and out.dtype == np.uint8


def tifffile_bytes(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kwargs)
    return buf.getvalue()


def test_cf_max_pixels_per_call(tmp_path):
    rgb = rgb_image()
    write_png(tmp_path / "x.png", rgb)
    tifffile.imwrite(tmp_path / "x.tif", rgb)
    for name in ("x.png", "x.tif"):
        with pytest.raises(MediaTooLarge, match=rf"x\.{name[2:]}: 3,072 pixels") as e:
            read_cf(tmp_path / name, max_pixels=H * W - 1)
        assert e.value.limit == H * W - 1
        assert read_cf(tmp_path / name, max_pixels=H * W).shape == (H, W, 3)


# --------------------------------------------------------------------------- FFA videos


def test_ffa_mp4_close_to_written(tmp_path):
    frames = gray_video()
    write_mp4(tmp_path / "v.mp4", frames)
    out = read_ffa(tmp_path / "v.mp4")
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert np.abs(out.astype(int) - frames).max() <= 4
    assert probe_ffa(tmp_path / "v.mp4") == (len(frames), W, H)


def test_ffa_mp4_bytes_and_rgb_frames():
    rgb = np.stack([rgb_image()] * 3)  # (T, H, W, 3)
    out = read_ffa(mp4_bytes(rgb), name="clip.mp4")
    assert out.shape == (3, H, W)
    assert np.abs(out[0].astype(int) - luma(rgb[0])).mean() < 3


@pytest.mark.parametrize(
    ("name", "fmt", "codec", "pix_fmt", "tol"),
    [
        ("v.avi", "avi", "ffv1", "gray", 0),  # lossless
        ("v2.avi", "avi", "mpeg4", "yuv420p", 6),
        ("v.mkv", "matroska", "ffv1", "gray", 0),  # no frame count in the header
        ("v.mov", "mov", "mpeg4", "yuv420p", 6),
    ],
)
def test_ffa_other_containers(tmp_path, name, fmt, codec, pix_fmt, tol):
    frames = gray_video()
    path = write_av(tmp_path / name, frames, fmt=fmt, codec=codec, pix_fmt=pix_fmt)
    out = read_ffa(path)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - frames).mean() <= tol
    assert probe_ffa(path) == (len(frames), W, H)
    assert read_ffa(path.read_bytes(), name=name).shape == frames.shape


def test_ffa_folder_natural_sort_and_luma(tmp_path):
    frames = gray_video(t=12)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames, start=1):
        suffix = ".tif" if i % 3 == 0 else ".png"  # formats may mix
        save_pil(folder / f"frame{i}{suffix}", frame)
    (folder / "notes.txt").write_text("ignored")
    (folder / ".DS_Store").write_bytes(b"ignored")
    out = read_ffa(folder)
    np.testing.assert_array_equal(out, frames)  # frame2 before frame10
    assert probe_ffa(folder) == (12, W, H)
    rgb = rgb_image()
    save_pil(folder / "frame13.jpg", rgb, quality=100)
    out = read_ffa(folder)
    assert out.shape == (13, H, W)
    assert np.abs(out[-1].astype(int) - luma(rgb)).mean() < 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_ffa_multiframe_tiff(tmp_path, dtype):
    frames8 = gray_video()
    frames = frames8.astype(dtype) * 257 if dtype == np.uint16 else frames8
    tifffile.imwrite(tmp_path / "stack.tif", frames)
    np.testing.assert_array_equal(read_ffa(tmp_path / "stack.tif"), frames8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, frames, imagej=True)  # ImageJ hyperstack (axes "IYX")
    np.testing.assert_array_equal(read_ffa(buf.getvalue(), name="stack.tif"), frames8)
    assert probe_ffa(tmp_path / "stack.tif") == (len(frames), W, H)


def test_ffa_tiff_rgb_pages_and_lzw_fallback(tmp_path):
    rgb = np.stack([rgb_image(), rgb_image()[::-1]])  # (T, H, W, 3)
    with tifffile.TiffWriter(tmp_path / "pages.tiff") as tw:
        for frame in rgb:  # separate writes: one series per page
            tw.write(frame, photometric="rgb")
    out = read_ffa(tmp_path / "pages.tiff")
    np.testing.assert_array_equal(out, np.stack([luma(f) for f in rgb]))
    gray = gray_video(t=4)
    first, *rest = [Image.fromarray(f) for f in gray]
    first.save(tmp_path / "lzw.tif", save_all=True, append_images=rest, compression="tiff_lzw")
    np.testing.assert_array_equal(read_ffa(tmp_path / "lzw.tif"), gray)


def test_ffa_single_frame_is_returned(tmp_path):
    write_mp4(tmp_path / "one.mp4", gray_video(t=1))
    assert read_ffa(tmp_path / "one.mp4").shape == (1, H, W)


# --------------------------------------------------------------------------- FFA errors


def test_ffa_missing_suffix_and_garbage(tmp_path):
    with pytest.raises(UnreadableVideo, match=r"gone\.mp4: no such file"):
        read_ffa(tmp_path / "gone.mp4")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnreadableVideo, match=r"notes\.txt: unsupported suffix '\.txt'"):
        read_ffa(tmp_path / "notes.txt")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(1).bytes(4000))
    with pytest.raises(UnreadableVideo, match=r"junk\.mp4: not a readable video"):
        read_ffa(tmp_path / "junk.mp4")
    (tmp_path / "photo.mp4").write_bytes(png_bytes(rgb_image()))
    with pytest.raises(UnreadableVideo, match=r"photo\.mp4: content is 'png_pipe'"):
        read_ffa(tmp_path / "photo.mp4")
    with pytest.raises(UnreadableVideo, match=r"scan\.tif: .*TIFF"):
        read_ffa(b"II*\x00 broken", name="scan.tif")


@pytest.mark.parametrize("faststart", [True, False])
def test_ffa_truncated_mp4(tmp_path, faststart):
    frames = np.random.default_rng(2).integers(0, 256, (10, 96, 128), dtype=np.uint8)
    data = mp4_bytes(frames)
    if not faststart:  # moov at the end: cutting loses the index itself
        path = write_av(tmp_path / "full.mp4", frames, fmt="mp4", codec="mpeg4", pix_fmt="yuv420p")
        data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableVideo, match=r"cut\.mp4: .*(truncated|not a readable)"):
        read_ffa(tmp_path / "cut.mp4")


@pytest.mark.parametrize(
    ("name", "fmt", "codec", "message"),
    [
        ("empty.avi", "avi", "ffv1", "no frames could be decoded"),  # a stream, no packets
        ("empty.mp4", "mp4", "mpeg4", "no video stream"),  # the muxer drops the empty track
    ],
)
def test_ffa_zero_frames(tmp_path, name, fmt, codec, message):
    path = tmp_path / name
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(4))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        container.start_encoding()  # header only
    with pytest.raises(UnreadableVideo, match=rf"{name}: .*{message}"):
        read_ffa(path)


def test_ffa_folder_errors(tmp_path):
    empty = tmp_path / "empty_frames"
    empty.mkdir()
    (empty / "readme.txt").write_text("no frames here")
    with pytest.raises(UnreadableVideo, match=r"empty_frames: no frame images"):
        read_ffa(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_pil(mixed / "f1.png", np.zeros((H, W), np.uint8))
    save_pil(mixed / "f2.png", np.zeros((H, W + 2), np.uint8))
    with pytest.raises(
        UnreadableVideo, match=r"mixed: frames of different sizes: f2\.png is 66x48"
    ):
        read_ffa(mixed)
    (mixed / "f2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UnreadableVideo, match=r"f2\.png"):
        read_ffa(mixed)
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tw:
        tw.write(np.zeros((H, W), np.uint8))
        tw.write(np.zeros((H + 1, W), np.uint8))
    with pytest.raises(UnreadableVideo, match=r"mixed\.tif: frames of different sizes"):
        read_ffa(tmp_path / "mixed.tif")


def test_ffa_pixel_and_frame_limits(tmp_path, monkeypatch):
    frames = gray_video(t=5)
    write_mp4(tmp_path / "v.mp4", frames)
    tifffile.imwrite(tmp_path / "v.tif", frames)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        write_png(folder / f"{i}.png", frame)
    for path in (tmp_path / "v.mp4", tmp_path / "v.tif", folder):
        with pytest.raises(MediaTooLarge, match="3,072 pixels exceeds the limit of 3,071"):
            read_ffa(path, max_pixels=H * W - 1)
        with pytest.raises(UnreadableVideo, match=rf"{path.name}: 5 frames exceeds the limit of 4"):
            read_ffa(path, max_frames=4)
        assert read_ffa(path, max_frames=5, max_pixels=H * W).shape == frames.shape

    def no_decoding(*args, **kwargs):
        raise AssertionError("frames must not be decoded")

    monkeypatch.setattr(av.container.InputContainer, "decode", no_decoding)
    with pytest.raises(MediaTooLarge, match=r"v\.mp4"):
        read_ffa(tmp_path / "v.mp4", max_pixels=100)
