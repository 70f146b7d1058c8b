"""Cohort-level embedding jobs: a run's query encoder, and cohort → index folder.

`QueryEncoder` joins decoded media (any size, from `retrieval.data.media`) with the run's
embedder (and generator, for synthesis). `build_index` embeds every case of a cohort
and writes an index folder (`index.save_index_folder`) with one FAISS index per
modality (`cf`, `ffa`) whose ids are catalog row ids.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from encoder import create_generator, synthesize
from encoder.data import cf_tensor
from encoder.embedder import (
    FRAMES_PER_PASS,
    cf_parts_array,
    embed_cf_array,
    embed_ffa_array,
    embedder_id,
    ffa_parts_array,
    load_embedder,
    native_precision,
    similarity_weights,
)
from encoder.fov import FovCircle, fov_square, fov_square_video, stored_circle
from index import ROW_ID, MilvusTarget, build_store, save_index_folder, with_row_ids
from index.backend import check_backend
from retrieval.data.cohort import Cohort
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mark_synthetic
from retrieval.data.training_data import DEFAULT_TIMES_S, load_paired
from retrieval.errors import Fundus2VideoError

from .generation import training_data_info
from .suggestion import suggestion_models

if TYPE_CHECKING:
    from .ray_embedding import RayOptions

log = logging.getLogger(__name__)

MODALITIES = ("cf", "ffa")
EMBEDDER_DIR = "embedder"  # inside a run folder
EMBED_BATCH_SIZE = 32  # CLIP batch (fewer when the train split is smaller)
EMBED_SHARE = 0.25  # of `train --minutes` given to the embedding stage when both run


def default_embedder_dir(run: str | Path) -> Path:
    return Path(run) / EMBEDDER_DIR


def video_times(times_s: Sequence[float] | np.ndarray | None, frames: int) -> np.ndarray:
    """A video's frame times, or evenly spaced over DEFAULT_TIMES_S when unknown."""
    if times_s is not None and len(times_s) == frames:
        return np.asarray(times_s, dtype=np.float32)
    return np.linspace(*DEFAULT_TIMES_S, frames, dtype=np.float32)


@dataclass
class QueryEncoder:
    """A run's embedder and generator, ready to embed decoded media and synthesize videos."""

    run_dir: Path
    embedder_dir: Path
    embedder: Any
    encoder_id: str
    image_size: int
    dim: int
    _generator: Any = field(default=None, repr=False)

    @classmethod
    def open(
        cls, run: str | Path, embedder_dir: str | Path | None = None, precision: str | None = None
    ) -> QueryEncoder:
        """The run's embedder (RUN/embedder unless `embedder_dir`), its backbone run in
        `precision` (default: bfloat16 where the device has it natively, else float32)."""
        run = Path(run)
        folder = Path(embedder_dir) if embedder_dir is not None else default_embedder_dir(run)
        if not (folder / "config.json").is_file():
            raise Fundus2VideoError(
                f"{folder}: no trained embedder (run `fundus2video train {run.name} --stage embed`)"
            )
        embedder, _ = load_embedder(folder)
        embedder.eval().set_precision(precision or native_precision(embedder.device))
        return cls(
            run_dir=run,
            embedder_dir=folder,
            embedder=embedder,
            encoder_id=embedder_id(folder),
            image_size=embedder.config.image_size,
            dim=embedder.config.out_dim,
        )

    @property
    def precision(self) -> str:
        """The backbone's precision; an index's vectors and its queries share it."""
        return self.embedder.precision

    @property
    def similarities(self) -> tuple[str, ...]:
        """The similarity kinds this encoder's vectors support."""
        if self.embedder.config.clinical_dim:
            return ("combined", "pair", "clinical")
        return ("pair",)

    def similarity_weights(self, similarity: str) -> np.ndarray:
        """(dim,) factors: stored vector x factors = a query scoring by `similarity`."""
        return similarity_weights(self.embedder.config, similarity)

    def squares(
        self, images: Sequence[np.ndarray], circles: Sequence[FovCircle | None] | None = None
    ) -> np.ndarray:
        """CF photos, any size → uint8 (N, S, S, 3) as the model sees them: each cropped to
        its FOV circle (`encoder.fov.fov_square`; detected where `circles` has None)."""
        circles = list(circles) if circles is not None else [None] * len(images)
        return np.stack(
            [fov_square(im, self.image_size, c) for im, c in zip(images, circles, strict=True)]
        )

    def embed_cf(
        self,
        images: Sequence[np.ndarray],
        batch_size: int = FRAMES_PER_PASS,
        circles: Sequence[FovCircle | None] | None = None,
    ) -> np.ndarray:
        """CF photos uint8 (H, W, 3), any size → float32 (N, D), L2-normalised."""
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        cf = self.squares(images, circles)  # (N, S, S, 3)
        return embed_cf_array(self.embedder, cf, batch_size=batch_size)

    def embed_ffa(
        self,
        videos: Sequence[np.ndarray],
        times: Sequence[np.ndarray | None] | None = None,
        circles: Sequence[FovCircle | None] | None = None,
    ) -> np.ndarray:
        """FFA videos uint8 (T, H, W) with their frame times → float32 (N, D); each video
        cropped to its FOV circle (detected where `circles` has None).

        Videos of different lengths are embedded one length-group at a time.
        """
        circles = list(circles) if circles is not None else [None] * len(videos)
        squares = [
            fov_square_video(v, self.image_size, c) for v, c in zip(videos, circles, strict=True)
        ]
        return self.embed_ffa_squares(squares, times)

    def embed_ffa_squares(
        self, videos: Sequence[np.ndarray], times: Sequence[np.ndarray | None] | None = None
    ) -> np.ndarray:
        """FFA videos uint8 (T, S, S) already cropped to their FOV squares → float32 (N, D);
        videos of different lengths are embedded one length-group at a time."""
        times = list(times) if times is not None else [None] * len(videos)
        out = np.zeros((len(videos), self.dim), np.float32)
        groups: dict[int, list[int]] = {}
        for i, video in enumerate(videos):
            groups.setdefault(len(video), []).append(i)
        for _, members in sorted(groups.items()):
            ffa = np.stack([videos[i] for i in members])  # (n, T, S, S)
            t = np.stack([video_times(times[i], len(videos[i])) for i in members])  # (n, T)
            out[members] = embed_ffa_array(self.embedder, ffa, t)
        return out

    def cf_parts(self, image: np.ndarray, circle: FovCircle | None = None) -> np.ndarray:
        """A CF photo uint8 (H, W, 3) → float32 (R, D): each region of the embedder's grid
        (row-major over the photo's FOV square) and its part of `embed_cf([image])`."""
        return cf_parts_array(self.embedder, fov_square(image, self.image_size, circle))

    def ffa_parts(
        self, video: np.ndarray, times: np.ndarray | None = None, circle: FovCircle | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An FFA video uint8 (T, H, W) → float32 (T, R, D), each frame's and region's part of
        `embed_ffa([video], [times])`; the frame times used (T,); the attention weights (T,)."""
        ffa = fov_square_video(video, self.image_size, circle)
        t = video_times(times, len(video))
        parts, attention = ffa_parts_array(self.embedder, ffa, t)
        return parts, t, attention

    @property
    def region_grid(self) -> int:
        """g of the g x g regions the embedder's vectors are made of."""
        return int(self.embedder.backbone.feature_shape[-1])

    @torch.no_grad()
    def _cf_features(
        self, images: Sequence[np.ndarray], circles: Sequence[FovCircle | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backbone grids (N, C, g, g) of the photos and of their mirror images (None
        without a clinical part, which alone reads them)."""
        e = self.embedder
        cf = cf_tensor(self.squares(images, circles)).to(e.device)  # (N, 3, S, S)
        return e.cf_features(cf), e.cf_features(cf.flip(-1)) if e.config.clinical_dim else None

    @torch.no_grad()
    def embed_cf_region(
        self, images: Sequence[np.ndarray], cells: tuple[int, int, int, int]
    ) -> np.ndarray:
        """CF photos and grid cells (row0, row1, col0, col1; end exclusive) → float32 (N, D)
        in the stored layout, from those regions alone: the pair part keeps only their
        entries (renormalised: where they are), the clinical part pools the lesion
        detectors over them (what they hold, wherever it is)."""
        e, g = self.embedder, self.region_grid
        mask = torch.zeros(g, g, dtype=torch.bool, device=e.device)
        mask[cells[0] : cells[1], cells[2] : cells[3]] = True
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), EMBED_BATCH_SIZE):
            feats, mirrored = self._cf_features(images[i : i + EMBED_BATCH_SIZE])
            keep = mask.flatten().repeat_interleave(e.config.dim // (g * g)).float()
            pair = torch.nn.functional.normalize(e.cf_head(feats) * keep, dim=-1)
            clinical = None
            if e.config.clinical_dim:
                clinical = e.cf_region_clinical_embed(feats, mirrored, mask)
            out.append(e.join(pair, clinical).float().cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def locate_cf_region(
        self,
        query: np.ndarray,
        images: Sequence[np.ndarray],
        shape: tuple[int, int],
        similarity: str = "clinical",
    ) -> np.ndarray | None:
        """A region query vector (D,) (`embed_cf_region`) and CF photos → float32 (N, g - rows
        + 1, g - cols + 1): the clinical cosine of every window of `shape` = (rows, cols)
        regions of each photo with the query's clinical part. None when the region search
        of `similarity` is bound to the place (pair, or no clinical part): it matched there."""
        e = self.embedder
        if similarity == "pair" or not e.config.clinical_dim:
            return None
        q = torch.from_numpy(np.asarray(query, np.float32)[e.config.dim :]).to(e.device)
        q = torch.nn.functional.normalize(q, dim=0)
        maps = [np.zeros((0, *(self.region_grid - n + 1 for n in shape)), np.float32)]
        for i in range(0, len(images), EMBED_BATCH_SIZE):
            feats, mirrored = self._cf_features(images[i : i + EMBED_BATCH_SIZE])
            windows = e.cf_window_clinical_embed(feats, mirrored, *shape)
            maps.append((windows @ q).float().cpu().numpy())
        return np.concatenate(maps)

    @property
    def generator(self):
        if self._generator is None:
            self._generator = create_generator(self.run_dir)
        return self._generator

    def default_times(self) -> np.ndarray:
        return np.asarray(training_data_info(self.run_dir)["median_times_s"], dtype=np.float32)

    def synthesize(
        self, image: np.ndarray, times_s: Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """CF uint8 (H, W, 3) → a SYNTHETIC-marked video uint8 (T, S, S) and its times (T,).

        The returned frames are for display; `embed_synthesized` embeds unmarked ones.
        """
        frames, times = self.synthesize_unmarked(image, times_s)
        return mark_synthetic(frames), times

    def synthesize_unmarked(
        self, image: np.ndarray, times_s: Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        times = np.asarray(times_s if times_s is not None else self.default_times(), np.float32)
        if times.ndim != 1 or len(times) < 1 or np.any(np.diff(times) < 0) or np.any(times < 0):
            raise ValueError(f"times must be non-negative and increasing, got {times.tolist()}")
        return synthesize(self.generator, image, times), times


def embed_cohort(
    encoder: QueryEncoder,
    cohort: Cohort,
    *,
    split: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """Catalog rows of `split` (all when None), their CF and FFA embeddings (N, D) each."""
    cases = cohort.cases(split)
    cf = np.zeros((len(cases), encoder.dim), np.float32)
    ffa = np.zeros((len(cases), encoder.dim), np.float32)
    with tqdm(total=len(cases), desc="embed", unit="case", disable=not progress) as bar:
        for start in range(0, len(cases), batch_size):
            part = cases[start : start + batch_size]
            rows = slice(start, start + len(part))
            cf[rows] = encoder.embed_cf(
                [read_cf(c.cf_path) for c in part],
                circles=[stored_circle(c.cf_fov) for c in part],
            )
            ffa[rows] = encoder.embed_ffa(
                [read_ffa(c.ffa_path) for c in part],
                [c.ffa_times_s for c in part],
                circles=[stored_circle(c.ffa_fov) for c in part],
            )
            bar.update(len(part))
    catalog = cohort.catalog
    if split is not None:
        catalog = catalog.filter(pl.col("split") == split)
    return catalog, cf, ffa


def build_index(
    run: str | Path,
    cohort: str | Path,
    out: str | Path,
    *,
    embedder_dir: str | Path | None = None,
    progress: bool = True,
    backend: str = "faiss",
    milvus: MilvusTarget | None = None,
    precision: str | None = None,
    ray: RayOptions | None = None,
) -> dict[str, Any]:
    """Embed every case of `cohort` with the run's embedder; write the index folder `out`.
    `backend` "milvus" puts the vectors in collections at `milvus` (the folder names them).
    `precision` of the backbone pass (default: bfloat16 where native, `QueryEncoder.open`);
    `ray` embeds on Ray Data through parquet shards (`ray_embedding`), removed once the
    index is written."""
    check_backend(backend)
    encoder = QueryEncoder.open(run, embedder_dir, precision=precision)
    opened = Cohort.open(cohort)
    if ray is None:
        catalog, cf, ffa = embed_cohort(encoder, opened, progress=progress)
    else:
        from .ray_embedding import embed_cohort_ray, shards_folder

        shards = shards_folder(out, ray)
        catalog = opened.catalog
        cf, ffa = embed_cohort_ray(encoder, opened, shards, ray, progress=progress)
    catalog = with_row_ids(absolute_media_paths(catalog, opened.root))
    ids = catalog[ROW_ID].to_numpy().astype(np.int64)
    indexes = {}
    for modality, vectors in zip(MODALITIES, (cf, ffa), strict=True):
        indexes[modality] = build_store(
            vectors,
            ids,
            modality=modality,
            backend=backend,
            milvus=milvus,
            encoder_id=encoder.encoder_id,
            catalog=catalog,
        )
    extra = {
        "run_dir": str(Path(run).resolve()),
        "embedder_dir": str(encoder.embedder_dir.resolve()),
        "cohort_dir": str(opened.root.resolve()),
        "image_size": encoder.image_size,
        "precision": encoder.precision,  # the queries' backbone pass must match it
        "suggestion": suggestion_models(encoder, catalog, {"cf": cf, "ffa": ffa}),
    }
    manifest = save_index_folder(out, indexes, catalog, encoder.encoder_id, extra)
    if ray is not None:
        shutil.rmtree(shards)
    return manifest


def absolute_media_paths(catalog: pl.DataFrame, root: Path) -> pl.DataFrame:
    """cf_path / ffa_path resolved against the cohort root, so the index folder stands alone."""
    root = root.resolve()
    return catalog.with_columns(
        pl.col(c).map_elements(lambda p: str((root / p).resolve()), return_dtype=pl.String)
        for c in ("cf_path", "ffa_path")
    )


def train_embedder(
    run: str | Path,
    cohort: str | Path,
    *,
    backbone: str = "generator",
    out: str | Path | None = None,
    minutes: float | None = None,
    iters: int | None = None,
    seed: int = 0,
    cf_histogram_match: bool = True,
    progress: bool = True,
    overwrite: bool = False,
):
    """Train the embedding heads of `run` on the cohort's train split (val split for R@1);
    `overwrite` replaces an embedder already in the output folder; `cf_histogram_match`
    matches each CF photo's channels to the training photos' histogram before the
    backbone (`encoder.colour`).

    The image size is the run's generator size, so every backbone sees the same pixels.
    """
    from encoder import read_checkpoint_config
    from encoder.train import EmbedderTrainOptions, distributed, embed_training_loop

    run = Path(run)
    distributed.setup()  # under torchrun: join the other processes (else a no-op)
    size = read_checkpoint_config(run)["model"]["generator"]["image_size"]
    opened = Cohort.open(cohort)
    train = load_paired(opened, size=size, split="train", progress=progress)
    val = None
    if opened.cases("val"):
        val = load_paired(opened, size=size, split="val", frames=train.frames, progress=False)
    options = EmbedderTrainOptions(
        backbone=backbone,
        minutes=minutes,
        iters=iters,
        batch_size=distributed.whole_parts(min(EMBED_BATCH_SIZE, len(train))),
        seed=seed,
        cf_histogram_match=cf_histogram_match,
    )
    return embed_training_loop(
        options,
        run_dir=run,
        out_dir=Path(out) if out is not None else default_embedder_dir(run),
        data=train,
        val_data=val,
        labels=case_labels(opened, train.case_ids),  # the train split's labels only
        progress=progress,
        overwrite=overwrite,
    )


def case_labels(cohort: Cohort, case_ids: Sequence[str]):
    """`encoder.train.CaseLabels` of these cases from the catalog: a null lesion list is
    unknown, an empty one means no lesions; an empty diagnosis is unknown."""
    from encoder.train import CaseLabels

    rows = {r["case_id"]: r for r in cohort.catalog.iter_rows(named=True)}
    rows = [rows[c] for c in case_ids]
    return CaseLabels(
        diagnoses=tuple(r["diagnosis"] or None for r in rows),
        lesions=tuple(tuple(r["lesions"]) if r["lesions"] is not None else None for r in rows),
    )
