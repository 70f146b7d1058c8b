"""Cohort → `encoder.PairedVideos`: decode, crop to the field of view and resize a split for
the model (`encoder.fov.fov_square`: the catalog's `cf_fov` / `ffa_fov` circles when
measured, else detected)."""

from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from encoder.data import PairedVideos
from encoder.fov import detect_video_fov, fov_square, fov_square_video, stored_circle

from .cohort import Case, Cohort
from .media import read_cf, read_ffa
from .registration import warp_cf

log = logging.getLogger(__name__)

DEFAULT_TIMES_S = (0.0, 600.0)  # assumed span of a video whose frame times are unknown


def resample_frames(
    frames: np.ndarray, times: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pick `count` frames evenly spread over the video (all of them when count == T).

    frames (T, H, W), times (T,) → (count, H, W), (count,)
    """
    index = np.round(np.linspace(0, len(frames) - 1, count)).astype(int)
    return frames[index], times[index]


def case_times(case: Case, frames: int) -> np.ndarray:
    """The case's frame times, or evenly spaced over DEFAULT_TIMES_S when the catalog has none."""
    if case.ffa_times_s is not None and len(case.ffa_times_s) == frames:
        return np.asarray(case.ffa_times_s, dtype=np.float32)
    log.warning(
        "%s: no frame times for %d frames; assuming evenly spaced 0-600 s", case.case_id, frames
    )
    return np.linspace(*DEFAULT_TIMES_S, frames, dtype=np.float32)


def case_squares(case: Case, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A case's CF (size, size, 3) and FFA (T, size, size). A registered CF (status ok) is
    first warped into the FFA's pixel grid and cropped with the FFA's circle, so the two
    line up pixel for pixel."""
    cf, ffa = read_cf(case.cf_path), read_ffa(case.ffa_path)
    ffa_circle = stored_circle(case.ffa_fov)
    cf_circle = stored_circle(case.cf_fov)
    if case.registration_status == "ok" and case.registration is not None:
        ffa_circle = ffa_circle or detect_video_fov(ffa)
        cf, cf_circle = warp_cf(cf, case.registration, ffa.shape[1:]), ffa_circle
    return fov_square(cf, size, cf_circle), fov_square_video(ffa, size, ffa_circle)


def load_paired(
    cohort: Cohort,
    *,
    size: int,
    split: str | None = None,
    frames: int | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> PairedVideos:
    """Decode the cases of `split` (all when None) at size × size.

    Videos are resampled to `frames` frames (default: the shortest video of the split),
    so every case has the same frame count.
    """
    cases = cohort.cases(split)[:limit]
    if not cases:
        raise ValueError(f"{cohort.root}: no cases in split {split!r}")
    cfs, videos, times = [], [], []
    for case in tqdm(cases, desc=f"load {split or 'all'}", unit="case", disable=not progress):
        cf, video = case_squares(case, size)  # (S, S, 3), (T, S, S)
        cfs.append(cf)
        videos.append(video)
        times.append(case_times(case, len(video)))
    count = frames or min(len(v) for v in videos)
    resampled = [resample_frames(v, t, count) for v, t in zip(videos, times, strict=True)]
    return PairedVideos.from_arrays(
        cf=np.stack(cfs),
        ffa=np.stack([v for v, _ in resampled]),
        times_s=np.stack([t for _, t in resampled]),
        case_ids=[c.case_id for c in cases],
        patient_ids=[c.patient_id for c in cases],
    )
