"""Generation metrics on frames in [0, 1], restricted to the field of view.

Per-video functions take one video: pred, target (T, H, W) float in [0, 1] and a mask
(H, W) bool. Vessel structure: `vessel_agreement` compares the vessel maps (a bright-ridge
filter, `vesselness`) of a generated and a real venous-phase frame (`venous_frames`:
where the veins are full; also the frames `retrieval.data.registration` registers
against); `curve_mae` compares the videos' mean brightness over time (`brightness_curve`).
Set-level: `frechet_distance` (with the covariance term), `fvd` over I3D
features from a local TorchScript file, and `fvd_proxy` over our own generator's
encoder features when no I3D is given — a report says which one it used, never both.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import rankdata
from skimage.filters import sato
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from .data import window
from .errors import CheckpointError, DataError
from .networks import Generator, gem_pool

log = logging.getLogger(__name__)

VENOUS_AFTER_PEAK_S = (4.0, 25.0)  # the venous frames: seconds after the brightest frame
VESSEL_SIGMAS = (1.0, 2.0, 3.0)  # the ridge filter's scales, pixels of a 256-px frame
VESSEL_PERCENTILE = 85.0  # a pixel is vessel above this percentile of the FOV's vesselness


def _check(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if pred.shape != target.shape or pred.ndim != 3:
        raise DataError(
            f"pred and target must both be (T, H, W), got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}"
        )
    if mask.shape != pred.shape[1:]:
        raise DataError(f"mask must be (H, W) = {tuple(pred.shape[1:])}, got {tuple(mask.shape)}")
    return mask.bool().expand_as(pred)  # (T, H, W)


def psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB, data range 1) over the masked pixels of all frames; nan for an empty mask."""
    m = _check(pred, target, mask)
    if not m.any():
        return float("nan")
    return float(peak_signal_noise_ratio(pred[m].double(), target[m].double(), data_range=1.0))


def ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """SSIM (Gaussian 11×11, σ 1.5) map of every frame, averaged over the masked pixels."""
    m = _check(pred, target, mask)
    if not m.any():
        return float("nan")
    _, full = structural_similarity_index_measure(
        pred[:, None].double(), target[:, None].double(), data_range=1.0, return_full_image=True
    )  # full: (T, 1, H, W)
    return float(full[:, 0][m].mean())


def temporal_consistency_gap(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """| mean |Δ| of consecutive generated frames − the same of the real frames | in the mask."""
    m = _check(pred, target, mask)[1:]
    if pred.shape[0] < 2 or not m.any():
        return float("nan")
    dp = (pred[1:] - pred[:-1]).abs()[m].mean()
    dt = (target[1:] - target[:-1]).abs()[m].mean()
    return float((dp - dt).abs())


def lesion_psnr(pred: torch.Tensor, target: torch.Tensor, knowledge: torch.Tensor) -> float:
    """PSNR inside the knowledge mask (∩ FOV, pass the intersection); nan when it is empty."""
    return psnr(pred, target, knowledge)


# ---------------------------------------------------------------- vessels and curves


def venous_frames(ffa: np.ndarray, times_s: Sequence[float] | None = None) -> np.ndarray:
    """The indices of the frames where the veins are full: those `VENOUS_AFTER_PEAK_S`
    after the brightest frame (laminar flow), or the few frames after it when the times
    are unknown. ffa (T, H, W), any intensity scale."""
    brightness = ffa.reshape(len(ffa), -1).mean(axis=1)
    peak = int(np.argmax(brightness))
    if times_s is not None and len(times_s) == len(ffa):
        after = np.asarray(times_s, dtype=np.float64) - float(times_s[peak])
        lo, hi = VENOUS_AFTER_PEAK_S
        window = np.flatnonzero((after >= lo) & (after <= hi))
        if len(window):
            return window
        return np.array([int(np.argmin(np.abs(after - (lo + hi) / 2)))])
    return np.arange(min(peak + 1, len(ffa) - 1), min(peak + 4, len(ffa)))


def _vessel_sigmas(side: int) -> list[float]:
    return sorted({max(0.75, s * side / 256) for s in VESSEL_SIGMAS})


def vessel_field(fov: np.ndarray | torch.Tensor) -> np.ndarray:
    """The pixels the vessel metrics score: the FOV (H, W) shrunk by twice the largest
    ridge scale, where the filter would see the aperture's edge."""
    fov = np.asarray(fov, dtype=bool)
    rim = int(np.ceil(2 * _vessel_sigmas(fov.shape[0])[-1]))
    return ndimage.binary_erosion(fov, iterations=rim)


def vesselness(frame: np.ndarray | torch.Tensor, fov: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bright vessels of an FFA frame (H, W) in [0, 1]: the Sato tubeness filter
    (`skimage.filters.sato`, black_ridges=False) at `VESSEL_SIGMAS` scaled with the frame's
    side, after filling outside the FOV (H, W) with the FOV's median (no ridge at the
    aperture); 0 outside the FOV."""
    img = np.asarray(frame, dtype=np.float64)
    inside = np.asarray(fov, dtype=bool)
    if not inside.any():
        return np.zeros_like(img)
    img = np.where(inside, img, float(np.median(img[inside])))
    ridges = sato(img, sigmas=_vessel_sigmas(img.shape[0]), black_ridges=False, mode="reflect")
    return np.where(inside, ridges, 0.0)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half); nan without both classes."""
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def vessel_agreement(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    fov: np.ndarray | torch.Tensor,
) -> dict[str, float]:
    """Vessel structure of a generated frame against the real one, both (H, W) in [0, 1],
    inside `vessel_field(fov)`. The real frame's vessel mask is its `vesselness` above
    the `VESSEL_PERCENTILE`-th percentile of the field (the strongest 15 %); the
    generated frame's the same of its own. `vessel_auc`: the generated vesselness as a
    score for the real mask (1 perfect, 0.5 chance); `vessel_dice`: the masks' Dice.
    Both nan when the field is empty or the real frame has no ridge (a flat frame)."""
    field = vessel_field(fov)
    if not field.any():
        return {"vessel_auc": float("nan"), "vessel_dice": float("nan")}
    real = vesselness(target, fov)[field]
    fake = vesselness(pred, fov)[field]
    real_mask = real > np.percentile(real, VESSEL_PERCENTILE)
    fake_mask = fake > np.percentile(fake, VESSEL_PERCENTILE)
    if not real_mask.any():
        return {"vessel_auc": float("nan"), "vessel_dice": float("nan")}
    dice = 2 * (real_mask & fake_mask).sum() / (real_mask.sum() + fake_mask.sum())
    return {"vessel_auc": _auc(fake, real_mask), "vessel_dice": float(dice)}


def venous_vessel_agreement(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    times_s: Sequence[float] | None = None,
) -> dict[str, float]:
    """`vessel_agreement` of the mean of the real video's `venous_frames` (chosen on the
    real video, with its frame times) and the mean of the same generated frames."""
    _check(pred, target, mask)
    idx = torch.from_numpy(venous_frames(target.numpy(), times_s))
    return vessel_agreement(pred[idx].mean(0), target[idx].mean(0), mask)


def brightness_curve(video: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The mean intensity inside the mask (H, W) of each frame of a video (T, H, W) → (T,);
    nan for an empty mask."""
    m = mask.bool()
    if not m.any():
        return np.full(video.shape[0], np.nan)
    return video[:, m].double().mean(1).numpy()


def curve_mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute difference of the two videos' `brightness_curve`s ([0, 1] units)."""
    _check(pred, target, mask)
    return float(np.mean(np.abs(brightness_curve(pred, mask) - brightness_curve(target, mask))))


# ---------------------------------------------------------------- Fréchet distances


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½) between two feature sets (N, D), (M, D).

    The matrix square root is scipy's; when it is not finite, eps·I is added to both
    covariances (as pytorch-fid does); a small imaginary part is dropped.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DataError(f"feature sets must be (N, D) and (M, D), got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise DataError(f"Fréchet distance needs >= 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # singular products are handled below
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(covmean)):
        log.warning("sqrtm of the covariance product is singular; adding %g to the diagonals", eps)
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            log.warning("sqrtm has an imaginary component of %g; keeping the real part", imag)
        covmean = covmean.real
    diff = mu_a - mu_b
    d = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
    return float(max(d, 0.0))


def load_i3d(path: str | Path) -> torch.jit.ScriptModule:
    """A local I3D TorchScript file (e.g. StyleGAN-V's `i3d_torchscript.pt`); never downloads."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "I3D TorchScript file not found")
    try:
        with warnings.catch_warnings():  # TorchScript is how the I3D detector is distributed
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as e:
        raise CheckpointError(path, f"not a TorchScript module: {e}") from e


@torch.no_grad()
def i3d_features(
    model: torch.jit.ScriptModule, videos: np.ndarray, batch_size: int = 8
) -> np.ndarray:
    """uint8 videos (N, T, H, W) → I3D features (N, D).

    Grey frames are repeated to RGB and resized to 224². A detector whose forward takes
    `rescale, resize, return_features` (the StyleGAN-V convention) gets (B, 3, T, 224, 224)
    in [0, 255] with rescale=True, resize=True, return_features=True; any other module gets
    (B, 3, T, 224, 224) in [-1, 1] and must return (B, D) features.
    """
    if videos.dtype != np.uint8 or videos.ndim != 4:
        raise DataError(f"videos must be uint8 (N, T, H, W), got {videos.dtype} {videos.shape}")
    names = {a.name for a in model.forward.schema.arguments}
    stylegan_v = {"rescale", "resize", "return_features"} <= names
    out = []
    for i in range(0, len(videos), batch_size):
        x = torch.from_numpy(videos[i : i + batch_size]).float()  # (B, T, H, W) in [0, 255]
        b, t, h, w = x.shape
        x = F.interpolate(
            x.reshape(b * t, 1, h, w), size=(224, 224), mode="bilinear", antialias=True
        )
        x = (
            x.reshape(b, t, 1, 224, 224).expand(-1, -1, 3, -1, -1).permute(0, 2, 1, 3, 4)
        )  # (B, 3, T, 224, 224)
        if stylegan_v:
            f = model(x.contiguous(), rescale=True, resize=True, return_features=True)
        else:
            f = model((x / 127.5 - 1).contiguous())
        out.append(f.reshape(b, -1).float().cpu().numpy())
    return np.concatenate(out)


def fvd(real: np.ndarray, fake: np.ndarray, i3d: torch.jit.ScriptModule) -> float:
    """Set-level FVD: Fréchet distance of I3D features of uint8 videos (N, T, H, W)."""
    return frechet_distance(i3d_features(i3d, real), i3d_features(i3d, fake))


@torch.no_grad()
def proxy_features(
    generator: Generator, videos: np.ndarray, times_s: np.ndarray, batch_size: int = 8
) -> np.ndarray:
    """Our own video features: uint8 videos (N, T, H, W) → (N, C).

    Frame t is encoded as the window of the K frames ending at t (black before frame 0)
    with a black CF and those frames' times; `encode` features are GeM-pooled and
    averaged over t. Videos are resized to the generator's size first.
    """
    if videos.dtype != np.uint8 or videos.ndim != 4 or times_s.shape != videos.shape[:2]:
        raise DataError(
            f"videos uint8 (N, T, H, W) with times (N, T); got {videos.shape}, {times_s.shape}"
        )
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    k, s = generator.config.k, generator.config.image_size
    out = []
    try:
        for i in range(0, len(videos), batch_size):
            x = torch.from_numpy(videos[i : i + batch_size]).float().to(device)  # (B, T, H, W)
            if x.shape[-1] != s or x.shape[-2] != s:
                x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True)
            x = x / 127.5 - 1
            times = torch.from_numpy(np.asarray(times_s[i : i + batch_size], np.float32)).to(device)
            b, t = times.shape
            cf = x.new_full((b, 3, s, s), -1.0)
            pooled = []
            for j in range(t):
                idx = torch.arange(j - k + 1, j + 1, device=device).clamp(min=0)
                feats = generator.encode(cf, window(x, j - k + 1, k), times[:, idx])  # (B, C, h, w)
                pooled.append(gem_pool(feats.float()))
            out.append(torch.stack(pooled, 1).mean(1).cpu().numpy())  # (B, C)
    finally:
        generator.train(was_training)
    return np.concatenate(out)


def fvd_proxy(
    generator: Generator,
    real: np.ndarray,
    fake: np.ndarray,
    times_s: np.ndarray,
) -> float:
    """Fréchet distance of `proxy_features` (not comparable with I3D FVD)."""
    return frechet_distance(
        proxy_features(generator, real, times_s), proxy_features(generator, fake, times_s)
    )
