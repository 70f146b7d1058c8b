"""DICOM ingest on files the tests write with pydicom: Ophthalmic Photography 8/16-bit,
multi-frame and series-of-instances angiograms, frame times and their sources, eyes,
Secondary Capture fallbacks, ambiguity, de-identification; the phantom's DICOM export
and (slow) a DICOM export through training, indexing and a search."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from retrieval import Cohort
from retrieval.apps.cli import app
from retrieval.data.dicom import (
    OP_8BIT,
    OP_16BIT,
    SALT_ENV,
    DicomIngestError,
    ingest_dicom,
)
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.phantom import case_meta, phantom_case, write_phantom_cohort
from retrieval.data.phantom.dicom import case_variant, case_visit

SALT = "test-salt-0123456789"
SIZE = 48
FRAMES = 4
SC = "1.2.840.10008.5.1.4.1.1.7"
SC_GRAY_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
START = datetime(2025, 3, 4, 10, 0, 0)
SECRETS = ("DOE^JANE^SECRET", "19470321", "ACCX98765", "MRN-123456")


def _pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth random pictures (distinct per seed, so never near-duplicates)."""
    colour = shape[-1] == 3
    block = (SIZE // 6, SIZE // 6, 1) if colour else (1,) * (len(shape) - 2) + (SIZE // 6,) * 2
    coarse = np.random.default_rng(seed).random([s // b for s, b in zip(shape, block, strict=True)])
    return (np.kron(coarse, np.ones(block)) * 255).astype(np.uint8)


def _dataset(sop: str, *, patient: str = "MRN-123456", study: str = "1.2.3.4", **tags) -> Dataset:
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop, uid
    ds.PatientName, ds.PatientID = "DOE^JANE^SECRET", patient
    ds.PatientBirthDate, ds.AccessionNumber = "19470321", "ACCX98765"
    ds.PatientAge, ds.PatientSex = "077Y", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20250304", "100000", "1"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "OP", uid, 1, 1
    ds.ImageLaterality = "R"
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def _image(sop: str, pixels: np.ndarray, photometric: str, bits: int = 8, **tags) -> Dataset:
    ds = _dataset(sop, **tags)
    if bits > 8:
        pixels = np.rint(pixels.astype(np.float64) * ((2**bits - 1) / 255)).astype(np.uint16)
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _cf(folder: Path, seed: int, name: str = "cf.dcm", sop: str = OP_8BIT, bits=8, **tags):
    return _save(_image(sop, _pixels(seed, (SIZE, SIZE, 3)), "RGB", bits, **tags), folder / name)


def _dt(seconds: float) -> str:
    return (START + timedelta(seconds=seconds)).strftime("%Y%m%d%H%M%S.%f")


def _multi_frame(folder: Path, seed: int, name: str = "ffa.dcm", sop=OP_8BIT, bits=8, **tags):
    ffa = _pixels(seed, (FRAMES, SIZE, SIZE))
    return _save(_image(sop, ffa, "MONOCHROME2", bits, **tags), folder / name)


def _series(folder: Path, seed: int, times: list[float] | None, **tags) -> list[Path]:
    """An angiogram as one single-frame instance per frame (written in shuffled order)."""
    ffa = _pixels(seed, (FRAMES, SIZE, SIZE))
    series = generate_uid()
    paths = []
    for k in (2, 0, 3, 1):
        stamp = {"AcquisitionDateTime": _dt(times[k])} if times else {}
        ds = _image(OP_8BIT, ffa[k], "MONOCHROME2", SeriesInstanceUID=series, **stamp, **tags)
        ds.InstanceNumber = k + 1
        paths.append(_save(ds, folder / f"ffa/{k}.dcm"))
    return paths


def _ingest(src: Path, out: Path, **kw):
    """`ingest_dicom` without progress bars and (for speed) without registration."""
    kw = {"salt": SALT, "register": False, "progress": False} | kw
    return ingest_dicom(src, out, **kw)


def _catalog(cohort: Path) -> list[dict]:
    return pl.read_parquet(cohort / "catalog.parquet").sort("case_id").to_dicts()


FLUORESCEIN = {"ContrastBolusAgent": "Fluorescein", "ContrastBolusStartTime": "100000"}


def test_op_8bit_multi_frame_frame_time(tmp_path: Path):
    src = tmp_path / "src"
    _cf(src, 1)
    _multi_frame(src, 2, FrameTime="2000", AcquisitionDateTime=_dt(10), **FLUORESCEIN)
    result = _ingest(src, tmp_path / "out")
    assert result.written == 1
    (row,) = _catalog(tmp_path / "out")
    assert row["ffa_times_source"] == "frame_time"
    assert row["ffa_times_s"] == pytest.approx([10, 12, 14, 16])
    assert row["eye"] == "OD" and row["age"] == 77 and row["sex"] == "F"
    assert row["source"] == "dicom"
    cf = read_cf(tmp_path / "out" / row["cf_path"])
    np.testing.assert_array_equal(cf, _pixels(1, (SIZE, SIZE, 3)))  # PNG: lossless
    ffa = read_ffa(tmp_path / "out" / row["ffa_path"])
    assert ffa.shape == (FRAMES, SIZE, SIZE)
    assert np.abs(ffa.astype(float) - _pixels(2, (FRAMES, SIZE, SIZE))).mean() < 3
    Cohort.open(tmp_path / "out")  # follows the data contract


def test_op_16bit_and_frame_time_vector(tmp_path: Path):
    src = tmp_path / "src"
    _cf(src, 1, sop=OP_16BIT, bits=12)
    vector = {"FrameTimeVector": ["0", "1500", "2500", "60000"]}
    _multi_frame(src, 2, sop=OP_16BIT, bits=12, **vector)
    _ingest(src, tmp_path / "out", ffa_format="frames")
    (row,) = _catalog(tmp_path / "out")
    assert row["ffa_times_source"] == "frame_time_vector"
    assert row["ffa_times_s"] == pytest.approx([0, 1.5, 4.0, 64.0])  # from the first frame
    cf = read_cf(tmp_path / "out" / row["cf_path"])
    np.testing.assert_array_equal(cf, _pixels(1, (SIZE, SIZE, 3)))  # 12 bits → 8, exact
    ffa = read_ffa(tmp_path / "out" / row["ffa_path"])  # a folder of PNG frames: lossless
    np.testing.assert_array_equal(ffa, _pixels(2, (FRAMES, SIZE, SIZE)))


@pytest.mark.parametrize("contrast", [True, False])
def test_series_of_instances_ordered_by_acquisition_time(tmp_path: Path, contrast: bool):
    src = tmp_path / "src"
    _cf(src, 1)
    tags = FLUORESCEIN if contrast else {}
    _series(src, 2, [12.0, 15.5, 40.0, 300.0], **tags)
    _ingest(src, tmp_path / "out", ffa_format="frames")
    (row,) = _catalog(tmp_path / "out")
    if contrast:  # seconds after ContrastBolusStartTime (10:00:00)
        assert row["ffa_times_source"] == "acquisition_times"
        assert row["ffa_times_s"] == pytest.approx([12.0, 15.5, 40.0, 300.0])
    else:  # seconds after the first frame
        assert row["ffa_times_source"] == "instance_times"
        assert row["ffa_times_s"] == pytest.approx([0.0, 3.5, 28.0, 288.0])
    ffa = read_ffa(tmp_path / "out" / row["ffa_path"])
    np.testing.assert_array_equal(ffa, _pixels(2, (FRAMES, SIZE, SIZE)))  # in time order


def test_missing_times_refused_naming_file_and_tag_unless_interval_assumed(tmp_path: Path):
    src = tmp_path / "src"
    _cf(src, 1)
    _multi_frame(src, 2, name="angio/ffa.dcm")
    with pytest.raises(DicomIngestError) as e:
        _ingest(src, tmp_path / "out")
    assert "angio/ffa.dcm" in str(e.value) and "FrameTime (0018,1063)" in str(e.value)
    assert "--assume-interval" in str(e.value)
    assert not (tmp_path / "out").exists()
    _ingest(src, tmp_path / "out", assume_interval=2.5)
    (row,) = _catalog(tmp_path / "out")
    assert row["ffa_times_source"] == "assumed_interval"
    assert row["ffa_times_s"] == pytest.approx([0, 2.5, 5, 7.5])


def test_series_without_times_refused_naming_the_tag(tmp_path: Path):
    src = tmp_path / "src"
    _cf(src, 1)
    _series(src, 2, None)
    with pytest.raises(DicomIngestError, match=r"AcquisitionTime \(0008,0032\)"):
        _ingest(src, tmp_path / "out")
    _ingest(src, tmp_path / "out", assume_interval=1.0, ffa_format="frames")
    (row,) = _catalog(tmp_path / "out")
    ffa = read_ffa(tmp_path / "out" / row["ffa_path"])
    np.testing.assert_array_equal(ffa, _pixels(2, (FRAMES, SIZE, SIZE)))  # InstanceNumber order


def test_per_frame_acquisition_times(tmp_path: Path):
    src = tmp_path / "src"
    _cf(src, 1)
    ds = _image(SC_GRAY_BYTE, _pixels(2, (FRAMES, SIZE, SIZE)), "MONOCHROME2", **FLUORESCEIN)
    ds.AcquisitionDateTime = _dt(9.0)
    groups = []
    for seconds in (9.0, 11.25, 30.0, 600.0):
        content = Dataset()
        content.FrameAcquisitionDateTime = _dt(seconds)
        group = Dataset()
        group.FrameContentSequence = [content]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    _save(ds, src / "ffa.dcm")
    _ingest(src, tmp_path / "out")
    (row,) = _catalog(tmp_path / "out")
    assert row["ffa_times_source"] == "acquisition_times"
    assert row["ffa_times_s"] == pytest.approx([9.0, 11.25, 30.0, 600.0])


def test_compressed_and_ybr_pixels_decode(tmp_path: Path):
    from pydicom.pixels import convert_color_space
    from pydicom.uid import RLELossless

    src = tmp_path / "src"
    rgb = _pixels(1, (SIZE, SIZE, 3))
    ds = _image(OP_8BIT, convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")
    _save(ds, src / "cf.dcm")
    ffa = _image(OP_8BIT, _pixels(2, (FRAMES, SIZE, SIZE)), "MONOCHROME2", FrameTime="1000")
    ffa.compress(RLELossless)
    _save(ffa, src / "ffa.dcm")
    _ingest(src, tmp_path / "out", ffa_format="frames")
    (row,) = _catalog(tmp_path / "out")
    cf = read_cf(tmp_path / "out" / row["cf_path"])
    assert np.abs(cf.astype(int) - rgb).max() <= 2  # YBR → RGB rounding
    ffa_back = read_ffa(tmp_path / "out" / row["ffa_path"])
    np.testing.assert_array_equal(ffa_back, _pixels(2, (FRAMES, SIZE, SIZE)))


def test_burned_in_annotation_refused_unless_allowed_and_old_ages_grouped(tmp_path: Path):
    src = tmp_path / "src"
    _cf(src, 1, BurnedInAnnotation="YES", PatientAge="095Y")
    _multi_frame(src, 2, FrameTime="1000")
    with pytest.raises(DicomIngestError, match=r"cf.dcm: BurnedInAnnotation \(0028,0301\)"):
        _ingest(src, tmp_path / "out")
    _ingest(src, tmp_path / "out", allow_burned_in=True)
    assert _catalog(tmp_path / "out")[0]["age"] == 90


def test_two_eyes_in_one_study(tmp_path: Path):
    src = tmp_path / "src"
    times = {"FrameTime": "1000"}
    _cf(src, 1, "r/cf.dcm")
    _multi_frame(src, 2, "r/ffa.dcm", **times)
    _cf(src, 3, "l/cf.dcm", ImageLaterality="L")
    _multi_frame(src, 4, "l/ffa.dcm", ImageLaterality="L", **times)
    _ingest(src, tmp_path / "out")
    rows = _catalog(tmp_path / "out")
    assert sorted(r["eye"] for r in rows) == ["OD", "OS"]
    assert rows[0]["patient_id"] == rows[1]["patient_id"]
    assert rows[0]["split"] == rows[1]["split"]
    assert len({r["case_id"] for r in rows}) == 2


def test_secondary_capture_fallback_and_op_preferred(tmp_path: Path):
    src = tmp_path / "src"
    _cf(src, 1, "sc-cf.dcm", sop=SC, Modality="OT")
    _multi_frame(src, 2, "sc-ffa.dcm", sop=SC_GRAY_BYTE, FrameTime="500", Modality="OT")
    _ingest(src, tmp_path / "sc")
    (row,) = _catalog(tmp_path / "sc")
    assert row["ffa_times_source"] == "frame_time"
    # beside an Ophthalmic Photography photo, the Secondary Capture one is left aside
    _cf(src, 3, "op-cf.dcm")
    _ingest(src, tmp_path / "op")
    (row,) = _catalog(tmp_path / "op")
    np.testing.assert_array_equal(
        read_cf(tmp_path / "op" / row["cf_path"]), _pixels(3, (SIZE, SIZE, 3))
    )


def test_ambiguous_eye_refused_naming_files_or_skipped(tmp_path: Path):
    src = tmp_path / "src"
    _cf(src, 1, "a.dcm")
    _cf(src, 2, "b.dcm")
    _multi_frame(src, 3, FrameTime="1000")
    _cf(src, 4, "left.dcm", ImageLaterality="L")  # an eye without an angiogram
    with pytest.raises(DicomIngestError) as e:
        _ingest(src, tmp_path / "out")
    text = str(e.value)
    assert "2 colour photos (a.dcm, b.dcm)" in text and "no angiogram (FFA)" in text
    assert "2 problem(s)" in text
    with pytest.raises(DicomIngestError, match="no usable case"):
        _ingest(src, tmp_path / "out", skip_bad=True)
    _cf(src, 5, "other/cf.dcm", patient="MRN-2")
    _multi_frame(src, 6, "other/ffa.dcm", patient="MRN-2", FrameTime="1000")
    result = _ingest(src, tmp_path / "out", skip_bad=True)
    assert result.written == 1 and len(result.skipped) == 2
    assert "left.dcm" in str(result.skipped[1])


def test_icga_and_lone_frames_are_not_angiograms(tmp_path: Path):
    src = tmp_path / "src"
    _cf(src, 1)
    _multi_frame(src, 2, "icg.dcm", FrameTime="1000", ContrastBolusAgent="Indocyanine green")
    _multi_frame(src, 3, "fa.dcm", FrameTime="1000", ContrastBolusAgent="Fluorescein")
    red_free = _pixels(4, (1, SIZE, SIZE))[0]
    _save(_image(OP_8BIT, red_free, "MONOCHROME2"), src / "red-free.dcm")
    (tmp_path / "src" / "notes.txt").write_text("not DICOM")
    _ingest(src, tmp_path / "out", ffa_format="frames")
    (row,) = _catalog(tmp_path / "out")
    ffa = read_ffa(tmp_path / "out" / row["ffa_path"])
    np.testing.assert_array_equal(ffa, _pixels(3, (FRAMES, SIZE, SIZE)))


def test_dicomdir_is_read(tmp_path: Path):
    fileset = FileSet()
    fileset.add(_image(OP_8BIT, _pixels(1, (SIZE, SIZE, 3)), "RGB"))
    ffa = _pixels(2, (FRAMES, SIZE, SIZE))
    fileset.add(_image(OP_8BIT, ffa, "MONOCHROME2", FrameTime="1000", SeriesNumber=2))
    fileset.write(tmp_path / "export")
    assert (tmp_path / "export" / "DICOMDIR").is_file()
    _ingest(tmp_path / "export" / "DICOMDIR", tmp_path / "out")
    assert len(_catalog(tmp_path / "out")) == 1


def _all_bytes(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file())


def test_identifiers_never_reach_the_cohort(tmp_path: Path, caplog):
    src = tmp_path / "src"
    _cf(src, 1)
    _multi_frame(src, 2, FrameTime="1000", **FLUORESCEIN)
    with caplog.at_level(logging.DEBUG):
        result = CliRunner().invoke(
            app, ["ingest-dicom", str(src), str(tmp_path / "out")], env={SALT_ENV: SALT}
        )
    assert result.exit_code == 0, result.output
    blob = _all_bytes(tmp_path / "out")
    for secret in SECRETS:
        assert secret.encode() not in blob
        assert secret not in caplog.text and secret not in result.output
    assert "DOE" not in repr(list(Cohort.open(tmp_path / "out").cases()))


def test_salted_patient_ids(tmp_path: Path, monkeypatch):
    src = tmp_path / "src"
    _cf(src, 1)
    _multi_frame(src, 2, FrameTime="1000")
    ids = []
    for k, salt in enumerate([SALT, SALT, "another-salt-456"]):
        _ingest(src, tmp_path / f"out{k}", salt=salt)
        (row,) = _catalog(tmp_path / f"out{k}")
        ids.append((row["patient_id"], row["case_id"]))
    assert ids[0] == ids[1] and ids[0][0] != ids[2][0] and ids[0][1] != ids[2][1]
    assert not any("123456" in i for pair in ids for i in pair)
    monkeypatch.delenv(SALT_ENV, raising=False)
    with pytest.raises(DicomIngestError, match=SALT_ENV):
        ingest_dicom(src, tmp_path / "nosalt", progress=False)
    with pytest.raises(DicomIngestError, match="too short"):
        ingest_dicom(src, tmp_path / "nosalt", salt="abc", progress=False)
    monkeypatch.setenv(SALT_ENV, SALT)
    ingest_dicom(src, tmp_path / "envsalt", progress=False)
    assert _catalog(tmp_path / "envsalt")[0]["patient_id"] == ids[0][0]


def test_cli_refuses_without_salt_and_bad_input(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(SALT_ENV, raising=False)
    src = tmp_path / "src"
    _cf(src, 1)
    result = CliRunner().invoke(app, ["ingest-dicom", str(src), str(tmp_path / "out")])
    assert result.exit_code == 2 and SALT_ENV in result.output
    result = CliRunner().invoke(
        app, ["ingest-dicom", str(src), str(tmp_path / "out"), "--salt", SALT]
    )
    assert result.exit_code == 2 and "cf.dcm" in result.output and "no angiogram" in result.output


def test_phantom_dicom_export_round_trip(tmp_path: Path):
    cases = 6
    result = CliRunner().invoke(
        app,
        ["phantom", str(tmp_path / "dcm"), "--format", "dicom", "--cases", cases, "--size", 48]
        + ["--frames", FRAMES],
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "dcm" / "catalog.parquet").exists()
    again = write_phantom_cohort(
        tmp_path / "again", cases=cases, size=48, frames=FRAMES, format="dicom", progress=False
    )
    files = sorted(p.relative_to(tmp_path / "dcm") for p in (tmp_path / "dcm").rglob("*.dcm"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.dcm"))
    for name in files:  # the same arguments give byte-identical files
        assert (tmp_path / "dcm" / name).read_bytes() == (again / name).read_bytes()
    variants = [case_variant(0, i) for i in range(cases)]
    assert {v.multi_frame for v in variants} == {True, False} and any(v.word for v in variants)
    _ingest(tmp_path / "dcm", tmp_path / "cohort")
    rows = {r["ffa_times_s"][-1]: r for r in _catalog(tmp_path / "cohort")}
    assert len(rows) == cases
    sources = set()
    for i in range(cases):
        case = phantom_case(0, i, size=48, frames=FRAMES)
        row = next(r for t, r in rows.items() if abs(t - case.times_s[-1]) < 1e-3)
        assert row["eye"] == case.eye and row["age"] == case.age and row["sex"] == case.sex
        assert row["ffa_times_s"] == pytest.approx(case.times_s, abs=1e-3)
        np.testing.assert_array_equal(read_cf(tmp_path / "cohort" / row["cf_path"]), case.cf)
        sources.add(row["ffa_times_source"])
    assert sources == {"frame_time_vector", "acquisition_times"}
    blob = _all_bytes(tmp_path / "cohort")
    assert b"PHANTOM" not in blob and b"ph0-p" not in blob


@pytest.mark.slow
def test_dicom_export_to_search_end_to_end(tmp_path: Path, caplog):
    """phantom --format dicom → ingest-dicom → train (micro) → index → a search; no
    patient name or id anywhere in the cohort, the index folder or the logs."""
    from fastapi.testclient import TestClient

    from retrieval.api import Settings, create_app
    from retrieval.testing import train_micro_run

    runner = CliRunner()
    dcm, cohort, run, index = (tmp_path / n for n in ("dcm", "cohort", "run", "index"))
    outputs = []

    def invoke(*args, **kw) -> None:
        got = runner.invoke(app, [str(a) for a in args], **kw)
        assert got.exit_code == 0, got.output
        outputs.append(got.output)

    with caplog.at_level(logging.INFO):
        invoke("phantom", dcm, "--format", "dicom", "--cases", 12, "--size", 64, "--frames", 6)
        invoke("ingest-dicom", dcm, cohort, env={SALT_ENV: SALT})
        train_micro_run(cohort, run)
        invoke("index", run, cohort, "--out", index)
        with TestClient(create_app(Settings(index=index))) as client:
            case = client.get("/cases", params={"limit": 1}).json()["items"][0]
            similar = client.get(f"/cases/{case['case_id']}/similar", params={"k": 3})
            photo = (cohort / "cf" / f"{case['case_id']}.png").read_bytes()
            files = {"file": ("query.png", photo, "image/png")}
            search = client.post("/search", files=files, data={"target": "ffa", "k": "3"})
    for answer in (similar, search):
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"]
        outputs.append(answer.text)
    visits = [case_visit(case_meta(0, i), 0, i) for i in range(12)]
    secrets = {s for v in visits for s in (v.patient_name, v.patient_id, v.accession)}
    secrets |= {v.birth_date for v in visits} | {"PHANTOM"}
    blob = _all_bytes(cohort, index) + caplog.text.encode() + "".join(outputs).encode()
    assert not [s for s in secrets if s.encode() in blob]
