"""One Fundus2Video training iteration: the networks, a window sampler and the step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..configs import ScaleConfig
from ..data import PairedVideos, cf_tensor, to_model, window
from ..discriminator import MultiscaleDiscriminator
from ..losses import (
    KNOWLEDGE_THRESHOLD,
    PatchSampleMLP,
    VGGLoss,
    feature_matching_loss,
    gradient_variance_loss,
    knowledge_mask,
    lsgan_loss,
    masked_l1,
    patch_nce_loss,
)
from ..networks import Generator


@dataclass(frozen=True)
class LossWeights:
    """Defaults measured on a 256-case phantom (README "Generator"): the public code's
    adversarial weights (gan 1, feat 10, gv 1, l1 10) give sharp vessels in the wrong
    place — CF and FFA are misregistered by a few pixels — and lose to the mean video on
    PSNR/SSIM; pixel-dominated weights (pix2pix's L1 = 100) with a weaker adversary win."""

    gan: float = 0.25
    feat: float = 2.5  # discriminator feature matching
    l1: float = 100.0  # (mask-weighted) L1
    nce: float = 1.0  # (mask-weighted) PatchNCE
    gv: float = 0.0  # gradient variance (sharpness; off by default, see above)
    vgg: float = 10.0  # only when VGG weights are given
    knowledge: float = 1.0  # knowledge-aware discriminator pass (GAN + feature matching)
    mask_alpha: float = 2.0  # L1 weight inside the knowledge mask is 1 + mask_alpha
    gv_patch: int = 8


@dataclass
class Nets:
    """Everything that trains: G, D, the knowledge-aware D, the PatchNCE head; VGG is frozen."""

    scale: ScaleConfig
    G: Generator
    D: MultiscaleDiscriminator
    D_knowledge: MultiscaleDiscriminator | None
    F: PatchSampleMLP
    vgg: VGGLoss | None = None

    @classmethod
    def build(
        cls, scale: ScaleConfig, knowledge: bool = True, vgg_weights: str | None = None
    ) -> Nets:
        g = scale.generator
        d_in = g.in_channels + g.k  # condition (CF ‖ previous K) ‖ frames (K)
        return cls(
            scale=scale,
            G=Generator(g),
            D=MultiscaleDiscriminator(d_in, scale.discriminator),
            D_knowledge=MultiscaleDiscriminator(d_in, scale.discriminator) if knowledge else None,
            F=PatchSampleMLP([g.channels(i) for i in scale.nce.layers], scale.nce.dim),
            vgg=VGGLoss(vgg_weights) if vgg_weights else None,
        )

    def modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"G": self.G, "D": self.D, "F": self.F}
        if self.D_knowledge is not None:
            out["D_knowledge"] = self.D_knowledge
        return out

    def to(self, device: torch.device) -> Nets:
        for m in (*self.modules().values(), self.vgg):
            if m is not None:
                m.to(device)
        return self

    def discriminators(self) -> list[nn.Module]:
        return [d for d in (self.D, self.D_knowledge) if d is not None]


@dataclass
class Batch:
    cf: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    prev: torch.Tensor  # (B, K, S, S) real frames j-K .. j-1 (black before frame 0)
    prev2: torch.Tensor  # (B, K, S, S) real frames j-2K .. j-K-1 (to predict `prev`)
    prev_times: torch.Tensor  # (B, K) times of `prev` (frame 0's time where index < 0)
    prev_valid: torch.Tensor  # (B, K) bool: index of `prev` >= 0
    target: torch.Tensor  # (B, K, S, S) frames j .. j+K-1
    times: torch.Tensor  # (B, K)
    mask: torch.Tensor  # (B, 1, S, S) float knowledge mask in {0, 1}

    def to(self, device: torch.device) -> Batch:
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})


@dataclass
class WindowSampler:
    """Random (video, window start, flip) triples from a PairedVideos, as model tensors."""

    data: PairedVideos
    k: int
    rng: np.random.Generator
    flip: bool = True
    threshold: float = KNOWLEDGE_THRESHOLD
    centred: bool = True  # knowledge_mask(..., fov=data.fov): see losses.knowledge_mask
    masks: np.ndarray = field(init=False)  # bool (N, S, S)

    def __post_init__(self) -> None:
        first = torch.from_numpy(self.data.ffa[:, 0])
        last = torch.from_numpy(self.data.ffa[:, -1])
        fov = torch.from_numpy(self.data.fov) if self.centred else None
        self.masks = knowledge_mask(first, last, self.threshold, fov).numpy()

    def sample(self, batch_size: int) -> Batch:
        n, t = len(self.data), self.data.frames
        vids = self.rng.integers(0, n, size=batch_size)
        starts = self.rng.integers(0, t - self.k + 1, size=batch_size)
        flips = self.rng.random(batch_size) < 0.5 if self.flip else np.zeros(batch_size, bool)
        return self.batch(vids, starts, flips)

    def batch(self, vids: np.ndarray, starts: np.ndarray, flips: np.ndarray | None = None) -> Batch:
        k = self.k
        items = []
        for v, j, fl in zip(
            vids, starts, flips if flips is not None else [False] * len(vids), strict=True
        ):
            lo = max(j - 2 * k, 0)  # only the frames this window needs: j-2K .. j+K-1
            ffa = to_model(self.data.ffa[v, lo : j + k])[None]  # (1, <= 3K, S, S)
            idx = torch.arange(j - k, j).clamp(min=0)
            item = dict(
                cf=cf_tensor(self.data.cf[v]),
                prev=window(ffa, j - k - lo, k)[0],
                prev2=window(ffa, j - 2 * k - lo, k)[0],
                prev_times=torch.from_numpy(self.data.times_s[v])[idx],
                prev_valid=torch.arange(j - k, j) >= 0,
                target=ffa[0, j - lo : j - lo + k],
                times=torch.from_numpy(self.data.times_s[v, j : j + k]),
                mask=torch.from_numpy(self.masks[v])[None].float(),
            )
            if fl:
                item = {key: x.flip(-1) if x.ndim == 3 else x for key, x in item.items()}
            items.append(item)
        return Batch(**{key: torch.stack([it[key] for it in items]) for key in items[0]})


@dataclass(frozen=True)
class StepOptions:
    knowledge_mask: bool = True
    autoregressive: bool = True
    weights: LossWeights = LossWeights()


def _f(x: torch.Tensor) -> float:
    return float(x.detach())


def _set_requires_grad(modules: list[nn.Module], flag: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


def _blacken(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Keep x inside the mask (B, 1, S, S), black (-1) outside."""
    return x * m + (m - 1)


def nce_loss(nets: Nets, batch: Batch, fake: torch.Tensor, knowledge: bool) -> torch.Tensor:
    """PatchNCE between G-encoder features of (CF ‖ fake) and (CF ‖ real), masked inputs and
    mask-weighted patch sampling when `knowledge`; a video with an empty mask uses whole frames."""
    nce = nets.scale.nce
    if knowledge:
        empty = batch.mask.flatten(1).sum(1) < 1  # (B,)
        m = torch.where(empty[:, None, None, None], torch.ones_like(batch.mask), batch.mask)
        x_q = _blacken(torch.cat([batch.cf, fake], 1), m)
        x_k = _blacken(torch.cat([batch.cf, batch.target], 1), m)
        weights: torch.Tensor | None = m
    else:
        x_q, x_k, weights = (
            torch.cat([batch.cf, fake], 1),
            torch.cat([batch.cf, batch.target], 1),
            None,
        )
    feats_q = nets.G.encoder_features(x_q)
    with torch.no_grad():
        feats_k = nets.G.encoder_features(x_k)
    feats_q = [feats_q[i] for i in nce.layers]
    feats_k = [feats_k[i] for i in nce.layers]
    ids = nets.F.sample_ids(feats_k, nce.num_patches, weights)
    q = nets.F(feats_q, ids)
    with torch.no_grad():
        k = nets.F(feats_k, ids)
    return torch.stack(
        [patch_nce_loss(a, b, nce.temperature) for a, b in zip(q, k, strict=True)]
    ).mean()


def train_step(
    nets: Nets,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    batch: Batch,
    options: StepOptions,
    ss_prob: float = 0.0,
    autocast: contextlib.AbstractContextManager | None = None,
    scaler_g: torch.amp.GradScaler | None = None,
    scaler_d: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One D update then one G (+ PatchNCE head) update; returns the losses by stats name."""
    w, know = options.weights, options.knowledge_mask
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    g_cfg = nets.G.config
    stats: dict[str, float] = {}

    # previous frames: teacher forcing, scheduled sampling, or black (non-autoregressive)
    if not options.autoregressive:
        prev = torch.full_like(batch.prev, -1.0)
    else:
        prev = batch.prev
        use = torch.rand(prev.shape[0], device=prev.device) < ss_prob  # (B,)
        if use.any():
            with torch.no_grad(), ctx:
                gen = nets.G(batch.cf[use], batch.prev2[use], batch.prev_times[use]).float()
            valid = batch.prev_valid[use][..., None, None]  # (b, K, 1, 1)
            prev = prev.clone()
            prev[use] = torch.where(valid, gen, -1.0)
        stats["Progress/ss_used"] = float(use.float().mean())
    cond = torch.cat([batch.cf, prev], 1)  # (B, 3 + K, S, S)
    m = batch.mask

    with ctx:
        fake = nets.G(batch.cf, prev, batch.times)  # (B, K, S, S)

    # ---- discriminators
    _set_requires_grad(nets.discriminators(), True)
    with ctx:
        real_in = torch.cat([cond, batch.target], 1)
        fake_in = torch.cat([cond, fake.detach()], 1)
        d_real = lsgan_loss(nets.D(real_in), True)
        d_fake = lsgan_loss(nets.D(fake_in), False)
        d_total = 0.5 * (d_real + d_fake)
        if know:
            dk_real = lsgan_loss(nets.D_knowledge(_blacken(real_in, m)), True)
            dk_fake = lsgan_loss(nets.D_knowledge(_blacken(fake_in, m)), False)
            d_total = d_total + 0.5 * w.knowledge * (dk_real + dk_fake)
            stats |= {
                "Loss/D_knowledge_real": _f(dk_real),
                "Loss/D_knowledge_fake": _f(dk_fake),
            }
    opt_d.zero_grad(set_to_none=True)
    _backward_step(d_total, opt_d, scaler_d)
    stats |= {
        "Loss/D_real": _f(d_real),
        "Loss/D_fake": _f(d_fake),
        "Loss/D_total": _f(d_total),
    }

    # ---- generator and PatchNCE head
    _set_requires_grad(nets.discriminators(), False)
    with ctx:
        fake_in = torch.cat([cond, fake], 1)
        pred_fake = nets.D(fake_in)
        with torch.no_grad():
            pred_real = nets.D(real_in)
        g_gan = lsgan_loss(pred_fake, True)
        g_feat = feature_matching_loss(pred_fake, pred_real)
        if know:
            pk_fake = nets.D_knowledge(_blacken(fake_in, m))
            with torch.no_grad():
                pk_real = nets.D_knowledge(_blacken(real_in, m))
            g_gan_k = lsgan_loss(pk_fake, True)
            g_feat_k = feature_matching_loss(pk_fake, pk_real)
        else:
            g_gan_k = g_feat_k = fake.new_zeros(())
        nce = nce_loss(nets, batch, fake, know)
        vgg = nets.vgg(fake, batch.target) if nets.vgg is not None else fake.new_zeros(())
    # pixel losses in float32, outside autocast
    l1 = masked_l1(fake.float(), batch.target, m if know else None, w.mask_alpha)
    gv = gradient_variance_loss(fake.float(), batch.target, min(w.gv_patch, g_cfg.image_size))
    g_total = (
        w.gan * (g_gan + w.knowledge * g_gan_k)
        + w.feat * (g_feat + w.knowledge * g_feat_k)
        + w.l1 * l1
        + w.gv * gv
        + w.nce * nce
        + w.vgg * vgg
    )
    opt_g.zero_grad(set_to_none=True)
    _backward_step(g_total, opt_g, scaler_g)
    stats |= {
        "Loss/G_gan": _f(g_gan),
        "Loss/G_feat": _f(g_feat),
        "Loss/G_gan_knowledge": _f(g_gan_k),
        "Loss/G_feat_knowledge": _f(g_feat_k),
        "Loss/G_l1": _f(l1),
        "Loss/G_gv": _f(gv),
        "Loss/G_nce": _f(nce),
        "Loss/G_vgg": _f(vgg),
        "Loss/G_total": _f(g_total),
    }
    return stats


def _backward_step(
    loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def make_optimizers(
    nets: Nets, lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999)
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G + PatchNCE head (one optimizer, two groups: the head trains) and for the Ds."""
    opt_g = torch.optim.Adam(
        [{"params": nets.G.parameters()}, {"params": nets.F.parameters()}], lr=lr, betas=betas
    )
    opt_d = torch.optim.Adam(
        [p for d in nets.discriminators() for p in d.parameters()], lr=lr, betas=betas
    )
    return opt_g, opt_d
