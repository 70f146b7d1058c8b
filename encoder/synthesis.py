"""CF photo → synthesized FFA video by a sliding window of K frames.

Window j predicts frames j .. j+K-1 from the CF and frames j-K .. j-1 (black before
frame 0). The sliding step is one frame; each frame's predictions from the (up to K)
windows that cover it are averaged. When window j runs, frames < j are final, so the
previous frames it sees are the averaged ones. A non-autoregressive generator
(`config.autoregressive = False`) always sees black previous frames.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import cf_tensor, from_model, window
from .errors import DataError
from .fov import FovCircle, fov_square
from .networks import Generator


@torch.no_grad()
def synthesize_tensor(
    generator: Generator, cf: torch.Tensor, times_s: torch.Tensor
) -> torch.Tensor:
    """cf (B, 3, S, S) in [-1, 1], times_s (B, T) → frames (B, T, S, S) in [-1, 1]."""
    k = generator.config.k
    b, t = times_s.shape
    if t < k:
        raise DataError(f"a video needs at least K={k} frame times, got {t}")
    s = cf.shape[-1]
    total = cf.new_zeros(b, t, s, s)  # (B, T, S, S) sum of predictions
    count = cf.new_zeros(1, t, 1, 1)
    for j in range(t - k + 1):
        if generator.config.autoregressive:
            prev = window(total / count.clamp(min=1), j - k, k)  # (B, K, S, S), final frames
        else:
            prev = cf.new_full((b, k, s, s), -1.0)
        total[:, j : j + k] += generator(cf, prev, times_s[:, j : j + k])
        count[:, j : j + k] += 1
    return total / count


def synthesize_batch(
    generator: Generator,
    cf_uint8: np.ndarray,
    times_s: np.ndarray,
    out_size: int | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """cf uint8 (N, S, S, 3) at the model size, times (N, T) → uint8 (N, T, S', S').

    S' is the model size, or `out_size` (antialiased bilinear resize) when given.
    """
    size = generator.config.image_size
    if cf_uint8.dtype != np.uint8 or cf_uint8.shape[1:] != (size, size, 3):
        raise DataError(
            f"cf must be uint8 (N, {size}, {size}, 3), got {cf_uint8.dtype} {cf_uint8.shape}"
        )
    times = np.asarray(times_s, dtype=np.float32)
    if times.ndim != 2 or times.shape[0] != cf_uint8.shape[0]:
        raise DataError(f"times_s must be (N={cf_uint8.shape[0]}, T), got {times.shape}")
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    out = []
    try:
        for i in range(0, len(cf_uint8), batch_size):
            cf = cf_tensor(cf_uint8[i : i + batch_size]).to(device)  # (B, 3, S, S)
            frames = synthesize_tensor(
                generator, cf, torch.from_numpy(times[i : i + batch_size]).to(device)
            )
            if out_size is not None and out_size != size:
                frames = F.interpolate(
                    frames,
                    size=(out_size, out_size),
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )
            out.append(from_model(frames))
    finally:
        generator.train(was_training)
    return np.concatenate(out)


def synthesize(
    generator: Generator,
    cf_uint8: np.ndarray,
    times_s: np.ndarray | list[float],
    out_size: int | None = None,
    circle: FovCircle | None = None,
) -> np.ndarray:
    """One CF photo uint8 (H, W, 3), any size → FFA frames uint8 (T, S, S) at `times_s`.

    The CF is cropped to its field of view (`circle`, detected when None) and resized to
    the model size S (`fov_square`); the frames are returned at S, or at `out_size` when
    given. Eval mode, no grad, deterministic (no sampling anywhere).
    """
    if cf_uint8.dtype != np.uint8 or cf_uint8.ndim != 3 or cf_uint8.shape[-1] != 3:
        raise DataError(f"cf must be uint8 (H, W, 3), got {cf_uint8.dtype} {cf_uint8.shape}")
    times = np.asarray(times_s, dtype=np.float32)
    if times.ndim != 1:
        raise DataError(f"times_s must be 1-D (T,), got shape {times.shape}")
    cf = fov_square(cf_uint8, generator.config.image_size, circle)
    return synthesize_batch(generator, cf[None], times[None], out_size=out_size)[0]
