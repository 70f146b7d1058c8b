"""How lifelike a colour fundus photo looks: a few measurements at one common scale.

A photo is first brought to `SCALE_PX` pixels with its field-of-view circle filling
`FOV_FILL` of the width (`encoder.fov.fov_square`: the models' own preprocessing and
the phantom's framing), so a real photo and a phantom photo are compared at about the
same pixels per degree. Inside the field of view:

- `thin_density`: the fraction of pixels whose black top-hat of the green channel
  (a disc of radius `THIN_RADIUS_PX`: it keeps dark structures up to 9 px wide, which
  at 512 px is every retinal vessel up to the main veins beside the disc, and
  microaneurysms and dot haemorrhages, but not the fovea or larger blots) exceeds
  `THIN_LEVEL` of the FOV's median green. A vessel darkens a fraction of the light
  behind it, so the contrast that shows is relative to the background level; unlike
  the green range, the median does not widen when a blot or an exudate is in view;
- `r_over_g`, `g_over_b`: ratios of the channel means;
- `pale_pattern`: the fraction of pixels in bright structures up to 17 px wide on a
  background cleared of vessels (grey closing, then a white top-hat of the green)
  brighter than `PALE_LEVEL` of the median green: the pale worm-like choroidal
  pattern, also drusen, exudates, cotton-wool spots and vessel reflexes.

`photo_variations` turns one real photo into a range of plausible acquisitions
(narrower fields, exposure, gamma, white balance, blur, JPEG), for when only one
real photo is at hand.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from encoder.data import estimate_fov
from encoder.fov import FOV_FILL, FovCircle, detect_fov, fov_square

SCALE_PX = 512  # the measurements' common image size
EDGE_PX = 8  # the FOV is eroded by this much: the aperture edge is no structure
THIN_RADIUS_PX = 4
THIN_LEVEL = 0.1  # of the median green
VESSEL_CLEAR_PX = 4  # closing radius that removes the retinal vessels
PALE_RADIUS_PX = 8
PALE_LEVEL = 0.065  # of the median green
METRICS = ("thin_density", "r_over_g", "g_over_b", "pale_pattern")


@dataclass(frozen=True)
class Realism:
    """The measurements of one photo (see the module docstring)."""

    thin_density: float
    r_over_g: float
    g_over_b: float
    pale_pattern: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def disk(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) bool disc footprint, as skimage.morphology.disk."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _check_photo(cf: np.ndarray, name: str) -> None:
    if not isinstance(cf, np.ndarray) or cf.dtype != np.uint8 or cf.ndim != 3:
        raise ValueError(f"{name} must be a uint8 (H, W, 3) RGB array")
    if cf.shape[2] != 3 or min(cf.shape[:2]) < 32:
        raise ValueError(f"{name} must be (H, W, 3) with H, W >= 32, got {cf.shape}")


def fov_circle(cf: np.ndarray) -> FovCircle:
    """The photo's field-of-view circle (`encoder.fov.detect_fov`)."""
    _check_photo(cf, "cf")
    if int(cf.max()) < 16:
        raise ValueError("cf has no field of view: the photo is black")
    return detect_fov(cf)


def at_scale(cf: np.ndarray, size: int = SCALE_PX) -> np.ndarray:
    """(size, size, 3) uint8: the square around the photo's FOV circle, the circle filling
    `FOV_FILL` of it, resized (`encoder.fov.fov_square`, as the models see photos)."""
    return fov_square(cf, size, fov_circle(cf))


def measure_mask(img: np.ndarray) -> np.ndarray:
    """(H, W) bool: inside the FOV circle of a photo at scale, lit (not where the camera's
    frame cut the circle, nor a notch), away from the edges."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    r = FOV_FILL * min(h, w) / 2 - EDGE_PX
    circle = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2) < r
    lit = ndimage.binary_erosion(estimate_fov(np.array(img)), disk(EDGE_PX))
    return circle & lit


def thin_structure_map(green: np.ndarray, level: float) -> np.ndarray:
    """(H, W) bool: thin dark structures, black top-hat above `THIN_LEVEL` x level."""
    bt = ndimage.black_tophat(green, footprint=disk(THIN_RADIUS_PX))
    return bt > THIN_LEVEL * level


def pale_pattern_map(green: np.ndarray, level: float) -> np.ndarray:
    """(H, W) bool: bright structures up to 17 px wide once the dark vessels are closed."""
    smooth = ndimage.gaussian_filter(green, 1.0)
    cleared = ndimage.grey_closing(smooth, footprint=disk(VESSEL_CLEAR_PX))
    wt = ndimage.white_tophat(cleared, footprint=disk(PALE_RADIUS_PX))
    return wt > PALE_LEVEL * level


def measure_at_scale(img: np.ndarray) -> Realism:
    """The measurements of a photo already at scale (see `at_scale`)."""
    _check_photo(img, "img")
    mask = measure_mask(img)
    if mask.sum() < 0.05 * mask.size:
        raise ValueError("img has too small a field of view to measure")
    green = img[..., 1].astype(np.float32)
    level = max(float(np.median(green[mask])), 1.0)
    mean = img[mask].astype(np.float64).mean(axis=0) + 1e-6
    return Realism(
        thin_density=float(thin_structure_map(green, level)[mask].mean()),
        r_over_g=float(mean[0] / mean[1]),
        g_over_b=float(mean[1] / mean[2]),
        pale_pattern=float(pale_pattern_map(green, level)[mask].mean()),
    )


def measure(cf: np.ndarray) -> Realism:
    """The measurements of a colour fundus photo of any size (uint8 (H, W, 3) RGB)."""
    return measure_at_scale(at_scale(cf))


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _narrower(img: np.ndarray, fraction: float) -> np.ndarray:
    """The central `fraction` of the field, as a camera with a narrower field sees it."""
    c = fov_circle(img)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    out = img.copy()
    out[np.hypot(xx - c.cx, yy - c.cy) > fraction * c.r] = 0
    return out


def _tone(img: np.ndarray, gain: tuple[float, float, float], gamma: float) -> np.ndarray:
    x = (img.astype(np.float32) / 255) ** gamma * np.asarray(gain, np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def photo_variations(photo: np.ndarray) -> dict[str, np.ndarray]:
    """Plausible other acquisitions of one real photo (each uint8 (H, W, 3)), at scale.

    Narrower fields (80 and 90 % of the diameter), exposure x0.8 / x1.2, gamma 0.8 /
    1.25, a warm and a cool white balance (+-6 % red and blue), a soft focus (Gaussian,
    1 px at scale), a lower-resolution camera (half size and back) and JPEG at quality
    40; the photo itself is `original`.
    """
    base = at_scale(photo)
    half = Image.fromarray(base).resize((SCALE_PX // 2,) * 2, Image.Resampling.LANCZOS)
    return {
        "original": base,
        "field_90": at_scale(_narrower(photo, 0.9)),
        "field_80": at_scale(_narrower(photo, 0.8)),
        "exposure_0.8": _tone(base, (0.8, 0.8, 0.8), 1.0),
        "exposure_1.2": _tone(base, (1.2, 1.2, 1.2), 1.0),
        "gamma_0.8": _tone(base, (1.0, 1.0, 1.0), 0.8),
        "gamma_1.25": _tone(base, (1.0, 1.0, 1.0), 1.25),
        "warm": _tone(base, (1.06, 1.0, 0.94), 1.0),
        "cool": _tone(base, (0.94, 1.0, 1.06), 1.0),
        "soft_focus": ndimage.gaussian_filter(base, (1.0, 1.0, 0)),
        "half_resolution": np.asarray(half.resize((SCALE_PX,) * 2, Image.Resampling.BICUBIC)),
        "jpeg_40": _jpeg(base, 40),
    }


def metric_ranges(photos: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """metric -> (min, max) over photos already at scale."""
    rows = [measure_at_scale(p).as_dict() for p in photos]
    return {k: (min(r[k] for r in rows), max(r[k] for r in rows)) for k in METRICS}
