"""Retinal vessel trees: arteries and veins leaving the disc, branching and tapering.

Geometry lives in *retina units* (image half-width = 1, y down, right-eye layout:
disc right of the fovea). The superior and inferior temporal arcades are arcs
around the fovea; nasal trunks and small papillomacular vessels are curved
random walks. Each generation of branches is drawn for all parents at once, as
(n, S) arrays of steps of `DS` units, so a tree costs a few dozen numpy calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DS = 0.006  # step along a vessel, retina units
TRUNKS = ("superotemporal", "inferotemporal", "superonasal", "inferonasal", "macular")
ST, IT, SN, IN, MAC = range(5)
FOV_R = 1.02  # vessels stop a little outside the camera's field
R_MIN = 0.0022  # thinner children are not drawn
MAX_DEPTH = 3


@dataclass
class Level:
    """One generation of branches, each a row of S steps."""

    x: np.ndarray  # (n, S)
    y: np.ndarray  # (n, S)
    h: np.ndarray  # (n, S) heading, radians
    r: np.ndarray  # (n, S) radius, units
    s: np.ndarray  # (n, S) path length from the disc, units
    valid: np.ndarray  # (n, S) bool
    trunk: np.ndarray  # (n,) int
    depth: int


@dataclass
class Tree:
    kind: str  # "artery" / "vein"
    levels: list[Level] = field(default_factory=list)

    def points(self, px_per_unit: float, spacing_px: float = 0.35) -> dict[str, np.ndarray]:
        """Flat (N,) point arrays resampled so neighbours are <= `spacing_px` apart.

        `node` marks the generated points (independent of `px_per_unit`): lesions
        anchored on vessels pick among those, so they sit alike at every size.
        """
        names = ("x", "y", "r", "s", "trunk", "depth", "node")
        out: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for lv in self.levels:
            r_px = max(float(np.median(lv.r[lv.valid])) * px_per_unit, 0.6) if lv.valid.any() else 1
            sub = max(1, int(np.ceil(DS * px_per_unit / max(spacing_px, 0.4 * r_px))))
            ok = lv.valid[:, :-1] & lv.valid[:, 1:]  # (n, S-1) segments with both ends drawn
            f = (np.arange(sub, dtype=np.float32) / sub)[None, None, :]
            for name, arr in (("x", lv.x), ("y", lv.y), ("r", lv.r), ("s", lv.s)):
                a0, a1 = arr[:, :-1, None], arr[:, 1:, None]
                out[name].append((a0 + (a1 - a0) * f)[ok].ravel())
            n_pts = int(ok.sum()) * sub
            trunk = np.broadcast_to(lv.trunk[:, None, None], ok.shape + (sub,))[ok].ravel()
            out["trunk"].append(trunk)
            out["depth"].append(np.full(n_pts, lv.depth, np.int8))
            node = np.zeros(ok.shape + (sub,), bool)
            node[..., 0] = True  # the generated points themselves: the same at every size
            out["node"].append(node[ok].ravel())
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


@dataclass(frozen=True)
class Eye:
    """Where the disc and fovea are, in retina units (right-eye layout)."""

    fovea: tuple[float, float]
    disc: tuple[float, float]
    disc_r: float
    faz_r: float


def _smooth_curvature(rng: np.random.Generator, n: int, steps: int, sd: float) -> np.ndarray:
    """(n, steps) curvature (rad/unit): Gaussian knots every 0.06 units, linearly joined."""
    knot = 0.06
    k = int(np.ceil(steps * DS / knot)) + 2
    knots = rng.normal(0.0, sd, (n, k))
    pos = np.arange(steps) * DS / knot
    j = pos.astype(int)
    frac = (pos - j)[None, :]
    return knots[:, j] * (1 - frac) + knots[:, j + 1] * frac


def walk(
    rng: np.random.Generator,
    x0: np.ndarray,
    y0: np.ndarray,
    h0: np.ndarray,
    length: np.ndarray,
    curv: np.ndarray,
    curv_sd: float = 2.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Curved walks from (x0, y0) heading h0: x, y, h (n, S) and s (1, S)."""
    steps = max(2, int(np.ceil(length.max() / DS)))
    kappa = curv[:, None] + _smooth_curvature(rng, len(x0), steps, curv_sd)  # (n, S)
    h = h0[:, None] + np.cumsum(kappa * DS, axis=1)
    x = x0[:, None] + np.cumsum(np.cos(h) * DS, axis=1)
    y = y0[:, None] + np.cumsum(np.sin(h) * DS, axis=1)
    s = (np.arange(steps) + 1.0)[None, :] * DS
    return x, y, h, s


def _arcade(rng: np.random.Generator, eye: Eye, sign: int, r_arc: float) -> np.ndarray:
    """(2, S) points of a temporal arcade: up (sign=-1) or down (+1) and around the fovea."""
    fx, fy = eye.fovea
    dx, dy = eye.disc[0] - fx, eye.disc[1] - fy
    r0, beta = np.hypot(dx, dy), np.arctan2(dy, dx)
    phi = np.linspace(0.0, 2.75, 800)
    bend = rng.uniform(1.45, 1.75)  # past the top of the arch the arcade runs temporally
    radius = r_arc + (r0 - r_arc) * np.exp(-((phi / rng.uniform(0.8, 1.0)) ** 2))
    flat = (np.sin(bend) / np.sin(np.maximum(phi, bend))) ** rng.uniform(0.75, 0.95)
    radius = radius * flat + 0.015 * np.sin(phi * rng.uniform(2, 4) + rng.uniform(0, 6.3))
    ang = beta + sign * phi
    pts = np.stack([fx + radius * np.cos(ang), fy + radius * np.sin(ang)])
    seg = np.hypot(*np.diff(pts, axis=1))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.arange(DS, arc[-1], DS)
    return np.stack([np.interp(s, arc, pts[0]), np.interp(s, arc, pts[1])])


def _trunks(rng: np.random.Generator, eye: Eye, root_r: float) -> Level:
    """The five trunks of one tree as a Level of depth 0 (rows padded to equal length)."""
    dx, dy = eye.disc
    rows = []
    for sign in (-1, 1):
        rows.append(_arcade(rng, eye, sign, rng.uniform(0.36, 0.46)))
    for sign in (-1, 1):  # nasal: up/down then bending nasally (+x)
        h0 = np.array([sign * rng.uniform(0.9, 1.35)])
        x, y, _, _ = walk(
            rng,
            np.array([dx]),
            np.array([dy]),
            h0,
            np.array([0.9]),
            np.array([-sign * rng.uniform(0.6, 1.6)]),
            curv_sd=1.0,
        )
        rows.append(np.stack([x[0], y[0]]))
    fx, fy = eye.fovea
    h0 = np.arctan2(fy - dy, fx - dx) + rng.uniform(-0.25, 0.25)
    x, y, _, _ = walk(
        rng,
        np.array([dx]),
        np.array([dy]),
        np.array([h0]),
        np.array([0.5]),
        np.zeros(1),
        curv_sd=1.5,
    )
    rows.append(np.stack([x[0], y[0]]))
    steps = max(r.shape[1] for r in rows)
    xy = np.full((len(rows), 2, steps), np.nan)
    for i, r in enumerate(rows):
        xy[i, :, : r.shape[1]] = r
    x, y = xy[:, 0], xy[:, 1]
    valid = ~np.isnan(x)
    x, y = np.nan_to_num(x), np.nan_to_num(y)
    h = np.arctan2(np.gradient(y, axis=1), np.gradient(x, axis=1))
    s = (np.arange(steps) * DS)[None, :].repeat(len(rows), 0)
    length = valid.sum(1) * DS
    r0 = root_r * np.array([1.0, 1.0, 0.8, 0.8, 0.35]) * rng.uniform(0.9, 1.1, len(rows))
    r = r0[:, None] * (1 - 0.6 * s / length[:, None])
    return _clip(Level(x, y, h, r, s, valid, np.arange(len(rows)), 0), eye)


def _clip(lv: Level, eye: Eye) -> Level:
    """End each branch where it leaves the field or reaches the foveal avascular zone."""
    inside = np.hypot(lv.x, lv.y) < FOV_R
    clear = np.hypot(lv.x - eye.fovea[0], lv.y - eye.fovea[1]) > eye.faz_r + 0.015
    lv.valid &= np.logical_and.accumulate(inside & clear, axis=1)
    return lv


def _children(rng: np.random.Generator, parent: Level, eye: Eye, interval: float) -> Level | None:
    """One generation of side branches from every row of `parent`."""
    length = parent.valid.sum(1) * DS
    count = rng.poisson(length / interval)
    rep = np.repeat(np.arange(len(length)), count)
    if len(rep) == 0:
        return None
    at = ((0.08 + 0.87 * rng.random(len(rep))) * length[rep] / DS).astype(int)
    px, py, ph = parent.x[rep, at], parent.y[rep, at], parent.h[rep, at]
    to_fovea = np.arctan2(eye.fovea[1] - py, eye.fovea[0] - px) - ph
    fovea_side = np.sign(np.sin(to_fovea))  # +1: the fovea is on the left-turn side
    outward = rng.random(len(rep)) < 0.62
    side = np.where(outward, -fovea_side, fovea_side)
    h0 = ph + side * rng.uniform(0.45, 1.1, len(rep))
    r0 = parent.r[rep, at] * rng.uniform(0.45, 0.78, len(rep)) * np.where(outward, 1.0, 0.8)
    keep = r0 >= R_MIN
    if not keep.any():
        return None
    rep, at, px, py, h0, r0, side, outward = (
        a[keep] for a in (rep, at, px, py, h0, r0, side, outward)
    )
    n = len(rep)
    length = np.clip(r0 * rng.uniform(55, 110, n) * np.where(outward, 1.0, 0.6), 0.05, 1.0)
    curv = -side * rng.uniform(0.0, 3.0, n)  # bend back towards the parent's course
    x, y, h, s = walk(rng, px, py, h0, length, curv, curv_sd=4.0)
    valid = s <= length[:, None]
    r = r0[:, None] * (1 - 0.5 * np.minimum(s / length[:, None], 1.0))
    s_path = parent.s[rep, at][:, None] + s
    return _clip(Level(x, y, h, r, s_path, valid, parent.trunk[rep], parent.depth + 1), eye)


def add_tortuosity(lv: Level, rng: np.random.Generator, amp: np.ndarray, start: np.ndarray) -> None:
    """Wiggle rows sideways: amplitude `amp[trunk]` radii beyond path length `start[trunk]`."""
    a = amp[lv.trunk][:, None]
    if not np.any(a > 0):
        return
    n = (len(lv.trunk), 1)
    wave = 0.7 * np.sin(2 * np.pi * lv.s / rng.uniform(0.08, 0.14, n) + rng.uniform(0, 6.3, n))
    wave += 0.5 * np.sin(2 * np.pi * lv.s / rng.uniform(0.03, 0.06, n) + rng.uniform(0, 6.3, n))
    ramp = np.clip((lv.s - start[lv.trunk][:, None]) / 0.05, 0, 1)
    off = a * lv.r * ramp * wave
    lv.x -= off * np.sin(lv.h)
    lv.y += off * np.cos(lv.h)


def grow_tree(
    rng: np.random.Generator,
    eye: Eye,
    kind: str,
    root_r: float,
    dilate: np.ndarray | None = None,
    tortuous: np.ndarray | None = None,
    occlusion_s: np.ndarray | None = None,
) -> Tree:
    """A full artery or vein tree. Per-trunk (5,) `dilate` factors and `tortuous`
    amplitudes apply beyond `occlusion_s` (path length from the disc)."""
    tree = Tree(kind)
    lv: Level | None = _trunks(rng, eye, root_r)
    intervals = (0.13, 0.13, 0.14)
    while lv is not None:
        tree.levels.append(lv)
        lv = _children(rng, lv, eye, intervals[lv.depth]) if lv.depth < MAX_DEPTH else None
    if dilate is not None or tortuous is not None:
        start = occlusion_s if occlusion_s is not None else np.zeros(len(TRUNKS))
        for lv in tree.levels:
            if dilate is not None:
                ramp = np.clip((lv.s - start[lv.trunk][:, None]) / 0.05, 0, 1)
                lv.r = lv.r * (1 + (dilate[lv.trunk][:, None] - 1) * ramp)
            if tortuous is not None:
                add_tortuosity(lv, rng, tortuous, start)
    return tree
