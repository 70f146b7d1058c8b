"""Losses of Fundus2Video training: LSGAN, feature matching, knowledge mask, PatchNCE,
mask-weighted L1, gradient variance, and a VGG perceptual loss from a local weights file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

KNOWLEDGE_THRESHOLD = 45 / 255  # |first - last| FFA difference, frames in [0, 1]


# ---------------------------------------------------------------- adversarial


def lsgan_loss(outputs: list[list[torch.Tensor]], target_is_real: bool) -> torch.Tensor:
    """LSGAN: mean squared distance of each scale's patch logits to 1 (real) or 0 (fake)."""
    target = 1.0 if target_is_real else 0.0
    losses = [F.mse_loss(feats[-1], torch.full_like(feats[-1], target)) for feats in outputs]
    return torch.stack(losses).mean()


def feature_matching_loss(
    fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]]
) -> torch.Tensor:
    """pix2pixHD feature matching: L1 between D features (real detached), averaged like theirs."""
    num_d = len(fake)
    total = fake[0][0].new_zeros(())
    for feats_f, feats_r in zip(fake, real, strict=True):
        n_layers = len(feats_f) - 1
        for f, r in zip(feats_f[:-1], feats_r[:-1], strict=True):
            total = total + F.l1_loss(f, r.detach()) * (4.0 / n_layers) / num_d
    return total


# ---------------------------------------------------------------- knowledge mask


def knowledge_mask(
    first: torch.Tensor,
    last: torch.Tensor,
    threshold: float = KNOWLEDGE_THRESHOLD,
    fov: torch.Tensor | None = None,
) -> torch.Tensor:
    """Where dye leaks or pools: |first − last| > threshold, frames in [0, 1] (or uint8 / 255).

    first, last (..., H, W) → bool (..., H, W). Without `fov` this is the paper's mask.
    With `fov` (..., H, W) bool, each frame is first centred on its median inside the FOV
    and the mask is cut to the FOV: the global brightening from a pre-dye first frame to
    the late background no longer counts, only local change (leakage, staining, pooling).
    On phantom cohorts the paper's form covers 55-80% of the fundus (lesion precision
    1-20%); the centred form 2-17% with the same lesion recall.
    """
    if first.dtype == torch.uint8:
        first, last = first.float() / 255, last.float() / 255
    first, last = first.float(), last.float()
    if fov is None:
        return (first - last).abs() > threshold
    fov = fov.bool()

    def centred(x: torch.Tensor) -> torch.Tensor:
        med = x.masked_fill(~fov, float("nan")).flatten(-2).nanmedian(-1).values  # (...)
        return x - torch.nan_to_num(med)[..., None, None]

    return ((centred(first) - centred(last)).abs() > threshold) & fov


# ---------------------------------------------------------------- PatchNCE


class PatchSampleMLP(nn.Module):
    """PatchSampleF: pick patch locations of each feature map, project them by a 2-layer MLP.

    Built eagerly from the known channel counts (CUT builds it lazily, which is how its
    head ended up outside the optimizer), so it joins an optimizer like any module.
    """

    def __init__(self, in_channels: Sequence[int], dim: int):
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(c, dim), nn.ReLU(), nn.Linear(dim, dim)) for c in in_channels
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def sample_ids(
        self,
        feats: Sequence[torch.Tensor],
        num_patches: int,
        weights: torch.Tensor | None = None,
        background: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Patch indices per layer, (B, P) into the flattened h·w grid.

        weights (B, 1, H, W) in [0, 1] (the knowledge mask): locations are drawn with
        probability ∝ weight + background at each layer's resolution, so lesions dominate
        but the rest of the fundus still supplies patches. None draws uniformly.
        """
        ids = []
        for f in feats:
            b, _, h, w = f.shape
            p = min(num_patches, h * w)
            if weights is None:
                probs = f.new_ones(b, h * w)
            else:
                down = F.adaptive_avg_pool2d(weights.float(), (h, w)).flatten(1)  # (B, h·w)
                probs = down + background
            ids.append(torch.multinomial(probs.float(), p, replacement=False, generator=generator))
        return ids

    def forward(
        self, feats: Sequence[torch.Tensor], ids: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """feats [(B, C_l, h, w)], ids [(B, P)] → L2-normalised projections [(B, P, dim)]."""
        out = []
        for f, idx, mlp in zip(feats, ids, self.mlps, strict=True):
            flat = f.flatten(2).transpose(1, 2)  # (B, h·w, C)
            picked = torch.gather(
                flat, 1, idx[..., None].expand(-1, -1, flat.shape[-1])
            )  # (B, P, C)
            out.append(F.normalize(mlp(picked), dim=-1))
        return out


def patch_nce_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """CUT's PatchNCE: q, k (B, P, D) normalised; the positive of q[b, i] is k[b, i], the
    negatives are the other patches of the same image. Keys are detached."""
    k = k.detach()
    b, p, _ = q.shape
    l_pos = (q * k).sum(-1, keepdim=True)  # (B, P, 1)
    l_neg = q @ k.transpose(1, 2)  # (B, P, P)
    eye = torch.eye(p, dtype=torch.bool, device=q.device)
    l_neg = l_neg.masked_fill(eye, -10.0)
    logits = torch.cat([l_pos, l_neg], dim=-1) / temperature  # (B, P, 1 + P)
    target = torch.zeros(b * p, dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.flatten(0, 1).float(), target)


# ---------------------------------------------------------------- reconstruction


def masked_l1(
    fake: torch.Tensor,
    real: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 2.0,
    weight_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """L1 with per-pixel weight 1 + alpha·mask; fake, real (B, K, H, W), mask (B, 1, H, W).

    `weight_sum` replaces the weights' sum as the normaliser: a part of a batch split across
    processes passes the mean of the parts' sums, so the mean of the parts' losses is the
    whole batch's."""
    diff = (fake - real).abs()
    if mask is None:
        return diff.mean()
    w = 1.0 + alpha * mask.to(diff.dtype)  # (B, 1, H, W)
    total = w.sum() if weight_sum is None else weight_sum
    return (diff * w).sum() / (total * diff.shape[1])


def _sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, 1, H, W) → horizontal and vertical Sobel gradients, same size."""
    kx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])[None, None]
    ky = kx.transpose(-1, -2)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(xp, kx), F.conv2d(xp, ky)


def gradient_variance_loss(fake: torch.Tensor, real: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """Gradient variance loss (Abrahamyan et al. 2022): MSE between the per-patch variances
    of Sobel gradients of the two images; fake, real (B, K, H, W), patch divides H and W."""
    b, k, h, w = fake.shape
    if h % patch or w % patch:
        raise ValueError(f"gradient-variance patch {patch} must divide the frame size {h}x{w}")
    loss = fake.new_zeros(())
    grads_f = _sobel(fake.reshape(b * k, 1, h, w))
    grads_r = _sobel(real.reshape(b * k, 1, h, w))
    for gf, gr in zip(grads_f, grads_r, strict=True):
        vf = F.unfold(gf, patch, stride=patch).var(dim=1)  # (B·K, n_patches)
        vr = F.unfold(gr, patch, stride=patch).var(dim=1)
        loss = loss + F.mse_loss(vf, vr)
    return loss


# ---------------------------------------------------------------- perceptual (VGG)

_VGG_SLICES = (2, 7, 12, 21, 30)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (pix2pixHD)
_VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


def load_vgg19_features(path: str | Path) -> nn.Sequential:
    """torchvision's vgg19 architecture (weights=None) with `features.*` from a local file.

    The file is a state dict (.pth/.pt read with weights_only=True, or .safetensors) of
    the whole vgg19 or of its `features` part; classifier keys are ignored, every
    `features` key must be present (a partial load raises CheckpointError).
    """
    from torchvision.models import vgg19

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "VGG19 weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(path, f"expected a state dict, got {type(state).__name__}")
    features = vgg19(weights=None).features
    wanted = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    missing, unexpected = features.load_state_dict(wanted, strict=False)
    if missing or unexpected or not wanted:
        raise CheckpointError(
            path, f"not a vgg19 state dict (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    return features


class VGGLoss(nn.Module):
    """pix2pixHD perceptual loss on grey frames repeated to RGB, ImageNet-normalised."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        features = load_vgg19_features(weights_path).eval()
        for p in features.parameters():
            p.requires_grad_(False)
        edges = (0, *_VGG_SLICES)
        self.slices = nn.ModuleList(
            features[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)
        )
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """fake, real (B, K, H, W) in [-1, 1]."""
        b, k, h, w = fake.shape

        def prep(x: torch.Tensor) -> torch.Tensor:
            x = (x.reshape(b * k, 1, h, w) + 1) / 2  # (B·K, 1, H, W) in [0, 1]
            return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

        xf, xr = prep(fake), prep(real)
        loss = fake.new_zeros(())
        for weight, s in zip(_VGG_WEIGHTS, self.slices, strict=True):
            xf, xr = s(xf), s(xr)
            loss = loss + weight * F.l1_loss(xf, xr.detach())
        return loss

    def train(self, mode: bool = True) -> VGGLoss:  # the frozen VGG stays in eval mode
        return super().train(False)


# ---------------------------------------------------------------- clinical similarity


def label_affinity(
    diagnoses: Sequence[str | None],
    lesions: Sequence[Sequence[str] | None],
    lesion_weight: float = 0.3,
) -> torch.Tensor:
    """How alike two cases' labels are, (N, N) in [0, 1]. Two cases with known diagnoses:
    0 when the diagnoses differ, else (1 - lesion_weight) + lesion_weight x the Jaccard of
    their lesion sets (two lesion-free cases: 1), so lesions order cases within a disease
    but never pull two diseases together. A case with an unknown diagnosis (None): the
    Jaccard alone. Unknown lesions (None) count as a Jaccard of 0; a case is always 1
    with itself.

    (Lesion overlap across diagnoses as a positive weight — most retinal diseases share
    haemorrhages or leakage — makes a space clustered by diagnosis score worse than
    chance under `label_contrastive_loss`, so it is kept inside a diagnosis.)"""
    n = len(diagnoses)
    if len(lesions) != n:
        raise ValueError(f"{n} diagnoses but {len(lesions)} lesion lists")
    names = {d: i for i, d in enumerate(sorted({d for d in diagnoses if d is not None}))}
    code = torch.tensor([names.get(d, -1) if d is not None else -1 for d in diagnoses])
    known = code >= 0
    both = known[:, None] & known[None]
    same = (code[:, None] == code[None]) & both
    vocab = {x: i for i, x in enumerate(sorted({x for ls in lesions if ls for x in ls}))}
    sets = torch.zeros(n, max(len(vocab), 1))
    for i, ls in enumerate(lesions):
        for x in ls or ():
            sets[i, vocab[x]] = 1.0
    has = torch.tensor([ls is not None for ls in lesions])
    inter = sets @ sets.T
    union = sets.sum(1)[:, None] + sets.sum(1)[None] - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    jaccard = jaccard * (has[:, None] & has[None])
    within = same.float() * (1 - lesion_weight + lesion_weight * jaccard)
    out = torch.where(both, within, jaccard)
    return out.fill_diagonal_(1.0)


def label_contrastive_loss(
    z: torch.Tensor,  # (M, D) unit vectors: every view of a batch, both modalities
    affinity: torch.Tensor,  # (M, M) label affinity of the views' cases (label_affinity)
    temperature: float = 0.1,
) -> torch.Tensor:
    """Supervised contrastive loss with soft targets: each view's softmax over the other
    views should match its label affinities (normalised to sum 1). Same-disease cases
    are pulled together in and across modalities instead of being pushed apart as the
    CLIP loss does; views whose row has no positive are left out."""
    m = z.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    target = affinity.to(z.device).float().masked_fill(eye, 0.0)
    mass = target.sum(1)
    rows = mass > 0
    if not rows.any():
        return z.sum() * 0.0
    target = target[rows] / mass[rows, None]
    logp = F.log_softmax(logits[rows], dim=1).masked_fill(eye[rows], 0.0)
    return -(target * logp).sum(1).mean()
