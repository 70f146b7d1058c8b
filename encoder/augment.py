"""Augmentations for contrastive training, on model-space tensors in [-1, 1] (black = -1):
geometry, what other cameras do (resolution, a narrower field of view, a frame that cuts
the circle, JPEG compression), exposure, colour balance and focus.

The camera augmentations mimic what a photo from another camera looks like *after* the
query path's field-of-view normalisation (`encoder.fov.fov_square`): a narrower field
of view is cropped to its circle there, so here it is the content zoomed in, inside the
standard circle; a frame cut at the top and bottom stays cut (black bands).

Pure torch with an explicit `torch.Generator`, so a seeded run is reproducible on CPU.
The two sides of a CF / FFA pair are augmented independently; all frames of one FFA
video share one geometric transform and one photometric jitter (one acquisition),
frames get an extra small exposure wobble of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from .errors import ConfigError
from .fov import FOV_FILL


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 8.0  # uniform ± rotation about the image centre
    shift: float = 0.02  # uniform ± translation, fraction of the image side
    scale: float = 0.03  # uniform 1 ± zoom
    brightness: float = 0.15  # additive, in [0, 1] intensity units
    contrast: float = 0.2  # multiplicative 1 ± around the image mean
    gamma: float = 0.25  # exposure curve x ** exp(± gamma)
    colour: float = 0.08  # per-channel gain 1 ± (CF only)
    blur_prob: float = 0.3  # probability of a Gaussian blur
    blur_sigma: float = 1.2  # its sigma is uniform in [0.3, blur_sigma] pixels
    frame_jitter: float = 0.05  # per-frame multiplicative exposure wobble (FFA only)
    downscale_prob: float = 0.25  # probability of a lower-resolution camera: down, then up
    downscale_min: float = 0.35  # its scale factor is uniform in [downscale_min, 1]
    aperture_prob: float = 0.2  # probability of a narrower field of view ...
    aperture_min: float = 0.75  # ... its radius over the usual one, uniform in [min, 1]
    frame_cut_prob: float = 0.15  # probability of a frame that cuts the top and bottom ...
    frame_cut_min: float = 0.7  # ... keeping a centred band of [min, 1] of the height
    jpeg_prob: float = 0.5  # probability of JPEG compression (CF only) ...
    jpeg_quality_min: int = 10  # ... at a quality uniform in [min, 95]

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ConfigError(f"augment {name} must be >= 0, got {value}")
        for name in (
            "blur_prob",
            "downscale_prob",
            "aperture_prob",
            "downscale_min",
            "aperture_min",
            "frame_cut_prob",
            "frame_cut_min",
            "jpeg_prob",
        ):
            if getattr(self, name) > 1:
                raise ConfigError(f"augment {name} must be <= 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality_min <= 95:
            raise ConfigError(
                f"augment jpeg_quality_min must be in [1, 95], got {self.jpeg_quality_min}"
            )


def _uniform(n: int, half: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=g).to(device) * 2 - 1) * half  # (n,)


def _affine(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One random rotation + shift + zoom per item of (B, C, S, S); black fill."""
    b, dev = x.shape[0], x.device
    angle = _uniform(b, math.radians(cfg.rotate_deg), g, dev)
    zoom = 1 + _uniform(b, cfg.scale, g, dev)
    tx, ty = _uniform(b, 2 * cfg.shift, g, dev), _uniform(b, 2 * cfg.shift, g, dev)
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    return _warp(x, theta)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) resampled through per-item affine matrices theta (B, 2, 3) (output →
    input, in [-1, 1] coordinates); what comes from outside the image is black."""
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)  # (B, S, S, 2)
    # sample x + 1 (black = 0) with zero padding, so the outside stays black
    y = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return y - 1


def _blur(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur of a random subset of items of (B, C, S, S), separable, per-item sigma."""
    b, c = x.shape[:2]
    apply = torch.rand(b, generator=g) < cfg.blur_prob  # (B,)
    sigma = 0.3 + torch.rand(b, generator=g) * max(cfg.blur_sigma - 0.3, 0.0)  # (B,)
    if not apply.any() or cfg.blur_sigma <= 0:
        return x
    radius = max(1, math.ceil(2 * cfg.blur_sigma))
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).to(x.device)  # (B, 2r + 1)
    idx = apply.nonzero()[:, 0].to(x.device)
    y = x[idx] + 1  # (b', C, S, S), black = 0
    kk = k[idx].repeat_interleave(c, 0)  # (b' * C, 2r + 1)
    n = y.shape[0]
    y = y.reshape(1, n * c, *y.shape[2:])
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0)), kk[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius)), kk[:, None, :, None], groups=n * c)
    out = x.clone()
    out[idx] = y.reshape(n, c, *x.shape[2:]) - 1
    return out


def _radius(s: int, device: torch.device) -> torch.Tensor:
    """(S, S) distance of each pixel centre from the image centre, 1 = half the side."""
    r = (torch.arange(s, device=device, dtype=torch.float32) + 0.5) / s * 2 - 1  # (S,)
    return (r[None, :] ** 2 + r[:, None] ** 2).sqrt()


def _narrower_fov(x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """(b, C, S, S) seen through a field of view `radius` (b,) times the usual one, after
    FOV normalisation: the content zoomed by 1 / radius about the centre, black outside
    the standard circle (FOV_FILL of the side)."""
    zero = torch.zeros_like(radius)
    theta = torch.stack(
        [torch.stack([radius, zero, zero], 1), torch.stack([zero, radius, zero], 1)], 1
    )
    return _warp(x, theta).masked_fill(_radius(x.shape[-1], x.device) > FOV_FILL, -1.0)


def _camera(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """What other cameras do to (B, C, S, S), each to a random subset: a lower resolution
    (resampled down and back up), a narrower field of view, a frame that cuts the circle
    at the top and bottom."""
    b, _, s, _ = x.shape
    down = torch.rand(b, generator=g) < cfg.downscale_prob  # (B,)
    factor = cfg.downscale_min + torch.rand(b, generator=g) * (1 - cfg.downscale_min)
    stop = torch.rand(b, generator=g) < cfg.aperture_prob
    radius = cfg.aperture_min + torch.rand(b, generator=g) * (1 - cfg.aperture_min)
    cut = torch.rand(b, generator=g) < cfg.frame_cut_prob
    kept = cfg.frame_cut_min + torch.rand(b, generator=g) * (1 - cfg.frame_cut_min)
    if not (down.any() or stop.any() or cut.any()):
        return x
    out = x.clone()
    for i in down.nonzero()[:, 0].tolist():
        side = max(8, round(s * float(factor[i])))
        small = F.interpolate(x[i : i + 1], size=(side, side), mode="bilinear", antialias=True)
        out[i] = F.interpolate(small, size=(s, s), mode="bilinear")[0]
    if stop.any():
        idx = stop.nonzero()[:, 0]
        out[idx.to(x.device)] = _narrower_fov(out[idx.to(x.device)], radius[idx])
    for i in cut.nonzero()[:, 0].tolist():
        band = round(s * (1 - float(kept[i])) / 2)
        if band:
            out[i, :, :band] = -1.0
            out[i, :, s - band :] = -1.0
    return out


def _jpeg(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """JPEG compression of a random subset of CF items (B, 3, S, S), each at its own
    quality (torchvision's libjpeg, on the CPU, with 4:2:0 chroma as cameras store it:
    the colour detail that a compressed query photo loses)."""
    b = x.shape[0]
    apply = torch.rand(b, generator=g) < cfg.jpeg_prob
    quality = torch.randint(cfg.jpeg_quality_min, 96, (b,), generator=g)
    if not apply.any():
        return x
    out = x.clone()
    for i in apply.nonzero()[:, 0].tolist():
        u8 = ((x[i].detach().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        back = decode_jpeg(encode_jpeg(u8, quality=int(quality[i])))  # (3, S, S) uint8
        out[i] = (back.to(x.device, torch.float32) / 127.5 - 1).where(x[i] > -1, x[i])
    return out


def _photometric(
    x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator, colour: bool
) -> torch.Tensor:
    """Exposure jitter of (B, C, S, S) in [0, 1] units: gamma, contrast, brightness, gains."""
    b, dev = x.shape[0], x.device
    u = ((x + 1) / 2).clamp(0, 1)  # (B, C, S, S) in [0, 1]
    gamma = torch.exp(_uniform(b, cfg.gamma, g, dev))[:, None, None, None]
    u = u.clamp_min(1e-6).pow(gamma)
    mean = u.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1 + _uniform(b, cfg.contrast, g, dev))[:, None, None, None]
    u = (u - mean) * contrast + mean + _uniform(b, cfg.brightness, g, dev)[:, None, None, None]
    if colour:
        gains = 1 + (torch.rand(b, x.shape[1], generator=g).to(dev) * 2 - 1) * cfg.colour
        u = u * gains[..., None, None]
    return (u.clamp(0, 1) * 2 - 1).where(x > -1, x)  # black surround stays black


def augment_cf(
    cf: torch.Tensor, g: torch.Generator, cfg: AugmentConfig | None = None
) -> torch.Tensor:
    """CF (B, 3, S, S) in [-1, 1] → augmented (B, 3, S, S): affine, camera, exposure,
    colour, blur, JPEG."""
    cfg = cfg or AugmentConfig()
    x = _photometric(_camera(_affine(cf, cfg, g), cfg, g), cfg, g, colour=True)
    return _jpeg(_blur(x, cfg, g), cfg, g)


def augment_video(
    frames: torch.Tensor, g: torch.Generator, cfg: AugmentConfig | None = None
) -> torch.Tensor:
    """FFA (B, T, S, S) in [-1, 1] → augmented (B, T, S, S).

    One affine, exposure curve and blur per video (frames as channels), then a small
    per-frame exposure wobble.
    """
    cfg = cfg or AugmentConfig()
    b, t = frames.shape[:2]
    x = _photometric(_camera(_affine(frames, cfg, g), cfg, g), cfg, g, colour=False)
    x = _blur(x, cfg, g)
    if cfg.frame_jitter > 0:
        wobble = 1 + (torch.rand(b, t, generator=g).to(x.device) * 2 - 1) * cfg.frame_jitter
        x = (((x + 1) / 2 * wobble[..., None, None]).clamp(0, 1) * 2 - 1).where(x > -1, x)
    return x
