"""Cohort-level generator jobs: train a run, synthesize a video, evaluate held-out patients.

The CLI calls these; they join cohorts (files) with the tensor-level `encoder` library.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from encoder import (
    create_generator,
    evaluate_generation,
    get_scale,
    read_checkpoint_config,
    synthesize,
)
from encoder.train import training_loop
from index.atomic import atomic_write_text
from retrieval.data.cohort import Cohort
from retrieval.data.media import read_cf
from retrieval.data.training_data import load_paired
from retrieval.errors import Fundus2VideoError

log = logging.getLogger(__name__)

VARIANTS = {  # name -> training_loop flags; the full model and its two ablations
    "full": {"knowledge_mask": True, "autoregressive": True},
    "no-knowledge-mask": {"knowledge_mask": False, "autoregressive": True},
    "per-frame": {"knowledge_mask": True, "autoregressive": False},
}
SYNTHETIC_LABEL = "SYNTHETIC"


class SplitLeak(Fundus2VideoError):
    """An evaluation split shares patients with a run's training data."""


def train_run(
    cohort: str | Path,
    out: str | Path,
    *,
    scale: str = "tiny",
    minutes: float | None = None,
    iters: int | None = None,
    resume: bool = False,
    variant: str = "full",
    batch_size: int = 4,
    seed: int = 0,
    vgg_weights: str | Path | None = None,
    progress: bool = True,
):
    """Train a generator on the cohort's train split (previews from its val split)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    out = Path(out)
    if not resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds files (--resume continues a run there)")
    size = get_scale(scale).generator.image_size
    opened = Cohort.open(cohort)
    train = load_paired(opened, size=size, split="train", progress=progress)
    val = None
    if opened.cases("val"):
        val = load_paired(
            opened, size=size, split="val", frames=train.frames, limit=4, progress=False
        )
    return training_loop(
        run_dir=out,
        data=train,
        val_data=val,
        scale=scale,
        iters=iters,
        minutes=minutes,
        batch_size=batch_size,
        seed=seed,
        resume=resume,
        vgg_weights=vgg_weights,
        progress=progress,
        **VARIANTS[variant],
    )


def training_data_info(run: str | Path) -> dict[str, Any]:
    """The data summary a run recorded: frames, size, median frame times, patient ids."""
    path = Path(run) / "training_options.json"
    try:
        return json.loads(path.read_text())["data"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise Fundus2VideoError(f"{path}: not a training run ({e})") from e


def mark_synthetic(frames: np.ndarray, label: str = SYNTHETIC_LABEL) -> np.ndarray:
    """Burn a visible label into every frame so a synthesized angiogram is never taken for real.

    frames uint8 (T, H, W) → uint8 (T, H, W): white text on a black band, top-left.
    """
    t, h, w = frames.shape
    font = ImageFont.load_default(size=max(8, h // 12))
    band = Image.new("L", (w, h), 0)
    mask = Image.new("L", (w, h), 0)
    draw, draw_mask = ImageDraw.Draw(band), ImageDraw.Draw(mask)
    left, top, right, bottom = draw.textbbox((3, 2), label, font=font)
    draw_mask.rectangle((0, 0, right + 3, bottom + 3), fill=255)
    draw.text((3, 2), label, fill=255, font=font)
    band_arr, mask_arr = np.asarray(band), np.asarray(mask) > 0  # (H, W)
    out = frames.copy()
    out[:, mask_arr] = band_arr[mask_arr]
    return out


def generate_video(
    run: str | Path, cf_path: str | Path, *, times_s: list[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Synthesize an FFA video (marked SYNTHETIC) for one CF photo.

    Default times are the median frame times of the run's training videos.
    Returns frames uint8 (T, S, S) and times (T,).
    """
    cf = read_cf(cf_path)  # (H, W, 3); a named error for unreadable input
    generator = create_generator(run)
    times = np.asarray(times_s or training_data_info(run)["median_times_s"], dtype=np.float32)
    if times.ndim != 1 or len(times) < 1 or np.any(np.diff(times) < 0) or np.any(times < 0):
        raise ValueError(f"times must be non-negative and increasing, got {times.tolist()}")
    return mark_synthetic(synthesize(generator, cf, times)), times


def check_no_leak(run: str | Path, patient_ids: set[str], split: str) -> None:
    """Refuse an evaluation split that shares patients with the run's training data.

    `run` is a generator run or an embedder folder: both record their training patients.
    """
    recorded = training_data_info(run).get("patient_ids")
    if recorded is None:
        raise Fundus2VideoError(
            f"{run}: its training_options.json does not list the training patients, so "
            f"split {split!r} cannot be checked for leaks; retrain it with this version"
        )
    shared = patient_ids & set(recorded)
    if shared:
        raise SplitLeak(
            f"split {split!r} shares {len(shared)} patient(s) with the training data of {run} "
            f"(e.g. {', '.join(sorted(shared)[:3])}); evaluate on held-out patients"
        )


def evaluate_runs(
    runs: dict[str, str | Path],
    cohort: str | Path,
    *,
    split: str = "test",
    i3d_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generation metrics of each run and the two baselines on the same held-out frames."""
    opened = Cohort.open(cohort)
    first = next(iter(runs.values()))
    size = read_checkpoint_config(first)["model"]["generator"]["image_size"]
    test = load_paired(opened, size=size, split=split, progress=progress)
    for run in runs.values():
        check_no_leak(run, set(test.patient_ids), split)
    train = load_paired(opened, size=size, split="train", frames=test.frames, progress=progress)
    models = {name: create_generator(run) for name, run in runs.items()}
    report = evaluate_generation(models, test, train, i3d_path=i3d_path)
    report["split"] = split
    report["cohort"] = str(opened.root)
    report["runs"] = {
        name: {"path": str(run), "training": read_checkpoint_config(run).get("training")}
        for name, run in runs.items()
    }
    return report


def generation_table(report: dict[str, Any]) -> str:
    """The report's rows as a text table (models, then baselines)."""
    metric = report["distribution_metric"]
    cols = ("psnr", "ssim", "temporal_gap", "lesion_psnr", metric)
    lines = [f"{'':<12}{'name':<20}" + "".join(f"{c:>14}" for c in cols)]
    for group in ("models", "baselines"):
        for name, row in report[group].items():
            cells = "".join(f"{row[c]:>14.4f}" for c in cols)
            lines.append(f"{group[:-1]:<12}{name:<20}{cells}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
