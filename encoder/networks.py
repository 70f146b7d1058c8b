"""The Fundus2Video generator: pix2pixHD global generator + FiLM frame-time conditioning.

Tensors are in model space: CF (B, 3, H, W) and FFA frames (B, K, H, W) in [-1, 1]
(black = -1); frame times are seconds after dye injection (B, K).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configs import GeneratorConfig


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


def init_weights(module: nn.Module) -> None:
    """pix2pixHD init: conv weights N(0, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TimeEmbedding(nn.Module):
    """Frame times (B, K) seconds → sinusoidal embedding of log1p(t) per frame → MLP (B, D)."""

    def __init__(self, k: int, freqs: int, hidden: int):
        super().__init__()
        # log1p(t) spans ~0..7 for 0..20 min; periods from ~0.1 to ~12 in that unit
        self.register_buffer(
            "freqs", torch.exp(torch.linspace(math.log(0.5), math.log(64.0), freqs))
        )
        self.mlp = nn.Sequential(
            nn.Linear(k * 2 * freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )

    def forward(self, times_s: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(times_s.float().clamp(min=0.0))  # (B, K)
        angles = x[..., None] * self.freqs  # (B, K, F)
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (B, K * 2F)
        return self.mlp(emb)  # (B, hidden)


class FiLMResnetBlock(nn.Module):
    """pad-conv-IN-FiLM-ReLU-pad-conv-IN, plus the identity."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3))
        self.norm1 = _norm(channels)
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3))
        self.norm2 = _norm(channels)
        self.film = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)  # start as the unconditioned pix2pixHD block
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(cond)[..., None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.norm1(self.conv1(x)) * (1 + gamma) + beta  # (B, C, h, w)
        h = self.norm2(self.conv2(F.relu(h)))
        return x + h


class Generator(nn.Module):
    """(CF, previous K frames, target frame times) → next K frames, all in [-1, 1]."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        c = config
        self.stem = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(c.in_channels, c.ngf, 7), _norm(c.ngf), nn.ReLU(True)
        )
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c.channels(i), c.channels(i + 1), 3, stride=2, padding=1),
                _norm(c.channels(i + 1)),
                nn.ReLU(True),
            )
            for i in range(c.n_downsampling)
        )
        self.time = TimeEmbedding(c.k, c.time_freqs, c.time_hidden)
        self.blocks = nn.ModuleList(
            FiLMResnetBlock(c.bottleneck_channels, c.time_hidden) for _ in range(c.n_blocks)
        )
        self.up = nn.Sequential(
            *(
                layer
                for i in reversed(range(c.n_downsampling))
                for layer in (
                    nn.ConvTranspose2d(
                        c.channels(i + 1), c.channels(i), 3, stride=2, padding=1, output_padding=1
                    ),
                    _norm(c.channels(i)),
                    nn.ReLU(True),
                )
            )
        )
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(c.ngf, c.k, 7), nn.Tanh())
        for name, m in self.named_modules():
            if not name.endswith("film"):
                init_weights(m)

    def inputs(self, cf: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """CF (B, 3, H, W) ‖ previous frames (B, K, H, W) → (B, 3 + K, H, W), checked."""
        c = self.config
        if cf.ndim != 4 or cf.shape[1] != c.cf_channels:
            raise ValueError(f"cf must be (B, {c.cf_channels}, H, W), got {tuple(cf.shape)}")
        if prev.shape != (cf.shape[0], c.k, *cf.shape[2:]):
            raise ValueError(
                f"prev must be (B, K={c.k}, H, W) = {(cf.shape[0], c.k, *cf.shape[2:])}, "
                f"got {tuple(prev.shape)}"
            )
        return torch.cat([cf, prev], dim=1)

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Input (B, 3 + K, H, W) → [stem (B, ngf, H, W), down_1, ..., down_n] feature maps."""
        feats = [self.stem(x)]
        for layer in self.down:
            feats.append(layer(feats[-1]))
        return feats

    def encode(self, cf: torch.Tensor, prev: torch.Tensor, times_s: torch.Tensor) -> torch.Tensor:
        """Encoder + time-conditioned residual bottleneck → (B, C, H / 2^n, W / 2^n)."""
        if times_s.shape != (cf.shape[0], self.config.k):
            raise ValueError(
                f"times_s must be (B, K) = {(cf.shape[0], self.config.k)}, "
                f"got {tuple(times_s.shape)}"
            )
        h = self.encoder_features(self.inputs(cf, prev))[-1]  # (B, C, h, w)
        cond = self.time(times_s)  # (B, time_hidden)
        for block in self.blocks:
            h = block(h, cond)
        return h

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Bottleneck features (B, C, h, w) → next K frames (B, K, H, W) in [-1, 1]."""
        return self.head(self.up(features))

    def forward(self, cf: torch.Tensor, prev: torch.Tensor, times_s: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(cf, prev, times_s))  # (B, K, H, W)


def gem_pool(features: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling (B, C, h, w) → (B, C); features are clamped at eps first."""
    return features.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
