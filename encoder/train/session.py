"""What both training loops share: their common options and the bookkeeping of one run.

`TrainingSession` owns the device, the iteration / time budget and its stop reasons,
`log.txt`, `stats.jsonl` (one row per tick, non-finite values written as null), the
progress bar, and the cadence of ticks and checkpoints. Under torchrun (see
`distributed`) only rank 0 writes and shows progress, rank 0 decides when every rank
stops, and each step's stats are averaged over the ranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_text, code_version
from ..data import PairedVideos
from ..errors import ConfigError
from . import distributed

log = logging.getLogger(__name__)

OPTIONS_NAME = "training_options.json"
STATS_NAME = "stats.jsonl"
LOG_NAME = "log.txt"


@dataclass(frozen=True)
class TrainOptions:
    """The options every training run has; written to training_options.json."""

    iters: int | None = None  # total iterations of the run
    minutes: float | None = None  # total wall-clock budget (whichever of the two ends first)
    batch_size: int = 4
    seed: int = 0
    lr: float = 2e-4
    lr_decay_start: float = 0.5  # fraction of the run after which lr decays linearly to 0
    flip: bool = True  # random horizontal flips, CF and FFA together
    stats_every: int = 10  # iterations per stats.jsonl row

    def __post_init__(self) -> None:
        if self.iters is None and self.minutes is None:
            raise ConfigError("give iters or minutes (or both: whichever ends first)")
        if (self.iters is not None and self.iters < 0) or (
            self.minutes is not None and self.minutes <= 0
        ):
            raise ConfigError(
                f"iters must be >= 0 and minutes > 0, got iters={self.iters}, "
                f"minutes={self.minutes}"
            )
        if self.batch_size < 1 or self.stats_every < 1:
            raise ConfigError(
                f"batch_size and stats_every must be >= 1, got {self.batch_size}, "
                f"{self.stats_every}"
            )

    @classmethod
    def merged(cls, options: Self | None, changes: dict[str, Any]) -> Self:
        """`options` (default: the defaults) with `changes` to its fields."""
        return cls(**changes) if options is None else dataclasses.replace(options, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """The options recorded in `values` (e.g. training_options.json); other keys are
        ignored and missing ones take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**cls._decode({k: v for k, v in values.items() if k in names}))

    @classmethod
    def _decode(cls, values: dict[str, Any]) -> dict[str, Any]:
        """JSON values → field values (nested dataclasses, tuples)."""
        return values


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


def pick_device(device: str | None) -> torch.device:
    """`device`, or cuda when available, else cpu (under torchrun: this rank's GPU)."""
    return distributed.device(device)


def finite_or_none(row: dict[str, Any]) -> dict[str, Any]:
    """The row with non-finite floats as None (JSON has no NaN or infinity)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def data_summary(data: PairedVideos, **extra: Any) -> dict[str, Any]:
    """What training_options.json records of the training data (evaluation refuses a split
    that shares any of its patient ids)."""
    size = {"videos": len(data), "frames": data.frames, "size": data.size}
    return size | extra | {"patient_ids": sorted(set(data.patient_ids))}


class TrainingSession:
    """The bookkeeping of one training run in `folder`; use as a context manager, which
    sends the `encoder` package's log records to folder/log.txt.

    The budget clock starts when the session is made (`start` restarts it). Each
    iteration: `running()` (False once the budget is spent or `abort_fn()` says so, with
    `stop_reason` set), then `record` the step's stats, `advance`, and `tick` when
    `due(options.stats_every)`.
    """

    def __init__(
        self,
        folder: Path,
        options: TrainOptions,
        *,
        device: str | None = None,
        progress: bool = True,
        progress_fn: Callable[[dict[str, Any]], None] | None = None,
        abort_fn: Callable[[], bool] | None = None,
    ):
        self.folder, self.options = folder, options
        self.device = pick_device(device)
        self.progress, self.progress_fn, self.abort_fn = progress, progress_fn, abort_fn
        self.main = distributed.is_main()  # rank 0 (or the only process) writes the files
        self.shared = distributed.active()  # the budget and stats are agreed with other ranks
        self._budget_s: float | None = None  # rank 0's clock at the last running() (shared)
        self.iteration = 0
        self.stop_reason = ""
        self.last_row: dict[str, Any] = {}
        self._elapsed_before = 0.0
        self._started = time.monotonic()
        self._stats: dict[str, list[float]] = defaultdict(list)
        self._tick_started, self._tick_iters = self._started, 0
        self._bar: tqdm | None = None
        self._handler: logging.Handler | None = None
        self._old_level = logging.NOTSET

    # ---------------------------------------------------------------- log.txt

    def __enter__(self) -> Self:
        if not self.main:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.folder / LOG_NAME, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        pkg = logging.getLogger("encoder")
        self._old_level = pkg.level
        if pkg.getEffectiveLevel() > logging.INFO:
            pkg.setLevel(logging.INFO)
        pkg.addHandler(handler)
        self._handler = handler
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._handler is not None:
            pkg = logging.getLogger("encoder")
            pkg.removeHandler(self._handler)
            pkg.setLevel(self._old_level)
            self._handler.close()
            self._handler = None

    def write_options(self, record: dict[str, Any], **extra: Any) -> None:
        """training_options.json: the run's `record`, the device, code version and `extra`."""
        if not self.main:
            return
        info = record | {"device": str(self.device), "code_version": code_version()} | extra
        atomic_write_text(self.folder / OPTIONS_NAME, json.dumps(info, indent=2) + "\n")

    # ---------------------------------------------------------------- budget

    def start(self, iteration: int = 0, elapsed_s: float = 0.0) -> None:
        """Count from `iteration` and `elapsed_s` (a resumed run's); the clock restarts."""
        self.iteration, self._elapsed_before = iteration, elapsed_s
        self._started = self._tick_started = time.monotonic()

    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._started

    def fraction(self) -> float:
        """How much of the budget is spent, in [0, 1]."""
        iters, minutes = self.options.iters, self.options.minutes
        parts = []
        if iters is not None:
            parts.append(self.iteration / iters if iters else 1.0)
        if minutes is not None:
            elapsed = self.elapsed() if self._budget_s is None else self._budget_s
            parts.append(elapsed / (60 * minutes))
        return min(1.0, max(parts))

    def _stop(self) -> str:
        """Why the run must stop now ("iters", "minutes", "abort"), or ""."""
        iters, minutes = self.options.iters, self.options.minutes
        if iters is not None and self.iteration >= iters:
            return "iters"
        if minutes is not None and self.elapsed() >= 60 * minutes:
            return "minutes"
        if self.abort_fn is not None and self.abort_fn():
            return "abort"
        return ""

    def running(self) -> bool:
        """True while another iteration fits the budget; else sets `stop_reason`."""
        if self._bar is None:
            self._bar = tqdm(
                total=self.options.iters,
                initial=self.iteration,
                disable=not self.progress or not self.main,
                unit="it",
                dynamic_ncols=True,
            )
        self.stop_reason = self._stop()
        if self.shared:
            self.stop_reason, self._budget_s = distributed.agree(self.stop_reason, self.elapsed())
        return not self.stop_reason

    def due(self, every: int) -> bool:
        """Whether the iteration just done is a multiple of `every` (0: never)."""
        return bool(every) and self.iteration % every == 0

    # ---------------------------------------------------------------- stats

    def record(self, stats: dict[str, float]) -> None:
        """Stats of a step, averaged into the next tick (and over the ranks)."""
        if self.shared:
            stats = distributed.mean_stats(stats)
        for k, v in stats.items():
            self._stats[k].append(v)

    def advance(self, **postfix: str) -> None:
        """One iteration done; `postfix` shows beside the progress bar."""
        self.iteration += 1
        self._tick_iters += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(postfix)

    @property
    def pending(self) -> bool:
        """Whether stats were recorded since the last tick."""
        return bool(self._stats)

    def tick(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Append a row to stats.jsonl: progress, timing, `extra` and the means of the stats
        recorded since the last tick; hand it to progress_fn; returns it."""
        sec = (time.monotonic() - self._tick_started) / max(self._tick_iters, 1)
        row = {
            "Progress/iter": self.iteration,
            "Progress/fraction": round(self.fraction(), 6),
            "Timing/sec_per_iter": sec,
            "Timing/total_s": self.elapsed(),
        }
        row |= extra | {k: float(np.mean(v)) for k, v in sorted(self._stats.items())}
        row = finite_or_none(row)
        if self.main:
            with open(self.folder / STATS_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.progress_fn is not None:
                self.progress_fn(row)
        self._stats.clear()
        self._tick_started, self._tick_iters = time.monotonic(), 0
        self.last_row = row
        return row

    def finish(self, detail: str = "") -> TrainingSummary:
        """Log the stop and summarise the run."""
        log.log(
            logging.INFO if self.main else logging.DEBUG,
            "stopped (%s) at iteration %d after %.0f s%s",
            self.stop_reason,
            self.iteration,
            self.elapsed(),
            detail,
        )
        return TrainingSummary(
            self.folder, self.iteration, self.elapsed(), self.stop_reason, self.last_row
        )
