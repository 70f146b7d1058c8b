"""The cross-modal embedder: CF photos and FFA videos in one L2-normalised space.

    CF (B, 3, S, S)  → backbone → regional grid (C, g, g) → CF head  ─┐
                                                                    ├→ pair part (B, dim)
    FFA (B, T, S, S) → backbone per frame → FFA head per frame (B, T, dim)
                     → time-aware attention over frames (masked) ──┘
    the same grids → per-region detectors → mean and max over regions (and mean
                     over frames) → clinical part (B, clinical_dim)

The embedding is [sqrt(1 - w) · pair, sqrt(w) · clinical] (w = clinical_weight), unit
norm, so one inner product is (1 - w) · pair cosine + w · clinical cosine, and a query
reweighted by `similarity_weights` ranks the same stored vectors by either part alone.
The pair part finds a photo's own angiogram (where things lie); the clinical part,
trained on diagnosis and lesion labels (`train.embed`), finds the same disease
wherever it lies, in either eye. At inference the clinical part is the mean of the
picture's and its mirror image's (one more backbone pass): the same in either eye by
construction, and two views of the lesions instead of one (on held-out phantom patients,
CF→CF precision@10 0.892 → 0.909; docs/results.md). Training sees single views (pairs are
flipped together there). Without labels clinical_dim is 0 (pair part only).

Backbones (generator / scratch / openclip / pixels) are described in `backbones.py`.
A projection head keeps the regions apart: each of the g² regions is mapped by one shared
LayerNorm + Linear (C → dim / g²) plus a learned per-region bias, and the embedding is
their concatenation in grid order. A cosine between two embeddings is then a sum of
region-by-region similarities, so a CF and an FFA match where their vessels, disc and
lesions lie in the same places. (A Linear mixing the flattened grid into dim over-fits:
on the 640-case phantom cohort it reached validation CF→FFA R@1 0.65 against 0.9 here.)
Attention logits over frames come from each frame's backbone features (averaged over
regions, LayerNorm) and sinusoidal features of log1p(t), like `networks.TimeEmbedding`.

An embedder folder holds `embedder.safetensors` (every weight, the backbone's included,
so it loads without the generator's run folder) and `config.json`:
{"format", "format_version", "embedder": EmbedderConfig, "backbone": {"spec",
"generator": GeneratorConfig or null, "source"}, "preprocessing", "training",
"code_version", "iteration"}. `embedder_id` hashes the weights file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .backbones import Backbone, BackboneSpec, GeneratorBackbone, PixelBackbone, build_backbone
from .checkpoint import (
    LOCAL_PREFIX,
    atomic_save_safetensors,
    atomic_write_text,
    code_version,
    load_generator,
)
from .colour import QUANTILES, histogram_reference, match_histograms
from .configs import GeneratorConfig
from .data import cf_tensor, to_model
from .errors import CheckpointError, ConfigError, DataError
from .networks import Generator

log = logging.getLogger(__name__)

FORMAT = "fundus2video-embedder"
FORMAT_VERSION = 4  # 2: region-aligned heads; 3: + clinical heads; 4: + CF histogram reference
READABLE_VERSIONS = (2, 3, 4)  # a version-2 folder loads with clinical_dim 0, 2-3 unmatched
SIMILARITIES = ("combined", "pair", "clinical")
PRECISIONS = ("float32", "bfloat16")  # of the backbone pass; the heads are always float32
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "embedder.safetensors"
DEFAULT_SUBDIR = "embedder"  # RUN/embedder/


@dataclass(frozen=True)
class EmbedderConfig:
    """The embedder's architecture as data (the backbone's own config is stored beside it)."""

    backbone: str = "generator"  # generator | scratch | pixels | openclip:<model>[@/file.pt]
    dim: int = 256  # shared embedding width
    image_size: int = 128  # S of CF and FFA frames
    train_backbone: bool = False  # False: frozen backbone, only heads + attention train
    pool: str = "avg"  # "avg" (signed mean) or "gem" (clamped at 1e-6, then power mean)
    gem_p: float = 3.0
    grid: int = 16  # regions per side of the pooled feature map (1 = global pooling)
    layers: tuple[int, ...] = (-1, -2, -3)  # generator levels [stem, down_1.., bottleneck]
    time_freqs: int = 8  # sinusoidal frequencies of log1p(t) for the attention
    attn_hidden: int = 64
    pixel_size: int = 16  # pixels backbone: downsampled side
    pixel_components: int = 128  # pixels backbone: PCA components per modality
    clinical_dim: int = 64  # width of the clinical part (0: pair part only)
    clinical_hidden: int = 64  # width of the clinical heads' per-region detectors
    clinical_weight: float = 0.5  # w: share of the clinical cosine in the combined score
    cf_histogram_match: bool = False  # match CF channels to the training photos' histogram

    def __post_init__(self) -> None:
        BackboneSpec.parse(self.backbone)
        for name in (
            "dim",
            "image_size",
            "grid",
            "time_freqs",
            "attn_hidden",
            "pixel_size",
            "pixel_components",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"embedder {name} must be >= 1, got {getattr(self, name)}")
        if self.pool not in ("avg", "gem"):
            raise ConfigError(f"embedder pool must be 'avg' or 'gem', got {self.pool!r}")
        if self.gem_p <= 0:
            raise ConfigError(f"embedder gem_p must be > 0, got {self.gem_p}")
        if self.clinical_dim < 0 or self.clinical_hidden < 1:
            raise ConfigError(
                f"embedder clinical_dim must be >= 0 and clinical_hidden >= 1, "
                f"got {self.clinical_dim}, {self.clinical_hidden}"
            )
        if self.clinical_dim and not 0 < self.clinical_weight < 1:
            raise ConfigError(
                f"embedder clinical_weight must be in (0, 1), got {self.clinical_weight}"
            )

    @property
    def out_dim(self) -> int:
        """Width of the stored embedding: the pair part, then the clinical part."""
        return self.dim + self.clinical_dim

    @property
    def spec(self) -> BackboneSpec:
        return BackboneSpec.parse(self.backbone)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedderConfig:
        try:
            d = dict(d)
            if "layers" in d:
                d["layers"] = tuple(d["layers"])
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"malformed embedder config {d!r}: {e}") from e


class ProjectionHead(nn.Module):
    """Regional features (..., C, g, g) → (..., dim), not normalised: region r fills
    entries [r · dim/g², (r + 1) · dim/g²) from its own features only."""

    def __init__(self, feature_shape: tuple[int, int, int], dim: int):
        super().__init__()
        c, g, _ = feature_shape
        if dim % (g * g):
            raise ConfigError(
                f"embedder dim {dim} is not divisible by the {g}x{g} regions "
                "of the backbone's feature grid: change dim or grid"
            )
        self.norm = nn.LayerNorm(c)
        self.region = nn.Linear(c, dim // (g * g))
        self.region_bias = nn.Parameter(torch.zeros(g * g, dim // (g * g)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regions = x.flatten(-2).transpose(-1, -2)  # (..., g², C)
        return (self.region(self.norm(regions)) + self.region_bias).flatten(-2)  # (..., dim)


class ClinicalHead(nn.Module):
    """Regional features (..., C, g, g) → what the image holds, not where: one shared
    LayerNorm + MLP per region (lesion detectors), then the mean and the max of their
    outputs over the regions (`pool`, (..., 2h)), then a Linear (`project`, → clinical_dim).
    (Pooling the backbone features first and classifying after reaches 0.66 validation
    accuracy of a diagnosis probe on the phantom; detecting per region first, 0.85.)"""

    def __init__(self, channels: int, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.detect = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.project = nn.Linear(2 * hidden, dim)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C, g, g) → (..., 2h): per-region detections, mean and max over regions."""
        r = self.detect(self.norm(x.flatten(-2).transpose(-1, -2)))  # (..., g², h)
        return torch.cat([r.mean(dim=-2), r.amax(dim=-2)], dim=-1)

    def pool_regions(self, x: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) and a bool (g, g) region mask → (B, 2h): `pool` over those regions only."""
        r = self.detect(self.norm(x.flatten(-2).transpose(-1, -2)))[:, regions.flatten()]
        return torch.cat([r.mean(dim=-2), r.amax(dim=-2)], dim=-1)

    def pool_windows(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(B, C, g, g) → (B, g - rows + 1, g - cols + 1, 2h): `pool` over every window of
        rows x cols regions (stride 1)."""
        g = x.shape[-1]
        r = self.detect(self.norm(x.flatten(-2).transpose(-1, -2)))  # (B, g², h)
        r = r.transpose(-1, -2).unflatten(-1, (g, g))  # (B, h, g, g)
        mean = F.avg_pool2d(r, (rows, cols), stride=1)
        peak = F.max_pool2d(r, (rows, cols), stride=1)
        return torch.cat([mean, peak], dim=1).permute(0, 2, 3, 1)


class TimeFeatures(nn.Module):
    """Times (...) seconds → sinusoidal features of log1p(t) (..., 2 * freqs), no weights."""

    def __init__(self, freqs: int):
        super().__init__()
        self.register_buffer(
            "freqs",
            torch.exp(torch.linspace(math.log(0.5), math.log(64.0), freqs)),
            persistent=False,
        )

    def forward(self, times_s: torch.Tensor) -> torch.Tensor:
        angles = torch.log1p(times_s.float().clamp(min=0.0))[..., None] * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Embedder(nn.Module):
    """Backbone + one projection head per modality + time-aware attention over FFA frames."""

    def __init__(self, config: EmbedderConfig, backbone: Backbone):
        super().__init__()
        self.config = config
        self.backbone = backbone
        fs = backbone.feature_shape
        self.cf_head = ProjectionHead(fs, config.dim)
        self.ffa_head = ProjectionHead(fs, config.dim)
        self.time = TimeFeatures(config.time_freqs)
        self.attn_norm = nn.LayerNorm(fs[0])  # a frame's features, averaged over regions
        self.attn = nn.Sequential(
            nn.Linear(fs[0] + 2 * config.time_freqs, config.attn_hidden),
            nn.GELU(),
            nn.Linear(config.attn_hidden, 1),
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init
        if config.clinical_dim:
            args = (fs[0], config.clinical_dim, config.clinical_hidden)
            self.cf_clinical, self.ffa_clinical = ClinicalHead(*args), ClinicalHead(*args)
        if not config.train_backbone:
            self.backbone.requires_grad_(False)
        if config.cf_histogram_match:  # fitted by `fit_training_statistics`; flat until then
            ramp = torch.linspace(-1, 1, QUANTILES).expand(3, -1).clone()
            self.register_buffer("cf_reference", ramp)  # (3, QUANTILES)
        self.precision = "float32"  # of the backbone pass (`set_precision`), not stored

    def set_precision(self, precision: str) -> Embedder:
        """Run the backbone in `precision` (PRECISIONS) from now on: "bfloat16" is about
        2.3x faster on CPUs with AVX512-BF16 (cosine to float32 vectors >= 0.995); the
        heads stay float32. An index and its queries must use the same precision."""
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        return self

    def train(self, mode: bool = True) -> Embedder:
        super().train(mode)
        if not self.config.train_backbone:
            self.backbone.eval()  # a frozen backbone is never in training mode
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    # ------------------------------------------------------------------ features

    @contextlib.contextmanager
    def _backbone_pass(self) -> Iterator[None]:
        """Gradients only into a trained backbone; autocast to a lower `precision`."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_backbone):
            if self.precision == "float32":
                yield
                return
            with torch.autocast(self.device.type, dtype=getattr(torch, self.precision)):
                yield

    def cf_features(self, cf: torch.Tensor) -> torch.Tensor:
        """CF (B, 3, S, S) in [-1, 1] → backbone grid (B, C, g, g); with
        `cf_histogram_match`, each photo's channels are matched to the training photos'
        histogram first (exposure, gamma and colour balance undone)."""
        s = self.config.image_size
        if cf.ndim != 4 or cf.shape[1:] != (3, s, s):
            raise DataError(f"cf must be (B, 3, {s}, {s}), got {tuple(cf.shape)}")
        if self.config.cf_histogram_match:
            cf = match_histograms(cf, self.cf_reference)
        with self._backbone_pass():
            return self.backbone.cf_features(cf.float()).float()

    def ffa_features(
        self,
        frames: torch.Tensor,  # (B, T, S, S) in [-1, 1]
        times_s: torch.Tensor,  # (B, T) seconds after injection
        mask: torch.Tensor | None = None,  # (B, T) bool, True = valid frame
        select: torch.Tensor | None = None,  # (B, T') frame indices to compute (all if None)
    ) -> torch.Tensor:
        """→ backbone grids (B, T', C, g, g). Masked frames are black with time 0 first,
        so nothing of them reaches any valid frame's window."""
        s = self.config.image_size
        if frames.ndim != 4 or frames.shape[2:] != (s, s):
            raise DataError(f"frames must be (B, T, {s}, {s}), got {tuple(frames.shape)}")
        if times_s.shape != frames.shape[:2]:
            raise DataError(
                f"times_s must be (B, T) = {tuple(frames.shape[:2])}, got {tuple(times_s.shape)}"
            )
        frames, times_s = frames.float(), times_s.float()
        if mask is not None:
            if mask.shape != frames.shape[:2] or mask.dtype != torch.bool:
                raise DataError(
                    f"mask must be bool (B, T) = {tuple(frames.shape[:2])}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            frames = frames.where(mask[..., None, None], -1.0)
            times_s = times_s.where(mask, 0.0)
        with self._backbone_pass():
            return self.backbone.ffa_features(frames, times_s, select).float()

    # ------------------------------------------------------------------ heads

    def cf_head_embed(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone grids (B, C, g, g) → (B, dim) L2-normalised."""
        return F.normalize(self.cf_head(feats), dim=-1)

    def ffa_head_embed(
        self, feats: torch.Tensor, times_s: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-frame grids (B, T, C, g, g) + their times (B, T) → (B, dim) L2-normalised."""
        z = self.ffa_head(feats)  # (B, T, dim)
        weights = self.frame_attention(feats, times_s, mask)  # (B, T)
        return F.normalize((weights[..., None] * z).sum(1), dim=-1)

    def frame_attention(
        self, feats: torch.Tensor, times_s: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-frame grids (B, T, C, g, g) + times (B, T) → the pooling's frame weights
        (B, T), summing to 1 over the valid frames."""
        frame = self.attn_norm(feats.mean(dim=(-2, -1)))  # (B, T, C)
        logits = self.attn(torch.cat([frame, self.time(times_s)], -1))[..., 0]  # (B, T)
        if mask is not None:
            if not mask.any(1).all():
                raise DataError("every video needs at least one valid (unmasked) frame")
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(-1)

    @staticmethod
    def _with_mirror(own: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
        """Unit clinical vectors of a picture and of its mirror image → their mean direction
        (the rule `VECTOR_RECIPE` names)."""
        return F.normalize(own + mirror, dim=-1)

    @staticmethod
    def _unflip_regions(parts: torch.Tensor, g: int) -> torch.Tensor:
        """Per-region parts (..., g², D) of a mirror image → the same parts at the regions
        of the picture itself (columns reversed)."""
        return parts.unflatten(-2, (g, g)).flip(-2).flatten(-3, -2)

    def cf_clinical_embed(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone grids (B, C, g, g) → clinical part (B, clinical_dim), L2-normalised."""
        head = self.cf_clinical
        return F.normalize(head.project(head.pool(feats)), dim=-1)

    def ffa_clinical_embed(self, feats: torch.Tensor, mask: torch.Tensor | None = None):
        """Per-frame grids (B, T, C, g, g) → (B, clinical_dim): each frame's pooled
        detections, averaged over the valid frames, projected; L2-normalised."""
        head = self.ffa_clinical
        pooled = head.pool(feats)  # (B, T, 2h)
        w = torch.ones(pooled.shape[:2], device=pooled.device) if mask is None else mask.float()
        mean = (w[..., None] * pooled).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(head.project(mean), dim=-1)

    def cf_region_clinical_embed(
        self, feats: torch.Tensor, mirrored: torch.Tensor, regions: torch.Tensor
    ) -> torch.Tensor:
        """Backbone grids of photos and of their mirror images (B, C, g, g), bool (g, g) mask
        → the clinical part (B, clinical_dim) of those regions' content alone
        (location-invariant), averaged with the mirrored regions' as `embed_cf` does."""
        head = self.cf_clinical
        own = F.normalize(head.project(head.pool_regions(feats, regions)), dim=-1)
        mirror = F.normalize(head.project(head.pool_regions(mirrored, regions.flip(-1))), dim=-1)
        return self._with_mirror(own, mirror)

    def cf_window_clinical_embed(
        self, feats: torch.Tensor, mirrored: torch.Tensor, rows: int, cols: int
    ) -> torch.Tensor:
        """Backbone grids of photos and of their mirror images (B, C, g, g) → (B, g - rows + 1,
        g - cols + 1, clinical_dim): the clinical part of every window of rows x cols
        regions, averaged with the mirrored window's as `embed_cf` does."""
        head = self.cf_clinical
        own = F.normalize(head.project(head.pool_windows(feats, rows, cols)), dim=-1)
        mirror = F.normalize(head.project(head.pool_windows(mirrored, rows, cols)), dim=-1)
        return self._with_mirror(own, mirror.flip(2))  # window c ↔ its mirror's last - c

    def join(self, pair: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
        """Unit pair (B, dim) and clinical (B, clinical_dim) parts → the stored (B, out_dim)."""
        if clinical is None:
            return pair
        w = self.config.clinical_weight
        return torch.cat([pair * math.sqrt(1 - w), clinical * math.sqrt(w)], dim=-1)

    # ------------------------------------------------------------------ public

    def embed_cf(self, cf: torch.Tensor) -> torch.Tensor:
        """CF (B, 3, S, S) in [-1, 1] → (B, out_dim) float32, unit norm; the clinical part
        averaged with the mirror image's."""
        feats = self.cf_features(cf)
        clinical = None
        if self.config.clinical_dim:
            mirror = self.cf_clinical_embed(self.cf_features(cf.flip(-1)))
            clinical = self._with_mirror(self.cf_clinical_embed(feats), mirror)
        return self.join(self.cf_head_embed(feats), clinical).float()

    def embed_ffa(
        self, frames: torch.Tensor, times_s: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """FFA (B, T, S, S) in [-1, 1], times (B, T) s, mask (B, T) bool → (B, out_dim); the
        clinical part averaged with the mirror video's."""
        feats = self.ffa_features(frames, times_s, mask)
        pair = self.ffa_head_embed(feats, times_s.float(), mask)
        clinical = None
        if self.config.clinical_dim:
            flipped = self.ffa_features(frames.flip(-1), times_s, mask)
            mirror = self.ffa_clinical_embed(flipped, mask)
            clinical = self._with_mirror(self.ffa_clinical_embed(feats, mask), mirror)
        return self.join(pair, clinical).float()

    # ------------------------------------------------------------------ explanation

    @staticmethod
    def _region_slices(z: torch.Tensor, regions: int) -> torch.Tensor:
        """Pair head outputs (..., dim) → (..., R, dim): region r keeps its own slice of
        dim / R entries (the region-aligned head), zeros elsewhere; the sum over R is z."""
        own = torch.eye(regions, device=z.device, dtype=z.dtype)
        own = own.repeat_interleave(z.shape[-1] // regions, dim=1)  # (R, dim)
        return z[..., None, :] * own

    @staticmethod
    def _clinical_regions(head: ClinicalHead, feats: torch.Tensor) -> torch.Tensor:
        """Regional grids (..., C, g, g) → (..., R, clinical_dim): each region's share of
        `head.project(head.pool(feats))` without its bias. Mean pool: region r adds
        A_mean · h_r / R; max pool: per channel, the argmax region adds A_max[:, c] · h_rc."""
        r = head.detect(head.norm(feats.flatten(-2).transpose(-1, -2)))  # (..., R, h)
        n, h = r.shape[-2:]
        top = F.one_hot(r.argmax(-2), n).transpose(-1, -2).to(r.dtype)  # (..., R, h)
        weight = head.project.weight  # (clinical_dim, 2h)
        return (r / n) @ weight[:, :h].T + (r * top) @ weight[:, h:].T

    @torch.no_grad()
    def cf_parts(self, cf: torch.Tensor) -> torch.Tensor:
        """CF (B, 3, S, S) → (B, R, out_dim): each region's part of `embed_cf(cf)` (their
        sum over R is the embedding). The clinical bias is spread evenly over the regions;
        the normalisations are scalar factors; the mirror image's clinical parts count at
        the regions they mirror."""
        feats = self.cf_features(cf)
        g = feats.shape[-1]
        z = self.cf_head(feats)  # (B, dim)
        pair = self._region_slices(z, g * g) / z.norm(dim=-1)[:, None, None]
        clinical = None
        if self.config.clinical_dim:
            head = self.cf_clinical

            def unit(f: torch.Tensor) -> torch.Tensor:  # (B, R, Dc), summing to unit norm
                u = self._clinical_regions(head, f) + head.project.bias / (g * g)
                return u / u.sum(-2).norm(dim=-1)[:, None, None]

            mirror = self._unflip_regions(unit(self.cf_features(cf.flip(-1))), g)
            both = unit(feats) + mirror
            clinical = both / both.sum(-2).norm(dim=-1)[:, None, None]
        return self.join(pair, clinical).float()

    @torch.no_grad()
    def ffa_parts(
        self, frames: torch.Tensor, times_s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FFA (B, T, S, S), times (B, T) → (B, T, R, out_dim), each frame's and region's part
        of `embed_ffa` (their sum is the embedding: the attention pooling is a weighted sum,
        the clinical part a mean over frames, with the mirror video's parts at the regions
        they mirror), and the attention weights (B, T)."""
        feats = self.ffa_features(frames, times_s)  # (B, T, C, g, g)
        g = feats.shape[-1]
        weights = self.frame_attention(feats, times_s.float())  # (B, T)
        z = weights[..., None] * self.ffa_head(feats)  # (B, T, dim)
        pair = self._region_slices(z, g * g) / z.sum(1).norm(dim=-1)[:, None, None, None]
        clinical = None
        if self.config.clinical_dim:
            head, t = self.ffa_clinical, feats.shape[1]

            def unit(f: torch.Tensor) -> torch.Tensor:  # (B, T, R, Dc), summing to unit norm
                u = self._clinical_regions(head, f) / t + head.project.bias / (t * g * g)
                return u / u.sum((1, 2)).norm(dim=-1)[:, None, None, None]

            flipped = self.ffa_features(frames.flip(-1), times_s)
            both = unit(feats) + self._unflip_regions(unit(flipped), g)
            clinical = both / both.sum((1, 2)).norm(dim=-1)[:, None, None, None]
        return self.join(pair, clinical).float(), weights.float()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def native_precision(device: torch.device | str) -> str:
    """ "bfloat16" where `device` computes it natively (CUDA with bf16; a CPU with
    AVX512-BF16 or AMX), else "float32" (emulated bfloat16 is slower there)."""
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "float32"


# ---------------------------------------------------------------------- create


def create_embedder(
    config: EmbedderConfig | None = None,
    *,
    run_dir: str | Path | None = None,  # generator run folder: weights ("generator"), config
    generator: Generator | None = None,  # ... or the generator itself
    **overrides: Any,
) -> Embedder:
    """A new embedder: heads from the current torch RNG; the backbone by `config.backbone`:
    "generator" copies the run's trained weights, "scratch" builds the run's architecture
    with fresh weights, "openclip:..." builds the tower (local weights or none), "pixels"
    needs `fit_pixels(embedder, cf, frames)` on the training split."""
    config = dataclasses.replace(config or EmbedderConfig(), **overrides)
    spec = config.spec
    gen_cfg = None
    if spec.needs_generator:
        if generator is None:
            if run_dir is None:
                raise ConfigError(f"backbone {spec.kind!r} needs run_dir or generator")
            generator = load_generator(run_dir)[0]
        gen_cfg = generator.config
    backbone = build_backbone(
        spec,
        image_size=config.image_size,
        grid=config.grid,
        pool=config.pool,
        gem_p=config.gem_p,
        pixel_size=config.pixel_size,
        pixel_components=config.pixel_components,
        layers=config.layers,
        generator_config=gen_cfg,
    )
    if spec.kind == "generator":
        backbone.generator.load_state_dict(generator.state_dict())
    embedder = Embedder(config, backbone)
    return embedder.eval()


def fit_training_statistics(embedder: Embedder, cf: np.ndarray, ffa: np.ndarray) -> None:
    """Fit what the embedder takes from the training arrays without gradients: cf uint8
    (N, S, S, 3), ffa (N, T, S, S). The CF histogram reference (`cf_histogram_match`) and
    the pixels backbone's PCA; a no-op for an embedder with neither."""
    photos = cf_tensor(cf)  # (N, 3, S, S)
    if embedder.config.cf_histogram_match:
        embedder.cf_reference.copy_(histogram_reference(photos))
    if isinstance(embedder.backbone, PixelBackbone):
        dev = embedder.device
        embedder.backbone.fit(photos.to(dev), to_model(ffa).to(dev))


# ---------------------------------------------------------------------- save / load


def embedder_config(
    embedder: Embedder,
    training: dict[str, Any] | None = None,
    iteration: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    bb = embedder.backbone
    gen = dataclasses.asdict(bb.generator.config) if isinstance(bb, GeneratorBackbone) else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "embedder": embedder.config.to_dict(),
        "backbone": {"spec": embedder.config.backbone, "generator": gen, "source": source},
        "preprocessing": {
            "size": embedder.config.image_size,
            "geometry": "centre-pad to square with black, then antialiased bilinear resize",
            "cf": "RGB uint8 (N, S, S, 3) -> x / 127.5 - 1",
            "cf_colour": "each channel matched to the training photos' in-field histogram"
            if embedder.config.cf_histogram_match
            else "as decoded",
            "ffa": "grey uint8 (N, T, S, S) -> x / 127.5 - 1, times in s after injection",
        },
        "training": training or {},
        "code_version": code_version(),
        "iteration": iteration,
    }


def save_embedder(
    folder: str | Path,
    embedder: Embedder,
    training: dict[str, Any] | None = None,
    iteration: int | None = None,
    source: str | None = None,  # where the backbone came from (e.g. the run folder)
) -> Path:
    """Write `embedder.safetensors` then `config.json` into `folder`, each atomically."""
    folder = Path(folder)
    cfg = embedder_config(embedder, training, iteration, source)
    text = json.dumps(cfg, indent=2)
    atomic_save_safetensors(folder / WEIGHTS_NAME, embedder.state_dict(), {"config": text})
    atomic_write_text(folder / CONFIG_NAME, text + "\n")
    return folder


def read_embedder_config(folder: str | Path) -> dict[str, Any]:
    """The embedder's config: `config.json`, or the copy saved inside the weights file
    (written atomically with them) when the two differ or `config.json` is missing: a
    save interrupted between the two files leaves a config that does not describe the
    weights beside them."""
    folder = Path(str(folder).removeprefix(LOCAL_PREFIX))
    path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    embedded = _weights_config(weights) if weights.is_file() else None
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as e:
        if embedded is None:
            raise CheckpointError(path.parent, f"no {CONFIG_NAME}") from e
        cfg = None
    except json.JSONDecodeError as e:
        if embedded is None:
            raise CheckpointError(path, f"invalid JSON: {e}") from e
        cfg = None
    if embedded is not None and embedded != cfg:
        log.warning(
            "%s: %s does not describe the weights beside it (a save was interrupted); "
            "using the config saved with the weights",
            folder,
            CONFIG_NAME,
        )
        cfg, path = embedded, weights
    return _checked_config(cfg, path)


def _weights_config(weights: Path) -> dict[str, Any] | None:
    """The config saved in the weights file's metadata (None: none there)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            text = (f.metadata() or {}).get("config")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(weights, str(e)) from e
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(weights, f"invalid embedded config: {e}") from e


def _checked_config(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """`cfg` if it is an embedder config of a version this code reads."""
    if cfg.get("format") != FORMAT:
        raise CheckpointError(path, f"format {cfg.get('format')!r} is not {FORMAT!r}")
    version = cfg.get("format_version", 0)
    if version not in READABLE_VERSIONS:
        why = (
            "newer than ours"
            if version > FORMAT_VERSION
            else (
                "from before the region-aligned heads: retrain it with "
                "`fundus2video train RUN COHORT --stage embed`"
            )
        )
        raise CheckpointError(path, f"format_version {version} is {why} ({FORMAT_VERSION})")
    return cfg


def load_embedder(folder: str | Path) -> tuple[Embedder, dict[str, Any]]:
    """Rebuild from `config.json` (no run folder, no download) and load weights strictly."""
    folder = Path(str(folder).removeprefix(LOCAL_PREFIX))
    cfg = read_embedder_config(folder)
    config = EmbedderConfig.from_dict({"clinical_dim": 0} | cfg["embedder"])  # v2: none
    gen = cfg["backbone"].get("generator")
    try:
        gen_cfg = GeneratorConfig(**gen) if gen else None
    except TypeError as e:
        raise CheckpointError(folder / CONFIG_NAME, f"malformed generator config: {e}") from e
    spec = config.spec
    if spec.kind == "openclip":  # the tower's weights are in our file: build it empty
        config_built = dataclasses.replace(config, backbone=f"openclip:{spec.model}")
    else:
        config_built = config
    backbone = build_backbone(
        config_built.spec,
        image_size=config.image_size,
        grid=config.grid,
        pool=config.pool,
        gem_p=config.gem_p,
        pixel_size=config.pixel_size,
        pixel_components=config.pixel_components,
        layers=config.layers,
        generator_config=gen_cfg,
    )
    embedder = Embedder(config, backbone)
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except FileNotFoundError as e:
        raise CheckpointError(folder, f"no {WEIGHTS_NAME}") from e
    except SafetensorError as e:
        raise CheckpointError(folder / WEIGHTS_NAME, str(e)) from e
    try:
        embedder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(folder / WEIGHTS_NAME, f"weights do not match config: {e}") from e
    return embedder.eval(), cfg


# How this code turns an embedder's weights into stored vectors. Part of every embedder's
# id, so that an index built before a change to it is refused (rebuild it) rather than
# searched with vectors of another kind.
VECTOR_RECIPE = "clinical part: mean of the picture's and its mirror image's"


def embedder_id(folder: str | Path) -> str:
    """Stable identity of what an embedder folder computes: sha256 of its weights file
    and of `VECTOR_RECIPE`, first 16 hex digits."""
    path = Path(str(folder).removeprefix(LOCAL_PREFIX)) / WEIGHTS_NAME
    h = hashlib.sha256(VECTOR_RECIPE.encode())
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError as e:
        raise CheckpointError(path.parent, f"no {WEIGHTS_NAME}") from e
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- numpy


@contextlib.contextmanager
def _evaluating(embedder: Embedder) -> Iterator[None]:
    """The embedder in eval mode for the block, its training flag restored after."""
    was = embedder.training
    embedder.eval()
    try:
        yield
    finally:
        embedder.train(was)


# Images per backbone pass at inference. More is slower on CPU, not faster: at 128 px,
# 16 frames per pass embed 135 frames/s on 2 cores, 32 frames 106 and 256 frames 45 (the
# activations stop fitting in cache).
FRAMES_PER_PASS = 16


@torch.no_grad()
def embed_cf_array(
    embedder: Embedder, cf: np.ndarray, batch_size: int = FRAMES_PER_PASS
) -> np.ndarray:
    """CF photos uint8 (N, S, S, 3) → float32 (N, dim), unit norm (eval mode, no grad)."""
    s = embedder.config.image_size
    if cf.dtype != np.uint8 or cf.ndim != 4 or cf.shape[1:] != (s, s, 3):
        raise DataError(f"cf must be uint8 (N, {s}, {s}, 3), got {cf.dtype} {cf.shape}")
    out = [np.zeros((0, embedder.config.out_dim), np.float32)]
    with _evaluating(embedder):
        for i in range(0, len(cf), batch_size):
            x = cf_tensor(cf[i : i + batch_size]).to(embedder.device)  # (b, 3, S, S)
            out.append(embedder.embed_cf(x).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def embed_ffa_array(
    embedder: Embedder,
    ffa: np.ndarray,
    times_s: np.ndarray,
    batch_size: int | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """FFA videos uint8 (N, T, S, S) + times (N, T) s [+ bool mask (N, T)] → float32 (N, dim);
    `batch_size` videos per pass (default: as many as fit FRAMES_PER_PASS frames, at least 1)."""
    s = embedder.config.image_size
    if ffa.dtype != np.uint8 or ffa.ndim != 4 or ffa.shape[2:] != (s, s):
        raise DataError(f"ffa must be uint8 (N, T, {s}, {s}), got {ffa.dtype} {ffa.shape}")
    times_s = np.asarray(times_s, dtype=np.float32)
    if times_s.shape != ffa.shape[:2]:
        raise DataError(f"times_s must be (N, T) = {ffa.shape[:2]}, got {times_s.shape}")
    dev = embedder.device
    batch_size = batch_size or max(1, FRAMES_PER_PASS // max(1, ffa.shape[1]))
    out = [np.zeros((0, embedder.config.out_dim), np.float32)]
    with _evaluating(embedder):
        for i in range(0, len(ffa), batch_size):
            x = to_model(ffa[i : i + batch_size]).to(dev)  # (b, T, S, S)
            t = torch.from_numpy(times_s[i : i + batch_size]).to(dev)  # (b, T)
            m = None if mask is None else torch.from_numpy(mask[i : i + batch_size]).to(dev)
            out.append(embedder.embed_ffa(x, t, m).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def cf_parts_array(embedder: Embedder, cf: np.ndarray) -> np.ndarray:
    """One CF photo uint8 (S, S, 3) → float32 (R, out_dim): its regions' parts of its
    embedding (`Embedder.cf_parts`; the sum over R is `embed_cf_array`'s vector)."""
    s = embedder.config.image_size
    if cf.dtype != np.uint8 or cf.shape != (s, s, 3):
        raise DataError(f"cf must be uint8 ({s}, {s}, 3), got {cf.dtype} {cf.shape}")
    with _evaluating(embedder):
        parts = embedder.cf_parts(cf_tensor(cf[None]).to(embedder.device))[0]
    return parts.cpu().numpy()


@torch.no_grad()
def ffa_parts_array(
    embedder: Embedder, ffa: np.ndarray, times_s: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One FFA video uint8 (T, S, S) + times (T,) s → float32 (T, R, out_dim), its frames'
    and regions' parts of its embedding (`Embedder.ffa_parts`), and the attention (T,)."""
    s = embedder.config.image_size
    if ffa.dtype != np.uint8 or ffa.ndim != 3 or ffa.shape[1:] != (s, s):
        raise DataError(f"ffa must be uint8 (T, {s}, {s}), got {ffa.dtype} {ffa.shape}")
    times_s = np.asarray(times_s, dtype=np.float32)
    if times_s.shape != ffa.shape[:1]:
        raise DataError(f"times_s must be ({len(ffa)},), got {times_s.shape}")
    dev = embedder.device
    x, t = to_model(ffa[None]).to(dev), torch.from_numpy(times_s[None]).to(dev)
    with _evaluating(embedder):
        parts, weights = embedder.ffa_parts(x, t)
    return parts[0].cpu().numpy(), weights[0].cpu().numpy()


def similarity_weights(config: EmbedderConfig, similarity: str) -> np.ndarray:
    """(out_dim,) factors that turn a stored embedding into a query vector whose inner
    product with stored embeddings is the `similarity` score: "combined" (the stored
    vector as it is), "pair" (the pair cosine) or "clinical" (the clinical cosine)."""
    if similarity not in SIMILARITIES:
        raise ConfigError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    ones = np.ones(config.out_dim, np.float32)
    if similarity == "combined":
        return ones
    if not config.clinical_dim:
        if similarity == "clinical":
            raise ConfigError(
                "this embedder has no clinical part (it was trained without "
                "diagnosis or lesion labels): use similarity 'pair'"
            )
        return ones
    w, d = config.clinical_weight, config.dim
    out = np.zeros(config.out_dim, np.float32)
    if similarity == "pair":
        out[:d] = 1 / (1 - w)  # stored part sqrt(1 - w) x pair, on both sides
    else:
        out[d:] = 1 / w
    return out
