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
DEFAULT_FOV_DEG = 45.0  # the field of view the retina units are laid out for (zoom 1)
FOV_DEG_RANGE = (20.0, 70.0)  # fields of view a phantom camera may have
CIRCLE_RANGE = (0.5, 1.5)  # the circle's diameter over the frame's height
ASPECT_RANGE = (0.5, 3.0)  # the frame's width over its height


@dataclass(frozen=True)
class Geometry:
    """Retina units (right-eye layout) -> FFA pixels: mirror (OS), rotate, shift, scale.

    The camera's square is `size` pixels a side, its aperture (the FOV circle) centred,
    FOV_R half-sides in radius; `zoom` > 1 magnifies the retina in it (a narrower field
    of view: `zoom = DEFAULT_FOV_DEG / fov_deg`)."""

    size: int
    mirror: bool
    rot: float  # radians, FFA relative to CF
    shift: tuple[float, float]  # (dx, dy) retina units, FFA relative to CF
    zoom: float = 1.0

    @property
    def half(self) -> float:  # half the camera square's side, pixels
        return self.size / 2

    @property
    def ppu(self) -> float:  # pixels per retina unit
        return self.half * self.zoom

    def to_px(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = -x if self.mirror else x
        c, s = np.cos(self.rot), np.sin(self.rot)
        xr = c * x - s * y + self.shift[0]
        yr = s * x + c * y + self.shift[1]
        z, h = self.zoom, self.half
        return ((xr * z + 1) * h - 0.5).astype(np.float32), ((yr * z + 1) * h - 0.5).astype(
            np.float32
        )

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Retina coordinates (H, W) of every FFA pixel centre (inverse of `to_px`)."""
        v = ((np.arange(self.size, dtype=np.float32) + 0.5) / self.half - 1) / self.zoom
        xr = v[None, :] - self.shift[0]
        yr = v[:, None] - self.shift[1]
        c, s = np.cos(self.rot), np.sin(self.rot)
        x = c * xr + s * yr
        y = -s * xr + c * yr
        return (-x if self.mirror else x).astype(np.float32), y.astype(np.float32)

    def registration_px(self) -> tuple[float, float, float]:
        """(dx, dy, degrees): FFA pixel = R(deg) (CF pixel - centre) + centre + (dx, dy),
        centre = the camera square's (the FOV circle's) centre."""
        return (self.shift[0] * self.ppu, self.shift[1] * self.ppu, float(np.degrees(self.rot)))


Range = tuple[float, float]


def _as_range(name: str, value: float | Range, bounds: Range) -> Range:
    """A value or (lo, hi) → (lo, hi) within `bounds`; ValueError naming `name`."""
    lo, hi = (value, value) if np.isscalar(value) else tuple(value)
    lo, hi = float(lo), float(hi)
    if not (bounds[0] <= lo <= hi <= bounds[1]):
        raise ValueError(
            f"{name} must be a value or a range lo-hi within {bounds[0]:g}-{bounds[1]:g}, "
            f"got {value!r}"
        )
    return lo, hi


def parse_aspect(text: str) -> float:
    """ "3:2", "4:3" or "1.5" → width / height; ValueError naming --aspect."""
    try:
        parts = [float(p) for p in str(text).split(":")]
        value = parts[0] / parts[1] if len(parts) == 2 else parts[0]
        if len(parts) > 2 or not np.isfinite(value):
            raise ValueError
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--aspect must be W:H (e.g. 3:2) or a number, got {text!r}") from None
    return value


def parse_range(name: str, text: str | None) -> float | Range | None:
    """ "30-55" → (30.0, 55.0), "45" → 45.0, None → None; ValueError naming `name`."""
    if text is None:
        return None
    try:
        parts = [float(p) for p in str(text).split("-")]
        if not 1 <= len(parts) <= 2 or not all(np.isfinite(parts)):
            raise ValueError
    except ValueError:
        raise ValueError(f"{name} must be a value or a range lo-hi, got {text!r}") from None
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def framing_options(aspect: str, fov_deg: str | None, circle: str | None, shift: float) -> dict:
    """The CLI's texts → checked `phantom_case` keywords; ValueError naming the option."""
    options = {
        "aspect": parse_aspect(aspect),
        "fov_deg": parse_range("--fov-deg", fov_deg),
        "circle": parse_range("--circle", circle),
        "shift": float(shift),
    }
    try:
        FrameOptions.of(**options)
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None
    return options


@dataclass(frozen=True)
class FrameOptions:
    """How a cohort's camera frames the retina. The default is the square frame whose
    circle fills FOV_R of it at DEFAULT_FOV_DEG; a real cohort has wider frames (aspect
    3:2: black sides), fields of view from 30 to 55 degrees, circles cut at the top and
    bottom (diameter over frame height > 1) and off-centre circles. Ranges are drawn per
    case, uniformly."""

    aspect: float = 1.0  # frame width / height
    fov_deg: Range = (DEFAULT_FOV_DEG, DEFAULT_FOV_DEG)
    circle: Range = (FOV_R, FOV_R)  # the circle's diameter / frame height
    shift: float = 0.0  # the circle's centre moves up to this x the frame height, x and y

    @classmethod
    def of(
        cls,
        aspect: float = 1.0,
        fov_deg: float | Range | None = None,
        circle: float | Range | None = None,
        shift: float = 0.0,
    ) -> FrameOptions:
        """Checked options (ValueError naming the bad one); None: the default."""
        if not ASPECT_RANGE[0] <= float(aspect) <= ASPECT_RANGE[1]:
            raise ValueError(f"aspect must be within {ASPECT_RANGE}, got {aspect!r}")
        if not 0.0 <= float(shift) <= 0.25:
            raise ValueError(f"shift must be within 0-0.25 of the frame height, got {shift!r}")
        return cls(
            float(aspect),
            _as_range("fov_deg", DEFAULT_FOV_DEG if fov_deg is None else fov_deg, FOV_DEG_RANGE),
            _as_range("circle", FOV_R if circle is None else circle, CIRCLE_RANGE),
            float(shift),
        )

    @property
    def is_default(self) -> bool:
        return self == FrameOptions()


@dataclass(frozen=True)
class Framing:
    """One case's camera square (`side` px, rendered as today) in its photo frame
    (height x width): its first column and row there (negative: cut off) and the zoom."""

    height: int
    width: int
    side: int
    left: int
    top: int
    zoom: float = 1.0

    @property
    def circle(self) -> tuple[float, float, float]:
        """The FOV circle (cx, cy, r) in frame pixels (pixel centres at integers)."""
        c = (self.side - 1) / 2
        return (self.left + c, self.top + c, FOV_R * self.side / 2)

    def place(self, img: np.ndarray) -> np.ndarray:
        """(side, side, ...) → (height, width, ...): the square in the frame, black around."""
        if (self.height, self.width, self.left, self.top) == (self.side, self.side, 0, 0):
            return img
        out = np.zeros((self.height, self.width, *img.shape[2:]), img.dtype)
        y0, y1 = max(self.top, 0), min(self.top + self.side, self.height)
        x0, x1 = max(self.left, 0), min(self.left + self.side, self.width)
        out[y0:y1, x0:x1] = img[y0 - self.top : y1 - self.top, x0 - self.left : x1 - self.left]
        return out


def plan_framing(rng: np.random.Generator, size: int, options: FrameOptions) -> Framing:
    """The framing of a case `size` pixels high (no draws for the default options)."""
    if options.is_default:
        return Framing(size, size, size, 0, 0)
    fov = rng.uniform(*options.fov_deg)
    diameter = rng.uniform(*options.circle)
    dx, dy = rng.uniform(-options.shift, options.shift, 2) * size
    width = max(1, round(size * options.aspect))
    side = max(8, round(size * diameter / FOV_R))
    left = round((width - side) / 2 + dx)
    top = round((size - side) / 2 + dy)
    return Framing(size, width, side, left, top, DEFAULT_FOV_DEG / fov)


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
    v = (np.arange(n, dtype=np.float32) + 0.5) / geom.half - 1
    cam_r = np.hypot(v[None, :], v[:, None])
    fov_soft = smoothstep(FOV_R + 0.75 / geom.half, FOV_R - 0.75 / geom.half, cam_r)
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
