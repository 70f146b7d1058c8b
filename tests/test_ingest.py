"""Ingest: every row validated first, all problems reported with row numbers, atomic output."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from retrieval import Cohort, ManifestError
from retrieval.apps.cli import app
from retrieval.data import ingest as ingest_module
from retrieval.data.cohort import validate_catalog
from retrieval.data.ingest import ingest
from retrieval.data.media_write import write_mp4, write_png
from retrieval.data.phantom import phantom_case
from retrieval.data.registration import MIN_QUALITY, corner_error, similarity_matrix

SIZE = 48
FRAMES = 4


def _media(folder: Path, name: str, seed: int) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    cf = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    ffa = np.repeat(np.linspace(0, 255, FRAMES, dtype=np.uint8)[:, None, None], SIZE, 1)
    ffa = np.repeat(ffa, SIZE, 2)  # (T, H, W)
    write_png(folder / "media" / f"{name}.png", cf)
    write_mp4(folder / "media" / f"{name}.mp4", ffa)
    return f"media/{name}.png", f"media/{name}.mp4"


def _write_manifest(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def good_rows(tmp_path: Path) -> list[dict]:
    rows = []
    for i in range(8):
        cf, ffa = _media(tmp_path, f"c{i}", i)
        rows.append(
            {
                "case_id": f"c{i}",
                "patient_id": f"p{i // 2}",
                "eye": "OD" if i % 2 == 0 else "l",
                "age": str(50 + i),
                "sex": "F",
                "diagnosis": "NPDR",
                "lesions": "microaneurysm;haemorrhage",
                "cf_path": cf,
                "ffa_path": ffa,
                "ffa_times_s": "12;18.5;40;600",
            }
        )
    return rows


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_good_manifest_writes_a_valid_cohort(tmp_path, good_rows):
    manifest = _write_manifest(tmp_path / "manifest.csv", good_rows)
    result = ingest(manifest, tmp_path / "out" / "cohort", progress=False)
    assert result.written == 8 and not result.skipped
    cohort = Cohort.open(result.cohort)
    validate_catalog(cohort.catalog)
    case = cohort.case("c1")
    assert case.eye == "OS" and case.age == 51 and case.lesions == ("microaneurysm", "haemorrhage")
    assert case.ffa_times_s == (12.0, 18.5, 40.0, 600.0)
    assert case.cf_path.read_bytes() == (tmp_path / good_rows[1]["cf_path"]).read_bytes()
    assert case.ffa_path.is_file() and case.ffa_path.is_relative_to(cohort.root)
    # a patient-level split was made: both eyes of a patient share it, all three splits used
    per_patient = cohort.catalog.group_by("patient_id").agg(pl.col("split").n_unique())
    assert per_patient["split"].max() == 1
    assert set(cohort.catalog["split"]) == {"train", "val", "test"}


def test_minimal_columns_only(tmp_path, good_rows):
    manifest = _write_manifest(tmp_path / "m.csv", good_rows, ["case_id", "cf_path", "ffa_path"])
    cohort = Cohort.open(ingest(manifest, tmp_path / "out", progress=False).cohort)
    case = cohort.case("c0")
    assert case.patient_id == "c0" and case.eye is None and case.ffa_times_s is None
    assert case.source == "m"


def _corrupt(tmp_path: Path, rows: list[dict]) -> dict[int, str]:
    """Break rows in every way `ingest` must report; returns row number -> expected message part."""
    rows[0]["cf_path"] = "media/nowhere.png"
    (tmp_path / "media" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    rows[1]["cf_path"] = "media/bad.png"
    mp4 = (tmp_path / rows[2]["ffa_path"]).read_bytes()
    (tmp_path / "media" / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])
    rows[2]["ffa_path"] = "media/cut.mp4"
    rows[3]["case_id"] = rows[4]["case_id"]
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / rows[5]["cf_path"]).read_bytes())
    rows[5]["cf_path"] = "../outside.png"
    rows[6]["ffa_times_s"] = "1;2"
    return {
        1: "nowhere.png",
        2: "bad.png",
        3: "cut.mp4",
        5: "duplicate case_id",
        6: "leaves the manifest",
        7: "ffa_times_s",
    }


def test_every_problem_reported_with_its_row_and_nothing_written(tmp_path, good_rows):
    expected = _corrupt(tmp_path, good_rows)
    manifest = _write_manifest(tmp_path / "manifest.csv", good_rows)
    out = tmp_path / "cohort"
    with pytest.raises(ManifestError) as info:
        ingest(manifest, out, progress=False)
    by_row = {p.row: p.message for p in info.value.problems}
    assert set(by_row) == set(expected), by_row
    for row, part in expected.items():
        assert part in by_row[row], (row, by_row[row])
        assert f"row {row}" in str(info.value)
    _assert_nothing_written(out)


def test_skip_bad_writes_good_rows_and_a_report(tmp_path, good_rows):
    expected = _corrupt(tmp_path, good_rows)
    manifest = _write_manifest(tmp_path / "manifest.csv", good_rows)
    result = ingest(manifest, tmp_path / "cohort", skip_bad=True, progress=False)
    assert result.written == 8 - len(expected)
    report = pl.read_csv(result.cohort / "skipped.csv")
    assert sorted(report["row"].to_list()) == sorted(expected)
    assert set(Cohort.open(result.cohort).catalog["case_id"]) == {"c4", "c7"}


def test_allow_outside(tmp_path, good_rows):
    (tmp_path.parent / "outside2.png").write_bytes(
        (tmp_path / good_rows[0]["cf_path"]).read_bytes()
    )
    good_rows[0]["cf_path"] = "../outside2.png"
    manifest = _write_manifest(tmp_path / "manifest.csv", good_rows)
    with pytest.raises(ManifestError, match="leaves the manifest"):
        ingest(manifest, tmp_path / "a", progress=False)
    assert ingest(manifest, tmp_path / "b", allow_outside=True, progress=False).written == 8


def test_missing_column(tmp_path, good_rows):
    manifest = _write_manifest(tmp_path / "m.csv", good_rows, ["case_id", "cf_path"])
    with pytest.raises(ManifestError, match="missing column.*ffa_path") as info:
        ingest(manifest, tmp_path / "out", progress=False)
    assert info.value.problems[0].row == 0
    _assert_nothing_written(tmp_path / "out")


def test_single_frame_video_and_bad_metadata(tmp_path, good_rows):
    write_mp4(tmp_path / "media" / "one.mp4", np.zeros((1, SIZE, SIZE), np.uint8))
    good_rows[0]["ffa_path"] = "media/one.mp4"
    good_rows[1]["eye"] = "middle"
    good_rows[2]["age"] = "old"
    good_rows[3]["split"] = "holdout"
    manifest = _write_manifest(tmp_path / "m.csv", good_rows, [*good_rows[0], "split"])
    with pytest.raises(ManifestError) as info:
        ingest(manifest, tmp_path / "out", progress=False)
    messages = {p.row: p.message for p in info.value.problems}
    assert "at least 2" in messages[1] and "eye" in messages[2]
    assert "age" in messages[3] and "split" in messages[4]


def test_given_split_must_not_split_a_patient(tmp_path, good_rows):
    for i, row in enumerate(good_rows):
        row["split"] = "train" if i < 6 else "test"
    good_rows[1]["split"] = "test"  # p0's second eye in another split than its first
    manifest = _write_manifest(tmp_path / "m.csv", good_rows)
    with pytest.raises(ManifestError, match="patient p0 is in split test"):
        ingest(manifest, tmp_path / "out", progress=False)
    good_rows[1]["split"] = "train"
    cohort = Cohort.open(
        ingest(
            _write_manifest(tmp_path / "m.csv", good_rows), tmp_path / "ok", progress=False
        ).cohort
    )
    assert cohort.catalog["split"].to_list() == ["train"] * 6 + ["test"] * 2


def test_interrupted_ingest_leaves_nothing(tmp_path, good_rows, monkeypatch):
    manifest = _write_manifest(tmp_path / "m.csv", good_rows)
    calls = []

    def failing_copy(src, dst):
        calls.append(src)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(src, dst)

    original = ingest_module._copy
    monkeypatch.setattr(ingest_module, "_copy", failing_copy)
    with pytest.raises(KeyboardInterrupt):
        ingest(manifest, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_existing_output_is_refused(tmp_path, good_rows):
    manifest = _write_manifest(tmp_path / "m.csv", good_rows)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        ingest(manifest, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_reports_problems_and_exits_2(tmp_path, good_rows):
    _corrupt(tmp_path, good_rows)
    manifest = _write_manifest(tmp_path / "manifest.csv", good_rows)
    result = CliRunner().invoke(app, ["ingest", str(manifest), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "row 2 (c1)" in result.output and "bad.png" in result.output
    _assert_nothing_written(tmp_path / "out")
    ok = CliRunner().invoke(app, ["ingest", str(manifest), str(tmp_path / "out"), "--skip-bad"])
    assert ok.exit_code == 0, ok.output
    assert "skipped 6 row(s)" in ok.output


def _phantom_rows(folder: Path, indices: list[int], cf_from: dict[int, int] | None = None):
    """Manifest rows of phantom cases (seed 5, 96 px); `cf_from` pairs a case's FFA with
    another case's CF (a pair that cannot register)."""
    cases = {i: phantom_case(5, i, size=96, frames=8) for i in indices}
    rows = []
    for i in indices:
        case = cases[cf_from.get(i, i) if cf_from else i]
        name = f"p{i}"
        write_png(folder / "ph" / f"{name}.png", case.cf)
        write_mp4(folder / "ph" / f"{name}.mp4", cases[i].ffa)
        times = ";".join(f"{t:.3f}" for t in cases[i].times_s)
        row = {"case_id": name, "cf_path": f"ph/{name}.png", "ffa_path": f"ph/{name}.mp4"}
        rows.append(row | {"ffa_times_s": times})
    return rows, cases


def test_ingest_registers_and_measures_the_field_of_view(tmp_path):
    rows, cases = _phantom_rows(tmp_path, [1, 3, 6], cf_from={6: 3})
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    result = ingest(manifest, tmp_path / "out", allow_duplicates=True, progress=False)
    assert list(result.registration_failed) == ["p6"]
    cohort = Cohort.open(result.cohort)
    for i in (1, 3):
        case = cohort.case(f"p{i}")
        assert case.registration_status == "ok" and case.ffa_times_source == "manifest"
        dx, dy, deg = cases[i].registration
        truth = similarity_matrix(dx, dy, deg, cases[i].fov_circle[:2])
        matrix = np.asarray(case.registration).reshape(2, 3)
        assert corner_error(matrix, truth, (96, 96)) < 1.5
        assert case.registration_quality >= MIN_QUALITY
        assert len(case.cf_fov) == 3 and len(case.ffa_fov) == 3
    failed = cohort.case("p6")
    assert failed.registration_status == "failed" and failed.registration is None
    assert failed.registration_quality < MIN_QUALITY


def test_cli_no_register_leaves_registration_empty(tmp_path):
    rows, _ = _phantom_rows(tmp_path, [1, 3])
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ingest", str(manifest), str(out), "--no-register"])
    assert result.exit_code == 0, result.output
    catalog = Cohort.open(out).catalog
    for name in ("registration", "registration_quality", "registration_status"):
        assert catalog[name].null_count() == 2
    assert catalog["cf_fov"].null_count() == 0 and catalog["ffa_fov"].null_count() == 0
