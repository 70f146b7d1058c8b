"""Model scales as data: frozen dataclasses, loaded from `model_configs/<name>.json`.

A scale bundles the generator, the discriminators and the PatchNCE head. Checkpoints
store the same dictionaries in `config.json`, so a model is always rebuilt from data.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnknownModel

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass(frozen=True)
class GeneratorConfig:
    """pix2pixHD global generator with FiLM frame-time conditioning on the bottleneck."""

    image_size: int  # H = W of CF and FFA frames at the model's resolution
    k: int = 3  # frames per window: input = CF ‖ previous K frames, output = next K frames
    cf_channels: int = 3
    ngf: int = 64  # channels after the stem; doubled at each downsampling
    n_downsampling: int = 4
    n_blocks: int = 9  # residual blocks in the bottleneck
    max_channels: int = 1024
    time_freqs: int = 16  # sinusoidal frequencies per frame time (embedding = 2 * time_freqs)
    time_hidden: int = 256  # MLP width that produces FiLM gamma, beta
    autoregressive: bool = True  # False: previous-frame channels are always black

    def __post_init__(self) -> None:
        for name in ("image_size", "k", "cf_channels", "ngf", "n_blocks", "max_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"generator {name} must be >= 1, got {getattr(self, name)}")
        if self.n_downsampling < 1:
            raise ConfigError(f"generator n_downsampling must be >= 1, got {self.n_downsampling}")
        if self.image_size % (2**self.n_downsampling):
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by 2**n_downsampling "
                f"= {2**self.n_downsampling}"
            )

    def channels(self, level: int) -> int:
        """Feature channels after `level` downsamplings (level 0 = stem)."""
        return min(self.ngf * 2**level, self.max_channels)

    @property
    def bottleneck_channels(self) -> int:
        return self.channels(self.n_downsampling)

    @property
    def in_channels(self) -> int:
        return self.cf_channels + self.k


@dataclass(frozen=True)
class DiscriminatorConfig:
    """pix2pixHD multi-scale PatchGAN; one instance per pass (plain and knowledge-aware)."""

    ndf: int = 64
    n_layers: int = 3
    num_d: int = 2  # scales: the input, then average-pooled by 2 each time

    def __post_init__(self) -> None:
        for name in ("ndf", "n_layers", "num_d"):
            if getattr(self, name) < 1:
                raise ConfigError(f"discriminator {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class NCEConfig:
    """PatchNCE on generator-encoder features (PatchSampleF-like MLP head)."""

    layers: tuple[int, ...] = (0, 1, 2, 3, 4)  # encoder levels: 0 = stem, i = i-th downsampling
    num_patches: int = 256  # per layer and image
    dim: int = 256  # MLP output width
    temperature: float = 0.07

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("nce layers must not be empty")
        if self.num_patches < 2:
            raise ConfigError(f"nce num_patches must be >= 2, got {self.num_patches}")
        if self.temperature <= 0:
            raise ConfigError(f"nce temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class ScaleConfig:
    name: str
    generator: GeneratorConfig
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    nce: NCEConfig = field(default_factory=NCEConfig)

    def __post_init__(self) -> None:
        bad = [i for i in self.nce.layers if not 0 <= i <= self.generator.n_downsampling]
        if bad:
            raise ConfigError(
                f"nce layers {bad} outside 0..n_downsampling={self.generator.n_downsampling}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScaleConfig:
        try:
            nce = dict(d.get("nce", {}))
            if "layers" in nce:
                nce["layers"] = tuple(nce["layers"])
            return cls(
                name=str(d["name"]),
                generator=GeneratorConfig(**d["generator"]),
                discriminator=DiscriminatorConfig(**d.get("discriminator", {})),
                nce=NCEConfig(**nce),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed scale config {d!r}: {e}") from e

    def replace(self, **overrides: Any) -> ScaleConfig:
        """Override fields by name, e.g. `image_size=64, ndf=8, num_patches=32`."""
        groups: dict[str, dict[str, Any]] = {"generator": {}, "discriminator": {}, "nce": {}}
        top: dict[str, Any] = {}
        for key, value in overrides.items():
            owner = next(
                (
                    g
                    for g in groups
                    if key in {f.name for f in dataclasses.fields(getattr(self, g))}
                ),
                None,
            )
            if owner is not None:
                groups[owner][key] = tuple(value) if key == "layers" else value
            elif key == "name":
                top[key] = value
            else:
                raise ConfigError(f"unknown config field {key!r}")
        if "n_downsampling" in groups["generator"] and "layers" not in groups["nce"]:
            n = groups["generator"]["n_downsampling"]
            groups["nce"]["layers"] = tuple(i for i in self.nce.layers if i <= n)
        return dataclasses.replace(
            self,
            **top,
            **{g: dataclasses.replace(getattr(self, g), **kw) for g, kw in groups.items() if kw},
        )


def list_scales() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_scale(name: str) -> ScaleConfig:
    """A bundled scale by name ("tiny", "paper")."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise UnknownModel(name, list_scales())
    return ScaleConfig.from_dict(json.loads(path.read_text()))
