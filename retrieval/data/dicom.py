"""Build a cohort from DICOM: ophthalmic photographs and fluorescein angiograms, de-identified.

`ingest_dicom(DIR, OUT, salt=...)` reads every DICOM file under DIR (or the files a
DICOMDIR lists), converts each eye's colour photo (CF) and angiogram (FFA) into the
project's media (CF PNG; FFA MP4 or a folder of PNG frames) in a temporary folder,
and hands those rows to `retrieval.data.ingest`, which validates and writes the cohort
exactly as for a manifest (readable, ≥ 2 frames, sizes, near-duplicates, all or
nothing, renamed into place at the end).

Accepted objects: Ophthalmic Photography 8-bit and 16-bit images, and the Secondary
Capture classes as a fallback. Other objects (OCT, reports, DICOMDIR) and files that
are not DICOM are passed over and counted.

Cases: instances are grouped by patient, study and eye (ImageLaterality, else the
series' Laterality: R → OD, L → OS; neither → the eye is unknown). In each group a
colour image (RGB / YBR) is the CF; a monochrome multi-frame image, or a series of
two or more monochrome single-frame images, is an FFA candidate. Ambiguity is resolved
by these rules, in order, and otherwise refused, naming the files:
- a monochrome object whose ContrastBolusAgent names indocyanine green (ICGA) is not
  an FFA; a lone monochrome single frame (red-free, infrared) is not an FFA either;
- several candidates: those whose ContrastBolusAgent names fluorescein are kept, then
  Ophthalmic Photography is preferred to Secondary Capture (for the CF too);
- still more than one CF or more than one FFA, or none, for an eye: a problem.
All problems are reported together; `skip_bad` leaves those eyes out instead.

FFA frame times, in this order (recorded in the catalog's `ffa_times_source`):
FrameTime (0018,1063) `frame_time` or FrameTimeVector (0018,1065) `frame_time_vector`;
per-frame FrameAcquisitionDateTime (0018,9074) `acquisition_times`; a series of
single-frame instances ordered by AcquisitionDateTime (0008,002A) or AcquisitionTime
(0008,0032): `acquisition_times` when a ContrastBolusStartTime (0018,1042) is present,
else `instance_times`; with none of these, `assume_interval` seconds between frames in
stored (InstanceNumber) order `assumed_interval`, or a problem naming the file and the
tags. Times count from ContrastBolusStartTime where present, else from the first frame.

De-identification: nothing but the pixels, PatientAge (above 89 as 90), PatientSex and
the eye leave the DICOM files; images marked BurnedInAnnotation YES are refused unless
`allow_burned_in` (their pixels may show a name). `patient_id` is a salted HMAC-SHA256
of PatientID, the case id joins it with a salted hash of the StudyInstanceUID and the
eye; the salt (`--salt` or FUNDUS2VIDEO_DICOM_SALT) is required and stored nowhere.
Logs and messages name files by their path under DIR, never by a tag's value.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import DA, DT, TM
from tqdm import tqdm

from index.atomic import remove_stale_temporaries, temp_prefix
from retrieval.errors import (
    ManifestError,
    MediaTooLarge,
    OutputExists,
    ProblemsError,
    RowProblem,
    UnreadableImage,
)

from .ingest import IngestResult, ingest
from .media import DEFAULT_MAX_PIXELS
from .media_write import write_mp4, write_png

log = logging.getLogger(__name__)

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
SECONDARY_CAPTURE = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
)
OPHTHALMIC = (OP_8BIT, OP_16BIT)
ACCEPTED_SOP_CLASSES = (*OPHTHALMIC, *SECONDARY_CAPTURE)
TIMES_SOURCES = (
    "frame_time",
    "frame_time_vector",
    "acquisition_times",
    "instance_times",
    "assumed_interval",
)
SALT_ENV = "FUNDUS2VIDEO_DICOM_SALT"
MIN_SALT_LENGTH = 8
MAX_AGE = 90  # older ages are stored as 90
FFA_FORMATS = ("mp4", "frames")
SEXES = ("M", "F", "O")
LATERALITY = {"R": "OD", "L": "OS"}
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_MISSING_TIMES = (
    "no frame times: none of FrameTime (0018,1063), FrameTimeVector (0018,1065) or "
    "per-frame FrameAcquisitionDateTime (0018,9074) (give --assume-interval SECONDS)"
)
_MISSING_INSTANCE_TIME = (
    "no AcquisitionDateTime (0008,002A) or AcquisitionTime (0008,0032) to order the "
    "series' frames by (give --assume-interval SECONDS)"
)


class DicomIngestError(ProblemsError):
    """DICOM input that cannot become a cohort; every problem is listed, each naming files."""


@dataclass(frozen=True)
class Instance:
    """The header facts of one DICOM file that ingest uses (hashed ids, no identifiers)."""

    path: Path
    name: str  # the path under the input folder, for messages
    sop_class: str
    patient: str  # salted hash of PatientID
    study: str  # salted hash of StudyInstanceUID
    series: str  # salted hash of SeriesInstanceUID
    uid: str  # salted hash of SOPInstanceUID (a file exported twice counts once)
    eye: str | None
    colour: bool
    frames: int
    pixels: int  # Rows x Columns
    number: int  # InstanceNumber (0 when absent)
    acquired: datetime | None
    injected: datetime | None  # ContrastBolusStartTime on the acquisition's date
    agent: str  # ContrastBolusAgent, lower case
    frame_time_ms: float | None
    frame_time_vector_ms: tuple[float, ...] | None
    frame_datetimes: tuple[datetime, ...] | None
    age: int | None
    sex: str | None
    burned_in: bool  # BurnedInAnnotation YES: the pixels may show identifiers

    @property
    def ophthalmic(self) -> bool:
        return self.sop_class in OPHTHALMIC


@dataclass
class DicomCase:
    """One eye of one study: its CF instance and its FFA instance(s), in frame order."""

    case_id: str
    patient: str
    eye: str | None
    cf: Instance
    ffa: list[Instance]
    times_s: list[float] = field(default_factory=list)
    times_source: str = ""

    @property
    def files(self) -> list[Instance]:
        return [self.cf, *self.ffa]


def resolve_salt(salt: str | None) -> str:
    """The salt given, else FUNDUS2VIDEO_DICOM_SALT; refuses none or a short one."""
    salt = salt or os.environ.get(SALT_ENV, "")
    if len(salt) < MIN_SALT_LENGTH:
        what = "is too short" if salt else "is required"
        raise DicomIngestError(
            "--salt",
            [
                f"a salt of at least {MIN_SALT_LENGTH} characters {what} (--salt or {SALT_ENV}); "
                "keep it secret and reuse it to get the same patient ids"
            ],
        )
    return salt


def salted_hash(salt: str, kind: str, value: str, length: int = 12) -> str:
    """A hex digest of `value` keyed by the salt (HMAC-SHA256); `kind` separates uses."""
    message = f"{kind}\x1f{value}".encode()
    return hmac.new(salt.encode(), message, hashlib.sha256).hexdigest()[:length]


def _files(source: Path) -> tuple[Path, list[Path]]:
    """The folder the files are named under, and the files: a DICOMDIR's, else all below."""
    dicomdir = source if source.is_file() else source / "DICOMDIR"
    if source.is_file() and source.name.upper() != "DICOMDIR":
        raise DicomIngestError(source, ["give a folder or a DICOMDIR file"])
    if not source.exists():
        raise DicomIngestError(source, ["no such folder"])
    if dicomdir.is_file():
        from pydicom.fileset import FileSet

        try:
            fileset = FileSet(pydicom.dcmread(dicomdir))
        except (InvalidDicomError, ValueError, OSError) as e:
            raise DicomIngestError(dicomdir, [f"cannot read the DICOMDIR: {e}"]) from e
        return dicomdir.parent, sorted(Path(inst.path) for inst in fileset)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    return source, files


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _date(text: str) -> date | None:
    try:
        return DA(text) if text else None
    except ValueError:
        return None


def _datetime(ds: pydicom.Dataset, dt_key: str, date_keys: tuple[str, ...], tm_key: str):
    """A DT tag, else a DA (the first present of `date_keys`) with a TM; None if absent."""
    try:
        if text := _text(ds, dt_key):
            return DT(text).replace(tzinfo=None)
        if not (time_text := _text(ds, tm_key)):
            return None
        day = next((d for k in date_keys if (d := _date(_text(ds, k)))), date(1900, 1, 1))
        return datetime.combine(day, TM(time_text))
    except ValueError:
        return None


def _injected(ds: pydicom.Dataset, acquired: datetime | None) -> datetime | None:
    """ContrastBolusStartTime on the acquisition's date (the day before if it is later)."""
    text = _text(ds, "ContrastBolusStartTime")
    if acquired is None or not text:
        return None
    try:
        start = datetime.combine(acquired.date(), TM(text))
    except ValueError:
        return None
    return start - timedelta(days=1) if start - acquired > timedelta(hours=12) else start


def _frame_datetimes(ds: pydicom.Dataset) -> tuple[datetime, ...] | None:
    """Per-frame FrameAcquisitionDateTime of an enhanced multi-frame object, when complete."""
    groups = ds.get("PerFrameFunctionalGroupsSequence") or []
    stamps = []
    for group in groups:
        content = group.get("FrameContentSequence") or [{}]
        text = str(content[0].get("FrameAcquisitionDateTime", "") or "").strip()
        try:
            stamps.append(DT(text).replace(tzinfo=None))
        except ValueError:
            return None
    return tuple(stamps) if stamps else None


def _age(text: str) -> int | None:
    """PatientAge (nnnD / nnnW / nnnM / nnnY) in whole years, above 89 as 90 (ages over
    89 identify people in small cohorts; HIPAA's safe harbour groups them)."""
    if len(text) != 4 or not text[:3].isdigit() or text[3] not in "DWMY":
        return None
    return min(MAX_AGE, int(text[:3]) // {"D": 365, "W": 52, "M": 12, "Y": 1}[text[3]])


def _vector(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    value = ds.get("FrameTimeVector")
    if value is None or value == "":
        return None
    return tuple(float(v) for v in (value if isinstance(value, Iterable) else [value]))


def read_header(path: Path, root: Path, salt: str) -> Instance | str | None:
    """The header facts of one file; None when it is not an accepted DICOM object, a
    problem (str) when it is one but cannot be used."""
    name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        log.debug("%s: not read as DICOM (%s)", name, type(e).__name__)
        return None
    sop_class = _text(ds, "SOPClassUID")
    if sop_class not in ACCEPTED_SOP_CLASSES:
        log.debug("%s: SOP class %s is not an accepted image class", name, sop_class)
        return None
    if not (patient_id := _text(ds, "PatientID")):
        return f"{name}: no PatientID (0010,0020): cannot tell which patient it belongs to"
    if not (study_uid := _text(ds, "StudyInstanceUID")):
        return f"{name}: no StudyInstanceUID (0020,000D)"
    try:
        frame_time = float(ds["FrameTime"].value) if _text(ds, "FrameTime") else None
        vector = _vector(ds)
    except (TypeError, ValueError):
        return f"{name}: FrameTime (0018,1063) or FrameTimeVector (0018,1065) is not a number"
    acquired = _datetime(
        ds,
        "AcquisitionDateTime",
        ("AcquisitionDate", "ContentDate", "StudyDate"),
        "AcquisitionTime",
    )
    laterality = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    return Instance(
        path=path,
        name=name,
        sop_class=sop_class,
        patient=salted_hash(salt, "patient", patient_id),
        study=salted_hash(salt, "study", study_uid, 8),
        series=salted_hash(salt, "series", _text(ds, "SeriesInstanceUID") or name, 8),
        uid=salted_hash(salt, "instance", _text(ds, "SOPInstanceUID") or name, 16),
        eye=LATERALITY.get(laterality.upper()),
        colour=_text(ds, "PhotometricInterpretation") in _COLOUR,
        frames=int(ds.get("NumberOfFrames") or 1),
        pixels=int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0),
        number=int(ds.get("InstanceNumber") or 0),
        acquired=acquired,
        injected=_injected(ds, acquired),
        agent=_text(ds, "ContrastBolusAgent").lower(),
        frame_time_ms=frame_time,
        frame_time_vector_ms=vector,
        frame_datetimes=_frame_datetimes(ds),
        age=_age(_text(ds, "PatientAge")),
        sex=_text(ds, "PatientSex").upper() if _text(ds, "PatientSex") in SEXES else None,
        burned_in=_text(ds, "BurnedInAnnotation").upper() == "YES",
    )


def read_headers(
    files: list[Path], root: Path, salt: str, progress: bool
) -> tuple[list[Instance], list[str], int]:
    """Every accepted instance (once per SOPInstanceUID), the problems, and how many
    files were passed over."""
    instances, problems, passed, seen = [], [], 0, set()
    for path in tqdm(files, desc="read DICOM", unit="file", disable=not progress):
        got = read_header(path, root, salt)
        if isinstance(got, Instance):
            if got.uid not in seen:
                instances.append(got)
            seen.add(got.uid)
        elif got is None:
            passed += 1
        else:
            problems.append(got)
    return instances, problems, passed


def _names(instances: list[Instance], limit: int = 3) -> str:
    names = sorted(i.name for i in instances)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _is_icg(instance: Instance) -> bool:
    return "indocyanine" in instance.agent or "icg" in instance.agent.split()


def ffa_candidates(monochrome: list[Instance]) -> list[list[Instance]]:
    """Each multi-frame image, and each series of ≥ 2 single frames (frame order: time,
    then InstanceNumber, then file); ICGA and lone frames are not angiograms here."""
    kept = [i for i in monochrome if not _is_icg(i)]
    candidates = [[i] for i in kept if i.frames > 1]
    series: dict[str, list[Instance]] = defaultdict(list)
    for i in kept:
        if i.frames == 1:
            series[i.series].append(i)
    for frames in series.values():
        if len(frames) >= 2:
            candidates.append(sorted(frames, key=_frame_order))
    return candidates


def _frame_order(i: Instance) -> tuple:
    return (i.acquired is None, i.acquired or datetime.min, i.number, i.name)


def _prefer(candidates: list, *tests) -> list:
    """Narrow the candidates by each test in turn, where some (not all) pass it."""
    for test in tests:
        passing = [c for c in candidates if test(c)]
        if passing and len(passing) < len(candidates):
            candidates = passing
    return candidates


def pick_media(eye: list[Instance]) -> tuple[Instance | None, list[Instance] | None, str | None]:
    """The CF and FFA of one eye's instances, or a problem saying why not."""
    cfs = _prefer([i for i in eye if i.colour and i.frames == 1], lambda i: i.ophthalmic)
    ffas = _prefer(
        ffa_candidates([i for i in eye if not i.colour]),
        lambda c: "fluorescein" in c[0].agent,
        lambda c: c[0].ophthalmic,
    )
    if len(cfs) != 1:
        found = f"{len(cfs)} colour photos ({_names(cfs)})" if cfs else "no colour photo (CF)"
        return None, None, f"{found}; need exactly one"
    if len(ffas) != 1:
        shown = [c[0] for c in ffas]
        found = f"{len(ffas)} angiograms ({_names(shown)})" if ffas else "no angiogram (FFA)"
        return None, None, f"{found}; need exactly one"
    return cfs[0], ffas[0], None


def group_cases(instances: list[Instance]) -> tuple[list[DicomCase], list[str]]:
    """One case per (patient, study, eye) with exactly one CF and one FFA; problems else."""
    groups: dict[tuple[str, str, str], list[Instance]] = defaultdict(list)
    for i in instances:
        groups[i.patient, i.study, i.eye or ""].append(i)
    cases, problems = [], []
    for (patient, study, eye), members in sorted(groups.items()):
        cf, ffa, problem = pick_media(members)
        if problem:
            where = eye or "eye unknown: no ImageLaterality (0020,0062) or Laterality (0020,0060)"
            problems.append(f"{_names(members)}: study {study}, {where}: {problem}")
            continue
        case_id = f"p{patient}-{study}-{eye or 'NA'}"
        cases.append(DicomCase(case_id, f"p{patient}", eye or None, cf, ffa))
    return cases, problems


def _seconds(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def _multi_frame_times(i: Instance) -> tuple[list[float], str] | None:
    """Times of a multi-frame image: FrameTime, FrameTimeVector, then per-frame stamps."""
    start = _seconds(i.acquired, i.injected) if i.acquired and i.injected else 0.0
    if i.frame_time_ms:
        return [start + k * i.frame_time_ms / 1000 for k in range(i.frames)], "frame_time"
    if i.frame_time_vector_ms and len(i.frame_time_vector_ms) == i.frames:
        steps = np.cumsum(np.asarray(i.frame_time_vector_ms, dtype=np.float64)) / 1000
        steps -= steps[0]  # the first entry is the first frame's own (zero) increment
        return [start + float(s) for s in steps], "frame_time_vector"
    if i.frame_datetimes and len(i.frame_datetimes) == i.frames:
        zero = i.injected or i.frame_datetimes[0]
        return [_seconds(t, zero) for t in i.frame_datetimes], "acquisition_times"
    return None


def frame_times(
    ffa: list[Instance], assume_interval: float | None
) -> tuple[list[float], str, list[Instance]]:
    """(times in seconds, their source, the frames' instances in order); raises ValueError
    naming the file and the missing tag when there are none and no interval is assumed."""
    if len(ffa) == 1:
        got = _multi_frame_times(ffa[0])
        frames = ffa[0].frames
        if got is not None:
            return got[0], got[1], ffa
        if assume_interval is None:
            raise ValueError(f"{ffa[0].name}: {_MISSING_TIMES}")
    else:
        frames = len(ffa)
        missing = [i for i in ffa if i.acquired is None]
        if not missing:
            zero, source = ffa[0].injected, "acquisition_times"
            if zero is None:
                zero, source = ffa[0].acquired, "instance_times"
            return [_seconds(i.acquired, zero) for i in ffa], source, ffa
        if assume_interval is None:
            raise ValueError(f"{missing[0].name}: {_MISSING_INSTANCE_TIME}")
        ffa = sorted(ffa, key=lambda i: (i.number, i.name))
    return [k * assume_interval for k in range(frames)], "assumed_interval", ffa


def _to_uint8(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values → uint8 over the stored bit depth; MONOCHROME1 inverted."""
    if arr.dtype != np.uint8:
        top = float(2 ** int(ds.get("BitsStored") or 16) - 1)
        arr = np.rint(np.clip(arr.astype(np.float64), 0, top) * (255.0 / top)).astype(np.uint8)
    if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":
        arr = 255 - arr
    return arr


def read_pixels(instance: Instance, max_pixels: int) -> np.ndarray:
    """uint8 pixels: (H, W, 3) for colour, (T, H, W) or (H, W) for monochrome."""
    if instance.pixels > max_pixels:
        raise MediaTooLarge(instance.name, instance.pixels, max_pixels)
    try:
        ds = pydicom.dcmread(instance.path)
        arr = ds.pixel_array
    except Exception as e:  # a decoder's failure of any kind: the file is unreadable
        raise UnreadableImage(instance.name, f"{type(e).__name__}: {e}") from e
    if instance.colour and arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if not instance.colour and arr.ndim == 2 + (instance.frames > 1) + 1:
        arr = arr[..., 0]
    return _to_uint8(arr, ds)


def _ffa_frames(ffa: list[Instance], max_pixels: int) -> np.ndarray:
    if len(ffa) == 1:
        return read_pixels(ffa[0], max_pixels)
    frames = [read_pixels(i, max_pixels) for i in ffa]
    if len({f.shape for f in frames}) > 1:
        sizes = {f"{f.shape[1]}x{f.shape[0]}" for f in frames}
        raise ValueError(f"{_names(ffa)}: the series' frames differ in size ({', '.join(sizes)})")
    return np.stack(frames)


def write_media(case: DicomCase, folder: Path, ffa_format: str, max_pixels: int) -> dict:
    """Convert one case's DICOM pixels into `folder`; return its manifest-like row."""
    cf_rel = f"cf/{case.case_id}.png"
    write_png(folder / cf_rel, read_pixels(case.cf, max_pixels))
    frames = _ffa_frames(case.ffa, max_pixels)
    if ffa_format == "mp4":
        ffa_rel = f"ffa/{case.case_id}.mp4"
        write_mp4(folder / ffa_rel, frames)
    else:
        ffa_rel = f"ffa/{case.case_id}"
        for k, frame in enumerate(frames):
            write_png(folder / ffa_rel / f"{k:04d}.png", frame)
    return {
        "case_id": case.case_id,
        "patient_id": case.patient,
        "eye": case.eye or "",
        "age": "" if case.cf.age is None else str(case.cf.age),
        "sex": case.cf.sex or "",
        "cf_path": cf_rel,
        "ffa_path": ffa_rel,
        "ffa_times_s": ";".join(repr(float(t)) for t in case.times_s),
        "ffa_times_source": case.times_source,
    }


def convert_cases(
    cases: list[DicomCase], folder: Path, ffa_format: str, max_pixels: int, progress: bool
) -> tuple[list[dict], dict[str, str]]:
    """Rows of the converted cases and, by case id, the problem of each that failed."""
    (folder / "cf").mkdir()
    (folder / "ffa").mkdir()
    rows, problems = [], {}
    for case in tqdm(cases, desc="convert", unit="case", disable=not progress):
        try:
            rows.append(write_media(case, folder, ffa_format, max_pixels))
        except (ValueError, UnreadableImage) as e:
            problems[case.case_id] = str(e)
    return rows, problems


def timed_cases(
    cases: list[DicomCase], assume_interval: float | None
) -> tuple[list[DicomCase], list[str]]:
    """The cases whose frame times are known (set on them), and a problem for each other."""
    kept, problems = [], []
    for case in cases:
        try:
            case.times_s, case.times_source, case.ffa = frame_times(case.ffa, assume_interval)
        except ValueError as e:
            problems.append(str(e))
            continue
        kept.append(case)
    return kept, problems


def _check_options(out: Path, assume_interval: float | None, ffa_format: str) -> None:
    if out.exists():
        raise OutputExists(f"{out} already exists (choose another output folder)")
    if assume_interval is not None and not assume_interval > 0:
        raise DicomIngestError("--assume-interval", [f"must be > 0 seconds, got {assume_interval}"])
    if ffa_format not in FFA_FORMATS:
        raise DicomIngestError("--ffa-format", [f"{ffa_format!r} is not one of {FFA_FORMATS}"])


def _burned_in(instances: list[Instance], allowed: bool) -> tuple[list[Instance], list[str]]:
    """Without `allowed`, the images marked BurnedInAnnotation YES are left out, a problem."""
    burned = [i for i in instances if i.burned_in]
    if not burned or allowed:
        return instances, []
    problem = (
        f"{_names(burned)}: BurnedInAnnotation (0028,0301) is YES: the pixels may show "
        "identifiers (check them, then give --allow-burned-in)"
    )
    return [i for i in instances if not i.burned_in], [problem]


def collect_cases(
    source: Path,
    salt: str,
    assume_interval: float | None,
    progress: bool,
    allow_burned_in: bool = False,
) -> tuple[list[DicomCase], list[str]]:
    """Read the headers under `source`; the usable cases and every problem found."""
    root, files = _files(source)
    instances, problems, passed = read_headers(files, root, salt, progress)
    log.info(
        "%d DICOM image(s) accepted, %d file(s) passed over (not DICOM or another object)",
        len(instances),
        passed,
    )
    instances, burned = _burned_in(instances, allow_burned_in)
    problems += burned
    cases, grouping = group_cases(instances)
    cases, timing = timed_cases(cases, assume_interval)
    return cases, problems + grouping + timing


def _ingest_problems(error: ManifestError, cases: list[DicomCase]) -> list[str]:
    """The ingest's row problems, each naming its case's DICOM files."""
    by_id = {c.case_id: c for c in cases}
    out = []
    for p in error.problems:
        case = by_id.get(p.case_id or "")
        where = _names(case.files) if case else (p.case_id or "input")
        out.append(f"{where}: {p.message}")
    return out


def ingest_dicom(
    source: str | Path,
    out: str | Path,
    *,
    salt: str | None = None,
    assume_interval: float | None = None,
    ffa_format: str = "mp4",
    name: str | None = None,
    skip_bad: bool = False,
    allow_burned_in: bool = False,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    **ingest_options,
) -> IngestResult:
    """Build the cohort `out` from the DICOM files under `source` (see the module
    docstring); `ingest_options` go to `retrieval.data.ingest.ingest` (duplicates, seed)."""
    source, out = Path(source), Path(out)
    salt = resolve_salt(salt)
    _check_options(out, assume_interval, ffa_format)
    cases, problems = collect_cases(source, salt, assume_interval, progress, allow_burned_in)
    if problems and not skip_bad:
        raise DicomIngestError(source, problems)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, f"{out.name}-dicom")
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(f"{out.name}-dicom"), dir=out.parent))
    try:
        rows, failed = convert_cases(cases, folder, ffa_format, max_pixels, progress)
        problems += [
            f"{_names(c.files)}: {failed[c.case_id]}" for c in cases if c.case_id in failed
        ]
        if not rows:
            problems.append("no usable case (an eye with one colour photo and one angiogram)")
        if problems and not skip_bad or not rows:
            raise DicomIngestError(source, problems)
        for problem in problems:
            log.warning("skipped: %s", problem)
        label = name or "dicom"  # not the folder's name: exports are often named by patient
        try:
            result = ingest(
                folder / "dicom.csv",  # not read: the rows are given; paths are under folder
                out,
                rows=[{**r, "source": label} for r in rows],
                skip_bad=skip_bad,
                max_pixels=max_pixels,
                progress=progress,
                **ingest_options,
            )
        except ManifestError as e:
            raise DicomIngestError(source, _ingest_problems(e, cases)) from e
        result.skipped = [RowProblem(0, None, p) for p in problems] + result.skipped
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)
