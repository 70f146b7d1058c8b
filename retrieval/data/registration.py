"""CF↔FFA registration: the similarity transform that maps a colour photo onto its angiogram.

Both pictures become vessel maps on a common working grid, each picture placed so that
its field-of-view circle (`encoder.fov`) fills the grid's central circle: a ridge filter
(`skimage.filters.sato`) on the CF's green channel, where vessels are dark, and on the
mean of the venous-phase FFA frames, where they are bright
(`encoder.metrics.venous_frames`: a few seconds after the brightest frame, when the
veins are full; the generation evaluation compares vessels on the same frames). Inside
each field of view (its rim left out) the maps keep their strongest fifth, centred and
scaled. A coarse search over rotation and scale finds each candidate's translation by
FFT cross-correlation on a half-size grid; the best is refined by ECC (Gauss-Newton steps
on the maps' correlation) twice: as a similarity, and rigid at the circles' own scale,
which is kept unless the scale adds `SCALE_MARGIN` of correlation. The result maps CF pixel
(x, y) to FFA pixel (a x + b y + tx, c x + d y + ty) in the stored files' pixels, the
catalog's `registration` field.

`quality` is the lower quartile of the registered maps' normalised correlation over
4 × 4 tiles, in [0, 1]: most of the picture must agree, not only the big arcades that
every eye has in about the same place. A pair is `ok` when it reaches `MIN_QUALITY`,
tuned on phantom pairs by `benchmarks/registration_bench.py` (true pairs against pairs
whose CF is another patient's). Not used: the eyeliner package (retinal-landmark
registration), which loads pretrained keypoint-matcher weights at run time.

`warp_cf` resamples a CF photo into the FFA's pixel grid with such a matrix;
`measure_pair` gives a pair's measured catalog fields (field-of-view circles and
registration) and `register_cohort` fills them in a cohort folder in place
(`fundus2video register`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from scipy import ndimage
from skimage.filters import sato
from tqdm import tqdm

from encoder.fov import FovCircle, detect_fov, detect_video_fov
from encoder.metrics import venous_frames
from retrieval.errors import CohortError, UnreadableMedia

from .cohort import CATALOG_NAME, Cohort, write_catalog
from .media import read_cf, read_ffa

log = logging.getLogger(__name__)

WORK_SIDE = 256  # the working grid's side, in pixels (lengths below are on this grid)
MIN_WORK_SIDE = 96  # ... or twice the field of view's diameter when smaller, at least this
GRID_FILL = 0.45  # the field-of-view circle's radius on the grid, as a share of its side
RIDGE_SIGMAS = (1.0, 2.0, 3.0)  # the ridge filter's scales, working pixels
SMOOTH = 1.0  # working pixels of Gaussian smoothing before the ridge filter (noise)
KEEP_ABOVE = 80.0  # percentile of the ridge response below which the map is zero (texture)
RIM = 8  # working pixels left out inside the field of view's rim
ANGLES = tuple(np.arange(-12.0, 12.01, 1.5))  # coarse rotations, degrees
SCALES = (0.85, 0.92, 1.0, 1.08, 1.17)  # coarse scales, FFA over CF (after the grid fit)
CANDIDATES = 3  # the coarse search's best distinct candidates, each refined
COARSE_DISTINCT = np.array([4.0, 4.0, 2.0, 0.05])  # candidates differ by more than this
MAX_SHIFT = 0.2  # the coarse search's largest shift, as a share of the grid
ECC_ITERATIONS = 40  # Gauss-Newton steps of each refinement
SCALE_MARGIN = 0.02  # correlation a fitted scale must add over the grids' own
QUALITY_TILES = 4  # the quality is measured on this many tiles a side
MIN_QUALITY = 0.2  # quality at or above which a registration is ok


@dataclass(frozen=True)
class Registration:
    """A CF → FFA transform with its quality; `matrix` (2, 3) maps CF (x, y, 1) to FFA (x, y)."""

    matrix: np.ndarray
    quality: float  # in [0, 1]
    ok: bool

    def as_list(self) -> list[float]:
        """The catalog's `registration` value: [a, b, tx, c, d, ty]."""
        return [float(v) for v in self.matrix.reshape(-1)]

    @property
    def status(self) -> str:
        return "ok" if self.ok else "failed"


def similarity_matrix(
    dx: float,
    dy: float,
    degrees: float,
    centre: tuple[float, float],
    scale: float = 1.0,
) -> np.ndarray:
    """(2, 3): p' = scale R(degrees) (p - centre) + centre + (dx, dy), in (x, y) pixels."""
    c, s = np.cos(np.radians(degrees)) * scale, np.sin(np.radians(degrees)) * scale
    rot = np.array([[c, -s], [s, c]])
    ctr = np.asarray(centre, dtype=np.float64)
    return np.column_stack([rot, ctr + np.array([dx, dy]) - rot @ ctr])


def corner_error(estimate: np.ndarray, truth: np.ndarray, shape: tuple[int, int]) -> float:
    """Mean distance (px) between the four corners of an (H, W) picture mapped both ways."""
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], float)
    diff = corners @ np.asarray(estimate).T - corners @ np.asarray(truth).T
    return float(np.linalg.norm(diff, axis=1).mean())


def homogeneous(matrix: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(matrix, dtype=np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])


def resample(image: np.ndarray, out_to_in: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Sample a 2-D float picture at `out_to_in` (3x3, x-y pixels) of every output pixel."""
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    rc = swap @ out_to_in @ swap  # the same map in (row, col) order
    return ndimage.affine_transform(
        image, rc[:2, :2], rc[:2, 2], output_shape=out_shape, order=1, mode="constant", cval=0.0
    )


def _to_grid(circle: FovCircle, side: int) -> np.ndarray:
    """3x3 map from a picture's pixels to the working grid: its field-of-view circle onto
    the grid's central circle of radius `GRID_FILL` × side."""
    s = GRID_FILL * side / circle.r
    c = (side - 1) / 2
    return np.array([[s, 0.0, c - s * circle.cx], [0.0, s, c - s * circle.cy], [0.0, 0.0, 1.0]])


def on_grid(image: np.ndarray, circle: FovCircle, side: int) -> np.ndarray:
    """A 2-D picture resampled onto the working grid (antialiased when shrunk)."""
    grid = _to_grid(circle, side)
    img = image.astype(np.float32)
    if grid[0, 0] < 1:
        img = ndimage.gaussian_filter(img, 0.5 * (1 / grid[0, 0] - 1) + 1e-3)
    return resample(img, np.linalg.inv(grid), (side, side))


def _field(gray: np.ndarray, rim: int) -> np.ndarray:
    """The field of view of a working-grid picture, shrunk by `rim` pixels."""
    smooth = ndimage.gaussian_filter(gray, 2.0)
    inside = smooth > 0.15 * np.percentile(smooth, 99.5)
    labels, n = ndimage.label(inside)
    if n > 1:
        sizes = ndimage.sum(inside, labels, index=np.arange(1, n + 1))
        inside = labels == 1 + int(np.argmax(sizes))
    inside = ndimage.binary_fill_holes(inside)
    return ndimage.binary_erosion(inside, iterations=rim) if rim > 0 else inside


def vessel_map(gray: np.ndarray, *, dark_vessels: bool) -> tuple[np.ndarray, np.ndarray]:
    """A working-grid picture → (vessel map centred and scaled inside the field, the field)."""
    k = gray.shape[0] / WORK_SIDE  # a smaller grid (a small picture) scales every length
    fov = _field(gray, max(2, round(RIM * k)))
    if not fov.any():
        return np.zeros_like(gray, dtype=np.float32), fov
    inside = _field(gray, 0)
    img = np.where(inside, gray, float(np.median(gray[inside])))  # no step at the aperture
    img = img / max(float(np.percentile(gray[fov], 99)), 1e-6)
    img = ndimage.gaussian_filter(img, SMOOTH * k)
    sigmas = [max(0.75, s * k) for s in RIDGE_SIGMAS]
    ridges = sato(img, sigmas=sigmas, black_ridges=dark_vessels, mode="reflect")
    ridges = np.where(fov, ridges, 0.0)
    low, top = np.percentile(ridges[fov], [KEEP_ABOVE, 99.5])
    ridges = np.clip((ridges - low) / max(float(top - low), 1e-9), 0, 1)  # the main vessels
    ridges = np.where(fov, ridges - ridges[fov].mean(), 0.0)
    return (ridges / max(float(np.linalg.norm(ridges)), 1e-9)).astype(np.float32), fov


def _correlate(fixed_f: np.ndarray, moving: np.ndarray, max_shift: int) -> tuple[float, int, int]:
    """Best cyclic cross-correlation of `moving` against fixed (given as its conjugate FFT,
    zero-padded): (score, dx, dy) with |shift| <= max_shift."""
    n = fixed_f.shape[0]
    corr = np.fft.irfft2(np.fft.rfft2(moving, s=(n, n)) * fixed_f, s=(n, n))
    span = 2 * max_shift + 1
    corr = np.roll(corr, (max_shift, max_shift), axis=(0, 1))[:span, :span]
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
    return float(corr[iy, ix]), max_shift - int(ix), max_shift - int(iy)


def _coarse(fixed: np.ndarray, moving: np.ndarray) -> list[np.ndarray]:
    """Coarse search over `ANGLES` × `SCALES` on a half-size grid → the `CANDIDATES` best
    distinct params (dx, dy, deg, log s) on the full grid (about its centre), best first."""
    half = fixed.shape[0] // 2
    fixed2 = ndimage.zoom(fixed, 0.5, order=1, grid_mode=True, mode="grid-constant")
    moving2 = ndimage.zoom(moving, 0.5, order=1, grid_mode=True, mode="grid-constant")
    fixed_f = np.conj(np.fft.rfft2(fixed2, s=(2 * half, 2 * half)))
    ctr = ((half - 1) / 2, (half - 1) / 2)
    max_shift = int(MAX_SHIFT * half)
    found = []
    for scale in SCALES:
        for deg in ANGLES:
            m = homogeneous(similarity_matrix(0, 0, deg, ctr, scale))
            warped = resample(moving2, np.linalg.inv(m), moving2.shape)
            score, dx, dy = _correlate(fixed_f, warped, max_shift)
            found.append((score, np.array([2.0 * dx, 2.0 * dy, deg, np.log(scale)])))
    found.sort(key=lambda f: -f[0])
    chosen: list[np.ndarray] = []
    for _, params in found:
        if all(np.abs((params - c) / COARSE_DISTINCT).max() > 1 for c in chosen):
            chosen.append(params)
        if len(chosen) == CANDIDATES:
            break
    return chosen


def params_matrix(params: np.ndarray, side: int) -> np.ndarray:
    dx, dy, deg, log_s = params
    ctr = ((side - 1) / 2, (side - 1) / 2)
    return homogeneous(similarity_matrix(dx, dy, deg, ctr, float(np.exp(log_s))))


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _centred(side_shape: tuple[int, ...]) -> np.ndarray:
    """3x3 map from grid pixels centred on the grid's middle to grid pixels."""
    cx, cy = (side_shape[1] - 1) / 2, (side_shape[0] - 1) / 2
    return np.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])


def _ecc(
    fixed: np.ndarray, fov: np.ndarray, moving: np.ndarray, m: np.ndarray, *, scale: bool
) -> tuple[np.ndarray, float]:
    """Refine the similarity m (3x3, moving grid → fixed grid) by maximising the maps'
    enhanced correlation coefficient over the fixed field (Gauss-Newton steps, ECC);
    `scale` False keeps m's scale. → (m, the normalised correlation there)."""
    ys, xs = np.nonzero(fov)
    shift = _centred(fixed.shape)
    u, v = xs - shift[0, 2], ys - shift[1, 2]
    t = fixed[ys, xs].astype(np.float64)
    t -= t.mean()
    gy, gx = np.gradient(moving.astype(np.float64))
    inv = np.linalg.inv(shift) @ np.linalg.inv(m) @ shift  # fixed → moving, centred
    p = np.array([np.arctan2(inv[1, 0], inv[0, 0]), 0.5 * np.log(np.linalg.det(inv[:2, :2]))])
    p = np.concatenate([p, inv[:2, 2]])  # angle, log scale, tx, ty
    corr, cols = 0.0, [0, 1, 2, 3] if scale else [0, 2, 3]
    for _ in range(ECC_ITERATIONS):
        a, b = np.exp(p[1]) * np.cos(p[0]), np.exp(p[1]) * np.sin(p[0])
        ru, rv = a * u - b * v, b * u + a * v  # the rotated, scaled offsets
        at = [rv + p[3] + shift[1, 2], ru + p[2] + shift[0, 2]]
        iw, ix, iy = (ndimage.map_coordinates(g, at, order=1) for g in (moving, gx, gy))
        corr = _ncc(t, iw)
        jac = np.stack([iy * ru - ix * rv, ix * ru + iy * rv, ix, iy], axis=1)[:, cols]
        jac -= jac.mean(axis=0)
        iw = iw - iw.mean()
        try:
            hi_i, hi_t = np.linalg.solve(jac.T @ jac, np.stack([jac.T @ iw, jac.T @ t], 1)).T
        except np.linalg.LinAlgError:  # a flat map: nothing to align
            break
        den = float(t @ iw - (jac.T @ t) @ hi_i)
        if den <= 0:
            break
        step = float(iw @ iw - (jac.T @ iw) @ hi_i) / den * hi_t - hi_i
        p[cols] += step
        if np.abs(step[-2:]).max() < 1e-3 and np.abs(step[:-2]).max() < 1e-5:
            break
    a, b = np.exp(p[1]) * np.cos(p[0]), np.exp(p[1]) * np.sin(p[0])
    inv = np.array([[a, -b, p[2]], [b, a, p[3]], [0.0, 0.0, 1.0]])
    return np.linalg.inv(shift @ inv @ np.linalg.inv(shift)), corr


def _refine(
    fixed: np.ndarray, fov: np.ndarray, moving: np.ndarray, m: np.ndarray
) -> tuple[np.ndarray, float]:
    """ECC from the coarse estimate m: a similarity, or a rigid fit at the grids' own scale
    when that correlates within `SCALE_MARGIN` (a scale is fitted only when it pays); the
    coarse estimate stays when neither improves on it."""
    start = _ncc(fixed[fov], resample(moving, np.linalg.inv(m), fixed.shape)[fov])
    free, free_corr = _ecc(fixed, fov, moving, m, scale=True)
    unscaled = m.copy()
    unscaled[:2, :2] /= np.sqrt(abs(np.linalg.det(m[:2, :2])))
    rigid, rigid_corr = _ecc(fixed, fov, moving, unscaled, scale=False)
    best = (rigid, rigid_corr) if rigid_corr >= free_corr - SCALE_MARGIN else (free, free_corr)
    return best if best[1] >= start else (m, start)


def tile_quality(
    fixed: np.ndarray, fov: np.ndarray, warped: np.ndarray, tiles: int = QUALITY_TILES
) -> float:
    """The lower quartile of the maps' normalised correlation over `tiles`² tiles (those
    at least half inside the field): most of the picture must agree, not only the big
    vessels that every eye has in about the same place. All tiles at once, each its own
    row of pixels (a tile's pixels outside the field count for nothing)."""
    n = fixed.shape[0] // tiles

    def rows(image: np.ndarray) -> np.ndarray:  # (tiles², n²): one row per tile
        cut = np.asarray(image[: n * tiles, : n * tiles], np.float64)
        return cut.reshape(tiles, n, tiles, n).swapaxes(1, 2).reshape(tiles * tiles, n * n)

    inside = rows(fov)
    kept = inside.mean(axis=1) >= 0.5
    if not kept.any():
        return 0.0
    inside = inside[kept]
    count = inside.sum(axis=1, keepdims=True)

    def centred(image: np.ndarray) -> np.ndarray:  # each kept tile less its mean in the field
        x = rows(image)[kept] * inside
        return (x - x.sum(axis=1, keepdims=True) / count) * inside

    a, b = centred(fixed), centred(warped)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    ncc = np.divide((a * b).sum(axis=1), denom, out=np.zeros_like(denom), where=denom > 0)
    return float(np.clip(np.percentile(ncc, 25), 0.0, 1.0))


def register_pair(
    cf: np.ndarray,
    ffa: np.ndarray,
    times_s: Sequence[float] | None = None,
    *,
    cf_fov: Sequence[float] | None = None,
    ffa_fov: Sequence[float] | None = None,
    min_quality: float = MIN_QUALITY,
) -> Registration:
    """The CF → FFA similarity transform of one pair.

    cf (H, W, 3) uint8 RGB, ffa (T, H', W') uint8 (times_s: seconds of each frame, or None;
    cf_fov, ffa_fov: their field-of-view circles [cx, cy, r], detected when None)
    → `Registration` whose matrix maps CF pixels to FFA pixels.
    """
    if cf.ndim != 3 or cf.shape[2] != 3:
        raise ValueError(f"cf must be (H, W, 3), got shape {cf.shape}")
    if ffa.ndim != 3 or len(ffa) < 1:
        raise ValueError(f"ffa must be (T, H, W), got shape {ffa.shape}")
    frame = ffa[venous_frames(ffa, times_s)].mean(axis=0)
    cf_circle = detect_fov(cf) if cf_fov is None else FovCircle.from_list(cf_fov)
    ffa_circle = detect_video_fov(ffa) if ffa_fov is None else FovCircle.from_list(ffa_fov)
    side = 2 * (int(np.clip(4 * max(cf_circle.r, ffa_circle.r), MIN_WORK_SIDE, WORK_SIDE)) // 2)
    fixed, fixed_fov = vessel_map(on_grid(frame, ffa_circle, side), dark_vessels=False)
    moving, _ = vessel_map(on_grid(cf[..., 1], cf_circle, side), dark_vessels=True)
    work, quality = np.eye(3), 0.0  # no vessels in one of them: nothing to register
    if np.any(fixed) and np.any(moving):
        for params in _coarse(fixed, moving):
            m, _ = _refine(fixed, fixed_fov, moving, params_matrix(params, side))
            q = tile_quality(fixed, fixed_fov, resample(moving, np.linalg.inv(m), fixed.shape))
            if q > quality:
                work, quality = m, q
    full = np.linalg.inv(_to_grid(ffa_circle, side)) @ work @ _to_grid(cf_circle, side)
    return Registration(full[:2], quality, quality >= min_quality)


def warp_cf(
    cf: np.ndarray, matrix: Sequence[float] | np.ndarray, out_shape: tuple[int, int]
) -> np.ndarray:
    """Resample a CF photo (H, W, 3) uint8 into the FFA's pixel grid `out_shape` (H', W'),
    with the CF → FFA matrix (2x3, or its 6 numbers row-major); outside the photo is black."""
    if cf.ndim != 3:
        raise ValueError(f"cf must be (H, W, 3), got shape {cf.shape}")
    values = np.asarray(matrix, dtype=np.float64).reshape(-1)
    if values.size != 6 or not np.all(np.isfinite(values)):
        raise ValueError(f"registration matrix must be 6 finite numbers, got {values.tolist()}")
    inv = np.linalg.inv(homogeneous(values))
    channels = [
        resample(cf[..., k].astype(np.float32), inv, tuple(out_shape)) for k in range(cf.shape[2])
    ]
    return np.clip(np.stack(channels, axis=-1) + 0.5, 0, 255).astype(np.uint8)


def measure_pair(
    cf: np.ndarray, ffa: np.ndarray, times_s: Sequence[float] | None = None, *, register: bool
) -> dict:
    """The measured catalog fields of one pair: `cf_fov`, `ffa_fov` and, when `register`,
    `registration` (null when failed), `registration_quality` and `registration_status`."""
    fields: dict = {
        "cf_fov": detect_fov(cf).as_list(),
        "ffa_fov": detect_video_fov(ffa).as_list(),
        "registration": None,
        "registration_quality": None,
        "registration_status": None,
    }
    if register:
        reg = register_pair(cf, ffa, times_s, cf_fov=fields["cf_fov"], ffa_fov=fields["ffa_fov"])
        fields["registration"] = reg.as_list() if reg.ok else None
        fields["registration_quality"] = reg.quality
        fields["registration_status"] = reg.status
    return fields


@dataclass
class CohortRegistration:
    """What `register_cohort` did: cases registered, failed (case id → quality), left as
    they were (already registered or failed before)."""

    cohort: Path
    registered: int = 0
    failed: dict[str, float] = field(default_factory=dict)
    kept: int = 0


def register_cohort(
    path: str | Path, *, force: bool = False, progress: bool = True
) -> CohortRegistration:
    """Register every case of a cohort folder that was not attempted yet (all with `force`),
    measuring its missing field-of-view circles too, and rewrite its catalog atomically."""
    cohort = Cohort.open(path)
    result = CohortRegistration(cohort.root)
    rows = cohort.catalog.to_dicts()
    for row, case in zip(
        rows, tqdm(cohort.cases(), desc="register", unit="case", disable=not progress), strict=True
    ):
        if row["registration_status"] is not None and not force:
            result.kept += 1
            continue
        try:
            cf, ffa = read_cf(case.cf_path), read_ffa(case.ffa_path)
        except UnreadableMedia as e:
            raise CohortError(f"{cohort.root}: case {case.case_id}: {e}") from e
        measured = measure_pair(cf, ffa, case.ffa_times_s, register=True)
        for name in ("cf_fov", "ffa_fov"):
            row[name] = row[name] if row[name] is not None and not force else measured[name]
        for name in ("registration", "registration_quality", "registration_status"):
            row[name] = measured[name]
        if row["registration_status"] == "ok":
            result.registered += 1
        else:
            result.failed[case.case_id] = float(row["registration_quality"])
    catalog = pl.DataFrame(rows, schema=cohort.catalog.schema)
    write_catalog(catalog, cohort.root / CATALOG_NAME)
    log.info(
        "%s: registered %d, failed %d, kept %d",
        cohort.root,
        result.registered,
        len(result.failed),
        result.kept,
    )
    return result
