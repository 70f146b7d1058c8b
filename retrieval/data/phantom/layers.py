"""Building blocks of lesions: how a lesion changes the photo and the angiogram.

A lesion is drawn once per case as pixel maps; its FFA dynamics are (T,) curves:
- `CfOp`: a colour change of the photo (absorb, blend towards a colour, or add light),
- `FfaTerm`: added fluorescence, `maps` (K, H, W) at increasing extent (K = 1 for
  a fixed shape) with per-frame `extent` (position in 0..K-1) and `amp`,
- `block` / `perfusion`: multiplicative maps (haemorrhage, capillary dropout),
- per-vein-point extra delay and wall staining (vein occlusions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from retrieval.data.cohort import LESIONS

from .anatomy import Anatomy
from .raster import blob_map


@dataclass
class CfOp:
    mode: str  # "absorb": x colour**alpha; "blend": towards colour; "add": + colour * alpha
    colour: tuple[float, float, float]
    alpha: np.ndarray  # (H, W) float32
    under_vessels: bool = False  # subretinal: drawn before the retinal vessels


@dataclass
class FfaTerm:
    maps: np.ndarray  # (K, H, W) float32, increasing extent
    extent: np.ndarray  # (T,) in [0, K-1]
    amp: np.ndarray  # (T,)


@dataclass
class Lesions:
    shape: tuple[int, int]
    n_vein_pts: int
    names: set[str] = field(default_factory=set)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    cf_ops: list[CfOp] = field(default_factory=list)
    terms: list[FfaTerm] = field(default_factory=list)
    block: np.ndarray = field(init=False)  # (H, W) FFA transmission, 1 = nothing in front
    perfusion: np.ndarray = field(init=False)  # (H, W) 1 = capillaries fill, 0 = non-perfused
    vein_delay: np.ndarray = field(init=False)  # (N_vein,) extra s before a vein point fills
    wall_stain: np.ndarray = field(init=False)  # (N_vein,) late staining of the vein wall
    disc_swelling: float = 0.0

    def __post_init__(self) -> None:
        self.block = np.ones(self.shape, np.float32)
        self.perfusion = np.ones(self.shape, np.float32)
        self.vein_delay = np.zeros(self.n_vein_pts, np.float32)
        self.wall_stain = np.zeros(self.n_vein_pts, np.float32)

    def mark(self, name: str, mask: np.ndarray) -> None:
        """Record a lesion's ground-truth pixels (union with earlier ones of that name)."""
        if name not in LESIONS:
            raise ValueError(f"unknown lesion {name!r}")
        if mask.any():
            self.names.add(name)
            self.masks[name] = self.masks[name] | mask if name in self.masks else mask

    def ordered_names(self) -> list[str]:
        return [n for n in LESIONS if n in self.names]


@dataclass
class Ctx:
    """What lesion drawing needs: randomness, the eye, the frame times and phases."""

    rng: np.random.Generator
    anat: Anatomy
    times: np.ndarray  # (T,) s
    t_choroid: float  # choroidal flush (arm-to-retina time)
    t_artery: float  # arteries fill
    t_vein: float  # veins begin to fill (laminar)
    out: Lesions

    @property
    def shape(self) -> tuple[int, int]:
        return self.anat.shape

    @property
    def ppu(self) -> float:
        return self.anat.geom.ppu

    def blob(
        self, x: np.ndarray, y: np.ndarray, r: np.ndarray, soft: float = 0.35, min_px: float = 0.0
    ) -> np.ndarray:
        """(H, W) union of soft discs given in retina units; radii at least `min_px` pixels."""
        px, py = self.anat.geom.to_px(np.asarray(x, float), np.asarray(y, float))
        r_px = np.maximum(np.asarray(r, float) * self.ppu, min_px)
        return blob_map(px, py, r_px, self.shape, soft)

    def inside(self, x: np.ndarray, y: np.ndarray, margin: float = 0.05) -> np.ndarray:
        """(N,) bool: the retina point shows in the camera's field, away from the disc."""
        px, py = self.anat.geom.to_px(np.asarray(x, float), np.asarray(y, float))
        half = self.anat.geom.half  # the camera square's half side: its centre and scale
        cam = np.hypot(px + 0.5 - half, py + 0.5 - half) / half
        e = self.anat.eye
        off_disc = np.hypot(x - e.disc[0], y - e.disc[1]) > e.disc_r * 1.3
        return (cam < 0.95 - margin) & off_disc

    def around(
        self, n: int, centre: tuple[float, float], r_lo: float, r_hi: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to n points in the annulus r_lo..r_hi around `centre`, inside the field."""
        rho = np.sqrt(self.rng.uniform(r_lo**2, r_hi**2, 3 * n + 4))
        ang = self.rng.uniform(0, 2 * np.pi, 3 * n + 4)
        x, y = centre[0] + rho * np.cos(ang), centre[1] + rho * np.sin(ang)
        ok = self.inside(x, y)
        return x[ok][:n], y[ok][:n]

    def clusters(
        self, x: np.ndarray, y: np.ndarray, r: np.ndarray, parts: tuple[int, int] = (2, 5)
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Irregular shapes: each (x, y, r) becomes a few overlapping smaller discs."""
        k = self.rng.integers(parts[0], parts[1] + 1, len(x))
        rep = np.repeat(np.arange(len(x)), k)
        ang = self.rng.uniform(0, 2 * np.pi, len(rep))
        off = r[rep] * self.rng.uniform(0, 0.6, len(rep))
        sub_r = r[rep] * self.rng.uniform(0.45, 0.85, len(rep))
        return x[rep] + off * np.cos(ang), y[rep] + off * np.sin(ang), sub_r

    def fixed(self, shape_map: np.ndarray, amp: np.ndarray) -> None:
        """Add fluorescence of a fixed shape with amplitude curve (T,)."""
        t = len(self.times)
        self.out.terms.append(FfaTerm(shape_map[None], np.zeros(t), np.asarray(amp, float)))

    def spreading(
        self, source: np.ndarray, sigma_max: float, amp: np.ndarray, extent: np.ndarray
    ) -> np.ndarray:
        """Leakage: `source` blurring out to `sigma_max` px; returns the late map (H, W)."""
        levels = blur_levels(source, np.linspace(0.6, max(sigma_max, 1.0), 5))
        self.out.terms.append(FfaTerm(levels, 4 * np.asarray(extent, float), np.asarray(amp)))
        return levels[-1]


def blur_levels(source: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """(K, H, W) `source` blurred at each sigma, each scaled to peak 1 (cropped for speed)."""
    out = np.zeros((len(sigmas),) + source.shape, np.float32)
    ys, xs = np.nonzero(source > 1e-3)
    if len(ys) == 0:
        return out
    pad = int(np.ceil(3 * sigmas[-1])) + 1
    y0, y1 = max(0, ys.min() - pad), min(source.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(source.shape[1], xs.max() + pad + 1)
    crop = source[y0:y1, x0:x1]
    for k, s in enumerate(sigmas):
        b = ndimage.gaussian_filter(crop, s, mode="constant", truncate=3.0)
        out[k, y0:y1, x0:x1] = b / max(float(b.max()), 1e-6)
    return out


def lacy(
    rng: np.random.Generator,
    centre: tuple[float, float],
    radius: float,
    n: int,
    ppu: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Points (retina units) of a lacy tuft of new vessels: curly walks fanning out from
    `centre` plus a few loops inside `radius` (neovascularisation, CNV)."""
    steps = max(24, int(np.ceil(1.2 * radius * ppu / 0.35)))
    ds = 1.2 * radius / steps
    from_centre = rng.random(n) < 0.6
    rho = np.where(from_centre, 0.0, radius * np.sqrt(rng.uniform(0, 0.8, n)))
    a = rng.uniform(0, 2 * np.pi, n)
    x0, y0 = centre[0] + rho * np.cos(a), centre[1] + rho * np.sin(a)
    knots = rng.normal(0, 3.0 / radius, (n, 8))
    pos = np.linspace(0, 6.99, steps)
    j = pos.astype(int)
    kappa = knots[:, j] + (knots[:, j + 1] - knots[:, j]) * (pos - j)
    h = rng.uniform(0, 2 * np.pi, n)[:, None] + np.cumsum(kappa * ds, axis=1)
    length = rng.uniform(0.5, 1.0, n)[:, None] * steps
    keep = np.arange(steps)[None, :] < length  # (n, steps)
    x = x0[:, None] + np.cumsum(np.cos(h) * ds, axis=1)
    y = y0[:, None] + np.cumsum(np.sin(h) * ds, axis=1)
    keep &= np.hypot(x - centre[0], y - centre[1]) < radius * 1.1
    keep = np.logical_and.accumulate(keep, axis=1)
    return x[keep], y[keep]
