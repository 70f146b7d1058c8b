"""Embedder backbones behind one interface: images → regional feature grids.

Every backbone maps
- CF photos (B, 3, S, S) in [-1, 1]                        → (B, C, g, g)
- FFA videos (B, T, S, S) in [-1, 1] + times (B, T) seconds → (B, T', C, g, g)
  for the frames picked by `select` (B, T') (all frames when None),
where (C, g, g) = `feature_shape`: a feature map pooled over a g × g grid of regions
(GeM or signed average; g = 1 is global pooling), so the projection heads can see
*where* a vessel, the disc or a lesion is, which instance-level matching needs.

- `GeneratorBackbone` ("generator" trained / "scratch" random): `Generator.encode`
  (encoder + time-conditioned residual bottleneck); the bottleneck output and, by
  default, the last two encoder levels it is computed from (multi-layer features: the
  finer level keeps vessel detail the bottleneck blurs). The generator's input is
  CF (3 ch) ‖ K previous FFA frames, with the times of the frames it is asked for:
    CF          → (CF ‖ K black frames), times 0 — the generator's first window;
    FFA frame t → (black CF ‖ frames t-K+1 .. t, black before frame 0), their times
                   (0 for black frames). Each frame thus sees its own recent history.
- `OpenClipBackbone` ("openclip:<model>[@/local/checkpoint.pt]"): an open_clip image
  tower built for our image size (`force_image_size`), last block's patch tokens as a
  map; grey FFA frames are repeated to 3 channels; CLIP mean/std normalisation.
  Nothing is ever downloaded: random init, or the named local file.
- `PixelBackbone` ("pixels"): area-downsampled pixels (pixel_size²) projected on a PCA
  fitted on the training split (`fit`), one PCA per modality; (C, 1, 1) "maps". The floor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .configs import GeneratorConfig
from .errors import ConfigError
from .networks import Generator

log = logging.getLogger(__name__)

DEFAULT_OPENCLIP = "ViT-S-32"  # 16 patch tokens at 128 px: the cheapest tower on a CPU


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone string: kind in {generator, scratch, openclip, pixels}."""

    kind: str
    model: str | None = None  # open_clip model name
    checkpoint: str | None = None  # local open_clip weights file

    @classmethod
    def parse(cls, text: str) -> BackboneSpec:
        if text in ("generator", "scratch", "pixels"):
            return cls(text)
        if text.startswith("openclip"):
            rest = text.removeprefix("openclip").removeprefix(":")
            model, _, ckpt = rest.partition("@")
            return cls("openclip", model or DEFAULT_OPENCLIP, ckpt or None)
        raise ConfigError(
            f"unknown backbone {text!r}: use generator, scratch, pixels, "
            "openclip:<model> or openclip:<model>@/local/checkpoint.pt"
        )

    @property
    def needs_generator(self) -> bool:
        return self.kind in ("generator", "scratch")


def pool_regions(x: torch.Tensor, grid: int, pool: str, p: float) -> torch.Tensor:
    """(N, C, h, w) → (N, C, g, g), g = min(grid, h): GeM (clamped at 1e-6) or signed mean."""
    g = min(grid, x.shape[-2], x.shape[-1])
    if pool == "avg":
        return _mean_pool(x, g)
    return _mean_pool(x.clamp(min=1e-6).pow(p), g).pow(1.0 / p)


def _mean_pool(x: torch.Tensor, g: int) -> torch.Tensor:
    """Adaptive mean pooling to g x g; a plain avg_pool2d when g divides the map (the same
    bins, and on CPU 5-10x faster than adaptive pooling, which dominated at inference)."""
    h, w = x.shape[-2:]
    if (h, w) == (g, g):
        return x
    if h % g == 0 and w % g == 0:
        return F.avg_pool2d(x, (h // g, w // g))
    return F.adaptive_avg_pool2d(x, g)


class Backbone(nn.Module):
    """Interface; subclasses set `feature_shape` and implement the two feature methods."""

    feature_shape: tuple[int, int, int]  # (C, g, g)

    def cf_features(self, cf: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ffa_features(
        self, frames: torch.Tensor, times_s: torch.Tensor, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


def _pick(frames: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """Frames (B, T, ...) at indices select (B, T') → (B, T', ...)."""
    if select is None:
        return frames
    b = torch.arange(frames.shape[0], device=frames.device)[:, None]
    return frames[b, select]


class GeneratorBackbone(Backbone):
    """`Generator.encode` features: `layers` index [stem, down_1, ..., down_n, bottleneck]
    (-1 = bottleneck, -2 = down_n, ...), each pooled to the same grid, concatenated."""

    def __init__(
        self, generator: Generator, grid: int, pool: str, gem_p: float, layers: tuple[int, ...]
    ):
        super().__init__()
        self.generator = generator
        self.grid, self.pool, self.gem_p = grid, pool, gem_p
        c = generator.config
        levels = c.n_downsampling + 2  # stem, n downsamplings, bottleneck
        bad = [i for i in layers if not -levels <= i < levels]
        if not layers or bad:
            raise ConfigError(
                f"generator layers {list(layers)} must index the {levels} levels "
                "[stem, down_1 .. down_n, bottleneck] (-1 = bottleneck)"
            )
        self.layers = tuple(i % levels for i in layers)
        channels = [c.channels(i) for i in range(c.n_downsampling + 1)] + [c.bottleneck_channels]
        sides = [c.image_size // 2**i for i in range(c.n_downsampling + 1)]
        sides.append(sides[-1])
        g = min(grid, *(sides[i] for i in self.layers))
        self.feature_shape = (sum(channels[i] for i in self.layers), g, g)

    @property
    def k(self) -> int:
        return self.generator.config.k

    def _encode(self, cf: torch.Tensor, prev: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """The body of `Generator.encode`, keeping the encoder levels it passes through."""
        gen = self.generator
        feats = gen.encoder_features(gen.inputs(cf, prev))  # [stem, down_1, ..., down_n]
        if gen.config.n_downsampling + 1 in self.layers:  # the bottleneck is asked for
            h, cond = feats[-1], gen.time(times)  # (N, C, h, w), (N, time_hidden)
            for block in gen.blocks:
                h = block(h, cond)
            feats.append(h)
        g = self.feature_shape[1]
        pooled = [pool_regions(feats[i], g, self.pool, self.gem_p) for i in self.layers]
        return torch.cat(pooled, 1)  # (N, C, g, g)

    def cf_features(self, cf: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = cf.shape
        prev = cf.new_full((b, self.k, s, s), -1.0)  # (B, K, S, S) black
        return self._encode(cf, prev, cf.new_zeros(b, self.k))

    def ffa_features(
        self, frames: torch.Tensor, times_s: torch.Tensor, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, t, s, _ = frames.shape
        k = self.k
        padded = torch.cat([frames.new_full((b, k - 1, s, s), -1.0), frames], 1)  # (B, T+K-1, ...)
        tpad = torch.cat([times_s.new_zeros(b, k - 1), times_s], 1)  # (B, T+K-1)
        idx = torch.arange(t, device=frames.device)[None].expand(b, t) if select is None else select
        offs = torch.arange(k, device=frames.device)  # window of frame i = padded[i : i + K]
        win = idx[..., None] + offs  # (B, T', K)
        bi = torch.arange(b, device=frames.device)[:, None, None]
        prev = padded[bi, win]  # (B, T', K, S, S)
        wt = tpad[bi, win].float()  # (B, T', K)
        n = prev.shape[1]
        cf = frames.new_full((b * n, 3, s, s), -1.0)  # black CF
        feats = self._encode(cf, prev.flatten(0, 1), wt.flatten(0, 1))  # (B * T', C, g, g)
        return feats.unflatten(0, (b, n))


class OpenClipBackbone(Backbone):
    def __init__(
        self,
        model: str,
        image_size: int,
        grid: int,
        pool: str,
        gem_p: float,
        checkpoint: str | None = None,
    ):
        super().__init__()
        import open_clip  # heavy import, only for this backbone

        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ConfigError(f"open_clip checkpoint {checkpoint!r} is not a local file")
        if model not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {model!r}")
        clip = open_clip.create_model(
            model,
            pretrained=checkpoint,  # None: random init; a file path: local weights, no download
            load_weights=checkpoint is not None,
            force_image_size=image_size,
            pretrained_image=False,
            pretrained_text=False,
        )
        self.visual = clip.visual
        pre = getattr(self.visual, "preprocess_cfg", {})
        mean = torch.tensor(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        std = torch.tensor(pre.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.register_buffer("mean", mean[None, :, None, None], persistent=False)
        self.register_buffer("std", std[None, :, None, None], persistent=False)
        self.grid, self.pool, self.gem_p = grid, pool, gem_p
        with torch.no_grad():
            probe = self._map(torch.zeros(1, 3, image_size, image_size))
        self.feature_shape = tuple(pool_regions(probe, grid, pool, gem_p).shape[1:])

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) / 2 - self.mean) / self.std
        out = self.visual.forward_intermediates(
            x, indices=1, normalize_intermediates=True, intermediates_only=True
        )
        return out["image_intermediates"][-1]  # (N, C, h, w)

    def cf_features(self, cf: torch.Tensor) -> torch.Tensor:
        return pool_regions(self._map(cf), self.grid, self.pool, self.gem_p)

    def ffa_features(
        self, frames: torch.Tensor, times_s: torch.Tensor, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = _pick(frames, select)  # (B, T', S, S)
        b, n = x.shape[:2]
        rgb = x.flatten(0, 1)[:, None].expand(-1, 3, -1, -1)  # (B * T', 3, S, S)
        return self.cf_features(rgb).unflatten(0, (b, n))


class PixelBackbone(Backbone):
    """Downsampled pixels → PCA (per modality); the PCA is a saved buffer, fitted once."""

    def __init__(self, pixel_size: int, components: int):
        super().__init__()
        self.pixel_size, self.components = pixel_size, components
        for name, d in (("cf", 3 * pixel_size**2), ("ffa", pixel_size**2)):
            self.register_buffer(f"{name}_mean", torch.zeros(d))
            self.register_buffer(f"{name}_basis", torch.zeros(components, d))
            self.register_buffer(f"{name}_scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.feature_shape = (components, 1, 1)

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, self.pixel_size).flatten(1)  # (N, C * p * p)

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mean, basis = getattr(self, f"{name}_mean"), getattr(self, f"{name}_basis")
        z = (self._pixels(x) - mean) @ basis.T / getattr(self, f"{name}_scale")
        return z[..., None, None]  # (N, components, 1, 1)

    @torch.no_grad()
    def fit(self, cf: torch.Tensor, frames: torch.Tensor) -> None:
        """PCA of CF (N, 3, S, S) and FFA frames (N, T, S, S) (training split only)."""
        for name, x in (("cf", cf), ("ffa", frames.flatten(0, 1)[:, None])):
            v = self._pixels(x.float()).double()  # (n, d)
            mean = v.mean(0)
            _, sv, vh = torch.linalg.svd(v - mean, full_matrices=False)
            k = min(self.components, vh.shape[0])
            basis = torch.zeros_like(getattr(self, f"{name}_basis"))
            basis[:k] = vh[:k].float()
            getattr(self, f"{name}_mean").copy_(mean.float())
            getattr(self, f"{name}_basis").copy_(basis)
            scale = (sv[0] / max(len(v) - 1, 1) ** 0.5).clamp(min=1e-6)  # std of component 1
            getattr(self, f"{name}_scale").copy_(scale.float())
        self.fitted.fill_(True)

    def cf_features(self, cf: torch.Tensor) -> torch.Tensor:
        return self._project("cf", cf)

    def ffa_features(
        self, frames: torch.Tensor, times_s: torch.Tensor, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = _pick(frames, select)  # (B, T', S, S)
        b, n = x.shape[:2]
        return self._project("ffa", x.flatten(0, 1)[:, None]).unflatten(0, (b, n))


def build_backbone(
    spec: BackboneSpec,
    *,
    image_size: int,
    grid: int,
    pool: str,
    gem_p: float,
    pixel_size: int,
    pixel_components: int,
    layers: tuple[int, ...] = (-1,),
    generator_config: GeneratorConfig | None = None,
) -> Backbone:
    """A backbone with fresh weights (a generator one needs the generator's config)."""
    if spec.needs_generator:
        if generator_config is None:
            raise ConfigError(f"backbone {spec.kind!r} needs the generator's config")
        if generator_config.image_size != image_size:
            raise ConfigError(
                f"embedder image_size {image_size} differs from the generator's "
                f"{generator_config.image_size}"
            )
        return GeneratorBackbone(Generator(generator_config), grid, pool, gem_p, layers)
    if spec.kind == "openclip":
        return OpenClipBackbone(spec.model, image_size, grid, pool, gem_p, spec.checkpoint)
    return PixelBackbone(pixel_size, pixel_components)
