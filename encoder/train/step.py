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
from . import distributed


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
    # (B, R, K, S, S) the R windows before `prev`, latest first: earlier[:, r] are real
    # frames j-(r+2)K .. j-(r+1)K-1 (scheduled sampling predicts `prev` from them)
    earlier: torch.Tensor
    earlier_times: torch.Tensor  # (B, R, K) times of `prev` and the R-1 windows before it
    earlier_valid: torch.Tensor  # (B, R, K) bool: those frames' indices are >= 0
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
    rollout: int = 1  # windows before `prev` in each item (`Batch.earlier`)
    masks: np.ndarray = field(init=False)  # bool (N, S, S)

    def __post_init__(self) -> None:
        first = torch.from_numpy(self.data.ffa[:, 0])
        last = torch.from_numpy(self.data.ffa[:, -1])
        fov = torch.from_numpy(self.data.fov) if self.centred else None
        self.masks = knowledge_mask(first, last, self.threshold, fov).numpy()

    def sample(self, batch_size: int, part: slice = slice(None)) -> Batch:
        """Draw a batch of `batch_size` windows; build its rows `part` (a rank's share of a
        global batch: the draw is the same for every rank)."""
        n, t = len(self.data), self.data.frames
        vids = self.rng.integers(0, n, size=batch_size)
        starts = self.rng.integers(0, t - self.k + 1, size=batch_size)
        flips = self.rng.random(batch_size) < 0.5 if self.flip else np.zeros(batch_size, bool)
        return self.batch(vids[part], starts[part], flips[part])

    def batch(self, vids: np.ndarray, starts: np.ndarray, flips: np.ndarray | None = None) -> Batch:
        k, r = self.k, self.rollout
        items = []
        for v, j, fl in zip(
            vids, starts, flips if flips is not None else [False] * len(vids), strict=True
        ):
            before = [j - (i + 1) * k for i in range(r + 1)]  # prev's window's start, then earlier
            lo = max(before[-1], 0)  # only the frames this item needs
            ffa = to_model(self.data.ffa[v, lo : j + k])[None]  # (1, <= (R + 2)K, S, S)
            idx = torch.stack([torch.arange(a, a + k) for a in before[:-1]])  # (R, K)
            item = dict(
                cf=cf_tensor(self.data.cf[v]),
                prev=window(ffa, before[0] - lo, k)[0],
                earlier=torch.stack([window(ffa, a - lo, k)[0] for a in before[1:]]),
                earlier_times=torch.from_numpy(self.data.times_s[v])[idx.clamp(min=0)],
                earlier_valid=idx >= 0,
                target=ffa[0, j - lo : j - lo + k],
                times=torch.from_numpy(self.data.times_s[v, j : j + k]),
                mask=torch.from_numpy(self.masks[v])[None].float(),
            )
            if fl:
                item = {key: x.flip(-1) if x.ndim >= 3 else x for key, x in item.items()}
            items.append(item)
        return Batch(**{key: torch.stack([it[key] for it in items]) for key in items[0]})


@dataclass(frozen=True)
class StepOptions:
    knowledge_mask: bool = True  # mask-weighted L1 and PatchNCE sampling
    autoregressive: bool = True
    weights: LossWeights = LossWeights()
    knowledge_discriminator: bool = True  # with the mask: the knowledge-aware D's pass

    @property
    def uses_knowledge_discriminator(self) -> bool:
        """Whether the knowledge-aware discriminator looks (it needs the knowledge mask)."""
        return self.knowledge_mask and self.knowledge_discriminator


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
    ids = _patch_ids(nets.F, feats_k, nce.num_patches, weights)
    q = nets.F(feats_q, ids)
    with torch.no_grad():
        k = nets.F(feats_k, ids)
    return torch.stack(
        [patch_nce_loss(a, b, nce.temperature) for a, b in zip(q, k, strict=True)]
    ).mean()


def _patch_ids(
    head: PatchSampleMLP,
    feats: list[torch.Tensor],
    num_patches: int,
    weights: torch.Tensor | None,
) -> list[torch.Tensor]:
    """PatchNCE locations of this batch; under torchrun drawn for the global batch (its
    weights gathered; every rank draws alike) and this rank's rows kept."""
    world = distributed.world_size()
    if world == 1:
        return head.sample_ids(feats, num_patches, weights)
    b, rank = feats[0].shape[0], distributed.rank()
    shapes = [f.new_empty(b * world, 1, *f.shape[2:]) for f in feats]  # only shapes matter
    full = distributed.gather(weights) if weights is not None else None
    return [ids[rank * b : (rank + 1) * b] for ids in head.sample_ids(shapes, num_patches, full)]


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
    """One G (+ PatchNCE head) update then one D update, as pix2pixHD orders them: every
    loss of the step is computed against the same discriminator weights, so each
    discriminator looks once at the real and once at the generated window, and both
    updates use those predictions. Returns the losses by stats name."""
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    prev, sampling = previous_frames(nets, batch, options.autoregressive, ss_prob, ctx)
    cond = torch.cat([batch.cf, prev], 1)  # (B, 3 + K, S, S)
    with ctx:
        fake = nets.G(batch.cf, prev, batch.times)  # (B, K, S, S)
        preds = discriminate(nets, batch, cond, fake, options.uses_knowledge_discriminator)
    g_losses = generator_phase(nets, opt_g, batch, fake, preds, options, ctx, scaler_g)
    d_losses = discriminator_phase(opt_d, preds, options.weights, scaler_d)
    return sampling | loss_stats(d_losses | g_losses)


def previous_frames(
    nets: Nets,
    batch: Batch,
    autoregressive: bool,
    ss_prob: float,
    ctx: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The previous frames G is conditioned on → (B, K, S, S) and their stats: real ones
    (teacher forcing), G's own with probability ss_prob (scheduled sampling), or black
    without autoregression."""
    if not autoregressive:
        return torch.full_like(batch.prev, -1.0), {}
    prev, b, rank = batch.prev, batch.prev.shape[0], distributed.rank()
    # drawn for the global batch (every rank alike), this rank's rows kept
    draw = torch.rand(b * distributed.world_size(), device=prev.device)
    use = draw[rank * b : (rank + 1) * b] < ss_prob  # (B,)
    if use.any():
        cf, times, valid = batch.cf[use], batch.earlier_times[use], batch.earlier_valid[use]
        gen = batch.earlier[use][:, -1]  # real frames, then G's own window by window
        with torch.no_grad(), ctx:
            for r in reversed(range(times.shape[1])):
                out = nets.G(cf, gen, times[:, r]).float()
                gen = torch.where(valid[:, r, :, None, None], out, -1.0)
        prev = prev.clone()
        prev[use] = gen
    return prev, {"Progress/ss_used": float(use.float().mean())}


Predictions = list[list[torch.Tensor]]  # per scale, the features whose last item is the logits


@dataclass
class WindowPredictions:
    """Both discriminators' predictions on the real and the generated window (CF ‖
    previous ‖ frames), recorded with the graph back into G and into D's weights."""

    real: Predictions
    fake: Predictions
    real_knowledge: Predictions | None  # None without the knowledge-aware discriminator
    fake_knowledge: Predictions | None

    @property
    def knowledge(self) -> bool:
        """Whether the knowledge-aware discriminator looked too."""
        return self.fake_knowledge is not None


def discriminate(
    nets: Nets, batch: Batch, cond: torch.Tensor, fake: torch.Tensor, knowledge: bool
) -> WindowPredictions:
    """The step's one pass of each discriminator over the real and the generated window."""
    real_in, fake_in = torch.cat([cond, batch.target], 1), torch.cat([cond, fake], 1)
    if not knowledge:
        return WindowPredictions(nets.D(real_in), nets.D(fake_in), None, None)
    return WindowPredictions(
        nets.D(real_in),
        nets.D(fake_in),
        nets.D_knowledge(_blacken(real_in, batch.mask)),
        nets.D_knowledge(_blacken(fake_in, batch.mask)),
    )


def discriminator_phase(
    opt_d: torch.optim.Optimizer,
    preds: WindowPredictions,
    weights: LossWeights,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """One update of D (and the knowledge-aware D): real windows → 1, generated → 0; the
    gradient reaches D's weights alone → the D losses by name."""
    losses = {"D_real": lsgan_loss(preds.real, True), "D_fake": lsgan_loss(preds.fake, False)}
    total = 0.5 * (losses["D_real"] + losses["D_fake"])
    if preds.knowledge:
        losses["D_knowledge_real"] = lsgan_loss(preds.real_knowledge, True)
        losses["D_knowledge_fake"] = lsgan_loss(preds.fake_knowledge, False)
        knowledge = losses["D_knowledge_real"] + losses["D_knowledge_fake"]
        total = total + 0.5 * weights.knowledge * knowledge
    losses["D_total"] = total
    _backward_step(total, opt_d, scaler)
    return losses


def _adversarial_losses(preds: WindowPredictions) -> dict[str, torch.Tensor]:
    """G's GAN and feature-matching losses against D (and the knowledge-aware D)
    (`feature_matching_loss` detaches the real features)."""
    losses = {
        "G_gan": lsgan_loss(preds.fake, True),
        "G_feat": feature_matching_loss(preds.fake, preds.real),
    }
    if preds.knowledge:
        fake, real = preds.fake_knowledge, preds.real_knowledge
        losses["G_gan_knowledge"] = lsgan_loss(fake, True)
        losses["G_feat_knowledge"] = feature_matching_loss(fake, real)
    else:
        zero = preds.fake[0][-1].new_zeros(())
        losses["G_gan_knowledge"] = losses["G_feat_knowledge"] = zero
    return losses


def generator_phase(
    nets: Nets,
    opt_g: torch.optim.Optimizer,
    batch: Batch,
    fake: torch.Tensor,
    preds: WindowPredictions,
    options: StepOptions,
    ctx: contextlib.AbstractContextManager,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """One update of G and the PatchNCE head on `fake` (with its graph); the gradient
    reaches their weights alone, and the discriminators' graph is kept for their update
    → the G losses."""
    w, know = options.weights, options.knowledge_mask
    with ctx:
        losses = _adversarial_losses(preds)
        losses["G_nce"] = nce_loss(nets, batch, fake, know)
        losses["G_vgg"] = (
            nets.vgg(fake, batch.target) if nets.vgg is not None else fake.new_zeros(())
        )
    # pixel losses in float32, outside autocast
    mask = batch.mask if know else None
    weight_sum = None  # under torchrun: the mean over ranks (the global batch's mean L1)
    if mask is not None and distributed.active():
        weight_sum = distributed.mean_value((1.0 + w.mask_alpha * mask).sum())
    losses["G_l1"] = masked_l1(fake.float(), batch.target, mask, w.mask_alpha, weight_sum)
    patch = min(w.gv_patch, nets.G.config.image_size)
    losses["G_gv"] = gradient_variance_loss(fake.float(), batch.target, patch)
    total = (
        w.gan * (losses["G_gan"] + w.knowledge * losses["G_gan_knowledge"])
        + w.feat * (losses["G_feat"] + w.knowledge * losses["G_feat_knowledge"])
        + w.l1 * losses["G_l1"]
        + w.gv * losses["G_gv"]
        + w.nce * losses["G_nce"]
        + w.vgg * losses["G_vgg"]
    )
    losses["G_total"] = total
    _backward_step(total, opt_g, scaler, keep_graph=True)  # D's update reuses its graph
    return losses


def loss_stats(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Losses by stats name ("Loss/<name>") as floats."""
    return {f"Loss/{k}": float(v.detach()) for k, v in losses.items()}


def _backward_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    keep_graph: bool = False,
) -> None:
    """Gradients of `loss` into `opt`'s parameters alone (no other weight's gradient is
    computed), averaged over ranks; then the update."""
    params = [p for group in opt.param_groups for p in group["params"]]
    scaling = scaler is not None and scaler.is_enabled()
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaling else loss).backward(inputs=params, retain_graph=keep_graph)
    distributed.average_gradients(opt)  # a no-op in a single process
    if scaling:
        scaler.step(opt)
        scaler.update()
    else:
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
