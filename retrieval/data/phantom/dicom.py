"""Write phantom cases as a hospital's DICOM export: Ophthalmic Photography objects.

Each case becomes, under `<patient>/<study>/`, a colour photo (one RGB instance) and
an angiogram: for some cases one multi-frame MONOCHROME2 instance whose frame times
are a FrameTimeVector, for others a series of single-frame instances each with its
AcquisitionDateTime (seeded per case). Some cases are written as the 16-bit class
(12 bits stored) instead of the 8-bit one. Both eyes of a patient share one study (the
same StudyInstanceUID), told apart by ImageLaterality. Every file carries made-up
identifiers (PatientName `PHANTOM^CASE0012`, PatientID, birth date, accession
number) for de-identification to remove, a fluorescein ContrastBolusAgent and the
ContrastBolusStartTime the frame times count from.

UIDs, dates and names come from (seed, case) alone, so the same arguments give
byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from retrieval.data.cohort import unit_hash

from .case import PhantomCase
from .meta import CaseMeta

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
FRAME_TIME_VECTOR_TAG = 0x00181065
MULTI_FRAME_P = 0.5  # share of angiograms written as one multi-frame instance
WORD_P = 0.25  # share of cases written as 16-bit objects
WORD_BITS = 12
_SALT_VARIANT = 47
_EPOCH = date(2024, 1, 1)
LATERALITY = {"OD": "R", "OS": "L"}


@dataclass(frozen=True)
class DicomVariant:
    """How one case is written."""

    multi_frame: bool  # the FFA as one multi-frame instance (else a series of frames)
    word: bool  # 16-bit objects (12 bits stored)


@dataclass(frozen=True)
class Visit:
    """The made-up identity and the clock of one case's study."""

    patient_name: str
    patient_id: str
    birth_date: str
    accession: str
    study_uid: str
    study_start: datetime
    injected: datetime  # the contrast start of this eye's angiogram


def case_variant(seed: int, index: int) -> DicomVariant:
    rng = np.random.default_rng([seed, index, _SALT_VARIANT])
    return DicomVariant(
        multi_frame=bool(rng.random() < MULTI_FRAME_P), word=bool(rng.random() < WORD_P)
    )


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["fundus2video-phantom", *map(str, parts)])


def case_visit(case: PhantomCase | CaseMeta, seed: int, index: int) -> Visit:
    """The identity and clock of a case (its rendering or only its metadata): shared by
    both eyes of a patient (the same study)."""
    # a two-eyed patient is cases 2k (OD) and 2k + 1 (OS); a one-eyed one has a letter
    first_index = index - index % 2 if case.patient_id[-1].isdigit() else index
    day = _EPOCH + timedelta(days=int(unit_hash("day", seed, case.patient_id) * 365))
    start = datetime.combine(day, datetime.min.time()) + timedelta(
        hours=8, minutes=int(unit_hash("time", seed, case.patient_id) * 480)
    )
    birth = date(day.year - case.age, 1 + int(unit_hash("month", seed, case.patient_id) * 12), 15)
    return Visit(
        patient_name=f"PHANTOM^CASE{first_index:04d}",
        patient_id=case.patient_id,
        birth_date=birth.strftime("%Y%m%d"),
        accession=f"ACC{int(unit_hash('accession', seed, case.patient_id) * 1e8):08d}",
        study_uid=_uid(seed, case.patient_id, "study"),
        study_start=start,
        injected=start + timedelta(minutes=5 if case.eye == "OD" else 20),
    )


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S.%f")


def _dt(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S.%f")


def _base(case: PhantomCase, visit: Visit, sop_class: str, uid: str) -> Dataset:
    """The patient, study, equipment and SOP common attributes of one instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.PatientName, ds.PatientID = visit.patient_name, visit.patient_id
    ds.PatientBirthDate, ds.PatientSex = visit.birth_date, case.sex
    ds.PatientAge = f"{case.age:03d}Y"
    ds.StudyInstanceUID, ds.AccessionNumber = visit.study_uid, visit.accession
    ds.StudyDate, ds.StudyTime = visit.study_start.strftime("%Y%m%d"), _tm(visit.study_start)
    ds.StudyID, ds.ReferringPhysicianName = "1", ""
    ds.StudyDescription = "Fluorescein angiography"
    ds.Modality, ds.Manufacturer = "OP", "fundus2video phantom"
    ds.ImageLaterality = LATERALITY[case.eye]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str, word: bool) -> None:
    if word:
        top = 2**WORD_BITS - 1
        pixels = np.rint(pixels.astype(np.float64) * (top / 255.0)).astype(np.uint16)
    ds.set_pixel_data(pixels, photometric, WORD_BITS if word else 8, generate_instance_uid=False)


def _series(ds: Dataset, uid: str, number: int, description: str, moment: datetime) -> None:
    ds.SeriesInstanceUID, ds.SeriesNumber = uid, number
    ds.SeriesDescription = description
    ds.ContentDate, ds.ContentTime = moment.strftime("%Y%m%d"), _tm(moment)
    ds.AcquisitionDateTime = _dt(moment)


def cf_dataset(case: PhantomCase, visit: Visit, variant: DicomVariant, seed: int) -> Dataset:
    """The colour photo: one RGB instance, taken before the injection."""
    sop = OP_16BIT if variant.word else OP_8BIT
    ds = _base(case, visit, sop, _uid(seed, case.case_id, "cf"))
    side = 0 if case.eye == "OD" else 10
    _series(ds, _uid(seed, case.case_id, "cf-series"), 1 + side, "Colour", visit.injected)
    ds.AcquisitionDateTime = _dt(visit.injected - timedelta(minutes=2))
    ds.InstanceNumber = 1
    _set_pixels(ds, case.cf, "RGB", variant.word)
    return ds


def _contrast(ds: Dataset, visit: Visit) -> None:
    ds.ContrastBolusAgent = "Fluorescein sodium 10%"
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusStartTime = _tm(visit.injected)


def ffa_datasets(
    case: PhantomCase, visit: Visit, variant: DicomVariant, seed: int
) -> list[Dataset]:
    """The angiogram: one multi-frame instance or one instance per frame."""
    sop = OP_16BIT if variant.word else OP_8BIT
    number = 2 if case.eye == "OD" else 12
    series_uid = _uid(seed, case.case_id, "ffa-series")
    moments = [visit.injected + timedelta(seconds=round(float(t), 3)) for t in case.times_s]
    if variant.multi_frame:
        ds = _base(case, visit, sop, _uid(seed, case.case_id, "ffa"))
        _series(ds, series_uid, number, "Fluorescein angiography", moments[0])
        _contrast(ds, visit)
        ds.InstanceNumber = 1
        _set_pixels(ds, case.ffa, "MONOCHROME2", variant.word)
        steps = np.diff(np.asarray([(m - moments[0]).total_seconds() for m in moments]))
        ds.FrameTimeVector = ["0"] + [f"{1000 * s:.3f}" for s in steps]
        ds.FrameIncrementPointer = FRAME_TIME_VECTOR_TAG
        return [ds]
    datasets = []
    for k, (frame, moment) in enumerate(zip(case.ffa, moments, strict=True)):
        ds = _base(case, visit, sop, _uid(seed, case.case_id, "ffa", k))
        _series(ds, series_uid, number, "Fluorescein angiography", moment)
        _contrast(ds, visit)
        ds.InstanceNumber = k + 1
        _set_pixels(ds, frame, "MONOCHROME2", variant.word)
        datasets.append(ds)
    return datasets


def write_case_dicom(root: Path, case: PhantomCase, seed: int, index: int) -> list[str]:
    """Write one case's instances under `root`; return their paths relative to it."""
    variant = case_variant(seed, index)
    visit = case_visit(case, seed, index)
    study = root / case.patient_id / visit.study_start.strftime("%Y%m%d")
    named = [(f"{case.eye}-CF/IM00001.dcm", cf_dataset(case, visit, variant, seed))]
    for ds in ffa_datasets(case, visit, variant, seed):
        named.append((f"{case.eye}-FFA/IM{ds.InstanceNumber:05d}.dcm", ds))
    written = []
    for name, ds in named:
        path = study / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        written.append(str(path.relative_to(root)))
    return written
