"""The Fundus2Video training loop: one function of typed keyword arguments.

A run folder holds:
- `training_options.json`  the arguments of the first call (+ device, data summary);
- `stats.jsonl`            one JSON line per tick: `Progress/*`, `Loss/*`, `Timing/*`;
- `log.txt`                the tick summaries;
- `previews/preview-<iter>.png`  CF | real vs generated at 4 times, for fixed cases;
- `config.json` + `generator.safetensors`  the latest generator (create_generator(run_dir));
- `training-state.safetensors`  everything needed to resume (see state.py).
`iters` and `minutes` are totals for the run, counted across resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_text, code_version, create_scale, save_generator
from ..configs import ScaleConfig
from ..data import PairedVideos
from ..errors import ConfigError, DataError
from ..losses import KNOWLEDGE_THRESHOLD
from .preview import save_preview
from .state import STATE_NAME, load_training_state, read_training_meta, save_training_state
from .step import LossWeights, Nets, StepOptions, WindowSampler, make_optimizers, train_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSummary:
    run_dir: Path
    iterations: int
    elapsed_s: float
    stop_reason: str  # "iters" | "minutes" | "abort"
    last_stats: dict[str, float]


def schedule(frac: float, decay_start: float = 0.5) -> float:
    """Learning-rate factor: constant, then linear decay to 0 from `decay_start` of the run."""
    if frac <= decay_start:
        return 1.0
    return max(0.0, (1.0 - frac) / (1.0 - decay_start))


def scheduled_sampling_prob(frac: float, max_prob: float, start: float, end: float) -> float:
    """Probability of generated previous frames: 0 before `start`, ramping to max_prob at `end`."""
    if end <= start:
        return max_prob if frac >= start else 0.0
    return max_prob * min(1.0, max(0.0, (frac - start) / (end - start)))


def _amp(device: torch.device, amp: bool) -> tuple[contextlib.AbstractContextManager, str, bool]:
    """(autocast context, dtype name, use GradScaler) for this device."""
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext(), "float32", False
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), "bfloat16", False
    return torch.autocast("cuda", dtype=torch.float16), "float16", True


def training_loop(
    *,
    run_dir: str | Path,
    data: PairedVideos,  # training videos at the model's resolution
    val_data: PairedVideos | None = None,  # preview rows (first preview_cases), else from data
    scale: str | ScaleConfig = "tiny",
    iters: int | None = None,  # total iterations of the run
    minutes: float | None = None,  # total wall-clock budget of the run
    batch_size: int = 4,
    seed: int = 0,
    resume: bool = False,
    knowledge_mask: bool = True,
    knowledge_centred: bool = True,  # centre frames on their FOV median before differencing
    knowledge_threshold: float = KNOWLEDGE_THRESHOLD,
    autoregressive: bool = True,
    vgg_weights: str | Path | None = None,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    lr_decay_start: float = 0.5,  # fraction of the run after which lr decays linearly to 0
    ss_max: float = 1.0,  # final probability of generated previous frames
    ss_start: float = 0.1,  # fraction of the run where scheduled sampling starts ramping
    ss_end: float = 0.6,  # ... and reaches ss_max
    loss_weights: LossWeights | None = None,
    flip: bool = True,  # random horizontal flips (CF and FFA together)
    device: str | None = None,  # default: cuda when available, else cpu
    amp: bool = True,  # bf16 (or fp16 + GradScaler) autocast on CUDA; ignored on CPU
    stats_every: int = 10,
    preview_every: int = 250,
    preview_cases: int = 4,
    snapshot_every: int = 500,
    progress: bool = True,
    progress_fn: Callable[[dict[str, float]], None] | None = None,
    abort_fn: Callable[[], bool] | None = None,
) -> TrainingSummary:
    """Train a Fundus2Video generator; resumable; see the module docstring for the run folder."""
    if iters is None and minutes is None:
        raise ConfigError("give iters or minutes (or both: whichever ends first)")
    if (iters is not None and iters < 0) or (minutes is not None and minutes <= 0):
        raise ConfigError(
            f"iters must be >= 0 and minutes > 0, got iters={iters}, minutes={minutes}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_NAME
    resuming = resume and state_path.is_file()
    if resume and not resuming:
        log.info("nothing to resume in %s; starting a new run", run_dir)
    if not resume and state_path.is_file():
        raise FileExistsError(
            f"{run_dir} already holds a training run (pass resume=True or another folder)"
        )

    sc = create_scale(scale)
    sc = dataclasses.replace(
        sc, generator=dataclasses.replace(sc.generator, autoregressive=autoregressive)
    )
    if resuming:
        saved_meta = read_training_meta(state_path)
        saved = ScaleConfig.from_dict(saved_meta["scale"])
        if saved != sc:
            raise ConfigError(f"resume with a different model config: saved {saved}, asked {sc}")
        saved_opts = saved_meta["options"]
        if saved_opts["knowledge_mask"] != knowledge_mask:
            raise ConfigError(
                f"resume with knowledge_mask={knowledge_mask}, "
                f"run used {saved_opts['knowledge_mask']}"
            )
    g = sc.generator
    if data.size != g.image_size:
        raise DataError(f"data is {data.size} px but scale {sc.name!r} needs {g.image_size} px")
    if data.frames < g.k:
        raise DataError(f"videos have {data.frames} frames, fewer than K={g.k}")
    weights = loss_weights or LossWeights()
    options = {
        "scale": sc.name,
        "iters": iters,
        "minutes": minutes,
        "batch_size": batch_size,
        "seed": seed,
        "knowledge_mask": knowledge_mask,
        "knowledge_centred": knowledge_centred,
        "knowledge_threshold": knowledge_threshold,
        "autoregressive": autoregressive,
        "vgg_weights": str(vgg_weights) if vgg_weights else None,
        "lr": lr,
        "betas": list(betas),
        "lr_decay_start": lr_decay_start,
        "ss_max": ss_max,
        "ss_start": ss_start,
        "ss_end": ss_end,
        "loss_weights": dataclasses.asdict(weights),
        "flip": flip,
    }

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes
    run_dir.mkdir(parents=True, exist_ok=True)
    with _run_log(run_dir):
        session = _Session.start(
            run_dir=run_dir,
            scale=sc,
            options=options,
            data=data,
            val_data=val_data,
            preview_cases=preview_cases,
            device=dev,
            amp=amp,
            resuming=resuming,
        )
        return session.train(
            iters=iters,
            minutes=minutes,
            stats_every=stats_every,
            preview_every=preview_every,
            snapshot_every=snapshot_every,
            progress=progress,
            progress_fn=progress_fn,
            abort_fn=abort_fn,
        )


@dataclass
class _Session:
    """The state of one training_loop call: networks, optimizers, RNG, where to write."""

    run_dir: Path
    scale: ScaleConfig
    options: dict[str, Any]
    nets: Nets
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scalers: dict[str, torch.amp.GradScaler]
    autocast: contextlib.AbstractContextManager
    np_rng: np.random.Generator
    sampler: WindowSampler
    preview_set: PairedVideos
    step_options: StepOptions
    device: torch.device
    iteration: int = 0
    elapsed_before: float = 0.0
    started: float = dataclasses.field(default_factory=time.monotonic)

    @classmethod
    def start(
        cls,
        *,
        run_dir: Path,
        scale: ScaleConfig,
        options: dict[str, Any],
        data: PairedVideos,
        val_data: PairedVideos | None,
        preview_cases: int,
        device: torch.device,
        amp: bool,
        resuming: bool,
    ) -> _Session:
        autocast, amp_dtype, use_scaler = _amp(device, amp)
        torch.manual_seed(options["seed"])
        np_rng = np.random.default_rng(options["seed"])
        nets = Nets.build(
            scale, knowledge=options["knowledge_mask"], vgg_weights=options["vgg_weights"]
        )
        nets.to(device)
        opt_g, opt_d = make_optimizers(nets, lr=options["lr"], betas=tuple(options["betas"]))
        shown = val_data if val_data is not None else data
        s = cls(
            run_dir=run_dir,
            scale=scale,
            options=options,
            nets=nets,
            opt_g=opt_g,
            opt_d=opt_d,
            scalers={n: torch.amp.GradScaler("cuda", enabled=use_scaler) for n in ("G", "D")},
            autocast=autocast,
            np_rng=np_rng,
            sampler=WindowSampler(
                data,
                scale.generator.k,
                np_rng,
                flip=options["flip"],
                threshold=options["knowledge_threshold"],
                centred=options["knowledge_centred"],
            ),
            preview_set=shown.subset(range(min(preview_cases, len(shown)))),
            step_options=StepOptions(
                knowledge_mask=options["knowledge_mask"],
                autoregressive=options["autoregressive"],
                weights=LossWeights(**options["loss_weights"]),
            ),
            device=device,
        )
        if resuming:
            meta = load_training_state(
                run_dir / STATE_NAME, nets.modules(), s.optimizers, s.scalers, np_rng
            )
            s.iteration, s.elapsed_before = int(meta["iteration"]), float(meta["elapsed_s"])
            log.info(
                "resumed %s at iteration %d (%.0f s trained)",
                run_dir,
                s.iteration,
                s.elapsed_before,
            )
        else:
            info = dict(
                options,
                device=str(device),
                amp=amp_dtype,
                code_version=code_version(),
                model=scale.to_dict(),
                data={
                    "videos": len(data),
                    "frames": data.frames,
                    "size": data.size,
                    # the median time of each frame position: the default times of `generate`
                    "median_times_s": np.median(data.times_s, axis=0).round(3).tolist(),
                    # evaluation refuses a split that shares any of these patients
                    "patient_ids": sorted(set(data.patient_ids)),
                },
            )
            atomic_write_text(run_dir / "training_options.json", json.dumps(info, indent=2) + "\n")
            s.preview()
        s.started = time.monotonic()
        return s

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_g, "D": self.opt_d}

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def snapshot(self) -> None:
        """Resumable state first, then the exported generator (each file atomic)."""
        meta = {
            "iteration": self.iteration,
            "elapsed_s": self.elapsed(),
            "scale": self.scale.to_dict(),
            "options": self.options,
        }
        save_training_state(
            self.run_dir / STATE_NAME,
            self.nets.modules(),
            self.optimizers,
            self.scalers,
            self.np_rng,
            meta,
        )
        save_generator(
            self.run_dir, self.nets.G, self.scale, training=self.options, iteration=self.iteration
        )

    def preview(self) -> None:
        path = self.run_dir / "previews" / f"preview-{self.iteration:06d}.png"
        save_preview(self.nets.G, self.preview_set, path)

    def fraction(self, iters: int | None, minutes: float | None) -> float:
        parts = []
        if iters is not None:
            parts.append(self.iteration / iters if iters else 1.0)
        if minutes is not None:
            parts.append(self.elapsed() / (60 * minutes))
        return min(1.0, max(parts))

    def train(
        self,
        *,
        iters: int | None,
        minutes: float | None,
        stats_every: int,
        preview_every: int,
        snapshot_every: int,
        progress: bool,
        progress_fn: Callable[[dict[str, float]], None] | None,
        abort_fn: Callable[[], bool] | None,
    ) -> TrainingSummary:
        o = self.options
        acc: dict[str, list[float]] = defaultdict(list)
        tick = (time.monotonic(), 0)
        stop_reason, last, lr_now, ss = "iters", {}, o["lr"], 0.0
        bar = tqdm(
            total=iters, initial=self.iteration, disable=not progress, unit="it", dynamic_ncols=True
        )
        try:
            while True:
                frac = self.fraction(iters, minutes)
                if iters is not None and self.iteration >= iters:
                    stop_reason = "iters"
                    break
                if minutes is not None and self.elapsed() >= 60 * minutes:
                    stop_reason = "minutes"
                    break
                if abort_fn is not None and abort_fn():
                    stop_reason = "abort"
                    break
                lr_now = o["lr"] * schedule(frac, o["lr_decay_start"])
                for opt in self.optimizers.values():
                    for group in opt.param_groups:
                        group["lr"] = lr_now
                ss = (
                    scheduled_sampling_prob(frac, o["ss_max"], o["ss_start"], o["ss_end"])
                    if o["autoregressive"]
                    else 0.0
                )
                batch = self.sampler.sample(o["batch_size"]).to(self.device)
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
                self.iteration += 1
                tick = (tick[0], tick[1] + 1)
                for k, v in stats.items():
                    acc[k].append(v)
                bar.update(1)
                bar.set_postfix(
                    G=f"{stats['Loss/G_total']:.3f}",
                    D=f"{stats['Loss/D_total']:.3f}",
                    l1=f"{stats['Loss/G_l1']:.3f}",
                    nce=f"{stats['Loss/G_nce']:.2f}",
                )
                if self.iteration % stats_every == 0:
                    last = self._tick(acc, frac, lr_now, ss, tick, progress_fn)
                    acc.clear()
                    tick = (time.monotonic(), 0)
                if preview_every and self.iteration % preview_every == 0:
                    self.preview()
                if snapshot_every and self.iteration % snapshot_every == 0:
                    self.snapshot()
        except KeyboardInterrupt:
            log.warning("interrupted at iteration %d; saving a snapshot", self.iteration)
            self.snapshot()
            raise
        finally:
            bar.close()
        if acc:
            last = self._tick(acc, self.fraction(iters, minutes), lr_now, ss, tick, progress_fn)
        self.snapshot()
        if not preview_every or self.iteration % preview_every:
            self.preview()
        log.info(
            "stopped (%s) at iteration %d after %.0f s", stop_reason, self.iteration, self.elapsed()
        )
        return TrainingSummary(self.run_dir, self.iteration, self.elapsed(), stop_reason, last)

    def _tick(
        self,
        acc: dict[str, list[float]],
        frac: float,
        lr: float,
        ss: float,
        tick: tuple[float, int],
        progress_fn: Callable[[dict[str, float]], None] | None,
    ) -> dict[str, float]:
        """Append the means since the last tick to stats.jsonl and log a one-line summary."""
        sec = (time.monotonic() - tick[0]) / max(tick[1], 1)
        row: dict[str, Any] = {
            "Progress/iter": self.iteration,
            "Progress/fraction": round(frac, 6),
            "Progress/lr": lr,
            "Progress/ss_prob": ss,
            "Timing/sec_per_iter": sec,
            "Timing/total_s": self.elapsed(),
        }
        row |= {k: float(np.mean(v)) for k, v in sorted(acc.items())}
        row = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with open(self.run_dir / "stats.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        log.info(
            "iter %d  %.0fs  %.3f s/it  G %.4f  D %.4f  l1 %.4f  nce %.3f  ss %.2f  lr %.1e",
            self.iteration,
            row["Timing/total_s"],
            sec,
            row.get("Loss/G_total") or 0,
            row.get("Loss/D_total") or 0,
            row.get("Loss/G_l1") or 0,
            row.get("Loss/G_nce") or 0,
            ss,
            lr,
        )
        if progress_fn is not None:
            progress_fn(row)
        return row


@contextlib.contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    """Log records of the `encoder` package also go to run_dir/log.txt while training."""
    pkg = logging.getLogger("encoder")
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()
