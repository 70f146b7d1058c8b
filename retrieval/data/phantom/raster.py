"""Pixel-grid helpers: nearest-point splatting of tubes and blobs, soft steps, noise.

Shapes are drawn as unions of discs: a point (x, y, r) in pixel units covers the
pixels with d/r < q_max, d the distance to the point. `splat` keeps, per pixel,
the smallest q = d/r and which point gave it, so per-point attributes (vessel
type, arrival time, trunk) become per-pixel maps by indexing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

Q_MAX = 1.6  # splat reach, in radii
_Q_SCALE = 2**20
_NONE = np.iinfo(np.int64).max
R_MIN_PX = 0.6  # thinner shapes are drawn at this radius, fainter


@dataclass
class Splat:
    q: np.ndarray  # (H, W) float32 smallest d/r, Q_MAX where nothing
    idx: np.ndarray  # (H, W) int64 index of the nearest point, -1 where nothing

    @property
    def hit(self) -> np.ndarray:  # (H, W) bool
        return self.idx >= 0

    def take(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Per-pixel map of a per-point attribute: (N,) -> (H, W)."""
        out = np.full(self.idx.shape, fill, dtype=np.float32)
        hit = self.idx >= 0
        out[hit] = values[self.idx[hit]]
        return out


@lru_cache(maxsize=64)
def _stencil(k: int) -> tuple[np.ndarray, np.ndarray]:
    oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
    keep = ox**2 + oy**2 <= (k + 0.5) ** 2
    return oy[keep].astype(np.float32), ox[keep].astype(np.float32)


def splat(
    x: np.ndarray, y: np.ndarray, r: np.ndarray, shape: tuple[int, int], q_max: float = Q_MAX
) -> Splat:
    """Rasterise discs (x, y, r) in pixels (N,) onto `shape`: nearest d/r and its point.

    Each point writes a key (quantised (d/r)^2, point index) into the pixels of a
    small stencil; `np.minimum.at` keeps the nearest. The grid is padded so no
    stencil needs bounds checks.
    """
    h, w = shape
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    r_eff = np.maximum(np.asarray(r, np.float32), R_MIN_PX)
    reach = np.ceil(r_eff * q_max).astype(np.int32)
    k_max = int(reach.max()) if len(x) else 1
    pad = 2 * k_max + 1
    wp = w + 2 * pad
    key = np.full((h + 2 * pad) * wp, _NONE, dtype=np.int64)
    cx, cy = np.rint(x), np.rint(y)
    near = (cx >= -k_max) & (cx <= w - 1 + k_max) & (cy >= -k_max) & (cy <= h - 1 + k_max)
    base = ((cy + pad) * wp + (cx + pad)).astype(np.int64)
    inv_r2 = 1.0 / (r_eff * r_eff)
    q2_max = np.float32(q_max * q_max)
    for k in np.unique(reach[near]):
        sel = np.flatnonzero(near & (reach == k))
        oy, ox = _stencil(int(k))
        dx = (cx[sel] - x[sel])[:, None] + ox[None, :]  # (n, S)
        dy = (cy[sel] - y[sel])[:, None] + oy[None, :]
        q2 = dx * dx
        q2 += dy * dy
        q2 *= inv_r2[sel, None]
        np.minimum(q2, q2_max, out=q2)
        k_val = (q2 * _Q_SCALE).astype(np.int64)
        k_val <<= 32
        k_val |= sel[:, None]
        lin = base[sel, None] + (oy * wp + ox).astype(np.int64)[None, :]
        np.minimum.at(key, lin.ravel(), k_val.ravel())
    key = key.reshape(h + 2 * pad, wp)[pad : pad + h, pad : pad + w]
    q2i = key >> 32
    hit = q2i < (np.array([q2_max], np.float32) * _Q_SCALE).astype(np.int64)[0]
    q2 = q2i.astype(np.float32) / _Q_SCALE
    q = np.where(hit, np.sqrt(np.minimum(q2, q2_max)), np.float32(q_max))
    idx = np.where(hit, key & 0xFFFFFFFF, -1)
    return Splat(q.astype(np.float32), idx)


def smoothstep(edge0: float, edge1: float, v: np.ndarray) -> np.ndarray:
    """0 below edge0, 1 above edge1 (edges may be reversed), smooth in between."""
    t = np.clip((v - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def disc_profile(q: np.ndarray, soft: float = 0.35) -> np.ndarray:
    """Solid disc / tube cross-section from q = d/r: 1 inside, soft edge around q = 1."""
    return smoothstep(1.0 + soft / 2, 1.0 - soft / 2, q).astype(np.float32)


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma_px: float, coarse: int = 4
) -> np.ndarray:
    """(H, W) float32 zero-mean unit-sd Gaussian noise smoothed at `sigma_px`.

    Drawn on a grid `coarse` times smaller when sigma allows (cheap at any size);
    the draw count depends only on the size, so it is reproducible.
    """
    h, w = shape
    f = max(1, min(coarse, int(sigma_px // 2)))
    small = rng.standard_normal((-(-h // f), -(-w // f))).astype(np.float32)
    small = ndimage.gaussian_filter(small, sigma_px / f, mode="wrap")
    if f > 1:
        small = ndimage.zoom(small, f, order=1, mode="grid-wrap", grid_mode=True)[:h, :w]
    return ((small - small.mean()) / (small.std() + 1e-6)).astype(np.float32)


def blob_map(
    x: np.ndarray, y: np.ndarray, r: np.ndarray, shape: tuple[int, int], soft: float = 0.35
) -> np.ndarray:
    """(H, W) float32 union of soft discs (pixel units); zeros when there are none."""
    if len(x) == 0:
        return np.zeros(shape, np.float32)
    r = np.asarray(r, np.float32)
    s = splat(np.asarray(x, np.float32), np.asarray(y, np.float32), r, shape)
    return disc_profile(s.q, soft) * s.take(np.minimum(1.0, r / R_MIN_PX))
