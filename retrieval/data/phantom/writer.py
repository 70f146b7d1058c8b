"""Write a phantom cohort folder: catalog.parquet, cf/<case>.png, ffa/<case>.mp4; or,
with `format="dicom"`, the same cases as a folder of DICOM files (`phantom/dicom.py`)
for `ingest-dicom`, without a catalog.

Each case is computed from (seed, index) alone, so the files are the same whatever
the number of worker processes, and the same arguments give byte-identical files.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from index.atomic import atomic_dir
from retrieval.data.cohort import CATALOG_NAME, catalog_from_rows, write_catalog
from retrieval.data.media_write import write_mp4, write_png

from .anatomy import FrameOptions
from .case import PhantomCase, check_params, phantom_case
from .dicom import write_case_dicom
from .meta import check_seed

log = logging.getLogger(__name__)
SOURCE = "phantom"
FORMATS = ("png", "dicom")  # png: CF PNG + FFA MP4 and a catalog; dicom: DICOM files


def catalog_row(case: PhantomCase) -> dict:
    """The data-contract row of a case (media paths relative to the cohort folder).

    The field-of-view circles and the registration are left empty: `fundus2video register`
    measures them from the media as for a user's cohort (the truth stays in
    `PhantomCase.registration` and `PhantomCase.fov_circle`)."""
    return {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "eye": case.eye,
        "age": case.age,
        "sex": case.sex,
        "diagnosis": case.diagnosis,
        "lesions": list(case.lesions),
        "split": case.split,
        "cf_path": f"cf/{case.case_id}.png",
        "ffa_path": f"ffa/{case.case_id}.mp4",
        "ffa_times_s": [float(t) for t in case.times_s],
        "ffa_times_source": "phantom",
        "cf_fov": None,
        "ffa_fov": None,
        "registration": None,
        "registration_quality": None,
        "registration_status": None,
        "source": SOURCE,
    }


def write_case(root: Path, case: PhantomCase) -> dict:
    """Write one case's media under `root`; return its catalog row."""
    row = catalog_row(case)
    write_png(root / row["cf_path"], case.cf)
    write_mp4(root / row["ffa_path"], case.ffa)
    return row


def _job(args: tuple[str, int, int, int, int, str, dict]) -> dict | list[str]:
    root, seed, index, size, frames, fmt, framing = args
    case = phantom_case(seed, index, size=size, frames=frames, **framing)
    if fmt == "dicom":
        return write_case_dicom(Path(root), case, seed, index)
    return write_case(Path(root), case)


def _rows(
    root: Path,
    seed: int,
    cases: int,
    size: int,
    frames: int,
    workers: int,
    fmt: str = "png",
    framing: dict | None = None,
) -> Iterator[dict | list[str]]:
    jobs = [(str(root), seed, i, size, frames, fmt, framing or {}) for i in range(cases)]
    if workers == 1:
        yield from map(_job, jobs)
        return
    ctx = multiprocessing.get_context("spawn")  # safe beside threads (torch, tqdm)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(_job, jobs, chunksize=max(1, min(16, cases // (4 * workers))))


def write_phantom_cohort(
    out: str | Path,
    *,
    cases: int,
    size: int = 128,
    frames: int = 16,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    format: str = "png",
    aspect: float = 1.0,
    fov_deg: float | tuple[float, float] | None = None,
    circle: float | tuple[float, float] | None = None,
    shift: float = 0.0,
) -> Path:
    """Write `cases` phantom eye-visits to the new folder `out` (atomically) and return it:
    a cohort, or with `format="dicom"` their DICOM files. `aspect`, `fov_deg`, `circle`
    and `shift` frame the retina as a real camera does (`phantom_case`; default: square)."""
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_params(size, frames)
    check_seed(seed)
    FrameOptions.of(aspect, fov_deg, circle, shift)  # ValueError naming a bad option, early
    framing = {"aspect": aspect, "fov_deg": fov_deg, "circle": circle, "shift": shift}
    out = Path(out)
    workers = min(workers, cases)
    log.info(
        "phantom %s: %d cases, %d px, %d frames, seed %d -> %s",
        "cohort" if format == "png" else "DICOM export",
        *(cases, size, frames, seed, out),
    )
    with atomic_dir(out) as tmp:
        if format == "png":
            (tmp / "cf").mkdir()
            (tmp / "ffa").mkdir()
        bar = tqdm(total=cases, desc="phantom", unit="case", disable=not progress)
        rows = []
        with bar:
            for row in _rows(tmp, seed, cases, size, frames, workers, format, framing):
                rows.append(row)
                bar.update()
        if format == "png":
            write_catalog(catalog_from_rows(rows), tmp / CATALOG_NAME)
    return out
