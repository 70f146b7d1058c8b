"""Cohorts: a folder with `catalog.parquet` (one row per eye-visit) and its media.

The catalog follows the README's data contract. `Cohort.open` validates it and
gives typed `Case` records whose media paths are resolved against the folder.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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

CATALOG_SCHEMA: dict[str, pl.DataType] = {
    "case_id": pl.String(),
    "patient_id": pl.String(),
    "eye": pl.String(),
    "age": pl.Int32(),
    "sex": pl.String(),
    "diagnosis": pl.String(),
    "lesions": pl.List(pl.String()),
    "split": pl.String(),
    "cf_path": pl.String(),
    "ffa_path": pl.String(),
    "ffa_times_s": pl.List(pl.Float64()),
    "source": pl.String(),
}
REQUIRED_NON_NULL = ("case_id", "patient_id", "split", "cf_path", "ffa_path", "source")


@dataclass(frozen=True)
class Case:
    """One eye-visit: a CF photo and its FFA video, with metadata."""

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
    source: str


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


def catalog_from_rows(rows: list[dict]) -> pl.DataFrame:
    """A catalog with the contract's columns and types from a list of row dicts."""
    df = pl.DataFrame(rows, schema=CATALOG_SCHEMA) if rows else empty_catalog()
    validate_catalog(df)
    return df


def validate_catalog(df: pl.DataFrame, where: str = "catalog") -> None:
    """Raise CohortError naming the first column or value that breaks the contract."""
    missing = [c for c in CATALOG_SCHEMA if c not in df.columns]
    if missing:
        raise CohortError(f"{where}: missing column(s) {', '.join(missing)}")
    for name, dtype in CATALOG_SCHEMA.items():
        if df.schema[name] != dtype:
            raise CohortError(
                f"{where}: column {name} has type {df.schema[name]}, expected {dtype}"
            )
    for name in REQUIRED_NON_NULL:
        if df[name].null_count():
            raise CohortError(f"{where}: column {name} has empty values")
    dup = df["case_id"].filter(df["case_id"].is_duplicated()).unique().sort()
    if len(dup):
        raise CohortError(f"{where}: duplicate case_id {', '.join(dup.head(5).to_list())}")
    bad_eye = df.filter(~pl.col("eye").is_in(EYES))["eye"].unique().to_list()
    if bad_eye:
        raise CohortError(f"{where}: eye must be OD, OS or empty, got {bad_eye[:5]}")
    bad_split = df.filter(~pl.col("split").is_in(SPLITS))["split"].unique().to_list()
    if bad_split:
        raise CohortError(f"{where}: split must be one of {SPLITS}, got {bad_split[:5]}")
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
        validate_catalog(df, str(catalog_path))
        return cls(root.resolve(), df)

    def __len__(self) -> int:
        return self.catalog.height

    def __repr__(self) -> str:
        return f"Cohort({str(self.root)!r}, cases={len(self)})"

    def _case(self, row: dict) -> Case:
        times = row["ffa_times_s"]
        return Case(
            case_id=row["case_id"],
            patient_id=row["patient_id"],
            eye=row["eye"],
            age=row["age"],
            sex=row["sex"],
            diagnosis=row["diagnosis"],
            lesions=tuple(row["lesions"] or ()),
            split=row["split"],
            cf_path=self.root / row["cf_path"],
            ffa_path=self.root / row["ffa_path"],
            ffa_times_s=tuple(times) if times is not None else None,
            source=row["source"],
        )

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
