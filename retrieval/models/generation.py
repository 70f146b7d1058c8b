"""Cohort-level generator jobs: train a run, synthesize a video (evaluation of held-out
patients: `retrieval.evaluation.generation`).

The CLI calls these; they join cohorts (files) with the tensor-level `encoder` library.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from encoder import create_generator, synthesize
from encoder.train import GeneratorTrainOptions, TrainingSummary, distributed, training_loop
from retrieval.data.cohort import Cohort
from retrieval.data.media import read_cf
from retrieval.data.media_write import mark_synthetic
from retrieval.data.training_data import load_paired
from retrieval.errors import Fundus2VideoError, OutputExists, QueryError

log = logging.getLogger(__name__)

# name -> GeneratorTrainOptions flags, each set explicitly: the paper's model ("full") and
# its ablations. `train`'s default, no-knowledge-discriminator (GeneratorTrainOptions'
# defaults), drops only the knowledge-aware discriminator: level with the full model, faster,
# and its encoder serves search as well (docs/results.md); the per-frame variants draw
# better angiograms but embed FFA through previous-frame channels they never trained.
VARIANTS = {
    "full": {"knowledge_mask": True, "knowledge_discriminator": True, "autoregressive": True},
    "no-knowledge-mask": {
        "knowledge_mask": False,
        "knowledge_discriminator": False,
        "autoregressive": True,
    },
    # the mask still weights the L1 and the PatchNCE sampling; no knowledge-aware D
    "no-knowledge-discriminator": {
        "knowledge_mask": True,
        "knowledge_discriminator": False,
        "autoregressive": True,
    },
    "per-frame": {"knowledge_mask": True, "knowledge_discriminator": True, "autoregressive": False},
    "per-frame-no-knowledge-discriminator": {
        "knowledge_mask": True,
        "knowledge_discriminator": False,
        "autoregressive": False,
    },
}


def train_run(
    cohort: str | Path,
    out: str | Path,
    options: GeneratorTrainOptions | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    **changes: Any,  # GeneratorTrainOptions fields, replacing those of `options`
) -> TrainingSummary:
    """Train a generator on the cohort's train split (previews from its val split). A
    registered pair's CF is warped onto its FFA (`case_squares`); the run records how many
    pairs are, and warns when some were never registered."""
    options = GeneratorTrainOptions.merged(options, changes)
    out = Path(out)
    distributed.setup()  # under torchrun: join the other processes (else a no-op)
    if not resume and out.exists() and any(out.iterdir()):
        raise OutputExists(f"{out} already holds files (--resume continues a run there)")
    distributed.barrier()  # every rank has checked before rank 0 writes there
    size = options.scale_config().generator.image_size
    opened = Cohort.open(cohort)
    train = load_paired(opened, size=size, split="train", progress=progress)
    val = None
    if opened.cases("val"):
        val = load_paired(
            opened, size=size, split="val", frames=train.frames, limit=4, progress=False
        )
    statuses = [case.registration_status for case in opened.cases("train")]
    registered, failed, never = (statuses.count(s) for s in ("ok", "failed", None))
    if never:
        log.warning(
            "%s: %d of %d training pairs were never registered (CF and FFA a few pixels "
            "apart), which blurs the generated vessels; `fundus2video register %s` first",
            opened.root, never, len(statuses), opened.root,
        )  # fmt: skip
    if failed:
        log.info(
            "%s: %d training pairs failed registration (kept unregistered)", opened.root, failed
        )
    return training_loop(
        options,
        run_dir=out,
        data=train,
        val_data=val,
        resume=resume,
        progress=progress,
        data_notes={"registered_pairs": registered},
    )


def training_data_info(run: str | Path) -> dict[str, Any]:
    """The data summary a run recorded: frames, size, median frame times, patient ids."""
    path = Path(run) / "training_options.json"
    try:
        return json.loads(path.read_text())["data"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise Fundus2VideoError(f"{path}: not a training run ({e})") from e


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
        raise QueryError(f"times must be non-negative and increasing, got {times.tolist()}")
    return mark_synthetic(synthesize(generator, cf, times)), times
