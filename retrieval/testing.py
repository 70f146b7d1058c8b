"""Stand-ins for tests and benchmarks that need no trained model (and no torch).

`PixelEncoder` has the interface the engine uses (`retrieval.search.engine.QueryEncoder`):
embeddings are fixed random projections of coarse pixels, synthesis repeats the CF
green channel under a dye curve. `build_pixel_index` writes an index folder of a
cohort with it, so `Engine.open(path, encoder=PixelEncoder())` serves it.

`build_micro_index` is the smallest real model instead (torch, imported on call): a
phantom cohort, a micro generator and embedder trained for a few iterations, and their
index folder, for the tests' `tiny_index` and the operational benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from index import VectorIndex, save_index_folder, with_row_ids
from retrieval.data.cohort import Cohort
from retrieval.data.media import read_cf, read_ffa
from retrieval.models.suggestion import suggestion_models

GRID = 8  # embeddings project a GRID x GRID thumbnail
DEFAULT_TIMES = (0.0, 10.0, 14.0, 20.0, 30.0, 60.0, 300.0, 600.0)


def _thumb(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) → float32 (size, size[, 3]) in [0, 1]."""
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.float32) / 255.0


def _crop(image: np.ndarray, cells: tuple[int, int, int, int]) -> np.ndarray:
    """The part of `image`, centre-padded to a square, under grid cells of a GRID x GRID."""
    h, w = image.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, *image.shape[2:]), image.dtype)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = image
    r0, r1, c0, c1 = (round(v * side / GRID) for v in cells)
    return square[r0:r1, c0:c1]


class PixelEncoder:
    """Deterministic embeddings from pixels: CF by its green channel, FFA by its mean frame."""

    def __init__(self, dim: int = 32, image_size: int = 32, seed: int = 0):
        self.dim, self.image_size = dim, image_size
        self.encoder_id = f"pixel-d{dim}-s{image_size}-seed{seed}"
        self.run_dir: Path | None = None
        self.embedder_dir: Path | None = None
        rng = np.random.default_rng(seed)
        self._proj = rng.standard_normal((GRID * GRID, dim)).astype(np.float32)

    def _project(self, thumbs: np.ndarray) -> np.ndarray:
        x = thumbs.reshape(len(thumbs), -1)  # (N, GRID*GRID)
        x = x - x.mean(axis=1, keepdims=True)
        v = x @ self._proj  # (N, D)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)
        return v.astype(np.float32)

    def embed_cf(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        return self._project(np.stack([_thumb(im[..., 1], GRID) for im in images]))

    def embed_ffa(
        self, videos: Sequence[np.ndarray], times: Sequence[Any] | None = None
    ) -> np.ndarray:
        if not len(videos):
            return np.zeros((0, self.dim), np.float32)
        means = [np.mean(np.stack([_thumb(f, GRID) for f in v]), axis=0) for v in videos]
        return self._project(np.stack(means))

    def cf_parts(self, image: np.ndarray) -> np.ndarray:
        """(R, D) with R = GRID²: each thumbnail pixel's part of `embed_cf([image])`."""
        return self._parts(_thumb(image[..., 1], GRID)[None])[0]

    def ffa_parts(
        self, video: np.ndarray, times: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(T, R, D) parts of `embed_ffa([video])` (the mean frame: uniform attention), the
        frame times (given, or spread like DEFAULT_TIMES) and the attention (T,)."""
        parts = self._parts(np.stack([_thumb(f, GRID) for f in video])) / len(video)
        given = times is not None and len(times) == len(video)
        t = np.asarray(times if given else np.linspace(0, DEFAULT_TIMES[-1], len(video)))
        return parts, t.astype(np.float32), np.full(len(video), 1 / len(video), np.float32)

    def _parts(self, thumbs: np.ndarray) -> np.ndarray:
        """(N, GRID, GRID) thumbnails → (N, R, D): pixel i adds (x_i - mean) · P_i, over the
        norm of the whole (mean) projection, so the parts sum to `_project` of their mean."""
        x = thumbs.reshape(len(thumbs), -1)
        x = x - x.mean(axis=1, keepdims=True)
        parts = x[..., None] * self._proj  # (N, R, D)
        norm = max(float(np.linalg.norm(parts.sum(1).mean(0))), 1e-6)
        return (parts / norm).astype(np.float32)

    region_grid = GRID  # region queries cut the (padded, square) photo into GRID x GRID

    def embed_cf_region(
        self, images: Sequence[np.ndarray], cells: tuple[int, int, int, int]
    ) -> np.ndarray:
        """The embedding of the part of each photo's padded square under grid `cells`
        (row0, row1, col0, col1): that crop embedded as a photo of its own."""
        return self.embed_cf([_crop(im, cells) for im in images])

    def locate_cf_region(
        self,
        query: np.ndarray,
        images: Sequence[np.ndarray],
        shape: tuple[int, int],
        similarity: str = "pair",
    ) -> np.ndarray:
        """(N, GRID - rows + 1, GRID - cols + 1): the cosine of `query` with every window of
        `shape` = (rows, cols) cells of each photo (`embed_cf_region`: a crop's embedding,
        wherever the crop lies)."""
        rows, cols = shape
        q = np.asarray(query, np.float32) / max(float(np.linalg.norm(query)), 1e-6)
        out = np.zeros((len(images), GRID - rows + 1, GRID - cols + 1), np.float32)
        for n, image in enumerate(images):
            for i in range(GRID - rows + 1):
                for j in range(GRID - cols + 1):
                    out[n, i, j] = self.embed_cf_region([image], (i, i + rows, j, j + cols))[0] @ q
        return out

    similarities = ("pair",)

    def similarity_weights(self, similarity: str) -> np.ndarray:
        if similarity not in self.similarities:
            raise ValueError(f"PixelEncoder has no {similarity!r} similarity (only 'pair')")
        return np.ones(self.dim, np.float32)

    def default_times(self) -> np.ndarray:
        return np.asarray(DEFAULT_TIMES, np.float32)

    def synthesize_unmarked(
        self, image: np.ndarray, times_s: Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """CF (H, W, 3) → (T, S, S) uint8: the green channel brightening, then fading."""
        times = np.asarray(times_s if times_s is not None else DEFAULT_TIMES, np.float32)
        green = _thumb(image[..., 1], self.image_size)  # (S, S)
        dye = np.clip(times / 20.0, 0, 1) * np.exp(-times / 900.0)  # (T,)
        frames = np.clip(green[None] * (0.3 + dye[:, None, None]), 0, 1)
        return (frames * 255).round().astype(np.uint8), times


def build_pixel_index(
    cohort: str | Path, out: str | Path, encoder: PixelEncoder | None = None
) -> dict[str, Any]:
    """Embed every case of `cohort` with a PixelEncoder and write the index folder `out`."""
    encoder = encoder or PixelEncoder()
    opened = Cohort.open(cohort)
    cases = opened.cases()
    cf = encoder.embed_cf([read_cf(c.cf_path) for c in cases])
    ffa = encoder.embed_ffa([read_ffa(c.ffa_path) for c in cases])
    catalog = with_row_ids(opened.catalog)
    catalog = catalog.with_columns(
        cf_path=np.asarray([str(c.cf_path) for c in cases]),
        ffa_path=np.asarray([str(c.ffa_path) for c in cases]),
    )
    ids = catalog["row_id"].to_numpy()
    indexes = {"cf": VectorIndex.build(cf, ids), "ffa": VectorIndex.build(ffa, ids)}
    extra = {
        "cohort_dir": str(opened.root),
        "image_size": encoder.image_size,
        "suggestion": suggestion_models(encoder, catalog, {"cf": cf, "ffa": ffa}),
    }
    return save_index_folder(out, indexes, catalog, encoder.encoder_id, extra)


def train_micro_run(cohort: Path, run: Path) -> None:
    """A micro generator (3 iterations, 32 px) and its embedder (6 iterations, dim 32, a
    4x4 grid with a clinical part) trained on `cohort`'s train split into `run`."""
    import torch

    from encoder import EmbedderConfig
    from encoder.testing import micro_scale
    from encoder.train import embed_training_loop, training_loop
    from retrieval.data.training_data import load_paired
    from retrieval.models.embedding import case_labels

    opened = Cohort.open(cohort)
    train = load_paired(opened, size=32, split="train", progress=False)
    val = load_paired(opened, size=32, split="val", frames=train.frames, progress=False)
    torch.manual_seed(0)
    common = {"run_dir": run, "data": train, "val_data": val, "progress": False}
    training_loop(
        **common, scale=micro_scale(32), iters=3, batch_size=2, preview_every=0, stats_every=1
    )
    embed_training_loop(
        **common,
        iters=6,
        dim=32,
        batch_size=8,
        stats_every=2,
        val_every=3,
        labels=case_labels(opened, train.case_ids),
        config=EmbedderConfig(grid=4, clinical_dim=16, clinical_hidden=32),  # 16 regions
    )


def build_micro_index(root: Path, *, seed: int = 7) -> tuple[Path, Path, Path]:
    """`root`/cohort (24 phantom cases, 64 px, 6 frames), `root`/run (`train_micro_run`)
    and `root`/index (its index folder); returns the three paths."""
    from retrieval.data.phantom import write_phantom_cohort
    from retrieval.models.embedding import build_index

    cohort, run, index = root / "cohort", root / "run", root / "index"
    write_phantom_cohort(cohort, cases=24, size=64, frames=6, seed=seed, progress=False)
    train_micro_run(cohort, run)
    build_index(run, cohort, index, progress=False)
    return cohort, run, index
