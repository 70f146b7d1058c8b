"""Catalog contract, splits and atomic folders."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from index.atomic import atomic_dir, atomic_write_bytes
from retrieval import CATALOG_SCHEMA, Cohort, CohortError, hash_split, patient_split
from retrieval.data.cohort import catalog_from_rows, validate_catalog, write_catalog


def _row(i: int, **kw) -> dict:
    row = {
        "case_id": f"c{i}",
        "patient_id": f"p{i}",
        "eye": "OD",
        "age": 60,
        "sex": "M",
        "diagnosis": "normal",
        "lesions": [],
        "split": "train",
        "cf_path": f"cf/c{i}.png",
        "ffa_path": f"ffa/c{i}.mp4",
        "ffa_times_s": [10.0, 20.0],
        "source": "test",
    }
    return row | kw


def test_catalog_round_trip(tmp_path):
    df = catalog_from_rows([_row(0), _row(1, eye="OS", lesions=["drusen"], age=None)])
    write_catalog(df, tmp_path / "catalog.parquet")
    cohort = Cohort.open(tmp_path)
    assert cohort.catalog.schema == pl.Schema(CATALOG_SCHEMA)
    case = cohort.case("c1")
    assert case.lesions == ("drusen",) and case.age is None and case.eye == "OS"
    assert case.cf_path == tmp_path.resolve() / "cf/c1.png"
    assert [c.case_id for c in cohort.cases(split="train")] == ["c0", "c1"]
    assert cohort.cases(split="test") == []
    with pytest.raises(KeyError, match="c9"):
        cohort.case("c9")
    with pytest.raises(ValueError, match="holdout"):
        cohort.cases(split="holdout")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row(0), _row(0)], "duplicate case_id c0"),
        ([_row(0, eye="X")], "eye must be"),
        ([_row(0, split="dev")], "split must be"),
        (
            [_row(0, split="train"), _row(1, patient_id="p0", split="test")],
            "span more than one split",
        ),
        ([_row(0, cf_path=None)], "cf_path has empty values"),
        ([{k: v for k, v in _row(0).items() if k != "source"}], r"missing field\(s\) \['source'\]"),
        ([_row(0, visit="baseline")], r"unknown field\(s\) \['visit'\]"),
    ],
)
def test_contract_violations_are_named(rows, message):
    with pytest.raises(CohortError, match=message):
        catalog_from_rows(rows)


def test_missing_and_mistyped_columns():
    df = catalog_from_rows([_row(0)])
    with pytest.raises(CohortError, match="missing column.*lesions"):
        validate_catalog(df.drop("lesions"))
    with pytest.raises(CohortError, match="column age has type"):
        validate_catalog(df.with_columns(pl.col("age").cast(pl.String)))


def test_open_refuses_non_cohorts(tmp_path):
    with pytest.raises(CohortError, match="not a folder"):
        Cohort.open(tmp_path / "nope")
    with pytest.raises(CohortError, match="no catalog.parquet"):
        Cohort.open(tmp_path)
    (tmp_path / "catalog.parquet").write_bytes(b"garbage")
    with pytest.raises(CohortError, match="unreadable parquet"):
        Cohort.open(tmp_path)


def test_hash_split_is_stable_and_proportional():
    splits = [hash_split(f"p{i}", seed=3) for i in range(3000)]
    assert splits == [hash_split(f"p{i}", seed=3) for i in range(3000)]
    counts = Counter(splits)
    assert abs(counts["train"] / 3000 - 0.70) < 0.03
    assert abs(counts["test"] / 3000 - 0.15) < 0.03
    assert splits != [hash_split(f"p{i}", seed=4) for i in range(3000)]


def test_patient_split_exact_counts_and_small_cohorts():
    split_of = patient_split([f"p{i}" for i in range(100)] * 2, seed=1)
    assert Counter(split_of.values()) == {"train": 70, "val": 15, "test": 15}
    small = patient_split(["a", "b", "c"], seed=0)
    assert sorted(small.values()) == ["test", "train", "val"]


def test_atomic_writes_flush_the_new_state_before_and_the_folder_after_the_rename(
    tmp_path, monkeypatch
):
    """Power loss: what a rename makes visible is on disk first, the rename itself after."""
    flushed: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")))
    target = tmp_path / "folder"
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
        (tmp / "b.bin").write_bytes(b"b")
    names = [Path(p).name for p in flushed]
    assert {"a.bin", "b.bin", "sub"} <= set(names)  # each file and folder of the new state
    assert flushed[-1] == str(tmp_path)  # then the parent, after the rename
    assert names.index("a.bin") < names.index("sub")  # a folder after its files

    flushed.clear()
    atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert Path(flushed[0]).name.startswith(".x.json.tmp-") and flushed[1] == str(tmp_path)

    flushed.clear()
    monkeypatch.setenv("FUNDUS2VIDEO_FSYNC", "0")
    atomic_write_bytes(tmp_path / "y.json", b"{}")
    assert flushed == [] and (tmp_path / "y.json").read_bytes() == b"{}"
    monkeypatch.setattr(os, "fsync", real_fsync)


def test_atomic_dir_keeps_previous_on_failure(tmp_path):
    target = tmp_path / "thing"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("crash mid-write")
    assert (target / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "v").write_text("3")
    assert (target / "v").read_text() == "3"
    with pytest.raises(FileExistsError), atomic_dir(target):
        pass
