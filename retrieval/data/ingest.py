"""Build a cohort from a user's manifest CSV, validating every row before writing.

The manifest needs `case_id, cf_path, ffa_path`; optional columns are the rest of
the catalog's fields (`retrieval.data.cohort.CATALOG_FIELDS`: `patient_id, eye, age,
sex, diagnosis, lesions, split, ffa_times_s, source`). Lists (`lesions`, `ffa_times_s`)
are separated by `;`.
Media paths are relative to the manifest's folder. Every row is decoded first and
all problems are reported together; nothing is written unless every row is good
(or `skip_bad`, which writes the good rows and `skipped.csv`). The cohort is built
in a temporary folder and renamed, so an interrupted ingest leaves nothing behind.

Near-duplicates: a row whose CF photo or FFA video is a near-duplicate of an earlier
row's (`retrieval.data.duplicates`: re-saved, recompressed, resized, slightly cropped,
brightness shifted) is a problem naming both rows; `skip_duplicates` leaves such rows
out (listed in `skipped.csv`) and `allow_duplicates` keeps them (still reported in
`IngestResult.duplicates`).

Measured fields: each written case gets its field-of-view circles (`cf_fov`, `ffa_fov`,
`encoder.fov`) and, unless `register=False`, its CF → FFA registration
(`retrieval.data.registration`): `registration`, `registration_quality` and
`registration_status`. A pair whose registration fails is kept unregistered (status
`failed`) and listed in `IngestResult.registration_failed`.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from tqdm import tqdm

from index.atomic import atomic_dir, atomic_write_text
from retrieval.errors import ManifestError, OutputExists, RowProblem, UnreadableMedia

from .cohort import CATALOG_NAME, SPLITS, catalog_from_rows, patient_split, write_catalog
from .duplicates import DuplicatePair, case_descriptor, find_pairs
from .media import DEFAULT_MAX_PIXELS, read_cf, read_ffa
from .registration import measure_pair

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("case_id", "cf_path", "ffa_path")
EYE_ALIASES = {"od": "OD", "r": "OD", "right": "OD", "os": "OS", "l": "OS", "left": "OS"}
MIN_SIDE = 32  # pixels; anything smaller is not a usable photo or angiogram


@dataclass
class IngestResult:
    cohort: Path
    written: int
    skipped: list[RowProblem] = field(default_factory=list)
    duplicates: list[DuplicatePair] = field(default_factory=list)  # (earlier, later) case ids
    registration_failed: dict[str, float] = field(default_factory=dict)  # case id → quality


@dataclass
class _Row:
    """One validated manifest row, ready to copy."""

    number: int
    meta: dict
    cf_src: Path
    ffa_src: Path
    descriptor: dict | None = None  # the near-duplicate descriptor of its media


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in re.split(r"[;|]", text) if part.strip()]


def _resolve(base: Path, text: str, column: str, allow_outside: bool) -> Path:
    if not text:
        raise ValueError(f"{column} is empty")
    path = (base / text).resolve()
    if not allow_outside and not path.is_relative_to(base):
        raise ValueError(f"{column} {text!r} leaves the manifest's folder (use --allow-outside)")
    if not path.exists():
        raise ValueError(f"{column} {text!r}: no such file")
    return path


def _parse_metadata(raw: dict[str, str], frames: int) -> dict:
    """Optional columns → typed catalog values; raises ValueError naming the column."""
    meta: dict = {"patient_id": raw.get("patient_id") or raw["case_id"]}
    eye = raw.get("eye", "")
    if eye:
        if eye.lower() not in EYE_ALIASES:
            raise ValueError(f"eye {eye!r} is not one of OD, OS (or R/L)")
        meta["eye"] = EYE_ALIASES[eye.lower()]
    else:
        meta["eye"] = None
    age = raw.get("age", "")
    try:
        meta["age"] = int(float(age)) if age else None
    except ValueError as e:
        raise ValueError(f"age {age!r} is not a number") from e
    if meta["age"] is not None and not 0 <= meta["age"] <= 130:
        raise ValueError(f"age {meta['age']} is out of range 0-130")
    meta["sex"] = raw.get("sex") or None
    meta["diagnosis"] = raw.get("diagnosis") or None
    meta["lesions"] = _split_list(raw.get("lesions", ""))
    split = raw.get("split", "")
    if split and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    meta["split"] = split or None
    times_text = raw.get("ffa_times_s", "")
    if times_text:
        try:
            times = [float(t) for t in _split_list(times_text)]
        except ValueError as e:
            raise ValueError(
                f"ffa_times_s {times_text!r} is not a ;-separated list of seconds"
            ) from e
        if len(times) != frames:
            raise ValueError(
                f"ffa_times_s has {len(times)} values but the video has {frames} frames"
            )
        if any(b <= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError("ffa_times_s must be strictly increasing")
        meta["ffa_times_s"] = times
        meta["ffa_times_source"] = raw.get("ffa_times_source") or "manifest"
    else:
        meta["ffa_times_s"] = meta["ffa_times_source"] = None
    return meta


def _check_media(cf_path: Path, ffa_path: Path, max_pixels: int) -> tuple[int, dict]:
    """Decode both files; return the FFA frame count and the near-duplicate descriptor.
    Raises UnreadableMedia / ValueError."""
    cf = read_cf(cf_path, max_pixels=max_pixels)  # (H, W, 3)
    if min(cf.shape[:2]) < MIN_SIDE:
        raise ValueError(
            f"cf_path {cf_path.name}: {cf.shape[1]}x{cf.shape[0]} is below {MIN_SIDE} px"
        )
    ffa = read_ffa(ffa_path, max_pixels=max_pixels)  # (T, H, W)
    if len(ffa) < 2:
        raise ValueError(f"ffa_path {ffa_path.name}: {len(ffa)} frame(s), need at least 2")
    if min(ffa.shape[1:]) < MIN_SIDE:
        raise ValueError(
            f"ffa_path {ffa_path.name}: {ffa.shape[2]}x{ffa.shape[1]} is below {MIN_SIDE} px"
        )
    return len(ffa), case_descriptor(cf, ffa)


def read_manifest(manifest: Path) -> list[dict[str, str]]:
    """The manifest's rows as stripped strings; raises ManifestError for a bad header."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(manifest, [RowProblem(0, None, f"cannot read: {e}")]) from e
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            manifest, [RowProblem(0, None, f"missing column(s) {', '.join(missing)}")]
        )
    rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not rows:
        raise ManifestError(manifest, [RowProblem(0, None, "no data rows")])
    return rows


def validate_manifest(
    manifest: Path,
    *,
    allow_outside: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    rows: list[dict[str, str]] | None = None,
) -> tuple[list[_Row], list[RowProblem]]:
    """Check every row (`rows`, as `read_manifest` gives them, instead of reading the
    manifest: paths are then relative to its folder all the same); return the good rows
    and every problem found."""
    manifest = Path(manifest)
    base = manifest.parent.resolve()
    rows = read_manifest(manifest) if rows is None else rows
    good: list[_Row] = []
    problems: list[RowProblem] = []
    first_row_of: dict[str, int] = {}
    for number, raw in enumerate(tqdm(rows, desc="validate", unit="case", disable=not progress), 1):
        case_id = raw.get("case_id") or None
        try:
            if not case_id:
                raise ValueError("case_id is empty")
            if case_id in first_row_of:
                raise ValueError(f"duplicate case_id (first seen in row {first_row_of[case_id]})")
            first_row_of[case_id] = number
            cf_src = _resolve(base, raw["cf_path"], "cf_path", allow_outside)
            ffa_src = _resolve(base, raw["ffa_path"], "ffa_path", allow_outside)
            frames, descriptor = _check_media(cf_src, ffa_src, max_pixels)
            meta = _parse_metadata(raw, frames)
        except (ValueError, UnreadableMedia) as e:
            problems.append(RowProblem(number, case_id, str(e)))
            continue
        meta["case_id"] = case_id
        meta["source"] = raw.get("source") or manifest.stem
        good.append(_Row(number, meta, cf_src, ffa_src, descriptor))
    problems += _check_splits(good)
    return good, problems


def _check_splits(rows: list[_Row]) -> list[RowProblem]:
    """Given splits must be complete (all rows or none) and never split a patient."""
    given = [r for r in rows if r.meta["split"]]
    if given and len(given) != len(rows):
        return [
            RowProblem(r.number, r.meta["case_id"], "split is empty while other rows give one")
            for r in rows
            if not r.meta["split"]
        ]
    split_of: dict[str, tuple[str, int]] = {}
    problems = []
    for r in given:
        pid, split = r.meta["patient_id"], r.meta["split"]
        first = split_of.setdefault(pid, (split, r.number))
        if first[0] != split:
            msg = f"patient {pid} is in split {split} here but {first[0]} in row {first[1]}"
            problems.append(RowProblem(r.number, r.meta["case_id"], msg))
    return problems


def near_duplicate_problems(rows: list[_Row]) -> tuple[list[RowProblem], list[DuplicatePair]]:
    """Each row whose CF or FFA near-duplicates an earlier row's: one problem naming both rows
    (at its nearest match), and every pair found."""
    described = [r for r in rows if r.descriptor is not None]
    pairs = find_pairs([r.meta["case_id"] for r in described], [r.descriptor for r in described])
    row_of = {r.meta["case_id"]: r for r in described}
    problems: dict[int, RowProblem] = {}
    for p in pairs:  # nearest first within each modality
        first, later = sorted((row_of[p.a], row_of[p.b]), key=lambda r: r.number)
        if later.number in problems:
            continue
        msg = (
            f"{p.modality} is a near-duplicate of row {first.number} ({first.meta['case_id']}): "
            f"distance {p.distance:.3f} (use --skip-duplicates or --allow-duplicates)"
        )
        problems[later.number] = RowProblem(later.number, later.meta["case_id"], msg)
    return sorted(problems.values(), key=lambda p: p.row), pairs


def _media_name(case_id: str, src: Path, taken: set[str]) -> str:
    """A filesystem-safe, unique name for a case's media, keeping the source suffix."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._") or "case"
    name, n = stem, 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name.lower())
    return name + ("" if src.is_dir() else src.suffix.lower())


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def measure_rows(
    rows: list[_Row], *, register: bool, max_pixels: int, progress: bool
) -> dict[str, float]:
    """Add each row's measured fields (field of view; registration when `register`) to its
    metadata; → the case ids whose registration failed, with their quality."""
    failed: dict[str, float] = {}
    desc = "register" if register else "measure"
    for r in tqdm(rows, desc=desc, unit="case", disable=not progress):
        cf = read_cf(r.cf_src, max_pixels=max_pixels)
        ffa = read_ffa(r.ffa_src, max_pixels=max_pixels)
        r.meta.update(measure_pair(cf, ffa, r.meta["ffa_times_s"], register=register))
        if r.meta["registration_status"] == "failed":
            failed[r.meta["case_id"]] = r.meta["registration_quality"]
    return failed


def _write_cohort(tmp: Path, rows: list[_Row], problems: list[RowProblem], progress: bool) -> None:
    """Copy the rows' media into the (temporary) cohort folder `tmp`, write its catalog and,
    when rows were left out, `skipped.csv`."""
    (tmp / "cf").mkdir()
    (tmp / "ffa").mkdir()
    taken_cf: set[str] = set()
    taken_ffa: set[str] = set()
    catalog_rows = []
    for r in tqdm(rows, desc="copy", unit="case", disable=not progress):
        cf_rel = f"cf/{_media_name(r.meta['case_id'], r.cf_src, taken_cf)}"
        ffa_rel = f"ffa/{_media_name(r.meta['case_id'], r.ffa_src, taken_ffa)}"
        _copy(r.cf_src, tmp / cf_rel)
        _copy(r.ffa_src, tmp / ffa_rel)
        catalog_rows.append({**r.meta, "cf_path": cf_rel, "ffa_path": ffa_rel})
    write_catalog(catalog_from_rows(catalog_rows), tmp / CATALOG_NAME)
    if problems:
        report = pl.DataFrame(
            {
                "row": [p.row for p in problems],
                "case_id": [p.case_id for p in problems],
                "problem": [p.message for p in problems],
            }
        )
        atomic_write_text(tmp / "skipped.csv", report.write_csv())


def ingest(
    manifest: str | Path,
    out: str | Path,
    *,
    skip_bad: bool = False,
    skip_duplicates: bool = False,
    allow_duplicates: bool = False,
    allow_outside: bool = False,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    register: bool = True,
    progress: bool = True,
    rows: list[dict[str, str]] | None = None,
) -> IngestResult:
    """Validate `manifest` (or `rows`) and write a cohort folder at `out` (module docstring)."""
    manifest, out = Path(manifest), Path(out)
    if out.exists():
        raise OutputExists(f"{out} already exists (choose another output folder)")
    rows, problems = validate_manifest(
        manifest, allow_outside=allow_outside, max_pixels=max_pixels, progress=progress, rows=rows
    )
    dup_problems, pairs = near_duplicate_problems(rows)
    if problems and not skip_bad or dup_problems and not (skip_duplicates or allow_duplicates):
        raise ManifestError(manifest, sorted(problems + dup_problems, key=lambda p: p.row))
    if not allow_duplicates:
        problems = sorted(problems + dup_problems, key=lambda p: p.row)
    bad_numbers = {p.row for p in problems}
    rows = [r for r in rows if r.number not in bad_numbers]
    if not rows:
        raise ManifestError(manifest, problems or [RowProblem(0, None, "no usable rows")])
    if not rows[0].meta["split"]:
        split_of = patient_split((r.meta["patient_id"] for r in rows), seed=seed)
        for r in rows:
            r.meta["split"] = split_of[r.meta["patient_id"]]
    failed = measure_rows(rows, register=register, max_pixels=max_pixels, progress=progress)
    with atomic_dir(out) as tmp:
        _write_cohort(tmp, rows, problems, progress)
    log.info(
        "ingested %d case(s) into %s; skipped %d; registration failed for %d",
        *(len(rows), out, len(problems), len(failed)),
    )
    return IngestResult(out, len(rows), problems, pairs, failed)
