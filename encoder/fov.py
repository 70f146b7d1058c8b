"""Field-of-view (FOV) normalisation: find the retina's circle in a photo or angiogram and
crop every image to the same geometry before the model sees it.

A fundus camera images the retina through a round aperture: the field of view is a bright
disc on a black frame, often wider than high (a 3:2 sensor with black sides), sometimes
cut at the top and bottom, shifted, with a notch or burned-in text. `detect_fov` finds
that circle: a smoothed brightness is thresholded relative to the image's own levels,
the boundary points of the bright part (those on the image border, where the circle is
clipped, left out) are fitted by a circle with RANSAC; the edge is then found to a
fraction of a pixel along rays across that circle (midway between the levels inside and
outside) and fitted by least squares with outliers (notches, text) dropped. A circle
that does not part bright from dark, or an image without one, falls back to the frame's
inscribed circle. Detection runs on the image shrunk to `WORK_SIZE`.

`fov_square` is THE preprocessing of training, indexing, search, synthesis and evaluation:
crop to the square around the circle (black where it leaves the image), with the circle
filling `FOV_FILL` of the square's side, black outside the circle, resized (antialiased
bilinear) to size x size. On a square frame whose circle already fills `FOV_FILL` of it
(the phantom's default camera), the crop is the whole frame: the old centre-pad-and-resize.

Coordinates: pixel (row i, column j) has its centre at x = j, y = i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

FOV_FILL = 0.95  # the circle's diameter over the side of the model's square
WORK_SIZE = 256  # detection runs on the image shrunk to at most this many pixels a side
LEVEL_SHARE = 0.08  # threshold: background + this share of (bright level - background)
MIN_STEP = 3.0  # ... and at least this many uint8 levels above the background
RANSAC_TRIES = 256
RAYS = 360  # rays along which the edge is refined to a sub-pixel position
MIN_COVERAGE = 0.25  # inliers over the in-frame circumference needed to trust a fit
MAX_BRIGHT_OUTSIDE = 0.3  # a FOV's circle has (nearly) only dark pixels outside it
MIN_BRIGHT_INSIDE = 0.6  # ... and mostly bright ones inside
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights of R, G, B


@dataclass(frozen=True)
class FovCircle:
    """The field of view: centre (cx, cy) and radius r, in pixels of the image."""

    cx: float
    cy: float
    r: float

    def as_list(self) -> list[float]:
        return [float(self.cx), float(self.cy), float(self.r)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> FovCircle:
        """[cx, cy, r] (e.g. a catalog's `cf_fov`) → FovCircle; DataError when malformed."""
        try:
            vals = [float(v) for v in values]
        except (TypeError, ValueError):
            vals = []
        if len(vals) != 3 or not all(np.isfinite(vals)) or vals[2] <= 0:
            raise DataError(f"a FOV circle is [cx, cy, r] with r > 0, got {values!r}")
        return cls(*vals)

    def scaled(self, fx: float, fy: float) -> FovCircle:
        """The circle on the image resized by (fx, fy) (pixel-centre convention)."""
        return FovCircle(
            (self.cx + 0.5) * fx - 0.5, (self.cy + 0.5) * fy - 0.5, self.r * (fx + fy) / 2
        )


def stored_circle(values: Sequence[float] | None) -> FovCircle | None:
    """A stored [cx, cy, r] (a catalog's `cf_fov` / `ffa_fov`) → FovCircle; None → None."""
    return None if values is None else FovCircle.from_list(values)


def inscribed_circle(h: int, w: int) -> FovCircle:
    """The largest circle centred in an h x w frame (the fallback when none is found)."""
    return FovCircle((w - 1) / 2, (h - 1) / 2, min(h, w) / 2)


def square_circle(size: int) -> FovCircle:
    """The circle of an image already normalised by `fov_square` to size x size."""
    return FovCircle((size - 1) / 2, (size - 1) / 2, FOV_FILL * size / 2)


def _check_image(image: np.ndarray, name: str = "image") -> None:
    ok = image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))
    if image.dtype != np.uint8 or not ok or min(image.shape[:2]) < 4:
        raise DataError(
            f"{name} must be uint8 (H, W) or (H, W, 3), at least 4 x 4, got "
            f"{image.dtype} {image.shape}"
        )


def _work_gray(image: np.ndarray) -> tuple[torch.Tensor, float, float]:
    """Brightness (max of luminance and red) at most WORK_SIZE a side (area-averaged), and
    the scale (fx, fy) from the image to it."""
    x = torch.from_numpy(np.asarray(image, np.float32))
    if x.ndim == 3:
        rgb = x[..., :3] if x.shape[-1] >= 3 else x[..., :1].expand(*x.shape[:2], 3)
        x = torch.maximum(rgb @ rgb.new_tensor(LUMA), rgb[..., 0])
    h, w = x.shape
    k = min(1.0, WORK_SIZE / max(h, w))
    hw = (max(4, round(h * k)), max(4, round(w * k)))
    x = x[None, None]
    if hw != (h, w):
        x = F.interpolate(x, size=hw, mode="area")
    return x[0, 0], hw[1] / w, hw[0] / h


def _smooth(gray: torch.Tensor) -> torch.Tensor:
    """3 x 3 box mean (borders: the mean of the pixels inside)."""
    x = F.avg_pool2d(gray[None, None], 3, stride=1, padding=1, count_include_pad=False)
    return x[0, 0]


def _threshold(gray: torch.Tensor) -> float | None:
    """The FOV's brightness threshold, relative to the image's own background (2nd
    percentile) and bright (98th) levels; None for a flat image."""
    sample = gray.flatten()[:: max(1, gray.numel() // 65536)]
    bg, fg = (float(v) for v in torch.quantile(sample, sample.new_tensor([0.02, 0.98])))
    if fg - bg < 2 * MIN_STEP:
        return None
    return bg + max(LEVEL_SHARE * (fg - bg), MIN_STEP)


def _boundary_points(on: torch.Tensor) -> np.ndarray:
    """(N, 2) x, y of the pixels on either side of the edge of the bright part `on` (bool
    (H, W)), the image border excluded."""
    pad = F.pad(on[None, None].float(), (1, 1, 1, 1), mode="replicate")
    lo = -F.max_pool2d(-pad, 3, stride=1)[0, 0] > 0.5  # erosion
    hi = F.max_pool2d(pad, 3, stride=1)[0, 0] > 0.5  # dilation
    edge = (on & ~lo) | (~on & hi)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = False
    ys, xs = torch.nonzero(edge, as_tuple=True)
    return np.stack([xs.numpy(), ys.numpy()], axis=1).astype(np.float64)


def _separates(on: torch.Tensor, circle: np.ndarray) -> bool:
    """Whether `circle` parts bright from dark: of the pixels more than 2 px outside it
    (at least 16 of them), at most `MAX_BRIGHT_OUTSIDE` bright; of those more than 2 px
    inside, at least `MIN_BRIGHT_INSIDE` (a FOV, not an edge within the retina)."""
    h, w = on.shape
    cx, cy, r = circle
    d = np.hypot(np.arange(w)[None, :] - cx, np.arange(h)[:, None] - cy) - r
    bright = on.numpy()
    outside, inside = bright[d > 2], bright[d < -2]
    if len(outside) < 16 or len(inside) < 16:
        return False
    return outside.mean() <= MAX_BRIGHT_OUTSIDE and inside.mean() >= MIN_BRIGHT_INSIDE


def _circumcircles(p: np.ndarray) -> np.ndarray:
    """(K, 3, 2) point triples → (K, 3) cx, cy, r (r = inf for collinear triples)."""
    a, b, c = p[:, 0], p[:, 1], p[:, 2]
    d = 2 * (a[:, 0] * (b[:, 1] - c[:, 1]) + b[:, 0] * (c[:, 1] - a[:, 1]))
    d += 2 * c[:, 0] * (a[:, 1] - b[:, 1])
    sa, sb, sc = (a**2).sum(1), (b**2).sum(1), (c**2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ux = (sa * (b[:, 1] - c[:, 1]) + sb * (c[:, 1] - a[:, 1]) + sc * (a[:, 1] - b[:, 1])) / d
        uy = (sa * (c[:, 0] - b[:, 0]) + sb * (a[:, 0] - c[:, 0]) + sc * (b[:, 0] - a[:, 0])) / d
    r = np.hypot(a[:, 0] - ux, a[:, 1] - uy)
    out = np.stack([ux, uy, r], axis=1)
    out[~np.isfinite(out).all(1)] = (0.0, 0.0, np.inf)
    return out


def _least_squares(pts: np.ndarray) -> np.ndarray:
    """The algebraic (Kasa) circle fit of (N, 2) points → cx, cy, r."""
    x, y = pts[:, 0], pts[:, 1]
    a = np.stack([x, y, np.ones_like(x)], axis=1)
    sol, *_ = np.linalg.lstsq(a, x**2 + y**2, rcond=None)
    cx, cy = sol[0] / 2, sol[1] / 2
    return np.array([cx, cy, np.sqrt(max(sol[2] + cx**2 + cy**2, 0.0))])


def _ransac(pts: np.ndarray, hw: tuple[int, int], tol: float) -> np.ndarray | None:
    """The circle (cx, cy, r) most boundary points lie on, refined on its inliers; None
    when no plausible circle (radius a quarter of the short side to the diagonal) exists."""
    rng = np.random.default_rng(0)  # deterministic: the same image, the same circle
    h, w = hw
    pick = rng.integers(0, len(pts), (RANSAC_TRIES, 3))
    cand = _circumcircles(pts[pick])
    ok = (cand[:, 2] > min(h, w) / 4) & (cand[:, 2] < np.hypot(h, w))
    ok &= (np.abs(cand[:, 0] - w / 2) < w) & (np.abs(cand[:, 1] - h / 2) < h)
    if not ok.any():
        return None
    cand = cand[ok]
    sub = pts[:: max(1, len(pts) // 2000)]
    dist = np.hypot(sub[None, :, 0] - cand[:, None, 0], sub[None, :, 1] - cand[:, None, 1])
    best = cand[int(np.argmax((np.abs(dist - cand[:, 2:3]) < tol).sum(1)))]
    for t in (tol, tol, tol / 2):
        inl = pts[np.abs(np.hypot(*(pts - best[:2]).T) - best[2]) < t]
        if len(inl) < 8:
            return None
        best = _least_squares(inl)
    return best


def _coverage(circle: np.ndarray, pts: np.ndarray, hw: tuple[int, int], tol: float) -> float:
    """Inliers per pixel of the circle's in-frame circumference (both edge sides: ~2 when
    the whole in-frame arc is found)."""
    cx, cy, r = circle
    a = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    xs, ys = cx + r * np.cos(a), cy + r * np.sin(a)
    inside = (xs > 1) & (xs < hw[1] - 2) & (ys > 1) & (ys < hw[0] - 2)
    arc = 2 * np.pi * r * inside.mean()
    if arc < 8:
        return 0.0
    near = np.abs(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) - r) < tol
    return float(near.sum()) / (2 * arc)


def _ray_edges(gray: torch.Tensor, circle: np.ndarray, half: float) -> np.ndarray:
    """(N, 2) sub-pixel edge points: along rays from the circle's centre, where the profile
    across the circle (± `half` px) crosses midway between its inner and outer levels.
    Rays whose profile leaves the image (a clipped circle) or has no step are left out."""
    h, w = gray.shape
    cx, cy, r = circle
    a = np.linspace(0, 2 * np.pi, RAYS, endpoint=False)[:, None]  # (A, 1)
    rr = r + np.linspace(-half, half, 8 * int(np.ceil(half)) + 1)[None, :]  # (1, S)
    xs, ys = cx + rr * np.cos(a), cy + rr * np.sin(a)  # (A, S)
    keep = ((xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)).all(1)
    if not keep.any():
        return np.zeros((0, 2))
    xs, ys, ang = xs[keep], ys[keep], a[keep, 0]
    grid = torch.from_numpy(np.stack([xs / (w - 1) * 2 - 1, ys / (h - 1) * 2 - 1], -1))
    prof = F.grid_sample(
        gray[None, None].double(), grid[None], mode="bilinear", align_corners=True
    )[0, 0].numpy()  # (A, S)
    s = prof.shape[1]
    inner = np.median(prof[:, : s // 4], axis=1)
    outer = np.median(prof[:, -(s // 4) :], axis=1)
    mid = (inner + outer)[:, None] / 2
    above = prof >= mid
    last = s - 1 - np.argmax(above[:, ::-1], axis=1)  # the outermost sample at or above mid
    ok = (inner - outer >= 2 * MIN_STEP) & (last < s - 1) & above.any(1)
    last = np.minimum(last, s - 2)
    i = np.arange(len(prof))
    p0, p1 = prof[i, last], prof[i, last + 1]
    frac = np.clip((p0 - mid[:, 0]) / np.maximum(p0 - p1, 1e-9), 0, 1)
    rad = rr[0, last] + frac * (rr[0, 1] - rr[0, 0])
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)[ok]


def _robust_fit(pts: np.ndarray, start: np.ndarray, tol: float) -> np.ndarray | None:
    """Least-squares circle of the points near a circle concentric with `start`, outliers
    (beyond 3 robust sigmas) dropped over a few rounds; None when too few points remain."""
    fit = start
    for _ in range(4):
        res = np.hypot(pts[:, 0] - fit[0], pts[:, 1] - fit[1]) - fit[2]
        res -= np.median(res)
        sigma = 1.4826 * np.median(np.abs(res))
        keep = np.abs(res) < min(tol, max(3 * sigma, 0.3))
        if keep.sum() < 12:
            return None
        fit = _least_squares(pts[keep])
    return fit


def detect_fov(image: np.ndarray) -> FovCircle:
    """The field-of-view circle of a CF photo uint8 (H, W, 3) or an FFA frame (H, W).

    Falls back to `inscribed_circle` when no circular edge is found (a flat image, or
    one the retina fills to every border)."""
    _check_image(image)
    h, w = image.shape[:2]
    gray, fx, fy = _work_gray(image)
    hw = (gray.shape[0], gray.shape[1])
    threshold = _threshold(gray)
    if threshold is None:
        return inscribed_circle(h, w)
    on = _smooth(gray) > threshold
    pts = _boundary_points(on)
    tol = max(1.0, 0.012 * max(hw))
    fit = _ransac(pts, hw, tol) if len(pts) >= 12 else None
    if fit is None or _coverage(fit, pts, hw, tol) < MIN_COVERAGE or not _separates(on, fit):
        return inscribed_circle(h, w)
    edges = _ray_edges(gray, fit, max(3.0, 2 * tol))
    fine = _robust_fit(edges, fit, tol) if len(edges) >= 12 else None
    fit = fit if fine is None else fine
    return FovCircle(*(float(v) for v in fit)).scaled(1 / fx, 1 / fy)


def detect_video_fov(video: np.ndarray) -> FovCircle:
    """One circle for an FFA video uint8 (T, H, W): detected on the brightest value of each
    pixel over the frames (the early frames are dark before the dye arrives)."""
    if video.dtype != np.uint8 or video.ndim != 3 or len(video) < 1:
        raise DataError(f"video must be uint8 (T, H, W), got {video.dtype} {video.shape}")
    return detect_fov(video.max(axis=0))


def fov_box(circle: FovCircle) -> tuple[int, int, int]:
    """(left, top, side): the integer square around `circle` that it fills `FOV_FILL` of
    (its first pixel column and row, possibly outside the image, and its side)."""
    half = circle.r / FOV_FILL
    side = max(1, round(2 * half))
    return round(circle.cx + 0.5 - half), round(circle.cy + 0.5 - half), side


def _crop(image: np.ndarray, left: int, top: int, side: int) -> np.ndarray:
    """image[top : top + side, left : left + side], black where it leaves the image."""
    h, w = image.shape[:2]
    out = np.zeros((side, side, *image.shape[2:]), np.uint8)
    y0, y1 = max(top, 0), min(top + side, h)
    x0, x1 = max(left, 0), min(left + side, w)
    if y0 < y1 and x0 < x1:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """A square uint8 (s, s[, C]) → (size, size[, C]), antialiased bilinear."""
    if image.shape[0] == size:
        return np.ascontiguousarray(image)
    x = torch.from_numpy(np.asarray(image, np.float32))
    x = x[None, None] if image.ndim == 2 else x.permute(2, 0, 1)[None]  # (1, C, s, s)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    y = y[0, 0] if image.ndim == 2 else y[0].permute(1, 2, 0)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def circle_mask(size: int, circle: FovCircle) -> np.ndarray:
    """float32 (size, size): 1 inside `circle`, fading to 0 one pixel beyond it (the
    aperture's own soft edge is kept; anything further out is black)."""
    v = np.arange(size, dtype=np.float32)
    d = np.hypot(v[None, :] - circle.cx, v[:, None] - circle.cy)
    return np.clip(circle.r + 1.0 - d, 0.0, 1.0).astype(np.float32)


def fov_square(image: np.ndarray, size: int, circle: FovCircle | None = None) -> np.ndarray:
    """One image uint8 (H, W) or (H, W, C) → uint8 (size, size[, C]): the square around its
    FOV circle (`detect_fov` when None), black outside the circle (masked at the image's
    resolution), resized. Loop over a video's frames with one circle (`fov_square_video`)."""
    _check_image(image)
    if size < 1:
        raise DataError(f"size must be >= 1, got {size}")
    circle = detect_fov(image) if circle is None else circle
    left, top, side = fov_box(circle)
    crop = _crop(image, left, top, side)
    mask = circle_mask(side, FovCircle(circle.cx - left, circle.cy - top, circle.r))
    crop = (crop * (mask if crop.ndim == 2 else mask[..., None]) + 0.5).astype(np.uint8)
    return resize_square(crop, size)


def fov_square_video(video: np.ndarray, size: int, circle: FovCircle | None = None) -> np.ndarray:
    """An FFA video uint8 (T, H, W) → (T, size, size), every frame cropped by one circle."""
    circle = detect_video_fov(video) if circle is None else circle
    return np.stack([fov_square(f, size, circle) for f in video])
