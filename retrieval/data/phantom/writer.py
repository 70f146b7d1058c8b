"""Write a phantom cohort folder: catalog.parquet, cf/<case>.png, ffa/<case>.mp4.

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

from .case import PhantomCase, check_params, phantom_case
from .meta import check_seed

log = logging.getLogger(__name__)
SOURCE = "phantom"


def catalog_row(case: PhantomCase) -> dict:
    """The data-contract row of a case (media paths relative to the cohort folder)."""
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
        "source": SOURCE,
    }


def write_case(root: Path, case: PhantomCase) -> dict:
    """Write one case's media under `root`; return its catalog row."""
    row = catalog_row(case)
    write_png(root / row["cf_path"], case.cf)
    write_mp4(root / row["ffa_path"], case.ffa)
    return row


def _job(args: tuple[str, int, int, int, int]) -> dict:
    root, seed, index, size, frames = args
    return write_case(Path(root), phantom_case(seed, index, size=size, frames=frames))


def _rows(
    root: Path, seed: int, cases: int, size: int, frames: int, workers: int
) -> Iterator[dict]:
    jobs = [(str(root), seed, i, size, frames) for i in range(cases)]
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
) -> Path:
    """Write `cases` phantom eye-visits to the new folder `out` (atomically) and return it."""
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    check_params(size, frames)
    check_seed(seed)
    out = Path(out)
    workers = min(workers, cases)
    log.info(
        "phantom cohort: %d cases, %d px, %d frames, seed %d -> %s", cases, size, frames, seed, out
    )
    with atomic_dir(out) as tmp:
        (tmp / "cf").mkdir()
        (tmp / "ffa").mkdir()
        bar = tqdm(total=cases, desc="phantom", unit="case", disable=not progress)
        rows = []
        with bar:
            for row in _rows(tmp, seed, cases, size, frames, workers):
                rows.append(row)
                bar.update()
        write_catalog(catalog_from_rows(rows), tmp / CATALOG_NAME)
    return out
