"""One phantom case: a paired colour photo and angiogram with its ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .anatomy import (
    FrameOptions,
    Geometry,
    Range,
    anatomy_masks,
    build_anatomy,
    make_eye,
    plan_framing,
)
from .cf import render_cf
from .ffa import make_phases, render_ffa
from .layers import Ctx, Lesions
from .lesions import draw_lesions, plan_vessels
from .meta import case_meta, frame_times
from .vessels import grow_tree

_SALT_RENDER = 21
_SALT_FRAME = 22
MIN_SIZE, MAX_SIZE = 32, 4096


@dataclass(eq=False)
class PhantomCase:
    case_id: str
    patient_id: str
    eye: str  # "OD" / "OS"
    age: int
    sex: str
    diagnosis: str
    lesions: list[str]  # names from cohort.LESIONS
    split: str
    cf: np.ndarray  # (H, W, 3) uint8 RGB
    ffa: np.ndarray  # (T, H, W) uint8
    times_s: np.ndarray  # (T,) float64 s after injection, strictly increasing
    masks: dict[str, np.ndarray]  # lesion -> (H, W) bool, FFA coords; leakage: its late extent
    fov: np.ndarray  # (H, W) bool
    # Extra ground truth (FFA coordinates), for tests and scoring:
    anatomy: dict[str, np.ndarray] = field(default_factory=dict)  # artery, vein, vein_wall, ...
    phases_s: dict[str, float] = field(default_factory=dict)  # choroidal, arterial, laminar, ...
    # CF -> FFA: dx, dy px, degrees, about the FOV circle's centre (`Geometry.registration_px`)
    registration: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fov_circle: tuple[float, float, float] = (0.0, 0.0, 0.0)  # true cx, cy, r px (CF and FFA)


def check_params(size: int, frames: int) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    if frames < 2:
        raise ValueError(f"frames must be at least 2, got {frames}")


def phantom_case(
    seed: int,
    index: int,
    *,
    size: int = 128,
    frames: int = 16,
    aspect: float = 1.0,
    fov_deg: float | Range | None = None,
    circle: float | Range | None = None,
    shift: float = 0.0,
) -> PhantomCase:
    """Case `index` of phantom cohort `seed`, computed from (seed, index) alone.

    Vessels, lesion placement and frame times do not depend on `size` (textures and
    camera noise do), so a case can be rendered again larger. `size` is the frame's
    height; the framing options (`FrameOptions`: `aspect` width / height, `fov_deg` the
    field of view in degrees, `circle` the FOV circle's diameter over the frame height,
    `shift` its centre's offset, up to this x the height; a value or a (lo, hi) range drawn
    per case) default to the square frame of FOV_R at DEFAULT_FOV_DEG. They are drawn from
    their own stream: the eye, its vessels and frame times stay the same draws (lesions
    are kept where the camera sees them); `fov_circle` is the true circle in the frame.
    """
    check_params(size, frames)
    options = FrameOptions.of(aspect, fov_deg, circle, shift)
    framing = plan_framing(np.random.default_rng([seed, index, _SALT_FRAME]), size, options)
    case = _render(seed, index, framing.side, frames, framing.zoom)
    place = framing.place
    case.cf = place(case.cf)
    case.ffa = np.ascontiguousarray(place(case.ffa.transpose(1, 2, 0)).transpose(2, 0, 1))
    case.masks = {k: place(m) for k, m in case.masks.items()}
    case.fov = place(case.fov)
    case.anatomy = {k: place(m) for k, m in case.anatomy.items()}
    case.fov_circle = framing.circle
    return case


def _render(seed: int, index: int, size: int, frames: int, zoom: float) -> PhantomCase:
    """The case on its camera's square, `size` px a side, the retina magnified by `zoom`."""
    meta = case_meta(seed, index)
    r_geo, r_les, r_tex, r_cam = (
        np.random.default_rng(s)
        for s in np.random.SeedSequence([seed, index, _SALT_RENDER]).spawn(4)
    )
    eye, cup_ratio, ovality = make_eye(r_geo)
    rot = np.radians(r_geo.uniform(1.0, 3.0)) * r_geo.choice([-1.0, 1.0])
    a, d = r_geo.uniform(0, 2 * np.pi), r_geo.uniform(0.02, 0.06)
    geom = Geometry(size, meta.eye == "OS", float(rot), (d * np.cos(a), d * np.sin(a)), zoom)
    plan = plan_vessels(r_geo, meta.diagnosis)
    arteries = grow_tree(r_geo, eye, "artery", r_geo.uniform(0.0095, 0.011))
    veins = grow_tree(
        r_geo,
        eye,
        "vein",
        r_geo.uniform(0.012, 0.0135),
        plan.dilate,
        plan.tortuous,
        plan.occlusion_s,
    )
    times = frame_times(r_geo, frames, meta.arrival_s)
    ph = make_phases(r_geo, meta.arrival_s)
    anat = build_anatomy(r_tex, geom, eye, cup_ratio, ovality, arteries, veins)
    les = Lesions(anat.shape, len(anat.vein.pts["x"]))
    ctx = Ctx(r_les, anat, times, ph.choroid, ph.artery, ph.vein, les)
    draw_lesions(ctx, meta.diagnosis, plan)
    cf = render_cf(r_cam, anat, les, meta.pigment, meta.age)
    ffa = render_ffa(r_cam, anat, les, times, ph)
    return PhantomCase(
        case_id=meta.case_id,
        patient_id=meta.patient_id,
        eye=meta.eye,
        age=meta.age,
        sex=meta.sex,
        diagnosis=meta.diagnosis,
        lesions=les.ordered_names(),
        split=meta.split,
        cf=cf,
        ffa=ffa,
        times_s=times.astype(np.float64),
        masks={k: les.masks[k] for k in les.ordered_names()},
        fov=anat.fov,
        anatomy=anatomy_masks(anat),
        phases_s=ph.as_dict(),
        registration=geom.registration_px(),
    )
