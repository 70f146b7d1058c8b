"""Cohorts: a folder with `catalog.parquet` (one row per eye-visit) and its media.

The catalog's columns are `CATALOG_FIELDS`, defined once here: the polars schema, the
`Case` record and the API's case record follow them. `Cohort.open` validates a catalog
and gives typed `Case` records whose media paths are resolved against the folder.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from index.atomic import atomic_write_bytes
from retrieval.errors import CohortError

CATALOG_NAME = "catalog.parquet"
DIAGNOSES = ("normal", "NPDR", "PDR", "BRVO", "CRVO", "wet-AMD", "CSC")
LESIONS = (
    "microaneurysm",
    "haemorrhage",
    "hard-exudate",
    "cotton-wool-spot",
    "non-perfusion",
    "neovascularisation",
    "leakage",
    "staining",
    "blocking",
    "cnv",
    "drusen",
    "tortuous-veins",
    "delayed-filling",
    "serous-detachment",
)
EYES = ("OD", "OS")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
REGISTRATION_STATUSES = ("ok", "failed")


@dataclass(frozen=True)
class CatalogField:
    """One column of `catalog.parquet`, and so one field of every case record: the
    cohort's `Case`, the engine's `CaseInfo` and `NewCase`, the API's `CaseRecord`."""

    name: str
    dtype: pl.DataType
    description: str
    example: Any  # as JSON gives it
    required: bool = False  # never empty in a catalog
    choices: tuple[str, ...] | None = None  # the allowed values (or empty, unless required)
    empty: Any = None  # a record's value for an empty cell: None (unknown), () (none)
    media: bool = False  # a media path: records serve the file instead
    measured: bool = False  # measured from the media at ingest, not given by the user;
    # optional in a catalog file: an older catalog without the column reads as empty

    @property
    def python_type(self) -> Any:
        """str, int, list[str], list[float]: the type of the field's values in a row."""
        if isinstance(self.dtype, pl.List):
            return list[self.dtype.inner.to_python()]
        return self.dtype.to_python()


CATALOG_FIELDS = (
    CatalogField("case_id", pl.String(), "Unique and stable.", "ph0-00017", required=True),
    CatalogField(
        "patient_id",
        pl.String(),
        "For patient-level splits (no patient spans two splits).",
        "ph0-p0012",
        required=True,
    ),
    CatalogField("eye", pl.String(), "OD or OS (null when not known).", "OD", choices=EYES),
    CatalogField("age", pl.Int32(), "Years.", 63),
    CatalogField("sex", pl.String(), "As the source gives it.", "F"),
    CatalogField(
        "diagnosis",
        pl.String(),
        f"{', '.join(DIAGNOSES)} (phantom); free text for user data.",
        "PDR",
    ),
    CatalogField(
        "lesions",
        pl.List(pl.String()),
        "e.g. microaneurysm, haemorrhage, leakage, non-perfusion, staining, blocking.",
        ["microaneurysm", "neovascularisation", "leakage"],
        empty=(),
    ),
    CatalogField(
        "split", pl.String(), "train, val or test.", "test", required=True, choices=SPLITS
    ),
    CatalogField(
        "cf_path",
        pl.String(),
        "The CF photo, relative to the cohort folder.",
        "cf/ph0-00017.png",
        required=True,
        media=True,
    ),
    CatalogField(
        "ffa_path",
        pl.String(),
        "The FFA video (MP4, a folder of frames or a multi-frame TIFF), relative to the "
        "cohort folder.",
        "ffa/ph0-00017.mp4",
        required=True,
        media=True,
    ),
    CatalogField(
        "ffa_times_s",
        pl.List(pl.Float64()),
        "Seconds after dye injection of each frame (null when not known).",
        [0.0, 12.1, 15.3, 30.2, 61.0, 300.5, 600.0],
    ),
    CatalogField(
        "ffa_times_source",
        pl.String(),
        "Where the frame times came from: manifest, api, phantom, frame_time, "
        "frame_time_vector, acquisition_times, instance_times or assumed_interval "
        "(null when not known).",
        "frame_time_vector",
        measured=True,
    ),
    CatalogField(
        "cf_fov",
        pl.List(pl.Float64()),
        "The CF photo's field-of-view circle: centre x, centre y and radius in pixels of the "
        "stored photo (null when not measured).",
        [700.5, 705.0, 655.25],
        measured=True,
    ),
    CatalogField(
        "ffa_fov",
        pl.List(pl.Float64()),
        "The same circle for the FFA video's frames (one for the video).",
        [384.0, 384.0, 380.5],
        measured=True,
    ),
    CatalogField(
        "registration",
        pl.List(pl.Float64()),
        "The CF-to-FFA registration: the 2x3 affine matrix [a, b, tx, c, d, ty] that maps a "
        "CF pixel (x, y) to the FFA pixel (a x + b y + tx, c x + d y + ty); null when not "
        "registered.",
        [0.55, -0.01, 3.2, 0.01, 0.55, -1.4],
        measured=True,
    ),
    CatalogField(
        "registration_quality",
        pl.Float64(),
        "How well the registered vessel maps agree, 0 to 1 (null when not attempted).",
        0.83,
        measured=True,
    ),
    CatalogField(
        "registration_status",
        pl.String(),
        "ok, or failed (the pair is kept unregistered); null when not attempted.",
        "ok",
        choices=REGISTRATION_STATUSES,
        measured=True,
    ),
    CatalogField(
        "source", pl.String(), "phantom, or the user dataset's name.", "phantom", required=True
    ),
)
CATALOG_SCHEMA: dict[str, pl.DataType] = {f.name: f.dtype for f in CATALOG_FIELDS}
# the fields a user describes a case by (apart from its media files)
CASE_METADATA = tuple(f for f in CATALOG_FIELDS if not f.media and not f.measured)
# the fields measured from a case's media: field of view, registration, frame-time source
CASE_MEASURED = tuple(f for f in CATALOG_FIELDS if f.measured)
# the fields of a case's record: all but the media paths
CASE_FIELDS = tuple(f for f in CATALOG_FIELDS if not f.media)


@dataclass(frozen=True, slots=True)
class Case:
    """One eye-visit: a CF photo and its FFA video, with metadata (one field per
    `CATALOG_FIELDS` entry, in its order)."""

    case_id: str
    patient_id: str
    eye: str | None  # None when a user manifest does not say
    age: int | None
    sex: str | None
    diagnosis: str | None
    lesions: tuple[str, ...]
    split: str
    cf_path: Path  # absolute
    ffa_path: Path  # absolute
    ffa_times_s: tuple[float, ...] | None
    ffa_times_source: str | None
    cf_fov: tuple[float, ...] | None  # (cx, cy, r) px of the stored CF
    ffa_fov: tuple[float, ...] | None  # (cx, cy, r) px of the stored FFA frames
    registration: tuple[float, ...] | None  # 2x3 affine CF px -> FFA px, row-major
    registration_quality: float | None
    registration_status: str | None  # "ok" / "failed"; None: not attempted
    source: str


def case_values(row: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """A catalog row as `Case` keyword arguments: lists as tuples, an empty cell as its
    field's `empty`, media paths resolved against `root` (absolute ones kept)."""
    values = {}
    for f in CATALOG_FIELDS:
        value = row.get(f.name)
        if f.media:
            value = root / (value or "")
        elif value is None:
            value = f.empty
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return values


def unit_hash(*parts: object) -> float:
    """A stable number in [0, 1) from the given parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def hash_split(patient_id: str, seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS) -> str:
    """The split of one patient, from (seed, patient_id) alone: reproducible case by case."""
    u = unit_hash("split", seed, patient_id)
    edges = np.cumsum(fractions) / np.sum(fractions)
    return SPLITS[int(np.searchsorted(edges, u, side="right"))]


def patient_split(
    patient_ids: Iterable[str], seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS
) -> dict[str, str]:
    """Split the distinct patients in the given proportions (exact counts, seeded order).

    Every val/test share gets at least one patient when there are three or more.
    """
    patients = sorted(set(patient_ids), key=lambda p: unit_hash("order", seed, p))
    n = len(patients)
    counts = np.floor(np.asarray(fractions) / np.sum(fractions) * n).astype(int)
    if n >= len(SPLITS):
        counts[1:] = np.maximum(counts[1:], 1)
    counts[0] = n - counts[1:].sum()
    split_of = {}
    start = 0
    for name, count in zip(SPLITS, counts, strict=True):
        for p in patients[start : start + count]:
            split_of[p] = name
        start += count
    return split_of


def empty_catalog() -> pl.DataFrame:
    return pl.DataFrame(schema=CATALOG_SCHEMA)


def with_measured_columns(df: pl.DataFrame) -> pl.DataFrame:
    """`df` with every measured column it lacks added empty (a catalog written before
    the column existed), in the catalog's column order."""
    missing = [f for f in CASE_MEASURED if f.name not in df.columns]
    if not missing:
        return df
    df = df.with_columns(pl.lit(None, f.dtype).alias(f.name) for f in missing)
    known = [name for name in CATALOG_SCHEMA if name in df.columns]
    return df.select(*known, *[c for c in df.columns if c not in CATALOG_SCHEMA])


def catalog_from_rows(rows: list[dict]) -> pl.DataFrame:
    """A catalog from row dicts, each giving every catalog field (None when empty); the
    measured fields may be left out (empty)."""
    measured = {f.name for f in CASE_MEASURED}
    for row in rows:
        missing = [name for name in CATALOG_SCHEMA if name not in row and name not in measured]
        unknown = [name for name in row if name not in CATALOG_SCHEMA]
        if missing or unknown:
            raise CohortError(
                f"catalog row {row.get('case_id')!r}: missing field(s) {missing}, "
                f"unknown field(s) {unknown}"
            )
    rows = [{name: row.get(name) for name in CATALOG_SCHEMA} for row in rows]
    df = pl.DataFrame(rows, schema=CATALOG_SCHEMA) if rows else empty_catalog()
    validate_catalog(df)
    return df


def _column_problem(df: pl.DataFrame, f: CatalogField) -> str | None:
    """What is wrong with one catalog column (its type, empty cells, values), or None."""
    if df.schema[f.name] != f.dtype:
        return f"column {f.name} has type {df.schema[f.name]}, expected {f.dtype}"
    if f.required and df[f.name].null_count():
        return f"column {f.name} has empty values"
    if f.choices is not None:
        bad = df.filter(~pl.col(f.name).is_in(f.choices))[f.name].unique().sort().to_list()
        if bad:
            allowed = ", ".join(f.choices) + ("" if f.required else " or empty")
            return f"{f.name} must be one of {allowed}, got {bad[:5]}"
    return None


def validate_catalog(df: pl.DataFrame, where: str = "catalog") -> None:
    """Raise CohortError naming the first column or value that breaks the contract."""
    missing = [c for c in CATALOG_SCHEMA if c not in df.columns]
    if missing:
        raise CohortError(f"{where}: missing column(s) {', '.join(missing)}")
    for f in CATALOG_FIELDS:
        problem = _column_problem(df, f)
        if problem:
            raise CohortError(f"{where}: {problem}")
    dup = df["case_id"].filter(df["case_id"].is_duplicated()).unique().sort()
    if len(dup):
        raise CohortError(f"{where}: duplicate case_id {', '.join(dup.head(5).to_list())}")
    leaks = (
        df.group_by("patient_id")
        .agg(pl.col("split").n_unique().alias("n"))
        .filter(pl.col("n") > 1)["patient_id"]
        .to_list()
    )
    if leaks:
        raise CohortError(f"{where}: patient(s) {sorted(leaks)[:5]} span more than one split")


def write_catalog(df: pl.DataFrame, path: str | Path) -> None:
    """Validate and write a catalog atomically (temp file, then rename)."""
    validate_catalog(df, str(path))
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=False)
    atomic_write_bytes(path, buf.getvalue())


class Cohort:
    """A cohort folder opened for reading. `catalog` is the polars table."""

    def __init__(self, root: Path, catalog: pl.DataFrame):
        self.root = root
        self.catalog = catalog

    @classmethod
    def open(cls, path: str | Path) -> Cohort:
        root = Path(path)
        catalog_path = root / CATALOG_NAME
        if not root.is_dir():
            raise CohortError(f"{root}: not a folder")
        if not catalog_path.is_file():
            raise CohortError(f"{root}: no {CATALOG_NAME} (is this a cohort folder?)")
        try:
            df = pl.read_parquet(catalog_path)
        except Exception as e:  # polars raises several kinds for a bad file
            raise CohortError(f"{catalog_path}: unreadable parquet ({e})") from e
        df = with_measured_columns(df)
        validate_catalog(df, str(catalog_path))
        return cls(root.resolve(), df)

    def __len__(self) -> int:
        return self.catalog.height

    def __repr__(self) -> str:
        return f"Cohort({str(self.root)!r}, cases={len(self)})"

    def _case(self, row: dict) -> Case:
        return Case(**case_values(row, self.root))

    def cases(self, split: str | None = None) -> list[Case]:
        """All cases, or those of one split, in catalog order."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        df = self.catalog if split is None else self.catalog.filter(pl.col("split") == split)
        return [self._case(r) for r in df.iter_rows(named=True)]

    def case(self, case_id: str) -> Case:
        rows = self.catalog.filter(pl.col("case_id") == case_id)
        if rows.height == 0:
            raise KeyError(f"unknown case_id {case_id!r} in {self.root}")
        return self._case(rows.row(0, named=True))
