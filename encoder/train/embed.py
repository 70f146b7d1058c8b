"""Contrastive training of the cross-modal embedder: one function of typed keyword arguments.

Each iteration draws `batch_size` CF / FFA pairs (without replacement within an epoch),
flips both sides of a pair together (a mirrored eye is another plausible eye), then
augments each side independently (encoder.augment), keeps `train_frames` random frames
of each video (with the frames before them as generator context), and minimises the
symmetric CLIP loss (`open_clip.loss.ClipLoss`, learnable logit scale, CLIP's init).

With labels (`CaseLabels`: the training cases' diagnoses and lesion sets), the clinical
heads train beside it on `losses.label_contrastive_loss` over the batch's CF and FFA
clinical vectors: every view is pulled towards the views of same-disease cases, in
and across modalities, by their label affinity (`losses.label_affinity`) instead of
being pushed away as the CLIP loss does (its false negatives). Without labels the
embedder has no clinical part (clinical_dim 0) and `training_options.json` says so.

With a frozen backbone (the default) its features are computed without gradients and
kept in a feature bank (the last `bank_views` augmented views of every case seen, at most
`bank_gb` in all: past that the oldest views go first); after
each fresh step, `replay` more head steps (scaled by the fraction of cases the bank has
seen, so the first batches are not over-fitted) are drawn from the bank, pairing a CF view
with an independently chosen FFA view of the same case. The backbone is the expensive
part on a CPU; the heads are cheap, so this multiplies the steps per backbone pass.

The output folder (default RUN/embedder/) holds:
- `training_options.json`  the arguments (+ device, data summary, embedder config);
- `stats.jsonl`            one JSON line per tick: `Progress/*`, `Loss/clip`,
                           `Embed/logit_scale`, `Timing/*`, and `Val/*` recalls;
- `log.txt`                the tick summaries;
- `config.json` + `embedder.safetensors`  the embedder (load_embedder(out_dir)); with
  val_data and keep_best, the iteration with the best validation CF→FFA Recall@1 —
  unless the clinical part trains: the pair recall says nothing about it (and validation
  labels never choose a model), so the last iteration is kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from ..augment import AugmentConfig, augment_cf, augment_video
from ..checkpoint import atomic_write_text, code_version
from ..data import PairedVideos, cf_tensor, to_model
from ..embedder import (
    DEFAULT_SUBDIR,
    WEIGHTS_NAME,
    Embedder,
    EmbedderConfig,
    create_embedder,
    fit_pixels,
    recall_at_k,
    save_embedder,
)
from ..errors import ConfigError, DataError
from ..losses import label_affinity, label_contrastive_loss
from .loop import TrainingSummary, _run_log, schedule

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


@dataclasses.dataclass(frozen=True)
class CaseLabels:
    """Clinical labels of the training cases, aligned with `PairedVideos` (None: unknown)."""

    diagnoses: tuple[str | None, ...]
    lesions: tuple[tuple[str, ...] | None, ...]

    def __len__(self) -> int:
        return len(self.diagnoses)

    @property
    def labelled(self) -> int:
        """Cases with a diagnosis or a lesion list."""
        pairs = zip(self.diagnoses, self.lesions, strict=True)
        return sum(d is not None or ls is not None for d, ls in pairs)


def embed_training_loop(
    *,
    run_dir: str | Path,  # the generator's run folder (backbone source; default out_dir parent)
    out_dir: str | Path | None = None,  # default run_dir / "embedder"
    data: PairedVideos,  # training pairs at the embedder's image size
    val_data: PairedVideos | None = None,  # held-out pairs for Val/* recalls (and keep_best)
    labels: CaseLabels | None = None,  # the training cases' labels: trains the clinical part
    clinical_loss: float = 1.0,  # weight of the label loss next to the CLIP loss
    clinical_temperature: float = 0.1,
    backbone: str = "generator",  # generator | scratch | pixels | openclip:<model>[@file]
    dim: int = 256,
    config: EmbedderConfig | None = None,  # full architecture; backbone/dim/image_size override
    iters: int | None = None,
    minutes: float | None = None,
    batch_size: int = 32,
    lr: float = 2e-3,  # heads and attention
    backbone_lr: float = 1e-4,  # backbone, when config.train_backbone
    weight_decay: float = 0.1,
    warmup: int = 10,  # iterations of linear lr warm-up
    lr_decay_start: float = 0.5,  # fraction of the run after which lr decays linearly to 0
    train_frames: int = 4,  # frames per video per step (all at evaluation)
    replay: int = 24,  # extra head steps per iteration from the feature bank (frozen only)
    bank_views: int = 4,  # augmented views kept per case in the bank
    bank_gb: float = 4.0,  # the bank's memory cap (fp16 features; oldest views evicted)
    augment: AugmentConfig | None = None,  # None: AugmentConfig(); see flip for mirroring
    flip: bool = True,  # mirror both sides of a pair together, p = 0.5
    keep_best: bool = True,  # with val_data: save the best Val/cf2ffa_R@1 iteration
    seed: int = 0,
    device: str | None = None,  # default: cuda when available
    stats_every: int = 10,
    val_every: int = 25,
    overwrite: bool = False,
    progress: bool = True,
    progress_fn: Callable[[dict[str, float]], None] | None = None,
    abort_fn: Callable[[], bool] | None = None,
) -> TrainingSummary:
    """Train an embedder on CF / FFA pairs; see the module docstring. `iters` and `minutes`
    are budgets (whichever ends first). Not resumable: a run is minutes."""
    if iters is None and minutes is None:
        raise ConfigError("give iters or minutes (or both: whichever ends first)")
    if (iters is not None and iters < 0) or (minutes is not None and minutes <= 0):
        raise ConfigError(f"iters must be >= 0 and minutes > 0, got {iters}, {minutes}")
    if batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 for a contrastive loss, got {batch_size}")
    if train_frames < 1 or replay < 0 or bank_views < 1 or bank_gb <= 0:
        raise ConfigError(
            f"need train_frames >= 1, replay >= 0, bank_views >= 1, bank_gb > 0, "
            f"got {train_frames}, {replay}, {bank_views}, {bank_gb}"
        )
    if len(data) < batch_size:
        raise DataError(f"{len(data)} training pairs, fewer than batch_size={batch_size}")
    if labels is not None and len(labels) != len(data):
        raise DataError(f"{len(labels)} label rows for {len(data)} training pairs")
    labelled = labels.labelled if labels is not None else 0
    if not labelled:
        labels = None
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_SUBDIR
    if (out_dir / WEIGHTS_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds an embedder (pass overwrite=True)")
    config = dataclasses.replace(
        config or EmbedderConfig(), backbone=backbone, dim=dim, image_size=data.size
    )
    if labels is None:  # nothing to learn a clinical part from
        config = dataclasses.replace(config, clinical_dim=0)
    else:
        keep_best = False  # pair recall would pick an early, half-trained clinical part
    if val_data is not None and val_data.size != data.size:
        raise DataError(f"val_data is {val_data.size} px, data is {data.size} px")
    aug = augment or AugmentConfig()
    options = {
        "run_dir": str(run_dir),
        "backbone": backbone,
        "dim": dim,
        "iters": iters,
        "minutes": minutes,
        "batch_size": batch_size,
        "lr": lr,
        "backbone_lr": backbone_lr,
        "weight_decay": weight_decay,
        "warmup": warmup,
        "lr_decay_start": lr_decay_start,
        "train_frames": train_frames,
        "replay": replay,
        "bank_views": bank_views,
        "bank_gb": bank_gb,
        "augment": dataclasses.asdict(aug),
        "flip": flip,
        "keep_best": keep_best,
        "seed": seed,
        "clinical_loss": clinical_loss,
        "clinical_temperature": clinical_temperature,
        "labels": {
            "used": labels is not None,
            "labelled_cases": labelled,
            "objective": "CLIP pair loss + label contrastive loss (diagnosis and lesions)"
            if labels is not None
            else "CLIP pair loss only: the training split has no diagnosis or lesion labels",
        },
    }
    started = time.monotonic()  # the budget counts setup too
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stats.jsonl").unlink(missing_ok=True)
    with _run_log(out_dir):
        torch.manual_seed(seed)
        embedder = create_embedder(config, run_dir=run_dir if config.spec.needs_generator else None)
        embedder.to(dev)
        fit_pixels(embedder, data.cf, data.ffa)  # training split only; no-op for others
        info = dict(
            options,
            device=str(dev),
            code_version=code_version(),
            embedder=config.to_dict(),
            data={
                "videos": len(data),
                "frames": data.frames,
                "size": data.size,
                "val_videos": len(val_data) if val_data is not None else 0,
                "patient_ids": sorted(set(data.patient_ids)),
            },
        )
        atomic_write_text(out_dir / "training_options.json", json.dumps(info, indent=2) + "\n")
        log.info(
            "labels: %s (%d of %d training cases labelled)",
            options["labels"]["objective"],
            labelled,
            len(data),
        )
        session = _EmbedSession(
            out_dir=out_dir,
            embedder=embedder,
            options=options,
            data=data,
            val_data=val_data,
            labels=labels,
            augment=aug,
            device=dev,
            started=started,
        )
        return session.train(
            iters=iters,
            minutes=minutes,
            stats_every=stats_every,
            val_every=val_every,
            progress=progress,
            progress_fn=progress_fn,
            abort_fn=abort_fn,
        )


class _EmbedSession:
    """Optimizer, samplers, feature memory and bookkeeping of one embed_training_loop call."""

    def __init__(
        self,
        *,
        out_dir: Path,
        embedder: Embedder,
        options: dict[str, Any],
        data: PairedVideos,
        val_data: PairedVideos | None,
        labels: CaseLabels | None,
        augment: AugmentConfig,
        device: torch.device,
        started: float,
    ):
        self.out_dir, self.embedder, self.options = out_dir, embedder, options
        self.affinity = None  # label affinity of every pair of training cases, (N, N)
        if labels is not None:
            self.affinity = label_affinity(labels.diagnoses, labels.lesions)
        self.data, self.val_data, self.augment, self.device = data, val_data, augment, device
        self.frozen = not embedder.config.train_backbone
        heads = embedder.head_parameters()
        backbone = list(embedder.backbone.parameters()) if not self.frozen else []
        wd = options["weight_decay"]
        groups = [  # CLIP's rule: no weight decay on gains, biases and the logit scale
            {
                "params": [p for p in ps if (p.ndim >= 2) == decay],
                "lr": options[base],
                "weight_decay": wd if decay else 0.0,
                "base": base,
            }
            for ps, base in ((heads, "lr"), (backbone, "backbone_lr"))
            for decay in (True, False)
        ]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]])
        self.loss_fn = ClipLoss()
        self.np_rng = np.random.default_rng(options["seed"])
        self.torch_rng = torch.Generator().manual_seed(options["seed"])
        self.order: list[int] = []
        self.bank = _FeatureBank(len(data), options["bank_views"], int(options["bank_gb"] * 2**30))
        self.iteration = 0
        self.started = started
        self.best: tuple[float, float] | None = None  # (R@1, R@5) of the saved checkpoint
        self.val_feats = self._val_features() if self.frozen and val_data is not None else None

    # ---------------------------------------------------------------- batches

    def _indices(self, n: int) -> np.ndarray:
        """Sample without replacement within an epoch (a fresh permutation per epoch)."""
        while len(self.order) < n:
            self.order.extend(self.np_rng.permutation(len(self.data)).tolist())
        idx, self.order = self.order[:n], self.order[n:]
        return np.asarray(idx)

    def _batch(self) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
        """→ case indices (B,), (cf (B, 3, S, S), frames (B, T, S, S), times (B, T),
        select (B, T')), augmented."""
        o, d, g = self.options, self.data, self.torch_rng
        idx = self._indices(o["batch_size"])
        cf = cf_tensor(d.cf[idx])  # (B, 3, S, S)
        frames = to_model(d.ffa[idx])  # (B, T, S, S)
        times = torch.from_numpy(d.times_s[idx]).float()  # (B, T)
        if o["flip"]:
            flip = torch.rand(len(idx), generator=g) < 0.5  # (B,) same for both sides
            cf = torch.where(flip[:, None, None, None], cf.flip(-1), cf)
            frames = torch.where(flip[:, None, None, None], frames.flip(-1), frames)
        cf, frames = cf.to(self.device), frames.to(self.device)
        cf, frames = augment_cf(cf, g, self.augment), augment_video(frames, g, self.augment)
        t, n = frames.shape[1], min(o["train_frames"], frames.shape[1])
        select = torch.rand(len(idx), t, generator=g).argsort(1)[:, :n].sort(1).values  # (B, n)
        return idx, (cf, frames, times.to(self.device), select.to(self.device))

    def _features(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        cf, frames, times, select = batch
        e = self.embedder
        f_cf = e.cf_features(cf)  # (B, C, g, g)
        f_ffa = e.ffa_features(frames, times, select=select)  # (B, n, C, g, g)
        return f_cf, f_ffa, times.gather(1, select)

    def _step(self, idx: np.ndarray, feats: tuple[torch.Tensor, ...]) -> dict[str, float]:
        """One optimizer step on the batch of cases `idx` → its losses."""
        f_cf, f_ffa, t = feats
        e, o = self.embedder, self.options
        z_cf, z_ffa = e.cf_head_embed(f_cf), e.ffa_head_embed(f_ffa, t)
        clip = self.loss_fn(z_cf, z_ffa, e.logit_scale.exp())
        losses = {"clip": clip}
        if self.affinity is not None:
            c = torch.cat([e.cf_clinical_embed(f_cf), e.ffa_clinical_embed(f_ffa)])  # (2B, Dc)
            cases = torch.from_numpy(np.concatenate([idx, idx]))
            affinity = self.affinity[cases][:, cases]
            losses["label"] = label_contrastive_loss(c, affinity, o["clinical_temperature"])
        loss = clip + o["clinical_loss"] * losses.get("label", 0.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            e.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        return {k: float(v.detach()) for k, v in losses.items()}

    # ---------------------------------------------------------------- validation

    @torch.no_grad()
    def _val_features(self) -> tuple[torch.Tensor, ...]:
        """Backbone features of the whole validation split, computed once (frozen backbone)."""
        v, e, cfs, ffas = self.val_data, self.embedder, [], []
        for i in range(0, len(v), 8):
            cfs.append(e.cf_features(cf_tensor(v.cf[i : i + 8]).to(self.device)))
            t = torch.from_numpy(v.times_s[i : i + 8]).to(self.device)
            ffas.append(e.ffa_features(to_model(v.ffa[i : i + 8]).to(self.device), t))
        return torch.cat(cfs), torch.cat(ffas), torch.from_numpy(v.times_s).to(self.device)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        e = self.embedder
        e.eval()
        if self.val_feats is not None:
            f_cf, f_ffa, t = self.val_feats
            z_cf = torch.cat([e.cf_head_embed(f_cf[i : i + 64]) for i in range(0, len(f_cf), 64)])
            z_ffa = torch.cat(
                [
                    e.ffa_head_embed(f_ffa[i : i + 64], t[i : i + 64])
                    for i in range(0, len(f_ffa), 64)
                ]
            )
        else:
            from ..embedder import embed_cf_array, embed_ffa_array

            v = self.val_data
            z_cf = torch.from_numpy(embed_cf_array(e, v.cf))
            z_ffa = torch.from_numpy(embed_ffa_array(e, v.ffa, v.times_s))
        e.train()
        fwd, back = recall_at_k(z_cf.cpu(), z_ffa.cpu()), recall_at_k(z_ffa.cpu(), z_cf.cpu())
        out = {f"Val/cf2ffa_R@{k}": r for k, r in fwd.items()}
        return out | {f"Val/ffa2cf_R@{k}": r for k, r in back.items()}

    # ---------------------------------------------------------------- loop

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fraction(self, iters: int | None, minutes: float | None) -> float:
        parts = []
        if iters is not None:
            parts.append(self.iteration / iters if iters else 1.0)
        if minutes is not None:
            parts.append(self.elapsed() / (60 * minutes))
        return min(1.0, max(parts))

    def save(self) -> None:
        save_embedder(
            self.out_dir,
            self.embedder,
            training=self.options,
            iteration=self.iteration,
            source=self.options["run_dir"],
        )

    def _maybe_keep(self, val: dict[str, float]) -> None:
        score = (val["Val/cf2ffa_R@1"], val["Val/cf2ffa_R@5"])
        if not self.options["keep_best"] or self.best is None or score > self.best:
            self.best = score
            self.save()

    def train(
        self,
        *,
        iters: int | None,
        minutes: float | None,
        stats_every: int,
        val_every: int,
        progress: bool,
        progress_fn: Callable | None,
        abort_fn: Callable | None,
    ) -> TrainingSummary:
        o = self.options
        acc: dict[str, list[float]] = defaultdict(list)
        tick = time.monotonic(), 0
        stop_reason, last, val = "iters", {}, {}
        self.embedder.train()
        bar = tqdm(total=iters, disable=not progress, unit="it", dynamic_ncols=True)
        try:
            while True:
                if iters is not None and self.iteration >= iters:
                    stop_reason = "iters"
                    break
                if minutes is not None and self.elapsed() >= 60 * minutes:
                    stop_reason = "minutes"
                    break
                if abort_fn is not None and abort_fn():
                    stop_reason = "abort"
                    break
                frac = self.fraction(iters, minutes)
                warm = min(1.0, (self.iteration + 1) / max(o["warmup"], 1))
                factor = warm * schedule(frac, o["lr_decay_start"])
                for group in self.opt.param_groups:
                    group["lr"] = o[group["base"]] * factor
                idx, batch = self._batch()
                feats = self._features(batch)
                for name, value in self._step(idx, feats).items():
                    acc[f"Loss/{name}"].append(value)
                if self.frozen and o["replay"]:
                    self.bank.add(idx, *feats)
                    # replay grows with the bank's coverage: no over-fitting of the first cases
                    for _ in range(o["replay"] * len(self.bank.filled) // len(self.data)):
                        replayed_idx, replayed = self.bank.sample(o["batch_size"], self.torch_rng)
                        for name, value in self._step(replayed_idx, replayed).items():
                            acc[f"Loss/{name}_replay"].append(value)
                self.iteration += 1
                tick = tick[0], tick[1] + 1
                bar.update(1)
                bar.set_postfix(loss=f"{acc['Loss/clip'][-1]:.3f}")
                row_val = {}
                if self.val_data is not None and val_every and self.iteration % val_every == 0:
                    row_val = val = self.validate()
                    self._maybe_keep(val)
                if self.iteration % stats_every == 0 or row_val:
                    last = self._tick(acc, frac, factor * o["lr"], tick, row_val, progress_fn)
                    acc.clear()
                    tick = time.monotonic(), 0
        finally:
            bar.close()
        end_val = {}
        if self.val_data is not None and (not val_every or self.iteration % val_every):
            end_val = val = self.validate()
            self._maybe_keep(val)
        if acc or end_val:
            frac = self.fraction(iters, minutes)
            last = self._tick(acc, frac, o["lr"], tick, end_val, progress_fn)
        if self.val_data is None or not o["keep_best"]:
            self.save()
        log.info(
            "stopped (%s) at iteration %d after %.0f s; %s",
            stop_reason,
            self.iteration,
            self.elapsed(),
            {k: round(v, 3) for k, v in val.items()},
        )
        return TrainingSummary(self.out_dir, self.iteration, self.elapsed(), stop_reason, last)

    def _tick(
        self,
        acc: dict[str, list[float]],
        frac: float,
        lr: float,
        tick: tuple[float, int],
        val: dict[str, float],
        progress_fn: Callable | None,
    ) -> dict[str, float]:
        """Append the means since the last tick (and any val recalls) to stats.jsonl."""
        sec = (time.monotonic() - tick[0]) / max(tick[1], 1)
        row: dict[str, Any] = {
            "Progress/iter": self.iteration,
            "Progress/fraction": round(frac, 6),
            "Progress/lr": lr,
            "Timing/sec_per_iter": sec,
            "Timing/total_s": self.elapsed(),
            "Embed/logit_scale": float(self.embedder.logit_scale.detach().exp()),
        }
        row |= {k: float(np.mean(v)) for k, v in sorted(acc.items())} | val
        row = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with open(self.out_dir / "stats.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        log.info(
            "iter %d  %.0fs  %.2f s/it  clip %.4f  label %.4f  scale %.1f%s",
            self.iteration,
            row["Timing/total_s"],
            sec,
            row.get("Loss/clip") or 0,
            row.get("Loss/label") or 0,
            row["Embed/logit_scale"],
            "".join(
                f"  {k.removeprefix('Val/')} {v:.3f}"
                for k, v in val.items()
                if k.endswith(("R@1", "R@10"))
            ),
        )
        if progress_fn is not None:
            progress_fn(row)
        return row


class _FeatureBank:
    """Backbone features of the last `views` augmented views of each training case (fp16),
    at most `max_bytes` in all: past that, the oldest views in the bank are evicted."""

    def __init__(self, cases: int, views: int, max_bytes: int):
        self.views, self.max_bytes = views, max_bytes
        self.items: list[list[tuple[int, tuple[torch.Tensor, ...]]]] = [[] for _ in range(cases)]
        self.filled: list[int] = []  # cases with at least one view, in order of arrival
        self.serial = 0  # views are numbered as they arrive: the smallest is the oldest
        self.bytes = 0

    @staticmethod
    def _size(view: tuple[torch.Tensor, ...]) -> int:
        return sum(t.numel() * t.element_size() for t in view)

    def _drop_oldest(self, case: int) -> None:
        self.bytes -= self._size(self.items[case].pop(0)[1])
        if not self.items[case]:
            self.filled.remove(case)

    def add(self, idx: np.ndarray, f_cf: torch.Tensor, f_ffa: torch.Tensor, t: torch.Tensor):
        for j, i in enumerate(idx.tolist()):
            if not self.items[i]:
                self.filled.append(i)
            elif len(self.items[i]) >= self.views:
                self._drop_oldest(i)
            view = (f_cf[j].detach().half(), f_ffa[j].detach().half(), t[j].detach())
            self.items[i].append((self.serial, view))
            self.serial += 1
            self.bytes += self._size(view)
        while self.bytes > self.max_bytes and len(self.filled) > 1:  # the oldest view goes
            self._drop_oldest(min(self.filled, key=lambda case: self.items[case][0][0]))

    def sample(self, n: int, g: torch.Generator) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
        """n distinct cases (fewer if the bank holds fewer); per case a random CF view and an
        independently chosen FFA view → case indices (n,), (cf (n, C, g, g),
        ffa (n, T', C, g, g), times (n, T'))."""
        pick = torch.randperm(len(self.filled), generator=g)[:n].tolist()
        cf, ffa, t = [], [], []
        for p in pick:
            views = [v for _, v in self.items[self.filled[p]]]
            a, b = torch.randint(len(views), (2,), generator=g).tolist()
            cf.append(views[a][0])
            ffa.append(views[b][1])
            t.append(views[b][2])
        cases = np.asarray([self.filled[p] for p in pick])
        return cases, (torch.stack(cf).float(), torch.stack(ffa).float(), torch.stack(t))
