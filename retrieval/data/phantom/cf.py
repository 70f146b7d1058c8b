"""The colour fundus photo: choroid, macula, disc, vessels and lesions, then the camera.

Composed on the FFA grid, then warped by the case's misregistration into the
photo's own camera frame; the camera (aperture, vignetting, colour cast, exposure,
blur, noise) acts last, in the photo's frame.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import Anatomy
from .layers import CfOp, Lesions
from .raster import smooth_noise, smoothstep

ARTERY_T = np.array([0.9, 0.6, 0.68], np.float32)  # transmission at a main trunk's centre
VEIN_T = np.array([0.68, 0.3, 0.42], np.float32)
TRUNK_R = 0.012  # retina units: a main vein's radius; thinner vessels absorb less
CALIBRE_POW = 0.65  # optical density ~ (radius / TRUNK_R) ** CALIBRE_POW
FUNDUS_LIGHT = np.array([0.95, 0.41, 0.28], np.float32)  # a blond fundus
FUNDUS_DARK = np.array([0.68, 0.25, 0.172], np.float32)  # a heavily pigmented one
TESSELLATION = 0.1  # choroidal vessels' contrast in the palest fundus
PALE_PIGMENT = 0.35  # choroidal vessels show through only below this pigment


def _apply(img: np.ndarray, op: CfOp) -> None:
    a = op.alpha[..., None]
    col = np.asarray(op.colour, np.float32)
    if op.mode == "absorb":
        img *= np.exp(np.clip(a, 0, None) * np.log(col))
    elif op.mode == "blend":
        a = np.clip(a, 0, 1)
        img *= 1 - a
        img += a * col
    elif op.mode == "add":
        img += a * col
    else:
        raise ValueError(f"unknown colour op {op.mode!r}")


def _tessellation(anat: Anatomy, pigment: float) -> np.ndarray:
    """(H, W) in [0, 1]: how much the choroidal vessels show through (pale fundi only),
    softened: broad orange stripes between darker spaces, no thin pale worms."""
    amount = TESSELLATION * max(0.0, 1 - pigment / PALE_PIGMENT) ** 1.5
    if amount == 0:
        return np.zeros(anat.shape, np.float32)
    soft = ndimage.gaussian_filter(anat.tigroid, 0.012 * anat.geom.ppu, truncate=2.5)
    return (amount * (1 - soft / max(float(soft.max()), 1e-6))).astype(np.float32)


def _fundus(rng: np.random.Generator, anat: Anatomy, pigment: float, age: int) -> np.ndarray:
    """(H, W, 3) float32 background: orange-red choroid (tessellated when blond), dark
    macula."""
    base = FUNDUS_LIGHT + (FUNDUS_DARK - FUNDUS_LIGHT) * pigment
    between = _tessellation(anat, pigment)  # the pigmented spaces between choroidal vessels
    shade = 1 - between
    shade *= 1 + 0.06 * smooth_noise(rng, anat.shape, 0.2 * anat.geom.ppu)
    img = shade[..., None] * base
    img *= np.array([1.0, 0.94, 0.9], np.float32) ** (between / TESSELLATION)[..., None]
    rho = anat.rho_fovea
    mac = 0.45 * np.exp(-((rho / 0.09) ** 2)) + 0.18 * np.exp(-((rho / 0.22) ** 2))
    img *= 1 - mac[..., None] * np.array([0.55, 0.65, 0.7], np.float32)
    youth = float(np.clip((60 - age) / 40, 0, 1))
    ring = np.exp(-(((rho - 0.2) / 0.04) ** 2)) * youth * 0.05
    reflex = np.exp(-((rho / 0.012) ** 2)) * youth * 0.35
    img += (ring + reflex)[..., None] * np.array([1.0, 1.0, 0.9], np.float32)
    return img


def _disc(rng: np.random.Generator, anat: Anatomy, img: np.ndarray, swelling: float) -> None:
    """Yellow-orange disc with a pale cup; a pale temporal crescent in some eyes."""
    rd, rc = anat.rho_disc, anat.rho_cup
    soft = 0.1 + 0.45 * swelling
    a = smoothstep(1.0 + soft, 1.0 - soft, rd)[..., None]
    rim = np.array([0.96, 0.62, 0.4]) * (1 - swelling) + np.array([0.92, 0.45, 0.33]) * swelling
    cup_a = smoothstep(anat.cup_ratio + 0.1, anat.cup_ratio - 0.1, rc)[..., None]
    col = rim + (np.array([1.0, 0.9, 0.7]) - rim) * cup_a * (1 - swelling)
    if rng.random() < 0.35:  # peripapillary crescent on the temporal side
        ux, _ = anat.geom.grid()
        temporal = (anat.eye.disc[0] - ux) / anat.eye.disc_r  # grid is in right-eye layout
        cres = smoothstep(1.45, 1.1, rd) * smoothstep(0.2, 0.9, temporal / np.maximum(rd, 1e-3))
        c = (0.6 * cres)[..., None]
        img *= 1 - c
        img += c * np.array([0.9, 0.72, 0.55], np.float32)
    img *= 1 - a
    img += a * col.astype(np.float32)


def _vessels(anat: Anatomy, img: np.ndarray) -> None:
    """Blood absorbs along the path through it: thin vessels are fainter than trunks."""
    for layer, trans in ((anat.vein, VEIN_T), (anat.artery, ARTERY_T)):
        calibre = layer.take(layer.pts["r"]) / (anat.geom.ppu * TRUNK_R)
        density = layer.profile * np.clip(calibre, 0, 1) ** CALIBRE_POW
        img *= np.exp(density[..., None] * np.log(trans))
    a = anat.artery
    big = a.take(a.pts["r"]) > 1.0
    reflex = 0.22 * np.exp(-((a.hit.q / 0.25) ** 2)) * big * a.profile
    img += reflex[..., None] * np.array([1.0, 0.95, 0.9], np.float32)


def _to_photo_frame(img: np.ndarray, anat: Anatomy) -> np.ndarray:
    """Warp from the FFA grid into the photo's frame (inverse of the misregistration)."""
    dx, dy, deg = anat.geom.registration_px()
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    m = np.array([[c, s], [-s, c]])
    centre = np.full(2, anat.geom.size / 2 - 0.5)
    offset = centre + np.array([dy, dx]) - m @ centre
    return np.stack(
        [
            ndimage.affine_transform(img[..., k], m, offset, order=1, mode="nearest")
            for k in range(3)
        ],
        axis=-1,
    )


def render_cf(
    rng: np.random.Generator, anat: Anatomy, les: Lesions, pigment: float, age: int
) -> np.ndarray:
    """(H, W, 3) uint8 RGB colour fundus photo."""
    img = _fundus(rng, anat, pigment, age)
    for op in les.cf_ops:
        if op.under_vessels:
            _apply(img, op)
    _disc(rng, anat, img, les.disc_swelling)
    _vessels(anat, img)
    for op in les.cf_ops:
        if not op.under_vessels:
            _apply(img, op)
    img = _to_photo_frame(img, anat)
    n = anat.geom.size
    v = (np.arange(n, dtype=np.float32) + 0.5) / (n / 2) - 1
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    fall = 1 - rng.uniform(0.15, 0.4) * ((v[None, :] - cx) ** 2 + (v[:, None] - cy) ** 2) ** 1.2
    cast = rng.normal(1.0, 0.02, 3).astype(np.float32)
    img *= (fall[..., None] * cast * rng.uniform(0.95, 1.2)).astype(np.float32)
    sigma = rng.uniform(0.3, 0.8) * n / 512
    if sigma > 0.2:
        img = ndimage.gaussian_filter(img, (sigma, sigma, 0), truncate=2.5)
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.003, 0.008)
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.0)
    img *= anat.fov_soft[..., None]
    return (img * 255 + 0.5).astype(np.uint8)
