"""Fluorescein angiogram frames: per-case layers weighted by per-frame phase curves.

Phases (seconds after injection): choroidal flush at the arm-to-retina time, arteries
~1 s later, laminar venous flow 1.5-2.5 s after that, full venous ~8 s after the
arteries, recirculation fading, late staining and leakage (with the photographer's
gain raised). Vessels are bright on dark; blood in front of the choroid dims it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Anatomy
from .curves import bolus, camera_gain, rise
from .layers import Lesions


@dataclass(frozen=True)
class Phases:
    choroid: float  # choroidal flush begins (arm-to-retina time)
    artery: float  # arteries fill
    vein: float  # laminar venous flow begins
    venous: float  # veins full

    def as_dict(self) -> dict[str, float]:
        return {
            "choroidal": self.choroid,
            "arterial": self.artery,
            "laminar": self.vein,
            "venous": self.venous,
            "late": 420.0,
        }


def make_phases(rng: np.random.Generator, arrival_s: float) -> Phases:
    t_art = arrival_s + rng.uniform(0.6, 1.4)
    t_vein = t_art + rng.uniform(1.5, 2.5)
    return Phases(arrival_s, t_art, t_vein, t_art + rng.uniform(7.0, 10.0))


def _vessels(frames: np.ndarray, anat: Anatomy, les: Lesions, ph: Phases, t: np.ndarray) -> None:
    """Add vessel fluorescence to `frames` (T, H, W), on vessel pixels only."""
    a, v = anat.artery, anat.vein
    dropout = 1.0 - les.perfusion  # small vessels in non-perfused retina do not fill
    a_prof = a.profile * (1 - dropout * a.take(a.pts["depth"] >= 2))
    v_prof = v.profile * (1 - dropout * v.take(v.pts["depth"] >= 2))
    on = (a_prof > 0.01) | (v_prof > 0.01)
    artery = a_prof[on] >= v_prof[on]  # arteries cross over veins
    a_arr = (ph.artery + 0.25 * a.pts["s"])[np.maximum(a.hit.idx[on], 0)]
    downstream = 1 - np.clip(v.pts["s"] / 1.2, 0, 1)  # big veins near the disc fill last
    v_arr_pt = ph.vein + 1.5 * downstream + les.vein_delay
    r_units = v.pts["r"] / anat.geom.ppu  # laminar flow: in big veins the centre fills later
    lam_pt = 4.0 * np.clip(r_units / 0.012, 0.2, 1.0)
    vi = np.maximum(v.hit.idx[on], 0)
    v_arr = v_arr_pt[vi] + lam_pt[vi] * (1 - np.minimum(v.hit.q[on], 1.0)) ** 1.5
    ppu = anat.geom.ppu  # bigger vessels hold a thicker column of dye: brighter
    a_cal = 0.5 + 0.5 * np.clip(a.pts["r"][np.maximum(a.hit.idx[on], 0)] / (0.010 * ppu), 0, 1)
    v_cal = 0.5 + 0.5 * np.clip(v.pts["r"][vi] / (0.012 * ppu), 0, 1)
    q = np.minimum(np.where(artery, a.hit.q[on], v.hit.q[on]), 1.0)
    shade = 0.75 + 0.25 * np.sqrt(1 - q**2)  # a cylinder: brightest along its axis
    prof = np.where(artery, 1.05 * a_prof[on] * a_cal, v_prof[on] * v_cal) * shade
    arr = np.where(artery, a_arr, v_arr)
    frames[:, on] += prof[None, :] * bolus(t[:, None], arr[None, :])  # (T, n)
    stain = v.take(les.wall_stain) * np.exp(-(((v.hit.q - 0.9) / 0.3) ** 2))
    on = stain > 0.01
    if on.any():
        frames[:, on] += stain[on][None, :] * rise(t, ph.vein + 10, 150)[:, None]


def _background(anat: Anatomy, les: Lesions, ph: Phases, t: np.ndarray) -> np.ndarray:
    """(T, H, W) choroidal flush, capillary bed (FAZ dark), disc, late scleral staining;
    dimmed where vessels lie in front."""
    rho, e, perf = anat.rho_fovea, anat.eye, les.perfusion
    macula = 1 - 0.5 * np.exp(-((rho / 0.1) ** 2)) - 0.15 * np.exp(-((rho / 0.25) ** 2))
    faz = np.clip((rho - e.faz_r) / (0.3 * e.faz_r), 0, 1)
    disc_in = np.clip((1.05 - anat.rho_disc) / 0.15, 0, 1)
    rim = np.exp(-(((anat.rho_disc - 0.9) / 0.25) ** 2))
    cup = np.clip((anat.cup_ratio - anat.rho_cup) / 0.1, 0, 1)
    layers = np.stack(
        [
            0.13 * anat.capillary_tex * perf * faz,
            0.35 * disc_in,
            0.12 * rim + 0.2 * disc_in + 0.12 * cup,
            0.1 * (1.1 - 0.3 * anat.tigroid) * np.sqrt(macula),
        ]
    ).astype(np.float32)
    curves = [
        bolus(t, ph.artery + 1.2),
        bolus(t, ph.artery + 0.2),
        rise(t, ph.artery, 200),
        rise(t, ph.choroid, 180),
    ]
    weights = np.stack(curves, axis=1).astype(np.float32)  # (T, 4)
    bg = np.einsum("tk,khw->thw", weights, layers)  # (T, H, W); no BLAS threads
    chor = (0.33 * anat.choroid_tex * macula * (1 - 0.6 * (1 - perf))).astype(np.float32)
    arrival = ph.choroid + anat.choroid_delay
    last, mean = float(arrival.max()), float(arrival.mean())
    for i, ti in enumerate(t):  # patchy filling matters only in the first seconds
        bg[i] += chor * (bolus(ti, arrival) if ti - last < 8.0 else np.float32(bolus(ti, mean)))
    cover = np.maximum(anat.artery.profile, anat.vein.profile)
    bg *= (1 - 0.6 * cover)[None]
    return bg


def _terms(frames: np.ndarray, les: Lesions) -> None:
    """Add the lesions' fluorescence to `frames` (T, H, W)."""
    for term in les.terms:
        k_max = len(term.maps) - 1
        for i in range(len(frames)):
            amp = float(term.amp[i])
            if amp <= 1e-4:
                continue
            e = min(max(float(term.extent[i]), 0.0), k_max)
            k = min(int(e), max(k_max - 1, 0))
            w = e - k
            frames[i] += (amp * (1 - w)) * term.maps[k]
            if w > 0:
                frames[i] += (amp * w) * term.maps[k + 1]


def _blur3(frames: np.ndarray, sigma: float) -> None:
    """In-place separable 3-tap blur of (T, H, W) (a Gaussian for sigma <~ 1 px)."""
    w = np.float32(min(sigma**2 / 2, 1 / 3))
    for axis in (1, 2):
        x = np.moveaxis(frames, axis, 0)
        inner = x[1:-1] * (1 - 2 * w)
        inner += w * x[:-2]
        inner += w * x[2:]
        x[1:-1] = inner


def render_ffa(
    rng: np.random.Generator, anat: Anatomy, les: Lesions, times: np.ndarray, ph: Phases
) -> np.ndarray:
    """(T, H, W) uint8 angiogram at `times` (s)."""
    t = np.asarray(times, np.float64)
    frames = _background(anat, les, ph, t)
    _vessels(frames, anat, les, ph, t)
    _terms(frames, les)
    n = anat.geom.size
    v = (np.arange(n, dtype=np.float32) + 0.5) / (n / 2) - 1
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    vignette = 1 - rng.uniform(0.1, 0.3) * ((v[None, :] - cx) ** 2 + (v[:, None] - cy) ** 2)
    frames *= (les.block * vignette)[None]
    frames *= (camera_gain(t) * rng.uniform(0.85, 1.05)).astype(np.float32)[:, None, None]
    sigma = rng.uniform(0.3, 0.8) * n / 512
    if sigma > 0.2:
        _blur3(frames, sigma)
    np.maximum(frames, 0, out=frames)
    noise = rng.random(frames.shape, dtype=np.float32)  # uniform, unit variance below
    noise -= 0.5
    noise *= np.sqrt(frames) * np.float32(0.03 * 12**0.5) + np.float32(
        rng.uniform(0.008, 0.02) * 12**0.5
    )
    frames += noise
    frames += 0.02
    np.clip(frames, 0, 1, out=frames)
    frames **= 0.85
    frames *= (255 * anat.fov_soft)[None]
    frames += 0.5
    return frames.astype(np.uint8)
