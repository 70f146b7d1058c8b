"""Macular disease: wet AMD (CNV, drusen, subretinal blood) and central serous
chorioretinopathy (ink-blot or smokestack leak under a serous detachment)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .curves import bolus, rise
from .layers import CfOp, Ctx, FfaTerm, lacy
from .raster import smoothstep


def drusen(ctx: Ctx, centre: tuple[float, float], keep_out: float) -> None:
    """Yellow deposits around the macula; stain late with sharp edges that do not grow."""
    rng, e, t = ctx.rng, ctx.anat.eye, ctx.times
    x, y = ctx.around(int(rng.integers(10, 40)), e.fovea, 0.06, 0.38)
    far = np.hypot(x - centre[0], y - centre[1]) > keep_out
    x, y = x[far], y[far]
    m = ctx.blob(x, y, rng.uniform(0.008, 0.02, len(x)), soft=0.25, min_px=0.8)
    ctx.out.cf_ops.append(CfOp("blend", (0.95, 0.84, 0.52), 0.75 * m, under_vessels=True))
    window = 0.25 * bolus(t, ctx.t_choroid + 0.5)  # early: a window onto the choroid
    ctx.fixed(m, window + 0.6 * rise(t, ctx.t_choroid, 80))
    ctx.out.mark("drusen", m > 0.5)
    ctx.out.mark("staining", m > 0.5)


def wet_amd(ctx: Ctx) -> None:
    """Choroidal neovascular membrane under the fovea: grey-green in the photo, lacy
    hyperfluorescence with the choroidal flush, leakage with fading margins late."""
    rng, e, t = ctx.rng, ctx.anat.eye, ctx.times
    a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.06)
    c = (e.fovea[0] + d * np.cos(a), e.fovea[1] + d * np.sin(a))
    radius = rng.uniform(0.05, 0.11)
    x, y = lacy(rng, c, radius, int(rng.integers(14, 24)), ctx.ppu)
    net = ctx.blob(x, y, np.full(len(x), 0.0028), soft=0.4, min_px=0.5)
    body = ctx.blob([c[0]], [c[1]], [radius * 1.15], soft=0.8, min_px=1.5)
    ctx.out.cf_ops.append(CfOp("blend", (0.42, 0.45, 0.33), 0.6 * body, under_vessels=True))
    ring = np.clip(body - ctx.blob([c[0]], [c[1]], [radius * 0.85], soft=0.8), 0, 1)
    ctx.out.cf_ops.append(CfOp("absorb", (0.55, 0.5, 0.5), ring, under_vessels=True))  # pigment
    ctx.fixed(
        np.maximum(net, 0.3 * body),
        1.5 * bolus(t, ctx.t_choroid + 0.3) + 0.25 * rise(t, ctx.t_choroid, 60),
    )
    late = ctx.spreading(
        np.maximum(net, 0.5 * body),
        max(2.0, 0.05 * ctx.ppu),
        1.1 * rise(t, ctx.t_choroid + 2, 50),
        rise(t, ctx.t_artery + 3, 160),
    )
    ctx.out.mark("cnv", body > 0.5)
    ctx.out.mark("leakage", late > 0.35)
    if rng.random() < 0.6:  # subretinal haemorrhage: a crescent at the margin, blocks
        a0, span = rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 2.0)
        arc = a0 + np.linspace(-span, span, 24) + rng.normal(0, 0.05, 24)
        rho = radius * (1.25 + 0.25 * np.cos(np.linspace(-np.pi, np.pi, 24) / 2) ** 2)
        hx, hy = c[0] + rho * np.cos(arc), c[1] + rho * np.sin(arc)
        m = ctx.blob(hx, hy, radius * rng.uniform(0.25, 0.45, 24), soft=0.7, min_px=1.0)
        m *= 1 - np.clip(body * 1.5, 0, 1)
        ctx.out.cf_ops.append(CfOp("absorb", (0.5, 0.12, 0.1), m, under_vessels=True))
        ctx.out.block *= 1 - 0.9 * m
        ctx.out.mark("haemorrhage", m > 0.5)
        ctx.out.mark("blocking", m > 0.5)
    if rng.random() < 0.75:
        drusen(ctx, c, radius * 1.8 + 0.07)


def _plume(ctx: Ctx, p: tuple[float, float], height: float, progress: np.ndarray) -> np.ndarray:
    """(K, H, W) smokestack snapshots: a column rising from p, mushrooming at its top."""
    anat = ctx.anat
    ux, uy = anat.geom.grid()
    up = p[1] - uy  # distance above the leak point (retina y grows downwards)
    w = max(0.015, 1.0 / ctx.ppu)
    out = []
    for f in progress:
        h = max(f * height, 1.5 / ctx.ppu)
        column = smoothstep(w, 0.5 * w, np.abs(ux - p[0])) * smoothstep(-w, 0, up)
        column *= smoothstep(h, h - w, up)
        cap_r = 0.45 * h + w
        cap = smoothstep(cap_r, 0.7 * cap_r, np.hypot(ux - p[0], (up - h) * 1.4))
        out.append(np.maximum(column, cap).astype(np.float32))
    return np.stack(out)


def central_serous(ctx: Ctx) -> None:
    """A leak point near the fovea under a round serous detachment; the dye pools as a
    growing ink blot, or rises as a smokestack."""
    rng, e, t = ctx.rng, ctx.anat.eye, ctx.times
    a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.04, 0.2)
    p = (e.fovea[0] + d * np.cos(a), e.fovea[1] + d * np.sin(a))
    r_sd = rng.uniform(0.12, 0.24)
    b = rng.uniform(0, 2 * np.pi)
    off = r_sd * rng.uniform(0.0, 0.45)
    sd_c = (p[0] + off * np.cos(b), p[1] + off * np.sin(b))
    sd = ctx.blob([sd_c[0]], [sd_c[1]], [r_sd], soft=0.5, min_px=2.0)
    edge = ctx.blob([sd_c[0]], [sd_c[1]], [r_sd * 1.04], soft=0.25) - sd
    ctx.out.cf_ops.append(CfOp("absorb", (0.86, 0.82, 0.74), sd, under_vessels=True))
    ctx.out.cf_ops.append(CfOp("blend", (0.95, 0.75, 0.45), 0.12 * sd, under_vessels=True))
    ctx.out.cf_ops.append(CfOp("add", (0.09, 0.09, 0.08), np.clip(edge, 0, 1)))
    ctx.out.mark("serous-detachment", sd > 0.5)
    progress = np.linspace(0.0, 1.0, 5)
    if rng.random() < 0.6:  # ink blot
        r_max = r_sd * rng.uniform(0.35, 0.6)
        snaps = np.stack(
            [
                ctx.blob([p[0]], [p[1]], [max(f * r_max, 0.01)], soft=0.9, min_px=0.8)
                for f in progress
            ]
        )
    else:
        snaps = _plume(ctx, p, (r_sd + off) * rng.uniform(0.6, 0.9), progress)
    snaps = ndimage.gaussian_filter(snaps, (0, 0.6, 0.6)) * np.clip(sd * 1.3, 0, 1)[None]
    snaps /= np.maximum(snaps.max(axis=(1, 2), keepdims=True), 1e-6)
    grow = rise(t, ctx.t_vein, 240)
    amp = 1.2 * rise(t, ctx.t_artery + 1, 20) + 0.3 * rise(t, ctx.t_vein, 200)
    ctx.out.terms.append(FfaTerm(snaps, 4 * grow, amp))
    ctx.out.mark("leakage", snaps[-1] > 0.4)
