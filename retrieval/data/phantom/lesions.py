"""Lesions of each diagnosis, drawn in both modalities with their FFA dynamics.

Diabetic retinopathy and vein occlusions live here; macular disease (wet AMD,
CSC) in `macular.py`. Counts, sizes and positions are drawn per case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .curves import bolus, rise
from .layers import CfOp, Ctx, lacy
from .macular import central_serous, wet_amd
from .vessels import IT, ST, TRUNKS

HAEM = (0.6, 0.2, 0.24)  # absorption of blood in the photo (R, G, B)


@dataclass(frozen=True)
class VesselPlan:
    """How a vein occlusion reshapes the vein tree (per trunk)."""

    affected: np.ndarray  # (5,) bool
    occlusion_s: np.ndarray  # (5,) path length from the disc where the occlusion sits
    dilate: np.ndarray  # (5,) radius factor beyond the occlusion
    tortuous: np.ndarray  # (5,) sideways wiggle amplitude, in radii


def plan_vessels(rng: np.random.Generator, diagnosis: str) -> VesselPlan:
    n = len(TRUNKS)
    affected = np.zeros(n, bool)
    occl = np.zeros(n)
    if diagnosis == "BRVO":
        affected[ST if rng.random() < 0.65 else IT] = True
        occl[:] = rng.uniform(0.15, 0.4)
        dil, tort = rng.uniform(1.35, 1.6), rng.uniform(1.0, 2.0)
    elif diagnosis == "CRVO":
        affected[:] = True
        dil, tort = rng.uniform(1.3, 1.5), rng.uniform(0.8, 1.6)
    else:
        dil, tort = 1.0, 0.0
    return VesselPlan(affected, occl, np.where(affected, dil, 1.0), np.where(affected, tort, 0.0))


def microaneurysms(ctx: Ctx, n: int, leak: bool) -> None:
    e = ctx.anat.eye
    x, y = ctx.around(n, e.fovea, 2 * e.faz_r, 0.6)
    m = ctx.blob(x, y, ctx.rng.uniform(0.005, 0.009, len(x)), soft=0.3, min_px=0.8)
    t = ctx.times
    ctx.out.cf_ops.append(CfOp("absorb", (0.55, 0.15, 0.2), m))
    ctx.fixed(m, 1.3 * bolus(t, ctx.t_artery + 0.3) + 0.35 * rise(t, ctx.t_artery, 90))
    ctx.out.mark("microaneurysm", m > 0.5)
    if leak:
        some = ctx.rng.random(len(x)) < 0.5
        src = ctx.blob(x[some], y[some], np.full(some.sum(), 0.007), min_px=0.75)
        late = ctx.spreading(
            src, max(1.5, 0.014 * ctx.ppu), 0.4 * rise(t, ctx.t_vein, 120), rise(t, ctx.t_vein, 150)
        )
        ctx.out.mark("leakage", late > 0.4)


def haemorrhages(ctx: Ctx, x: np.ndarray, y: np.ndarray, r: np.ndarray) -> None:
    """Dot/blot haemorrhages: dark red, block fluorescence in every phase."""
    m = ctx.blob(*ctx.clusters(x, y, r), soft=0.5, min_px=0.7)
    _blood(ctx, m)


def _blood(ctx: Ctx, m: np.ndarray) -> None:
    ctx.out.cf_ops.append(CfOp("absorb", HAEM, m))
    ctx.out.block *= 1 - 0.85 * m
    ctx.out.mark("haemorrhage", m > 0.5)
    ctx.out.mark("blocking", m > 0.5)


def flames(ctx: Ctx, ax: np.ndarray, ay: np.ndarray, n: int) -> None:
    """Flame haemorrhages beside the given anchor points, along the nerve fibres."""
    if len(ax) == 0 or n == 0:
        return
    rng, e = ctx.rng, ctx.anat.eye
    pick = rng.integers(0, len(ax), n)
    x = ax[pick] + rng.normal(0, 0.025, n)
    y = ay[pick] + rng.normal(0, 0.025, n)
    ang = np.arctan2(y - e.disc[1], x - e.disc[0])  # fibres run radially from the disc
    length = rng.uniform(0.05, 0.11, n)
    f = np.linspace(-0.5, 0.5, 9)[None, :]
    px = x[:, None] + f * length[:, None] * np.cos(ang)[:, None]
    py = y[:, None] + f * length[:, None] * np.sin(ang)[:, None]
    pr = rng.uniform(0.007, 0.012, n)[:, None] * (1 - 0.7 * np.abs(2 * f)) + 0.002
    ok = ctx.inside(px.ravel(), py.ravel(), margin=0.0)
    _blood(ctx, ctx.blob(px.ravel()[ok], py.ravel()[ok], pr.ravel()[ok], soft=0.8, min_px=0.6))


def exudates(ctx: Ctx, n_clusters: int) -> None:
    """Hard exudates: waxy yellow dots in clusters or rings; little FFA effect."""
    rng, e = ctx.rng, ctx.anat.eye
    cx, cy = ctx.around(n_clusters, e.fovea, 0.1, 0.4)
    xs, ys = [], []
    for x0, y0 in zip(cx, cy, strict=True):
        k = int(rng.integers(6, 20))
        if rng.random() < 0.5:  # circinate ring
            a = rng.uniform(0, 2 * np.pi, k)
            rho = rng.uniform(0.04, 0.09) * rng.uniform(0.85, 1.15, k)
        else:
            a, rho = rng.uniform(0, 2 * np.pi, k), np.abs(rng.normal(0, 0.03, k))
        xs.append(x0 + rho * np.cos(a))
        ys.append(y0 + rho * np.sin(a))
    if not xs:
        return
    x, y = np.concatenate(xs), np.concatenate(ys)
    m = ctx.blob(x, y, rng.uniform(0.004, 0.011, len(x)), soft=0.3, min_px=0.6)
    ctx.out.cf_ops.append(CfOp("blend", (0.98, 0.9, 0.5), 0.9 * m))
    ctx.out.block *= 1 - 0.2 * m
    ctx.out.mark("hard-exudate", m > 0.5)


def cotton_wool(ctx: Ctx, ax: np.ndarray, ay: np.ndarray, n: int) -> None:
    """Fluffy white nerve-fibre infarcts near the big vessels; non-perfused in FFA."""
    if len(ax) == 0 or n == 0:
        return
    rng = ctx.rng
    pick = rng.integers(0, len(ax), n)
    x, y = ax[pick] + rng.normal(0, 0.035, n), ay[pick] + rng.normal(0, 0.035, n)
    ok = ctx.inside(x, y)
    r = rng.uniform(0.025, 0.045, n)
    m = ctx.blob(*ctx.clusters(x[ok], y[ok], r[ok], (3, 5)), soft=0.9, min_px=0.8)
    ctx.out.cf_ops.append(CfOp("blend", (0.93, 0.9, 0.82), 0.75 * m))
    ctx.out.perfusion *= 1 - 0.9 * m
    ctx.out.block *= 1 - 0.3 * m
    ctx.out.mark("cotton-wool-spot", m > 0.5)


def non_perfusion(ctx: Ctx, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Capillary dropout: regions that never fill (dark in every phase)."""
    rng = ctx.rng
    x, y, r = ctx.clusters(cx, cy, rng.uniform(0.1, 0.16, len(cx)), (6, 10))
    x, y, r = ctx.clusters(x, y, r * 0.8, (2, 3))  # lobulated, irregular outline
    m = ctx.blob(x, y, r, soft=0.8, min_px=1.0)
    ctx.out.perfusion *= 1 - m
    ctx.out.mark("non-perfusion", m > 0.5)
    return m


def neovascularisation(ctx: Ctx, centre: tuple[float, float], radius: float) -> None:
    """Lacy new vessels: fill early, then leak profusely (a growing, blurring cloud)."""
    t = ctx.times
    x, y = lacy(ctx.rng, centre, radius, int(ctx.rng.integers(14, 24)), ctx.ppu)
    tuft = ctx.blob(x, y, np.full(len(x), 0.0022), soft=0.4, min_px=0.5)
    ctx.out.cf_ops.append(CfOp("absorb", (0.7, 0.35, 0.42), tuft))
    ctx.fixed(tuft, 1.2 * bolus(t, ctx.t_artery + 0.2) + 0.2 * rise(t, ctx.t_artery, 60))
    late = ctx.spreading(
        ndimage.gaussian_filter(tuft, 1.0),
        max(2.5, 0.07 * ctx.ppu),
        1.15 * rise(t, ctx.t_artery + 1, 45),
        rise(t, ctx.t_artery + 2, 150),
    )
    ctx.out.mark("neovascularisation", ndimage.binary_dilation(tuft > 0.35))
    ctx.out.mark("leakage", late > 0.35)


def diabetic(ctx: Ctx, proliferative: bool) -> None:
    rng, e = ctx.rng, ctx.anat.eye
    v = ctx.anat.vein.pts
    big = (v["depth"] <= 1) & v["node"]
    microaneurysms(ctx, int(rng.integers(10, 50 if proliferative else 40)), rng.random() < 0.6)
    n_h = int(rng.integers(4, 25 if proliferative else 20))
    hx, hy = ctx.around(n_h, e.fovea, 0.08, 0.75)
    haemorrhages(ctx, hx, hy, rng.uniform(0.012, 0.03, len(hx)))
    if rng.random() < (0.5 if proliferative else 0.6):
        exudates(ctx, int(rng.integers(1, 4)))
    n_cws = int(rng.integers(1, 6)) if proliferative else int(rng.random() < 0.3)
    cotton_wool(ctx, v["ux"][big], v["uy"][big], n_cws)
    if not proliferative:
        return
    cx, cy = ctx.around(int(rng.integers(1, 4)), e.fovea, 0.45, 0.8)
    non_perfusion(ctx, cx, cy)
    nvd, nve = rng.random() < 0.5, int(rng.integers(1, 3))
    if nvd:
        neovascularisation(ctx, e.disc, rng.uniform(0.08, 0.13))
        nve -= 1
    for x0, y0 in zip(cx[:nve], cy[:nve], strict=False):  # at the edge of the dropout
        a = rng.uniform(0, 2 * np.pi)
        neovascularisation(
            ctx, (x0 + 0.2 * np.cos(a), y0 + 0.2 * np.sin(a)), rng.uniform(0.045, 0.08)
        )


def vein_occlusion(ctx: Ctx, plan: VesselPlan, central: bool) -> None:
    """BRVO (one quadrant) / CRVO (all): dilated tortuous veins filling late, flame
    haemorrhages, cotton-wool spots, non-perfusion, late wall staining and leakage."""
    rng, anat, e, t = ctx.rng, ctx.anat, ctx.anat.eye, ctx.times
    v = anat.vein.pts
    beyond = np.clip((v["s"] - plan.occlusion_s[v["trunk"]]) / 0.05, 0, 1)
    aff = plan.affected[v["trunk"]] * beyond  # (N,) 0..1
    ctx.out.vein_delay += (aff * rng.uniform(6.0, 12.0)).astype(np.float32)
    ctx.out.wall_stain += (aff * rng.uniform(0.35, 0.6)).astype(np.float32)
    layer = anat.vein
    aff_px = (layer.take(aff) > 0.5) & (layer.profile > 0.4)
    ctx.out.mark("tortuous-veins", aff_px & anat.fov)
    ctx.out.mark("delayed-filling", aff_px & anat.fov)
    wall = (layer.take(aff) > 0.5) & (layer.hit.q > 0.45) & (layer.hit.q < 1.3)
    ctx.out.mark("staining", wall & anat.fov)
    sel = (aff > 0.5) & (v["depth"] <= 2) & v["node"]
    if not sel.any():  # the occluded branch lies outside the field: anchor on any vein
        sel = v["node"] & (v["depth"] <= 2)
    ax, ay = v["ux"][sel], v["uy"][sel]
    flames(ctx, ax, ay, int(rng.integers(50, 110) if central else rng.integers(15, 40)))
    if central:
        hx, hy = ctx.around(int(rng.integers(10, 25)), e.fovea, 0.1, 0.8)
        haemorrhages(ctx, hx, hy, rng.uniform(0.012, 0.03, len(hx)))
        ctx.out.disc_swelling = rng.uniform(0.5, 1.0)
    cotton_wool(ctx, ax, ay, int(rng.integers(0, 6 if central else 4)))
    if rng.random() < (0.4 if central else 0.7):
        k = int(rng.integers(2, 5) if central else rng.integers(1, 3))
        pick = rng.integers(0, len(ax), k)
        a = rng.uniform(0, 2 * np.pi, k)
        cx, cy = ax[pick] + 0.08 * np.cos(a), ay[pick] + 0.08 * np.sin(a)
        ok = ctx.inside(cx, cy)
        non_perfusion(ctx, cx[ok], cy[ok])
    near = sel & (np.hypot(v["ux"] - e.fovea[0], v["uy"] - e.fovea[1]) < 0.5)
    src_i = np.flatnonzero(near if near.sum() > 20 else sel)
    src_i = rng.choice(src_i, min(len(src_i), 40), replace=False)
    src = ctx.blob(v["ux"][src_i], v["uy"][src_i], np.full(len(src_i), 0.03), soft=0.8)
    if central:
        src = np.maximum(src, (anat.rho_disc < 1.1).astype(np.float32))
    late = ctx.spreading(
        src, max(2.0, 0.04 * ctx.ppu), 0.6 * rise(t, ctx.t_vein + 5, 120), rise(t, ctx.t_vein, 200)
    )
    ctx.out.mark("leakage", (late > 0.4) & anat.fov)


def draw_lesions(ctx: Ctx, diagnosis: str, plan: VesselPlan) -> None:
    """Draw every lesion of `diagnosis` into `ctx.out`."""
    if diagnosis in ("NPDR", "PDR"):
        diabetic(ctx, diagnosis == "PDR")
    elif diagnosis in ("BRVO", "CRVO"):
        vein_occlusion(ctx, plan, diagnosis == "CRVO")
    elif diagnosis == "wet-AMD":
        wet_amd(ctx)
    elif diagnosis == "CSC":
        central_serous(ctx)
    elif diagnosis != "normal":
        raise ValueError(f"unknown diagnosis {diagnosis!r}")
    for name in list(ctx.out.masks):  # ground truth is what shows inside the field
        ctx.out.masks[name] &= ctx.anat.fov
        if not ctx.out.masks[name].any():
            del ctx.out.masks[name]
            ctx.out.names.discard(name)
