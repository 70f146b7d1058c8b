"""Paired CF / FFA arrays at the model's resolution, and their conversion to model tensors.

Conventions (shared by training, synthesis and evaluation):
- arrays are uint8; model tensors are float in [-1, 1] (x / 127.5 - 1), so black = -1;
- an FFA window's "previous frames" before frame 0 are black (pre-dye darkness);
- images are cropped to the square around their field-of-view circle, black outside it,
  then resized (bilinear, antialiased): `encoder.fov.fov_square`, the one preprocessing of
  training, indexing, search, synthesis and evaluation (`fit_square`, the plain centred
  padding, remains for callers that know no circle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .fov import LUMA

FOV_THRESHOLD = 20  # uint8 luminance of the smoothed CF above which a pixel is in the FOV


@dataclass(frozen=True)
class PairedVideos:
    """N eye-visits: CF photos, FFA videos and their frame times, at one square size."""

    cf: np.ndarray  # uint8 (N, H, W, 3)
    ffa: np.ndarray  # uint8 (N, T, H, W)
    times_s: np.ndarray  # float32 (N, T), seconds after dye injection, increasing
    fov: np.ndarray  # bool (N, H, W), field of view (estimate_fov(cf) when unknown)
    case_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        cf, ffa, t, fov = self.cf, self.ffa, self.times_s, self.fov
        if cf.dtype != np.uint8 or cf.ndim != 4 or cf.shape[-1] != 3:
            raise DataError(f"cf must be uint8 (N, H, W, 3), got {cf.dtype} {cf.shape}")
        n, h, w, _ = cf.shape
        if ffa.dtype != np.uint8 or ffa.ndim != 4 or ffa.shape[0] != n or ffa.shape[2:] != (h, w):
            raise DataError(f"ffa must be uint8 (N={n}, T, {h}, {w}), got {ffa.dtype} {ffa.shape}")
        if t.shape != ffa.shape[:2] or not np.issubdtype(t.dtype, np.floating):
            raise DataError(
                f"times_s must be float (N, T) = {ffa.shape[:2]}, got {t.dtype} {t.shape}"
            )
        if not np.all(np.isfinite(t)) or np.any(np.diff(t, axis=1) < 0):
            raise DataError("times_s must be finite and non-decreasing along each video")
        if fov.dtype != np.bool_ or fov.shape != (n, h, w):
            raise DataError(
                f"fov must be bool (N, H, W) = {(n, h, w)}, got {fov.dtype} {fov.shape}"
            )
        if len(self.case_ids) != n or len(self.patient_ids) != n:
            raise DataError(
                f"{len(self.case_ids)} case_ids and {len(self.patient_ids)} patient_ids "
                f"for {n} videos"
            )
        if h != w:
            raise DataError(f"frames must be square, got {h}x{w} (use encoder.fov.fov_square)")

    @classmethod
    def from_arrays(
        cls,
        cf: np.ndarray,
        ffa: np.ndarray,
        times_s: np.ndarray,
        case_ids: Sequence[str],
        patient_ids: Sequence[str] | None = None,
        fov: np.ndarray | None = None,
    ) -> PairedVideos:
        """Build with the FOV estimated from the CF and patient ids = case ids when absent."""
        return cls(
            cf=cf,
            ffa=ffa,
            times_s=np.asarray(times_s, dtype=np.float32),
            fov=estimate_fov(cf) if fov is None else fov,
            case_ids=tuple(case_ids),
            patient_ids=tuple(case_ids if patient_ids is None else patient_ids),
        )

    def __len__(self) -> int:
        return self.cf.shape[0]

    @property
    def size(self) -> int:
        return self.cf.shape[1]

    @property
    def frames(self) -> int:
        return self.ffa.shape[1]

    def subset(self, index: Sequence[int] | np.ndarray) -> PairedVideos:
        idx = np.asarray(index, dtype=np.int64)
        return PairedVideos(
            cf=self.cf[idx],
            ffa=self.ffa[idx],
            times_s=self.times_s[idx],
            fov=self.fov[idx],
            case_ids=tuple(self.case_ids[i] for i in idx),
            patient_ids=tuple(self.patient_ids[i] for i in idx),
        )


def estimate_fov(cf: np.ndarray, threshold: int = FOV_THRESHOLD) -> np.ndarray:
    """Field of view from CF brightness: luminance box-blurred (size/32) > threshold.

    cf uint8 (..., H, W, 3) → bool (..., H, W). Blurring keeps dark lesions and vessels
    inside the FOV; the black surround of a fundus photo falls outside.
    """
    if cf.dtype != np.uint8 or cf.shape[-1] != 3:
        raise DataError(f"cf must be uint8 (..., H, W, 3), got {cf.dtype} {cf.shape}")
    lead, (h, w) = cf.shape[:-3], cf.shape[-3:-1]
    x = torch.from_numpy(cf.reshape(-1, h, w, 3)).float()
    lum = (x @ x.new_tensor(LUMA))[:, None]  # (N, 1, H, W)
    k = max(3, (min(h, w) // 32) | 1)
    smooth = F.avg_pool2d(lum, k, stride=1, padding=k // 2, count_include_pad=False)
    return (smooth[:, 0] > threshold).numpy().reshape(*lead, h, w)


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad with black to a square, then resize to size × size (antialiased bilinear).

    image uint8 (H, W) or (H, W, C), one image (loop over frames for a video)
    → uint8 (size, size) or (size, size, C). The model's preprocessing is
    `encoder.fov.fov_square` (the same on a frame whose FOV circle fills it).
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise DataError(f"image must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    s = max(h, w)
    if (h, w) != (s, s):
        pad = [((s - h) // 2, s - h - (s - h) // 2), ((s - w) // 2, s - w - (s - w) // 2)]
        image = np.pad(image, pad + [(0, 0)] * (image.ndim - 2))
    if s == size:
        return np.ascontiguousarray(image)
    x = torch.from_numpy(image).float()
    x = x[None, None] if image.ndim == 2 else x.permute(2, 0, 1)[None]  # (1, C, s, s)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    y = y[0, 0] if image.ndim == 2 else y[0].permute(1, 2, 0)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def to_model(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 → float in [-1, 1]."""
    t = torch.as_tensor(x)
    return t.float() / 127.5 - 1.0


def from_model(x: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] → uint8 numpy."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def cf_tensor(cf: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) → float (..., 3, H, W) in [-1, 1]."""
    return to_model(cf).movedim(-1, -3)


def window(frames: torch.Tensor, start: int, k: int) -> torch.Tensor:
    """Frames [start, start + k) of (B, T, H, W) with black (-1) where the index is < 0."""
    b, t, h, w = frames.shape
    out = frames.new_full((b, k, h, w), -1.0)
    lo = max(start, 0)
    if lo < start + k:
        out[:, lo - start :] = frames[:, lo : start + k]
    return out
