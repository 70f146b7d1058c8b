"""Per-channel histogram matching of CF photos inside their field of view.

A camera's exposure, gamma and colour balance change each channel of a photo by an
increasing curve. Matching each channel's histogram (inside the field of view) to one
reference histogram undoes any such curve, up to clipping and 8-bit rounding: the
matched photo depends only on the order of its pixel values within each channel. The
reference is the pooled histogram of the training photos (`histogram_reference`), so a
matched photo looks like a typical training photo and a frozen backbone sees what it
was trained on.

Tensors are model space: float in [-1, 1], black = -1 (`encoder.data`).
"""

from __future__ import annotations

import numpy as np
import torch

LEVELS = 256  # 8-bit levels of the histograms
QUANTILES = 256  # points of the reference quantile function
SURROUND_LEVEL = 2  # a pixel whose channels are all <= this level is outside the field


def _levels(x: torch.Tensor) -> torch.Tensor:
    """(..., P) in [-1, 1] → int64 8-bit levels."""
    return ((x.float() + 1) * 127.5).round().clamp(0, LEVELS - 1).long()


def _in_field(levels: torch.Tensor) -> torch.Tensor:
    """Levels (B, C, ...) → bool (B, ...): some channel above the black surround."""
    return levels.amax(1) > SURROUND_LEVEL


def field_mask(x: torch.Tensor) -> torch.Tensor:
    """CF (B, C, S, S) → bool (B, S, S): pixels with some channel above the black
    surround (the field of view, and its black bands or corners left out)."""
    return _in_field(_levels(x))


def _histograms(levels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """levels (B, C, P), mask (B, P) → per-channel counts (B, C, LEVELS) of masked pixels."""
    weights = mask[:, None, :].expand_as(levels).float()
    hist = torch.zeros(*levels.shape[:2], LEVELS, device=levels.device)
    return hist.scatter_add_(2, levels, weights)


def _mid_cdf(hist: torch.Tensor) -> torch.Tensor:
    """Counts (..., LEVELS) → each level's mid-rank quantile in [0, 1] (ties share one)."""
    n = hist.sum(-1, keepdim=True).clamp_min(1)
    return (hist.cumsum(-1) - hist / 2) / n


def histogram_reference(cf: torch.Tensor, quantiles: int = QUANTILES) -> torch.Tensor:
    """Training CF photos (N, C, S, S) → the reference (C, quantiles): the pooled
    in-field histogram's values at quantiles 0 .. 1, increasing, in [-1, 1]."""
    hist = torch.zeros(cf.shape[1], LEVELS)
    for i in range(0, len(cf), 64):  # bounded memory
        levels = _levels(cf[i : i + 64].cpu().flatten(2))  # (b, C, P)
        hist += _histograms(levels, _in_field(levels)).sum(0)
    p = np.linspace(0, 1, quantiles)
    ref = np.empty((cf.shape[1], quantiles))
    for c, h in enumerate(hist.double().numpy()):
        used = h > 0
        ref[c] = np.interp(p, _mid_cdf(torch.from_numpy(h)).numpy()[used], np.arange(LEVELS)[used])
    return torch.from_numpy(ref / 127.5 - 1).float()


def match_histograms(cf: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """CF (B, C, S, S) in [-1, 1] → each channel's in-field values replaced by the
    reference's value at their mid-rank quantile; the surround unchanged."""
    b, c = cf.shape[:2]
    levels = _levels(cf.flatten(2))  # (B, C, P)
    mask = _in_field(levels)  # (B, P)
    q = _mid_cdf(_histograms(levels, mask)).gather(2, levels)  # (B, C, P) in [0, 1]
    k = reference.shape[-1]
    pos = q * (k - 1)
    lo = pos.floor().long().clamp(0, k - 2)
    ref = reference.to(cf.device, torch.float32)[None].expand(b, -1, -1)
    y = torch.lerp(ref.gather(2, lo), ref.gather(2, lo + 1), pos - lo)
    return y.where(mask[:, None, :], cf.flatten(2).float()).reshape(cf.shape)
