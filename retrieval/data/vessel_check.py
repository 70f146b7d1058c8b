"""Vessel check: do two pictures show the same eye? Spatial verification of pair searches.

The pair similarity finds a photo's own angiogram by comparing the embedder's 16 × 16
region maps cell by cell, so a camera that turns the eye by 5°, narrows the field of
view or cuts the frame moves content into other cells and the right case drops. Image
retrieval answers this with spatial verification of the top candidates (Philbin et al.
2007); here the geometry is the eye's vessel tree, which no other eye shares.

Each picture becomes a `VesselPrint`: the vessel map of `retrieval.data.registration`
(a ridge filter on the CF's luma, where vessels are dark, or on the mean of
the venous-phase FFA frames, where they are bright) on a `SIDE`-pixel working grid
that its field-of-view circle fills. The query's print is warped once over `ANGLES` ×
`SCALES` (`QueryPrint`; scales below 1 for a narrower camera field, above for a wider
one); against each candidate the best shifts come from FFT cross-correlation on a
half-size grid, and the `agreement` is the mean of the registration's tile quality (the
lower quartile of the maps' correlation over tiles, in [0, 1]) on 4 × 4 and on 8 × 8
tiles (`TILES`), each at the best of the `CANDIDATES` placements, of the two maps, each
smoothed by `MATCH_SMOOTH` pixels so that a placement a pixel off still counts. The
coarse tiles ask that most of the picture agree; the fine ones measure the small
branches, which no other eye shares, and keep the own angiogram apart when a narrower
camera field leaves the outer tiles black. `rerank` orders the `CHECK_DEPTH` best hits by

    pair cosine + VESSEL_WEIGHT × agreement

(depth, weight, tiles, smoothing and placements chosen on a validation split,
`docs/results.md`). A true pair agrees at about 0.25-0.7; another eye mostly below 0.2.
A print takes about 0.1 s and a comparison about 0.03 s on one CPU core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from encoder.fov import FovCircle, detect_fov, detect_video_fov
from encoder.metrics import venous_frames

from .media import luma
from .registration import (
    MAX_SHIFT,
    homogeneous,
    on_grid,
    params_matrix,
    resample,
    similarity_matrix,
    tile_quality,
    vessel_map,
)

SIDE = 128  # the working grid's side, pixels
ANGLES = tuple(float(a) for a in np.arange(-12.0, 12.01, 1.5))  # degrees
SCALES = (0.75, 0.8, 0.87, 0.93, 1.0, 1.07, 1.15, 1.25, 1.33)  # candidate over query
CANDIDATES = 6  # the coarse search's best placements, each scored by tile quality
MATCH_SMOOTH = 0.7  # Gaussian sigma (grid pixels) of both maps before the tile quality
TILES = (4, 8)  # tile grids (a side) whose tile qualities the agreement averages
CHECK_DEPTH = 40  # hits of a pair search that the vessel check re-ranks
VESSEL_WEIGHT = 1.5  # agreement's weight beside the pair cosine


@dataclass(frozen=True)
class VesselPrint:
    """A picture's vessel map on the working grid (centred and scaled inside its field,
    zero outside) and its field of view there."""

    vessels: np.ndarray  # float32 (SIDE, SIDE)
    field: np.ndarray  # bool (SIDE, SIDE)

    def half_spectrum(self) -> np.ndarray:
        """The conjugate FFT of the half-size map, zero-padded to SIDE: what a query's
        warps are correlated with."""
        return np.conj(fft.rfft2(_half(self.vessels), s=(SIDE, SIDE))).astype(np.complex64)


def _half(image: np.ndarray) -> np.ndarray:
    return ndimage.zoom(image, 0.5, order=1, grid_mode=True, mode="grid-constant")


def cf_print(photo: np.ndarray, circle: FovCircle | None = None) -> VesselPrint:
    """A CF photo (H, W, 3) uint8 (its FOV circle, detected when None) → its print.

    The print reads the photo's luma, not its green channel: JPEG stores the colour
    (chroma) at a quarter of the pixels and quantises it hardest, and the green channel
    carries that damage; the luma is kept at full resolution."""
    if photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"a CF photo must be (H, W, 3), got shape {photo.shape}")
    circle = detect_fov(photo) if circle is None else circle
    vessels, field = vessel_map(on_grid(luma(photo), circle, SIDE), dark_vessels=True)
    return VesselPrint(vessels, field)


def ffa_print(
    video: np.ndarray, times_s: Sequence[float] | None = None, circle: FovCircle | None = None
) -> VesselPrint:
    """An FFA video (T, H, W) uint8 with its frame times → the print of its venous phase."""
    if video.ndim != 3 or len(video) < 1:
        raise ValueError(f"an FFA video must be (T, H, W), got shape {video.shape}")
    frame = video[venous_frames(video, times_s)].mean(axis=0)
    circle = detect_video_fov(video) if circle is None else circle
    vessels, field = vessel_map(on_grid(frame, circle, SIDE), dark_vessels=False)
    return VesselPrint(vessels, field)


@dataclass(frozen=True)
class QueryPrint:
    """A query's print with the spectra of its half-size map turned by every angle and
    scaled by every scale (`placements[i]` = (degrees, scale) of `spectra[i]`)."""

    print: VesselPrint
    spectra: np.ndarray  # complex64 (len(ANGLES) * len(SCALES), SIDE, SIDE // 2 + 1)
    placements: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, query: VesselPrint) -> QueryPrint:
        half = _half(query.vessels)
        ctr = ((half.shape[1] - 1) / 2, (half.shape[0] - 1) / 2)
        placements, spectra = [], []
        for scale in SCALES:
            for deg in ANGLES:
                m = homogeneous(similarity_matrix(0, 0, deg, ctr, scale))
                warped = resample(half, np.linalg.inv(m), half.shape)
                spectra.append(fft.rfft2(warped, s=(SIDE, SIDE)).astype(np.complex64))
                placements.append((deg, scale))
        return cls(query, np.stack(spectra), tuple(placements))


def agreement(query: QueryPrint, candidate: VesselPrint) -> float:
    """How well the query's vessels lie on the candidate's, in [0, 1] (0: no vessels)."""
    if not query.print.vessels.any() or not candidate.vessels.any():
        return 0.0
    spectrum = query.spectra * candidate.half_spectrum()[None]
    corr = fft.irfft2(spectrum, s=(SIDE, SIDE), workers=-1)
    reach = int(MAX_SHIFT * SIDE // 2)
    span = 2 * reach + 1
    corr = np.roll(corr, (reach, reach), axis=(1, 2))[:, :span, :span].reshape(len(corr), -1)
    fixed = ndimage.gaussian_filter(candidate.vessels, MATCH_SMOOTH)
    best = np.zeros(len(TILES))
    for i in np.argsort(-corr.max(axis=1))[:CANDIDATES]:
        iy, ix = divmod(int(corr[i].argmax()), span)
        deg, scale = query.placements[i]
        params = np.array([2.0 * (reach - ix), 2.0 * (reach - iy), deg, np.log(scale)])
        m = params_matrix(params, SIDE)
        warped = resample(query.print.vessels, np.linalg.inv(m), (SIDE, SIDE))
        warped = ndimage.gaussian_filter(warped, MATCH_SMOOTH)
        quality = [tile_quality(fixed, candidate.field, warped, tiles) for tiles in TILES]
        best = np.maximum(best, quality)
    return float(best.mean())


def checked_scores(scores, agreements, weight: float = VESSEL_WEIGHT) -> np.ndarray:
    """Pair cosines and vessel agreements (any matching shapes) → the checked scores,
    cosine + weight × agreement (float64): the one rule the engine, `evaluate` and the
    robustness benchmark order by."""
    return np.asarray(scores, np.float64) + weight * np.asarray(agreements, np.float64)


def rerank(scores: Sequence[float], agreements: Sequence[float]) -> np.ndarray:
    """Hits' pair cosines and vessel agreements → their order by the checked score
    (best first; ties keep the given order)."""
    return np.argsort(-checked_scores(scores, agreements), kind="stable")


def top_agreements(
    scores: np.ndarray,  # (Q, N) the queries' pair scores against N candidates
    query_print: Callable[[int], VesselPrint],  # query q's print
    prints: Sequence[VesselPrint],  # the N candidates' prints
    found: dict[tuple[int, int], float] | None = None,  # (q, n) → agreement, shared
) -> np.ndarray:
    """(Q, N) agreements of each query's CHECK_DEPTH best candidates with it, 0 elsewhere:
    `checked_scores(scores, agreements)` are the vessel check's scores (the engine's
    order). `found` keeps the pairs compared, so that several rankings of the same
    queries (embedders, weights) compare each pair once; `checked_scores` adds them."""
    found = {} if found is None else found
    out = np.zeros(scores.shape, np.float64)
    for q in range(len(scores)):
        top = np.argsort(-scores[q], kind="stable")[:CHECK_DEPTH]
        missing = [int(n) for n in top if (q, int(n)) not in found]
        if missing:
            query = QueryPrint.of(query_print(q))
            found.update({(q, n): agreement(query, prints[n]) for n in missing})
        out[q, top] = [found[(q, int(n))] for n in top]
    return out
