"""Preview grid: rows = fixed cases; columns = CF, then real | generated at 4 frame times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data import PairedVideos
from ..networks import Generator
from ..synthesis import synthesize_batch

REAL_BORDER = (40, 170, 80)  # green frame: real
FAKE_BORDER = (235, 140, 30)  # orange frame: generated
HEADER = 18
MIN_TILE, MAX_TILE = 96, 256


def preview_grid(generator: Generator, cases: PairedVideos, n_times: int = 4) -> Image.Image:
    """A PIL image: one row per case; CF, then real and generated frames at n_times times."""
    fake = synthesize_batch(generator, cases.cf, cases.times_s)  # (N, T, S, S)
    t = cases.frames
    cols = np.unique(np.linspace(0, t - 1, min(n_times, t)).round().astype(int))
    tile = max(MIN_TILE, min(cases.size, MAX_TILE))
    pad = 3
    step = tile + 2 * pad
    width = step * (1 + 2 * len(cols))
    grid = Image.new("RGB", (width, HEADER + step * len(cases)), (0, 0, 0))
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 3), "CF", fill=(255, 255, 255))
    for c, j in enumerate(cols):
        draw.text((step * (1 + 2 * c) + pad, 3), f"real #{j}", fill=REAL_BORDER)
        draw.text((step * (2 + 2 * c) + pad, 3), f"gen #{j}", fill=FAKE_BORDER)

    def put(
        img: np.ndarray, col: int, row: int, border: tuple[int, int, int] | None, label: str
    ) -> None:
        x, y = step * col, HEADER + step * row
        if border is not None:
            draw.rectangle([x, y, x + step - 1, y + step - 1], fill=border)
        im = Image.fromarray(img).convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
        grid.paste(im, (x + pad, y + pad))
        if label:
            draw.text((x + pad + 2, y + pad + 1), label, fill=(255, 255, 0))

    for r in range(len(cases)):
        put(cases.cf[r], 0, r, None, cases.case_ids[r][:18])
        for c, j in enumerate(cols):
            label = f"{cases.times_s[r, j]:.1f}s"
            put(cases.ffa[r, j], 1 + 2 * c, r, REAL_BORDER, label)
            put(fake[r, j], 2 + 2 * c, r, FAKE_BORDER, label)
    return grid


def save_preview(generator: Generator, cases: PairedVideos, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    preview_grid(generator, cases).save(tmp, format="PNG")
    tmp.replace(path)
    return path
