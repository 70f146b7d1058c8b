"""Contrastive training of the cross-modal embedder (options: `EmbedderTrainOptions`).

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

Under torchrun (`distributed`) `batch_size` is the global batch: every rank draws and
augments the whole batch alike (a single process's draw), embeds its part, and the CLIP
loss (`ClipLoss(local_loss=True, gather_with_grad=True)`) and the label loss see every
rank's vectors; each rank's feature bank holds the global batch's features. Rank 0 alone
validates and writes the output folder.

The output folder (default RUN/embedder/) holds:
- `training_options.json`  the options (+ device, data summary, embedder config);
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
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.loss import ClipLoss

from ..augment import AugmentConfig, augment_cf, augment_video
from ..data import PairedVideos, cf_tensor, to_model
from ..embedder import (
    DEFAULT_SUBDIR,
    WEIGHTS_NAME,
    Embedder,
    EmbedderConfig,
    create_embedder,
    fit_training_statistics,
    save_embedder,
)
from ..errors import ConfigError, DataError, OutputExists
from ..losses import label_affinity, label_contrastive_loss
from ..ranking import recall_at_k
from . import distributed
from .session import (
    STATS_NAME,
    TrainingSession,
    TrainingSummary,
    TrainOptions,
    data_summary,
    schedule,
)

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


@dataclasses.dataclass(frozen=True)
class EmbedderTrainOptions(TrainOptions):
    """The options of an embedder run: TrainOptions' plus the embedder's."""

    batch_size: int = 32
    lr: float = 2e-3  # heads and attention
    backbone: str = "generator"  # generator | scratch | pixels | openclip:<model>[@file]
    dim: int = 256
    cf_histogram_match: bool = True  # match CF channels to the training photos' histogram
    backbone_lr: float = 1e-4  # backbone, when the architecture has train_backbone
    weight_decay: float = 0.1
    warmup: int = 10  # iterations of linear lr warm-up
    train_frames: int = 4  # frames per video per step (all at evaluation)
    replay: int = 24  # extra head steps per iteration from the feature bank (frozen only)
    bank_views: int = 4  # augmented views kept per case in the bank
    bank_gb: float = 4.0  # the bank's memory cap (fp16 features; oldest views evicted)
    augment: AugmentConfig = AugmentConfig()  # each side's own augmentation; see flip
    keep_best: bool = True  # with val_data: save the best Val/cf2ffa_R@1 iteration
    clinical_loss: float = 1.0  # weight of the label loss next to the CLIP loss
    clinical_temperature: float = 0.1
    val_every: int = 25  # iterations per validation (with val_data)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 2:
            raise ConfigError(
                f"batch_size must be >= 2 for a contrastive loss, got {self.batch_size}"
            )
        if self.train_frames < 1 or self.replay < 0 or self.bank_views < 1 or self.bank_gb <= 0:
            raise ConfigError(
                f"need train_frames >= 1, replay >= 0, bank_views >= 1, bank_gb > 0, got "
                f"{self.train_frames}, {self.replay}, {self.bank_views}, {self.bank_gb}"
            )

    @classmethod
    def _decode(cls, values: dict[str, Any]) -> dict[str, Any]:
        if "augment" in values:
            values["augment"] = AugmentConfig(**values["augment"])
        return values


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
    options: EmbedderTrainOptions | None = None,
    *,
    run_dir: str | Path,  # the generator's run folder (backbone source; default out_dir parent)
    out_dir: str | Path | None = None,  # default run_dir / "embedder"
    data: PairedVideos,  # training pairs at the embedder's image size
    val_data: PairedVideos | None = None,  # held-out pairs for Val/* recalls (and keep_best)
    labels: CaseLabels | None = None,  # the training cases' labels: trains the clinical part
    config: EmbedderConfig | None = None,  # architecture; options.backbone/dim, data size win
    device: str | None = None,  # default: cuda when available
    overwrite: bool = False,
    progress: bool = True,
    progress_fn: Callable[[dict[str, Any]], None] | None = None,
    abort_fn: Callable[[], bool] | None = None,
    **changes: Any,  # EmbedderTrainOptions fields, replacing those of `options`
) -> TrainingSummary:
    """Train an embedder on CF / FFA pairs; see the module docstring. The budget counts the
    setup too. Not resumable: a run is minutes."""
    options = EmbedderTrainOptions.merged(options, changes)
    distributed.setup()  # a no-op unless started by torchrun with several processes
    _check_data(options, data, val_data, labels)
    labelled = labels.labelled if labels is not None else 0
    labels = labels if labelled else None
    run_dir = Path(run_dir)
    out_dir = _output_folder(run_dir, out_dir, overwrite)
    arch = {k: getattr(options, k) for k in ("backbone", "dim", "cf_histogram_match")}
    config = dataclasses.replace(config or EmbedderConfig(), image_size=data.size, **arch)
    if labels is None:  # nothing to learn a clinical part from
        config = dataclasses.replace(config, clinical_dim=0)
    else:  # pair recall would pick an early, half-trained clinical part
        options = dataclasses.replace(options, keep_best=False)
    record = options.to_dict() | {"run_dir": str(run_dir), "labels": _labels_info(labelled)}
    session = TrainingSession(
        out_dir,
        options,
        device=device,
        progress=progress,
        progress_fn=progress_fn,
        abort_fn=abort_fn,
    )
    if session.main:
        (out_dir / STATS_NAME).unlink(missing_ok=True)
    with session:
        torch.manual_seed(options.seed)
        embedder = create_embedder(config, run_dir=run_dir if config.spec.needs_generator else None)
        embedder.to(session.device)
        fit_training_statistics(embedder, data.cf, data.ffa)  # the training split only
        distributed.broadcast_module(embedder)  # every rank starts from rank 0's weights
        val_videos = len(val_data) if val_data is not None else 0
        session.write_options(
            record, embedder=config.to_dict(), data=data_summary(data, val_videos=val_videos)
        )
        objective = record["labels"]["objective"]
        log.info("labels: %s (%d of %d training cases labelled)", objective, labelled, len(data))
        run = _EmbedderRun(session, options, record, embedder, data, val_data, labels)
        return run.train()


def _output_folder(run_dir: Path, out_dir: str | Path | None, overwrite: bool) -> Path:
    """The embedder's folder (default run_dir / "embedder"); one that already holds an
    embedder only with `overwrite`."""
    out = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_SUBDIR
    if (out / WEIGHTS_NAME).exists() and not overwrite:
        raise OutputExists(f"{out} already holds an embedder (pass overwrite=True, or --overwrite)")
    return out


def _check_data(
    options: EmbedderTrainOptions,
    data: PairedVideos,
    val_data: PairedVideos | None,
    labels: CaseLabels | None,
) -> None:
    """The data fits the options, its labels and the validation pairs."""
    if len(data) < options.batch_size:
        raise DataError(f"{len(data)} training pairs, fewer than batch_size={options.batch_size}")
    if labels is not None and len(labels) != len(data):
        raise DataError(f"{len(labels)} label rows for {len(data)} training pairs")
    if val_data is not None and val_data.size != data.size:
        raise DataError(f"val_data is {val_data.size} px, data is {data.size} px")


def _labels_info(labelled: int) -> dict[str, Any]:
    """What training_options.json says of the labels: used or not, and the objective."""
    return {
        "used": bool(labelled),
        "labelled_cases": labelled,
        "objective": "CLIP pair loss + label contrastive loss (diagnosis and lesions)"
        if labelled
        else "CLIP pair loss only: the training split has no diagnosis or lesion labels",
    }


class _EmbedderRun:
    """Optimizer, samplers and feature memory of one embed_training_loop call."""

    def __init__(
        self,
        session: TrainingSession,
        options: EmbedderTrainOptions,
        record: dict[str, Any],  # the options as saved with the embedder
        embedder: Embedder,
        data: PairedVideos,
        val_data: PairedVideos | None,
        labels: CaseLabels | None,
    ):
        self.session, self.options, self.record, self.embedder = session, options, record, embedder
        self.data, self.val_data, self.device = data, val_data, session.device
        self.affinity = None  # label affinity of every pair of training cases, (N, N)
        if labels is not None:
            self.affinity = label_affinity(labels.diagnoses, labels.lesions)
        self.frozen = not embedder.config.train_backbone
        self.opt = torch.optim.AdamW(self._param_groups())
        self.part = distributed.part(options.batch_size)  # this rank's rows of a batch
        self.loss_fn = ClipLoss()
        if distributed.active():  # over the global batch: every rank's vectors, with grads
            self.loss_fn = ClipLoss(
                local_loss=True,
                gather_with_grad=True,
                rank=distributed.rank(),
                world_size=distributed.world_size(),
            )
        self.np_rng = np.random.default_rng(options.seed)
        self.torch_rng = torch.Generator().manual_seed(options.seed)
        self.order: list[int] = []
        self.bank = _FeatureBank(len(data), options.bank_views, int(options.bank_gb * 2**30))
        self.best: tuple[float, float] | None = None  # (R@1, R@5) of the saved checkpoint
        self.validating = val_data is not None and session.main  # rank 0 alone validates
        self.val_feats = self._val_features() if self.frozen and self.validating else None

    def _param_groups(self) -> list[dict[str, Any]]:
        """CLIP's rule: no weight decay on gains, biases and the logit scale; each group
        remembers its base lr ("lr" or "backbone_lr")."""
        o, e = self.options, self.embedder
        heads = e.head_parameters()
        backbone = list(e.backbone.parameters()) if not self.frozen else []
        groups = [
            {
                "params": [p for p in ps if (p.ndim >= 2) == decay],
                "lr": getattr(o, base),
                "weight_decay": o.weight_decay if decay else 0.0,
                "base": base,
            }
            for ps, base in ((heads, "lr"), (backbone, "backbone_lr"))
            for decay in (True, False)
        ]
        return [g for g in groups if g["params"]]

    # ---------------------------------------------------------------- batches

    def _indices(self, n: int) -> np.ndarray:
        """Sample without replacement within an epoch (a fresh permutation per epoch)."""
        while len(self.order) < n:
            self.order.extend(self.np_rng.permutation(len(self.data)).tolist())
        idx, self.order = self.order[:n], self.order[n:]
        return np.asarray(idx)

    def _batch(self) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
        """→ case indices (B,), (cf (b, 3, S, S), frames (b, T, S, S), times (b, T),
        select (b, T')), augmented: the global batch's cases, this rank's rows of it."""
        o, d, g = self.options, self.data, self.torch_rng
        idx = self._indices(o.batch_size)
        cf = cf_tensor(d.cf[idx])  # (B, 3, S, S)
        frames = to_model(d.ffa[idx])  # (B, T, S, S)
        times = torch.from_numpy(d.times_s[idx]).float()  # (B, T)
        if o.flip:
            flip = torch.rand(len(idx), generator=g) < 0.5  # (B,) same for both sides
            cf = torch.where(flip[:, None, None, None], cf.flip(-1), cf)
            frames = torch.where(flip[:, None, None, None], frames.flip(-1), frames)
        cf, frames = cf.to(self.device), frames.to(self.device)
        cf, frames = augment_cf(cf, g, o.augment), augment_video(frames, g, o.augment)
        t, n = frames.shape[1], min(o.train_frames, frames.shape[1])
        select = torch.rand(len(idx), t, generator=g).argsort(1)[:, :n].sort(1).values  # (B, n)
        tensors = (cf, frames, times.to(self.device), select.to(self.device))
        return idx, tuple(x[self.part] for x in tensors)

    def _features(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        cf, frames, times, select = batch
        e = self.embedder
        f_cf = e.cf_features(cf)  # (B, C, g, g)
        f_ffa = e.ffa_features(frames, times, select=select)  # (B, n, C, g, g)
        return f_cf, f_ffa, times.gather(1, select)

    def _step(self, idx: np.ndarray, feats: tuple[torch.Tensor, ...]) -> dict[str, float]:
        """One optimizer step on the batch of cases `idx` (global; `feats` this rank's rows)
        → its losses."""
        f_cf, f_ffa, t = feats
        e, o = self.embedder, self.options
        z_cf, z_ffa = e.cf_head_embed(f_cf), e.ffa_head_embed(f_ffa, t)
        clip = self.loss_fn(z_cf, z_ffa, e.logit_scale.exp())
        losses = {"clip": clip}
        if self.affinity is not None:
            c_cf, c_ffa = e.cf_clinical_embed(f_cf), e.ffa_clinical_embed(f_ffa)
            gathered = distributed.gather_with_grad  # identity in a single process
            c = torch.cat([gathered(c_cf), gathered(c_ffa)])  # (2B, Dc)
            cases = torch.from_numpy(np.concatenate([idx, idx]))
            affinity = self.affinity[cases][:, cases]
            losses["label"] = label_contrastive_loss(c, affinity, o.clinical_temperature)
        loss = clip + o.clinical_loss * losses.get("label", 0.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.opt)  # a no-op in a single process
        self.opt.step()
        with torch.no_grad():
            e.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        return {k: float(v.detach()) for k, v in losses.items()}

    def iteration(self) -> dict[str, float]:
        """A fresh batch's step, then the replayed steps from the feature bank → the fresh
        step's losses."""
        o, s = self.options, self.session
        idx, batch = self._batch()
        feats = self._features(batch)
        fresh = self._step(idx, feats)
        s.record({f"Loss/{k}": v for k, v in fresh.items()})
        if self.frozen and o.replay:
            self.bank.add(idx, *(distributed.gather(f) for f in feats))  # the global batch's
            # replay grows with the bank's coverage: no over-fitting of the first cases
            rank, world = distributed.rank(), distributed.world_size()
            for _ in range(o.replay * len(self.bank.filled) // len(self.data)):
                replayed_idx, replayed = self.bank.sample(o.batch_size, self.torch_rng, rank, world)
                losses = self._step(replayed_idx, replayed)
                s.record({f"Loss/{k}_replay": v for k, v in losses.items()})
        return fresh

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

    def save(self) -> None:
        save_embedder(
            self.session.folder,
            self.embedder,
            training=self.record,
            iteration=self.session.iteration,
            source=self.record["run_dir"],
        )

    def validate_and_keep(self) -> dict[str, float]:
        """The validation recalls; saves the embedder when they beat the saved one's
        (every time without keep_best)."""
        val = self.validate()
        score = (val["Val/cf2ffa_R@1"], val["Val/cf2ffa_R@5"])
        if not self.options.keep_best or self.best is None or score > self.best:
            self.best = score
            self.save()
        return val

    # ---------------------------------------------------------------- loop

    def set_lr(self) -> float:
        """Warm-up then the schedule → the heads' lr of this iteration."""
        s, o = self.session, self.options
        warm = min(1.0, (s.iteration + 1) / max(o.warmup, 1))
        factor = warm * schedule(s.fraction(), o.lr_decay_start)
        for group in self.opt.param_groups:
            group["lr"] = getattr(o, group["base"]) * factor
        return o.lr * factor

    def train(self) -> TrainingSummary:
        """Iterate until the budget is spent; validate and save at the end."""
        s, o, validating = self.session, self.options, self.validating
        lr, val = o.lr, {}
        self.embedder.train()
        while s.running():
            lr = self.set_lr()
            s.advance(loss=f"{self.iteration()['clip']:.3f}")
            row_val = self.validate_and_keep() if validating and s.due(o.val_every) else {}
            val = row_val or val
            if s.due(o.stats_every) or row_val:
                self.tick(lr, row_val)
        end_val = self.validate_and_keep() if validating and not s.due(o.val_every) else {}
        val = end_val or val
        if s.pending or end_val:
            self.tick(o.lr, end_val)
        if s.main and (not validating or not o.keep_best):
            self.save()
        distributed.barrier()  # the others read nothing before rank 0 has written
        return s.finish(f"; { ({k: round(v, 3) for k, v in val.items()}) }")

    def tick(self, lr: float, val: dict[str, float]) -> None:
        """A stats.jsonl row (with any validation recalls) and its summary in the log."""
        scale = float(self.embedder.logit_scale.detach().exp())
        row = self.session.tick({"Progress/lr": lr, "Embed/logit_scale": scale} | val)
        log.info(
            "iter %d  %.0fs  %.2f s/it  clip %.4f  label %.4f  scale %.1f%s",
            row["Progress/iter"],
            row["Timing/total_s"],
            row["Timing/sec_per_iter"],
            row.get("Loss/clip") or 0,
            row.get("Loss/label") or 0,
            row["Embed/logit_scale"],
            "".join(
                f"  {k.removeprefix('Val/')} {v:.3f}"
                for k, v in val.items()
                if k.endswith(("R@1", "R@10"))
            ),
        )


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

    def sample(
        self, n: int, g: torch.Generator, rank: int = 0, world: int = 1
    ) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
        """n distinct cases (fewer if the bank holds fewer; a multiple of `world`); per case
        a random CF view and an independently chosen FFA view → case indices (n,),
        (cf (m, C, g, g), ffa (m, T', C, g, g), times (m, T')) of rank `rank`'s m = n / world
        of them (every rank draws alike)."""
        pick = torch.randperm(len(self.filled), generator=g)[:n].tolist()
        pick = pick[: len(pick) // world * world]
        views = []
        for p in pick:
            case = [v for _, v in self.items[self.filled[p]]]
            a, b = torch.randint(len(case), (2,), generator=g).tolist()
            views.append((case[a][0], case[b][1], case[b][2]))
        each = len(pick) // world
        cf, ffa, t = zip(*views[rank * each : (rank + 1) * each], strict=True)
        cases = np.asarray([self.filled[p] for p in pick])
        return cases, (torch.stack(cf).float(), torch.stack(ffa).float(), torch.stack(t))
