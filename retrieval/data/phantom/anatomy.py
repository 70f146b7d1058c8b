"""The eye of one case on the pixel grid: camera geometry, disc, macula, vessels, choroid.

Every layer is drawn in *FFA camera coordinates*; the colour photo is composed on
the same grid and then warped by the case's small misregistration, so lesion
masks and anatomy maps are exact for the FFA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .raster import R_MIN_PX, Splat, disc_profile, smooth_noise, smoothstep, splat
from .vessels import DS, Eye, Tree, walk

FOV_R = 0.95  # camera aperture radius, in image half-widths


@dataclass(frozen=True)
class Geometry:
    """Retina units (right-eye layout) -> FFA pixels: mirror (OS), rotate, shift, scale."""

    size: int
    mirror: bool
    rot: float  # radians, FFA relative to CF
    shift: tuple[float, float]  # (dx, dy) retina units, FFA relative to CF

    @property
    def ppu(self) -> float:  # pixels per retina unit
        return self.size / 2

    def to_px(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = -x if self.mirror else x
        c, s = np.cos(self.rot), np.sin(self.rot)
        xr = c * x - s * y + self.shift[0]
        yr = s * x + c * y + self.shift[1]
        return ((xr + 1) * self.ppu - 0.5).astype(np.float32), ((yr + 1) * self.ppu - 0.5).astype(
            np.float32
        )

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Retina coordinates (H, W) of every FFA pixel centre (inverse of `to_px`)."""
        v = (np.arange(self.size, dtype=np.float32) + 0.5) / self.ppu - 1
        xr = v[None, :] - self.shift[0]
        yr = v[:, None] - self.shift[1]
        c, s = np.cos(self.rot), np.sin(self.rot)
        x = c * xr + s * yr
        y = -s * xr + c * yr
        return (-x if self.mirror else x).astype(np.float32), y.astype(np.float32)

    def registration_px(self) -> tuple[float, float, float]:
        """(dx, dy, degrees): FFA pixel = R(deg) (CF pixel - centre) + centre + (dx, dy)."""
        return (self.shift[0] * self.ppu, self.shift[1] * self.ppu, float(np.degrees(self.rot)))


@dataclass
class VesselLayer:
    pts: dict[str, np.ndarray]  # (N,) x, y, r in FFA pixels; ux, uy in units; s, trunk, depth
    hit: Splat
    profile: np.ndarray  # (H, W) float32 in [0, 1], thin vessels fainter

    def take(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return self.hit.take(values, fill)


@dataclass
class Anatomy:
    geom: Geometry
    eye: Eye
    cup_ratio: float
    rho_fovea: np.ndarray  # (H, W) distance to the fovea, retina units
    rho_disc: np.ndarray  # (H, W) distance to the disc centre in disc radii (oval)
    rho_cup: np.ndarray  # (H, W) distance to the cup centre in disc radii
    fov: np.ndarray  # (H, W) bool
    fov_soft: np.ndarray  # (H, W) float32 aperture with a one-pixel soft edge
    artery: VesselLayer
    vein: VesselLayer
    tigroid: np.ndarray  # (H, W) choroidal vessel network in [0, 1]
    choroid_delay: np.ndarray  # (H, W) s, patchy lobular filling of the choroid
    choroid_tex: np.ndarray  # (H, W) ~1, choroidal fluorescence texture
    capillary_tex: np.ndarray  # (H, W) ~1, fine capillary grain

    @property
    def shape(self) -> tuple[int, int]:
        return self.rho_fovea.shape


def make_eye(rng: np.random.Generator) -> tuple[Eye, float, float]:
    """Disc, fovea and foveal avascular zone of one eye; also (cup ratio, disc ovality)."""
    fovea = (-0.12 + rng.uniform(-0.05, 0.05), 0.02 + rng.uniform(-0.04, 0.04))
    disc_r = rng.uniform(0.12, 0.145)
    dist = 5.0 * disc_r * rng.uniform(0.92, 1.06)  # ~2.5 disc diameters, ~15 degrees
    ang = rng.uniform(-0.16, -0.02)  # the disc sits a little above the fovea
    disc = (fovea[0] + dist * np.cos(ang), fovea[1] + dist * np.sin(ang))
    eye = Eye(fovea=fovea, disc=disc, disc_r=disc_r, faz_r=rng.uniform(0.032, 0.045))
    return eye, rng.uniform(0.2, 0.5), rng.uniform(1.03, 1.12)


def choroid_vessels(rng: np.random.Generator, geom: Geometry, eye: Eye) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the large choroidal vessels (tigroid pattern), broad
    curving bands fanning out from the posterior pole; drawn on a coarse grid."""
    n = 170
    rho = np.sqrt(rng.uniform(0.0, 1.0, n))
    a = rng.uniform(0, 2 * np.pi, n)
    x0, y0 = eye.fovea[0] + 1.1 * rho * np.cos(a), eye.fovea[1] + 1.1 * rho * np.sin(a)
    h0 = np.arctan2(y0 - eye.fovea[1], x0 - eye.fovea[0]) + rng.normal(0, 0.6, n)
    length = rng.uniform(0.3, 0.9, n)
    x, y, _, s = walk(rng, x0, y0, h0, length, rng.normal(0, 2.0, n), curv_sd=6.0)
    taper = np.clip(s / length[:, None], 0, 1)
    r = rng.uniform(0.008, 0.02, n)[:, None] * (1 - 0.7 * taper) * np.minimum(1, 8 * taper + 0.3)
    coarse = min(geom.size, max(64, geom.size // 4))
    f = coarse / geom.size
    every = max(1, int(0.4 / (DS * geom.ppu * f)))  # ~0.4 coarse pixels between points
    keep = (s <= length[:, None]) & (np.arange(s.shape[1]) % every == 0)
    px, py = geom.to_px(x[keep], y[keep])
    hit = splat((px + 0.5) * f - 0.5, (py + 0.5) * f - 0.5, r[keep] * geom.ppu * f, (coarse,) * 2)
    band = disc_profile(hit.q, soft=1.0)
    if coarse != geom.size:
        band = ndimage.zoom(band, geom.size / coarse, order=1, grid_mode=True, mode="nearest")
    return np.clip(band, 0, 1).astype(np.float32)


def _vessel_layer(tree: Tree, geom: Geometry, shape: tuple[int, int]) -> VesselLayer:
    pts = tree.points(geom.ppu)
    x, y = geom.to_px(pts["x"], pts["y"])
    r = (pts["r"] * geom.ppu).astype(np.float32)
    pts = pts | {"ux": pts["x"], "uy": pts["y"], "x": x, "y": y, "r": r}
    hit = splat(x, y, r, shape)
    weight = hit.take(np.minimum(1.0, r / R_MIN_PX) ** 0.8)
    return VesselLayer(pts, hit, disc_profile(hit.q, soft=0.5) * weight)


def build_anatomy(
    rng: np.random.Generator,
    geom: Geometry,
    eye: Eye,
    cup_ratio: float,
    ovality: float,
    arteries: Tree,
    veins: Tree,
) -> Anatomy:
    """Rasterise the eye onto the FFA pixel grid."""
    n = geom.size
    shape = (n, n)
    ux, uy = geom.grid()
    rho_f = np.hypot(ux - eye.fovea[0], uy - eye.fovea[1])
    dx, dy = ux - eye.disc[0], (uy - eye.disc[1]) / ovality
    rho_d = np.hypot(dx, dy) / eye.disc_r
    cup_dx = dx + 0.12 * eye.disc_r  # the cup sits a little temporal
    rho_c = np.hypot(cup_dx, dy) / eye.disc_r
    v = (np.arange(n, dtype=np.float32) + 0.5) / geom.ppu - 1
    cam_r = np.hypot(v[None, :], v[:, None])
    fov_soft = smoothstep(FOV_R + 0.75 / geom.ppu, FOV_R - 0.75 / geom.ppu, cam_r)
    ppu = geom.ppu
    tig = choroid_vessels(rng, geom, eye)
    delay = np.clip(0.7 + 0.45 * smooth_noise(rng, shape, 0.05 * ppu), 0.0, 1.6)
    chor = 1.0 + 0.07 * smooth_noise(rng, shape, 0.06 * ppu) + 0.08 * (tig - 0.5)
    cap = 1.0 + 0.2 * smooth_noise(rng, shape, max(0.6, 0.004 * ppu))
    return Anatomy(
        geom=geom,
        eye=eye,
        cup_ratio=cup_ratio,
        rho_fovea=rho_f,
        rho_disc=rho_d.astype(np.float32),
        rho_cup=rho_c.astype(np.float32),
        fov=cam_r < FOV_R,
        fov_soft=fov_soft.astype(np.float32),
        artery=_vessel_layer(arteries, geom, shape),
        vein=_vessel_layer(veins, geom, shape),
        tigroid=tig.astype(np.float32),
        choroid_delay=delay.astype(np.float32),
        choroid_tex=chor.astype(np.float32),
        capillary_tex=cap.astype(np.float32),
    )


def anatomy_masks(anat: Anatomy) -> dict[str, np.ndarray]:
    """Ground-truth anatomy in FFA coordinates: vessels, vein wall/centre, disc, FAZ."""
    a, v = anat.artery, anat.vein
    r_vein = v.take(v.pts["r"])
    big = r_vein >= 1.3
    artery = (a.profile > 0.5) & (a.hit.q < v.hit.q)
    vein = (v.profile > 0.5) & ~artery
    return {
        "artery": artery & anat.fov,
        "vein": vein & anat.fov,
        "vein_wall": vein & big & (v.hit.q > 0.6) & (v.hit.q < 0.95) & anat.fov,
        "vein_centre": vein & big & (v.hit.q < 0.3) & ~(a.hit.q < 1.3) & anat.fov,
        "disc": (anat.rho_disc < 1.0) & anat.fov,
        "faz": anat.rho_fovea < anat.eye.faz_r,
    }
