"""Generation metrics on frames in [0, 1], restricted to the field of view.

Per-video functions take one video: pred, target (T, H, W) float in [0, 1] and a mask
(H, W) bool. Set-level: `frechet_distance` (with the covariance term), `fvd` over I3D
features from a local TorchScript file, and `fvd_proxy` over our own generator's
encoder features when no I3D is given — a report says which one it used, never both.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from .data import window
from .errors import CheckpointError, DataError
from .networks import Generator, gem_pool

log = logging.getLogger(__name__)


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
