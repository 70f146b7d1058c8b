"""Near-duplicate media: the same CF photo or FFA video re-saved, recompressed, resized,
slightly cropped or with its brightness shifted.

The descriptor is model-free, so ingest (no model) and the engine share it. A picture (a
CF photo's luminance; for an FFA video, two: the mean of all its frames and the mean of
its first third, where the vessels fill, side by side) is cut into `VARIANTS` views: the
whole picture and 36 crops to 90 % of each side (offsets 0-10 % in steps of 2 %), so a
crop of one copy lines up with a view of the other. Each view is shrunk to
`THUMB`×`THUMB` (area average) and band-passed (a difference of Gaussians: what stays is
vessels, disc rim and lesions, which differ between eyes; shading and noise go), its
values clipped at `CLIP` robust deviations (a bright leak must not outweigh the
vessels), the rim of the field of view dropped, then centred and scaled to unit length,
so a brightness or contrast change does not move it. The distance of two cases in one
modality is 1 − the best cosine of one side's whole picture with any view of the other
(either way round), in [0, 2]; 0 is the same picture.

`THRESHOLDS` (one per modality; a pair at or below it is a near-duplicate) were tuned
by `benchmarks/duplicates_bench.py` on a phantom cohort (seed 8, 520 cases + 60
planted copies: the midpoint between the farthest planted pair and the nearest
distinct pair) and checked on another (seed 7, other planted copies): precision and
recall 1.0 for CF and FFA there, no two eyes of one patient flagged. An FFA video's
per-pixel standard deviation over time, the first choice, put two distinct leaking
eyes of a 640-case phantom at 0.261, inside the planted copies' range (0.24-0.28);
the two means keep distinct eyes at 0.27 or more and copies at 0.22 or less.

The neighbour search is exact (numpy matrix products in blocks): `DuplicateIndex.find`
for one new case against an index, `find_pairs` for every pair within a collection,
`folder_pairs` for a cohort or index folder (`fundus2video duplicates`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter
from tqdm import tqdm

from retrieval.errors import Fundus2VideoError, UnreadableMedia

from .media import luma, read_cf, read_ffa

log = logging.getLogger(__name__)

MODALITIES = ("cf", "ffa")
THUMB = 40  # side of each view's thumbnail
WORK_SIDE = 160  # a picture is first shrunk to at most this side
FINE, COARSE = 0.6, 2.0  # pixels of the thumbnail: the band kept (noise and shading go)
CLIP = 2.5  # band values beyond this many robust deviations are clipped (bright leaks)
EDGE = 3  # pixels of the thumbnail dropped inside the field of view's rim
CROP = 0.9  # the crops' side, as a share of the picture's
OFFSETS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1)
VARIANTS = 1 + len(OFFSETS) ** 2
DIM = THUMB * THUMB  # one picture's view
WIDTH = {"cf": DIM, "ffa": 2 * DIM}  # a modality's descriptor: one picture, or two side by side
THRESHOLDS: dict[str, float] = {"cf": 0.23, "ffa": 0.262}
_BLOCK = 4096  # query views per matrix product


@dataclass(frozen=True)
class DuplicatePair:
    """Two cases whose `modality` media are near-duplicates (`b` came after `a`)."""

    a: str
    b: str
    modality: str
    distance: float

    def record(self) -> dict:
        return {"a": self.a, "b": self.b, "modality": self.modality, "distance": self.distance}


def _boxes() -> list[tuple[float, float, float, float]]:
    boxes = [(0.0, 0.0, 1.0, 1.0)]
    boxes += [(x, y, x + CROP, y + CROP) for y in OFFSETS for x in OFFSETS]
    return boxes


def _gray(image: np.ndarray) -> np.ndarray:
    """A CF (H, W, 3) or gray (H, W) uint8/float image as float32 luminance."""
    arr = np.asarray(image, np.float32)
    if arr.ndim == 3:
        arr = luma(arr)
    if arr.ndim != 2 or min(arr.shape) < 4:
        raise Fundus2VideoError(f"a duplicate descriptor needs a 2-D picture, got {arr.shape}")
    return arr


def image_descriptor(image: np.ndarray) -> np.ndarray:
    """(VARIANTS, DIM) float32 unit vectors of one picture (see the module docstring)."""
    pic = Image.fromarray(_gray(image), mode="F")
    scale = WORK_SIDE / max(pic.size)
    if scale < 1:
        size = (max(4, round(pic.width * scale)), max(4, round(pic.height * scale)))
        pic = pic.resize(size, Image.Resampling.BOX)
    w, h = pic.size
    out = np.empty((VARIANTS, DIM), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(_boxes()):
        box = (x0 * w, y0 * h, x1 * w, y1 * h)
        view = pic.resize((THUMB, THUMB), Image.Resampling.BOX, box=box)
        out[i] = _band(np.asarray(view, np.float32))
    return out


def _band(arr: np.ndarray) -> np.ndarray:
    """One view's unit vector: its band-passed content inside the field of view."""
    band = gaussian_filter(arr, FINE, mode="nearest") - gaussian_filter(arr, COARSE, mode="nearest")
    fov = binary_erosion(arr > 0.2 * float(np.percentile(arr, 99)), iterations=EDGE)
    inside = band[fov]
    spread = 1.4826 * float(np.median(np.abs(inside - np.median(inside)))) if inside.size else 0.0
    v = (np.clip(band, -CLIP * spread, CLIP * spread) * fov).ravel()
    v -= v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-6)


def video_descriptor(ffa: np.ndarray) -> np.ndarray:
    """(VARIANTS, 2 · DIM) float32 unit vectors of an FFA video (T, H, W): the views of the
    mean of all its frames beside those of the mean of its first third (the filling
    vessels), so one view's cosine is the mean of the two pictures' cosines."""
    frames = np.asarray(ffa, np.float32)
    if frames.ndim != 3 or len(frames) < 1:
        raise Fundus2VideoError(f"an FFA video must be (T, H, W), got {frames.shape}")
    early = frames[: max(1, len(frames) // 3)]
    views = [image_descriptor(p.mean(axis=0)) for p in (frames, early)]
    return np.concatenate(views, axis=1) / np.float32(np.sqrt(2.0))


def case_descriptor(cf: np.ndarray, ffa: np.ndarray) -> dict[str, np.ndarray]:
    """The descriptors of one case: its CF photo (`image_descriptor`) and its FFA video
    (`video_descriptor`)."""
    return {"cf": image_descriptor(cf), "ffa": video_descriptor(ffa)}


def media_descriptor(cf_path: str | Path, ffa_path: str | Path) -> dict[str, np.ndarray]:
    """Decode a case's media and describe them (raises UnreadableMedia naming the file)."""
    return case_descriptor(read_cf(cf_path), read_ffa(ffa_path))


def distances(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, VARIANTS, W) × (G, VARIANTS, W) → (Q, G) distances: 1 − the best cosine of
    one side's whole picture with any view of the other (either way round)."""
    q, g, width = len(query), len(gallery), query.shape[-1]
    best = np.full((q, g), -1.0, np.float32)
    per = max(1, _BLOCK // VARIANTS)
    for gs in range(0, g, per):
        gal = np.asarray(gallery[gs : gs + per], np.float32)
        gal_views, gal_whole = gal.reshape(-1, width), np.ascontiguousarray(gal[:, 0])
        for qs in range(0, q, per):
            block = np.asarray(query[qs : qs + per], np.float32)
            whole = (block[:, 0] @ gal_views.T).reshape(len(block), len(gal), VARIANTS)
            views = (block.reshape(-1, width) @ gal_whole.T).reshape(len(block), VARIANTS, len(gal))
            best[qs : qs + per, gs : gs + per] = np.maximum(whole.max(axis=2), views.max(axis=1))
    return np.clip(1.0 - best, 0.0, 2.0)


def check_thresholds(thresholds: dict[str, float] | None) -> dict[str, float]:
    """`THRESHOLDS` overridden by `thresholds`; QueryError-like message naming the bad one."""
    out = dict(THRESHOLDS)
    for modality, value in (thresholds or {}).items():
        if modality not in MODALITIES:
            raise Fundus2VideoError(f"threshold: unknown modality {modality!r} (cf or ffa)")
        if not 0.0 <= float(value) <= 2.0:
            raise Fundus2VideoError(f"threshold {modality}: must be in [0, 2], got {value}")
        out[modality] = float(value)
    return out


def find_pairs(
    ids: Sequence[str],
    descriptors: Sequence[dict[str, np.ndarray]],
    thresholds: dict[str, float] | None = None,
) -> list[DuplicatePair]:
    """Every near-duplicate pair within one collection, by modality then distance."""
    limits = check_thresholds(thresholds)
    pairs: list[DuplicatePair] = []
    for modality in MODALITIES:
        stack = np.stack([d[modality] for d in descriptors]) if descriptors else None
        if stack is None:
            continue
        dist = distances(stack, stack)
        a, b = np.nonzero(np.triu(dist <= limits[modality], k=1))
        found = [
            DuplicatePair(ids[i], ids[j], modality, float(dist[i, j]))
            for i, j in zip(a, b, strict=True)
        ]
        pairs += sorted(found, key=lambda p: p.distance)
    return pairs


class DuplicateIndex:
    """The descriptors of indexed cases (float16, by row id), for checking a new case.

    Thread-safe. About `3 · VARIANTS · DIM · 2` bytes a case (≈ 360 kB)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[int] = []
        self._ids: list[str] = []
        self._stack = {m: np.zeros((0, VARIANTS, WIDTH[m]), np.float16) for m in MODALITIES}

    @classmethod
    def from_media(cls, cases: Iterable[tuple[int, str, str | Path, str | Path]]) -> DuplicateIndex:
        """Describe `(row_id, case_id, cf_path, ffa_path)` cases; unreadable media are left out."""
        index = cls()
        for row_id, case_id, cf_path, ffa_path in cases:
            try:
                index.add(row_id, case_id, media_descriptor(cf_path, ffa_path))
            except UnreadableMedia as err:
                log.warning("near-duplicate check: case %s left out (%s)", case_id, err)
        return index

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row_id: int, case_id: str, descriptor: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._rows.append(int(row_id))
            self._ids.append(case_id)
            for m in MODALITIES:
                new = np.asarray(descriptor[m], np.float16)[None]
                self._stack[m] = np.concatenate([self._stack[m], new])

    def remove(self, row_id: int) -> None:
        with self._lock:
            keep = np.asarray([r != int(row_id) for r in self._rows], bool)
            self._rows = [r for r, k in zip(self._rows, keep, strict=True) if k]
            self._ids = [c for c, k in zip(self._ids, keep, strict=True) if k]
            self._stack = {m: s[keep] for m, s in self._stack.items()}

    def find(
        self,
        descriptor: dict[str, np.ndarray],
        thresholds: dict[str, float] | None = None,
        exclude: int | None = None,
    ) -> list[DuplicatePair]:
        """The indexed cases whose CF or FFA is a near-duplicate of `descriptor`'s, nearest
        first, as pairs (indexed case, "" for the new one, modality, distance)."""
        limits = check_thresholds(thresholds)
        with self._lock:
            rows, ids, stack = list(self._rows), list(self._ids), dict(self._stack)
        found: list[DuplicatePair] = []
        for modality in MODALITIES:
            dist = distances(np.asarray(descriptor[modality])[None], stack[modality])[0]
            for j in np.nonzero(dist <= limits[modality])[0]:
                if rows[j] != exclude:
                    found.append(DuplicatePair(ids[j], "", modality, float(dist[j])))
        return sorted(found, key=lambda p: p.distance)

    def of_row(self, row_id: int) -> dict[str, np.ndarray] | None:
        """The stored descriptor of one indexed case (None: not described)."""
        with self._lock:
            if int(row_id) not in self._rows:
                return None
            j = self._rows.index(int(row_id))
            return {m: self._stack[m][j] for m in MODALITIES}


def folder_cases(folder: str | Path) -> list[tuple[str, Path, Path]]:
    """`(case_id, cf_path, ffa_path)` of a cohort folder or an index folder (with
    `manifest.json`), media paths resolved against the folder."""
    from .cohort import CATALOG_NAME, Cohort

    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        catalog = pl.read_parquet(folder / CATALOG_NAME, columns=["case_id", "cf_path", "ffa_path"])
        rows = catalog.iter_rows()
        return [(c, folder / cf, folder / ffa) for c, cf, ffa in rows]
    cohort = Cohort.open(folder)
    return [(c.case_id, cohort.root / c.cf_path, cohort.root / c.ffa_path) for c in cohort.cases()]


def folder_pairs(
    folder: str | Path, thresholds: dict[str, float] | None = None, *, progress: bool = False
) -> list[DuplicatePair]:
    """Every near-duplicate pair of a cohort or index folder (`fundus2video duplicates`).

    Raises UnreadableMedia naming the first file that cannot be decoded."""
    limits = check_thresholds(thresholds)
    cases = folder_cases(folder)
    descs = [
        media_descriptor(cf, ffa)
        for _, cf, ffa in tqdm(cases, desc="describe", unit="case", disable=not progress)
    ]
    return find_pairs([c for c, _, _ in cases], descs, limits)


def duplicate_match(pair: DuplicatePair, other: str | None = None) -> dict:
    """A pair as the API's `DuplicateMatch`: the case on the other side of `other` (default:
    `pair.a`), the modality, the distance and the modality's threshold."""
    case_id = pair.b if other is not None and pair.a == other else pair.a
    return {
        "case_id": case_id,
        "modality": pair.modality,
        "distance": round(pair.distance, 4),
        "threshold": THRESHOLDS[pair.modality],
    }
