"""The Fundus2Video generator training loop (options: `GeneratorTrainOptions`).

A run folder holds:
- `training_options.json`  the options of the first call (+ device, data summary);
- `stats.jsonl`            one JSON line per tick: `Progress/*`, `Loss/*`, `Timing/*`;
- `log.txt`                the tick summaries;
- `previews/preview-<iter>.png`  CF | real vs generated at 4 times, for fixed cases;
- `config.json` + `generator.safetensors`  the latest generator (create_generator(run_dir));
- `training-state.safetensors`  everything needed to resume (see state.py).
`iters` and `minutes` are totals for the run, counted across resumes.

Under torchrun every rank trains its part of each global batch (`batch_size` is the
global batch; see `distributed`); rank 0 alone writes the run folder, and every rank
resumes from its snapshot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import create_scale, save_generator
from ..configs import ScaleConfig
from ..data import PairedVideos
from ..embedder import native_precision
from ..errors import ConfigError, DataError, OutputExists
from ..losses import KNOWLEDGE_THRESHOLD
from . import distributed
from .preview import save_preview
from .session import TrainingSession, TrainingSummary, TrainOptions, data_summary, schedule
from .state import STATE_NAME, load_training_state, read_training_meta, save_training_state
from .step import LossWeights, Nets, StepOptions, WindowSampler, make_optimizers, train_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratorTrainOptions(TrainOptions):
    """The options of a generator run: TrainOptions' plus the model's and its losses'."""

    scale: str | ScaleConfig = "tiny"  # a bundled scale's name, or the config itself
    lr: float = 8e-4  # G's and the discriminators' (pix2pixHD: 2e-4; docs/results.md)
    knowledge_mask: bool = True  # weights the L1 and the PatchNCE sampling
    # a second, knowledge-aware discriminator pass on masked windows (only with the mask).
    # Off by default: level with it on three seeds and 1.2-1.3x faster (docs/results.md).
    knowledge_discriminator: bool = False
    knowledge_centred: bool = True  # centre frames on their FOV median before differencing
    knowledge_threshold: float = KNOWLEDGE_THRESHOLD
    autoregressive: bool = True
    vgg_weights: str | None = None  # local VGG19 weights: enables the perceptual loss
    betas: tuple[float, float] = (0.5, 0.999)
    ss_max: float = 1.0  # final probability of generated previous frames
    ss_start: float = 0.1  # fraction of the run where scheduled sampling starts ramping
    ss_end: float = 0.6  # ... and reaches ss_max
    # windows G chains from real frames to make its own previous frames (scheduled sampling):
    # more is closer to synthesis, which chains every window, and costs a forward pass each
    ss_rollout: int = 1
    loss_weights: LossWeights = LossWeights()
    # "auto": bfloat16 autocast where the device has it natively (CUDA; a CPU with
    # AVX512-BF16 or AMX: 1.6x faster on 2 cores, with channels-last), float16 + GradScaler
    # on CUDA without bfloat16; "float32": no autocast
    precision: str = "auto"
    preview_every: int = 250  # iterations per preview grid (0: first and last only)
    preview_cases: int = 4
    snapshot_every: int = 500  # iterations per resumable snapshot (0: at the end only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in ("auto", "float32"):
            raise ConfigError(f"precision must be auto or float32, got {self.precision!r}")
        if self.ss_rollout < 1:
            raise ConfigError(f"ss_rollout must be >= 1, got {self.ss_rollout}")

    def step_options(self) -> StepOptions:
        """What each training step does with the mask, the previous frames and the losses."""
        return StepOptions(
            self.knowledge_mask,
            self.autoregressive,
            self.loss_weights,
            knowledge_discriminator=self.knowledge_discriminator,
        )

    def scale_config(self) -> ScaleConfig:
        """The model: the scale with this run's autoregressive flag."""
        sc = create_scale(self.scale)
        g = dataclasses.replace(sc.generator, autoregressive=self.autoregressive)
        return dataclasses.replace(sc, generator=g)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON values; the scale by name (training_options.json holds the
        whole model config under "model")."""
        name = self.scale if isinstance(self.scale, str) else self.scale.name
        return super().to_dict() | {"scale": name}

    @classmethod
    def _decode(cls, values: dict[str, Any]) -> dict[str, Any]:
        values.setdefault("knowledge_discriminator", True)  # runs recorded before the flag
        if "loss_weights" in values:
            values["loss_weights"] = LossWeights(**values["loss_weights"])
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return values


def scheduled_sampling_prob(frac: float, max_prob: float, start: float, end: float) -> float:
    """Probability of generated previous frames: 0 before `start`, ramping to max_prob at `end`."""
    if end <= start:
        return max_prob if frac >= start else 0.0
    return max_prob * min(1.0, max(0.0, (frac - start) / (end - start)))


def _amp(
    device: torch.device, precision: str
) -> tuple[contextlib.AbstractContextManager, str, bool]:
    """(autocast context, dtype name, use GradScaler) for this device and precision."""
    if precision == "float32":
        return contextlib.nullcontext(), "float32", False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16), "float16", True
    if native_precision(device) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16), "bfloat16", False
    return contextlib.nullcontext(), "float32", False


def training_loop(
    options: GeneratorTrainOptions | None = None,
    *,
    run_dir: str | Path,
    data: PairedVideos,  # training videos at the model's resolution
    val_data: PairedVideos | None = None,  # preview rows (first preview_cases), else from data
    resume: bool = False,
    device: str | None = None,  # default: cuda when available, else cpu
    progress: bool = True,
    progress_fn: Callable[[dict[str, Any]], None] | None = None,
    abort_fn: Callable[[], bool] | None = None,
    data_notes: dict[str, Any] | None = None,  # more facts of the data for the run's record
    **changes: Any,  # GeneratorTrainOptions fields, replacing those of `options`
) -> TrainingSummary:
    """Train a Fundus2Video generator; resumable; see the module docstring for the run folder.
    `data_notes` (e.g. how many pairs are registered) go into training_options.json's
    "data" and the run's log."""
    options = GeneratorTrainOptions.merged(options, changes)
    distributed.setup()  # a no-op unless started by torchrun with several processes
    run_dir = Path(run_dir)
    resuming = _resuming(run_dir, resume)
    scale = options.scale_config()
    if resuming:
        _check_resume(run_dir / STATE_NAME, scale, options)
    g = scale.generator
    if data.size != g.image_size:
        raise DataError(f"data is {data.size} px but scale {scale.name!r} needs {g.image_size} px")
    if data.frames < g.k:
        raise DataError(f"videos have {data.frames} frames, fewer than K={g.k}")
    session = TrainingSession(
        run_dir,
        options,
        device=device,
        progress=progress,
        progress_fn=progress_fn,
        abort_fn=abort_fn,
    )
    if session.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes
    with session:
        run = _GeneratorRun.build(session, options, scale, data, val_data)
        if resuming:
            run.resume()
        else:
            run.begin(data, data_notes or {})
        return run.train()


def _resuming(run_dir: Path, resume: bool) -> bool:
    """Whether this call continues the run in run_dir; refuses to overwrite one."""
    exists = (run_dir / STATE_NAME).is_file()
    if not resume and exists:
        raise OutputExists(
            f"{run_dir} already holds a training run (pass resume=True or another folder)"
        )
    if resume and not exists:
        log.info("nothing to resume in %s; starting a new run", run_dir)
    return resume and exists


def _check_resume(state_path: Path, scale: ScaleConfig, options: GeneratorTrainOptions) -> None:
    """A run resumes with the model, knowledge mask and discriminators it started with."""
    meta = read_training_meta(state_path)
    saved = ScaleConfig.from_dict(meta["scale"])
    if saved != scale:
        raise ConfigError(f"resume with a different model config: saved {saved}, asked {scale}")
    run = _resumed_facts(GeneratorTrainOptions.from_dict(meta["options"]))
    for flag, asked in _resumed_facts(options).items():
        if run[flag] != asked:
            raise ConfigError(f"resume with {flag}={asked}, run used {run[flag]}")


def _resumed_facts(o: GeneratorTrainOptions) -> dict[str, Any]:
    """What a resume must keep: the networks trained and how the steps train them."""
    step = o.step_options()
    return {
        "knowledge_mask": step.knowledge_mask,
        "uses_knowledge_discriminator": step.uses_knowledge_discriminator,
        "lr": o.lr,
        "ss_rollout": o.ss_rollout,
    }


@dataclass
class _GeneratorRun:
    """What trains in one training_loop call: networks, optimizers, RNG, sampler, previews."""

    session: TrainingSession
    options: GeneratorTrainOptions
    scale: ScaleConfig
    nets: Nets
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scalers: dict[str, torch.amp.GradScaler]
    autocast: contextlib.AbstractContextManager
    amp_dtype: str
    np_rng: np.random.Generator
    sampler: WindowSampler
    preview_set: PairedVideos
    step_options: StepOptions
    part: slice  # this rank's rows of each global batch (all of it in one process)

    @classmethod
    def build(
        cls,
        session: TrainingSession,
        o: GeneratorTrainOptions,
        scale: ScaleConfig,
        data: PairedVideos,
        val_data: PairedVideos | None,
    ) -> _GeneratorRun:
        autocast, amp_dtype, use_scaler = _amp(session.device, o.precision)
        torch.manual_seed(o.seed)
        np_rng = np.random.default_rng(o.seed)
        step_options = o.step_options()
        nets = Nets.build(
            scale, knowledge=step_options.uses_knowledge_discriminator, vgg_weights=o.vgg_weights
        )
        nets.to(session.device)
        if amp_dtype == "bfloat16" and session.device.type == "cpu":
            # oneDNN's fast layout for G's convolutions; not for the discriminators, whose
            # instance norms convert each layer's output out of it and back (a step is 6-7 %
            # faster with them in the default layout)
            nets.G.to(memory_format=torch.channels_last)
        for module in nets.modules().values():
            distributed.broadcast_module(module)
        opt_g, opt_d = make_optimizers(nets, lr=o.lr, betas=o.betas)
        shown = val_data if val_data is not None else data
        sampler = WindowSampler(
            data,
            scale.generator.k,
            np_rng,
            flip=o.flip,
            threshold=o.knowledge_threshold,
            centred=o.knowledge_centred,
            rollout=o.ss_rollout,
        )
        return cls(
            session=session,
            options=o,
            scale=scale,
            nets=nets,
            opt_g=opt_g,
            opt_d=opt_d,
            scalers={n: torch.amp.GradScaler("cuda", enabled=use_scaler) for n in ("G", "D")},
            autocast=autocast,
            amp_dtype=amp_dtype,
            np_rng=np_rng,
            sampler=sampler,
            preview_set=shown.subset(range(min(o.preview_cases, len(shown)))),
            step_options=step_options,
            part=distributed.part(o.batch_size),
        )

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_g, "D": self.opt_d}

    def begin(self, data: PairedVideos, notes: dict[str, Any]) -> None:
        """A new run: training_options.json and the first preview; the clock starts."""
        if notes:
            log.info("training data: %d pairs, %s", len(data), notes)
        self.session.write_options(
            self.options.to_dict(),
            amp=self.amp_dtype,
            model=self.scale.to_dict(),
            # the median time of each frame position: the default times of `generate`
            data=data_summary(
                data, median_times_s=np.median(data.times_s, axis=0).round(3).tolist(), **notes
            ),
        )
        self.preview()
        self.session.start()

    def resume(self) -> None:
        """Restore the last snapshot; the clock continues from its elapsed time. The
        generator is exported again from it: a run killed between writing the state and
        the export has an export one snapshot behind (or none yet)."""
        s = self.session
        path = s.folder / STATE_NAME
        meta = load_training_state(
            path, self.nets.modules(), self.optimizers, self.scalers, self.np_rng
        )
        s.start(int(meta["iteration"]), float(meta["elapsed_s"]))
        record = self.options.to_dict()
        if s.main:
            save_generator(
                s.folder, self.nets.G, self.scale, training=record, iteration=s.iteration
            )
        log.info("resumed %s at iteration %d (%.0f s trained)", s.folder, s.iteration, s.elapsed())

    def snapshot(self) -> None:
        """Resumable state first, then the exported generator (each file atomic; rank 0)."""
        s, record = self.session, self.options.to_dict()
        if not s.main:
            return
        meta = {
            "iteration": s.iteration,
            "elapsed_s": s.elapsed(),
            "scale": self.scale.to_dict(),
            "options": record,
        }
        save_training_state(
            s.folder / STATE_NAME,
            self.nets.modules(),
            self.optimizers,
            self.scalers,
            self.np_rng,
            meta,
        )
        save_generator(s.folder, self.nets.G, self.scale, training=record, iteration=s.iteration)

    def preview(self) -> None:
        if not self.session.main:
            return
        path = self.session.folder / "previews" / f"preview-{self.session.iteration:06d}.png"
        save_preview(self.nets.G, self.preview_set, path)

    def train(self) -> TrainingSummary:
        """Iterate until the budget is spent; snapshot and preview at the end."""
        s, o = self.session, self.options
        lr, ss = o.lr, 0.0
        try:
            while s.running():
                lr, ss = self.step(s.fraction())
                if s.due(o.stats_every):
                    self.tick(lr, ss)
                if s.due(o.preview_every):
                    self.preview()
                if s.due(o.snapshot_every):
                    self.snapshot()
        except KeyboardInterrupt:
            log.warning("interrupted at iteration %d; saving a snapshot", s.iteration)
            self.snapshot()
            raise
        if s.pending:
            self.tick(lr, ss)
        self.snapshot()
        if not s.due(o.preview_every):
            self.preview()
        distributed.barrier()  # the others read nothing before rank 0 has written
        return s.finish()

    def step(self, frac: float) -> tuple[float, float]:
        """One iteration at run fraction `frac` → its (lr, scheduled sampling probability)."""
        o = self.options
        lr = o.lr * schedule(frac, o.lr_decay_start)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr
        ss = scheduled_sampling_prob(frac, o.ss_max, o.ss_start, o.ss_end)
        ss = ss if o.autoregressive else 0.0
        batch = self.sampler.sample(o.batch_size, self.part).to(self.session.device)
        stats = train_step(
            self.nets,
            self.opt_g,
            self.opt_d,
            batch,
            self.step_options,
            ss,
            self.autocast,
            self.scalers["G"],
            self.scalers["D"],
        )
        self.session.record(stats)
        self.session.advance(
            G=f"{stats['Loss/G_total']:.3f}",
            D=f"{stats['Loss/D_total']:.3f}",
            l1=f"{stats['Loss/G_l1']:.3f}",
            nce=f"{stats['Loss/G_nce']:.2f}",
        )
        return lr, ss

    def tick(self, lr: float, ss: float) -> None:
        """A stats.jsonl row and its one-line summary in the log."""
        row = self.session.tick({"Progress/lr": lr, "Progress/ss_prob": ss})
        log.info(
            "iter %d  %.0fs  %.3f s/it  G %.4f  D %.4f  l1 %.4f  nce %.3f  ss %.2f  lr %.1e",
            row["Progress/iter"],
            row["Timing/total_s"],
            row["Timing/sec_per_iter"],
            row.get("Loss/G_total") or 0,
            row.get("Loss/D_total") or 0,
            row.get("Loss/G_l1") or 0,
            row.get("Loss/G_nce") or 0,
            ss,
            lr,
        )
