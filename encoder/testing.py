"""A toy paired CF / FFA generator for tests and smoke runs (the real phantom is in retrieval).

Each eye: a circular field of view, an optic disc, a few random vessels that fill with
dye early, a background that peaks and fades, and in half of the eyes a leak that
grows over time (so the knowledge mask is not empty).
"""

from __future__ import annotations

import numpy as np

from .configs import ScaleConfig, get_scale
from .data import PairedVideos


def toy_paired_videos(n: int = 8, size: int = 32, frames: int = 6, seed: int = 0) -> PairedVideos:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1  # (S, S) in [-1, 1]
    fov = xx**2 + yy**2 < 0.92**2
    cf = np.zeros((n, size, size, 3), np.float32)
    ffa = np.zeros((n, frames, size, size), np.float32)
    times = np.zeros((n, frames), np.float32)
    for i in range(n):
        disc_x, disc_y = rng.uniform(-0.5, 0.5), rng.uniform(-0.2, 0.2)
        disc = np.exp(-((xx - disc_x) ** 2 + (yy - disc_y) ** 2) / 0.02)
        vessels = np.zeros((size, size), np.float32)
        for _ in range(4):
            angle = rng.uniform(0, 2 * np.pi)
            dist = np.abs((xx - disc_x) * np.sin(angle) - (yy - disc_y) * np.cos(angle))
            ahead = (xx - disc_x) * np.cos(angle) + (yy - disc_y) * np.sin(angle) > 0
            vessels = np.maximum(vessels, np.exp(-(dist**2) / 0.003) * ahead)
        leak = np.zeros((size, size), np.float32)
        lx, ly = rng.uniform(-0.5, 0.5, 2)
        has_leak = i % 2 == 0
        cf[i] = (0.55 + 0.35 * disc[..., None]) * np.array([0.9, 0.45, 0.2])
        cf[i] -= 0.25 * vessels[..., None] * np.array([0.4, 0.8, 0.6])
        t = np.sort(np.geomspace(8, 600, frames) * rng.uniform(0.85, 1.15, frames))
        times[i] = t
        for j, tj in enumerate(t):
            fill = 1 / (1 + np.exp(-(tj - 14) / 2))  # vessels fill after ~14 s
            background = 0.25 * fill * np.exp(-tj / 400)
            if has_leak:
                r = 0.05 + 0.25 * min(1.0, tj / 600)
                leak = np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / r**2) * min(1.0, tj / 120)
            ffa[i, j] = background + 0.8 * fill * vessels * np.exp(-tj / 900) + 0.3 * disc * fill
            ffa[i, j] += 0.9 * leak
    cf = np.clip(cf * fov[..., None], 0, 1)
    ffa = np.clip(ffa * fov, 0, 1)
    return PairedVideos.from_arrays(
        cf=(cf * 255).round().astype(np.uint8),
        ffa=(ffa * 255).round().astype(np.uint8),
        times_s=times,
        case_ids=[f"toy-{seed}-{i:03d}" for i in range(n)],
        patient_ids=[f"p-{seed}-{i // 2:03d}" for i in range(n)],
    )


def micro_scale(size: int = 32) -> ScaleConfig:
    """A few-thousand-parameter scale for mechanics tests (32 px, 2 downsamplings, 1 block)."""
    return get_scale("tiny").replace(
        name="micro",
        image_size=size,
        ngf=8,
        n_downsampling=2,
        n_blocks=1,
        time_freqs=4,
        time_hidden=16,
        ndf=8,
        n_layers=2,
        num_patches=16,
        dim=16,
    )
