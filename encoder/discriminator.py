"""pix2pixHD multi-scale PatchGAN (LSGAN) that returns every intermediate feature map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import DiscriminatorConfig
from .networks import init_weights


class NLayerDiscriminator(nn.Module):
    """conv4x4/s2 + LReLU, (n_layers - 1) × conv/s2 + IN + LReLU, conv/s1 + IN + LReLU, conv → 1."""

    def __init__(self, in_channels: int, ndf: int, n_layers: int):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, ndf, 4, 2, 2), nn.LeakyReLU(0.2, True))
        ]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = min(ch * 2, 512)
            stride = 2 if i < n_layers else 1
            layers.append(
                nn.Sequential(
                    nn.Conv2d(ch, out, 4, stride, 2),
                    nn.InstanceNorm2d(out, affine=False),
                    nn.LeakyReLU(0.2, True),
                )
            )
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 2))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, H, W) → [features ..., patch logits (B, 1, h, w)]."""
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """`num_d` PatchGANs on the input average-pooled by 1, 2, 4, ..."""

    def __init__(self, in_channels: int, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        self.nets = nn.ModuleList(
            NLayerDiscriminator(in_channels, config.ndf, config.n_layers)
            for _ in range(config.num_d)
        )
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """x (B, C, H, W) → per scale, the list of features whose last item is the logits."""
        out = []
        for i, net in enumerate(self.nets):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(net(x))
        return out
