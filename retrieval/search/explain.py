"""Why a result matched: its score split over regions (both photos) and, for an angiogram,
over frames and phases.

A stored vector is [sqrt(1 - w)·pair, sqrt(w)·clinical] and a search scores
`query · weights · result` (`similarity_weights`). The encoder splits each side's own
embedding into parts that sum to it (`QueryEncoder.cf_parts`, `ffa_parts`: the pair part
region by region, since the head maps each region to its own slice; the clinical part
through its mean pool (each region's detections / R) and its max pool (per channel, the
region that holds the maximum), the projection's bias spread evenly over the regions;
an FFA's parts also per frame, the attention pooling being a weighted sum of frames and
the clinical part a mean over frames). So:

- the query's map: its parts · weights · the result's vector, one value per region;
- the result's map: the query's vector · weights · the result's parts;

each sums to the cosine of the similarity asked for (to float rounding; the embeddings
are recomputed from the media, and `search_score` is the score a search reports from
the stored vectors). A value is signed: a region that pulls the two apart is negative.

FFA phases are by the frame's time after injection: arterial before 20 s (the
phantom's dye arrives at 8-15 s and the arteries fill ~1 s later), venous from 20 s to
5 min (veins full, recirculation), late from 5 min (staining, leakage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .region import from_square, square_on_photo

if TYPE_CHECKING:
    from encoder.fov import FovCircle

PHASES: tuple[tuple[str, float, float], ...] = (
    ("arterial", 0.0, 20.0),
    ("venous", 20.0, 300.0),
    ("late", 300.0, math.inf),
)
TOP_REGIONS = 5  # regions listed per side, by contribution


def phase_of(time_s: float) -> str:
    """The FFA phase (`PHASES`) of a frame `time_s` seconds after injection."""
    for name, _, end in PHASES:
        if time_s < end:
            return name
    return PHASES[-1][0]


@dataclass(frozen=True)
class SideParts:
    """One side's embedding split into parts: (R, D) for a CF photo, (T, R, D) for an FFA
    video with its frame times (T,) and attention weights (T,); and, when known, the photo's
    (or frames') (height, width) and FOV circle, to place the regions on it."""

    modality: str
    parts: np.ndarray
    times_s: np.ndarray | None = None
    attention: np.ndarray | None = None
    hw: tuple[int, int] | None = None
    circle: FovCircle | None = None

    @property
    def vector(self) -> np.ndarray:
        """(D,) float64: the embedding the parts add up to."""
        return self.parts.reshape(-1, self.parts.shape[-1]).sum(0, dtype=np.float64)


@dataclass(frozen=True)
class SideMap:
    """One side's share of the score: per region (grid x grid, row-major from the top
    left of the model's square: the photo's FOV square) and, for an FFA video, per frame and
    phase. `hw` and `circle` (when known) place the square on the photo."""

    case_id: str | None
    modality: str
    regions: np.ndarray  # (grid, grid) float64
    frames: list[dict[str, Any]] | None = None  # index, time_s, phase, attention, contribution
    phases: list[dict[str, Any]] | None = None  # phase, start_s, end_s, frames, contribution
    hw: tuple[int, int] | None = None
    circle: FovCircle | None = None

    @property
    def total(self) -> float:
        return float(self.regions.sum())

    def box(self, row: int, col: int) -> list[float]:
        """The box (x0, y0, x1, y1) in [0, 1] of region (row, col): on the photo (clipped)
        when its size and FOV circle are known, else on the model's square."""
        g = self.regions.shape[0]
        square = (col / g, row / g, (col + 1) / g, (row + 1) / g)
        if self.hw is None:
            return list(square)
        return list(from_square(square, *self.hw, self.circle))

    def top_regions(self, n: int = TOP_REGIONS) -> list[dict[str, Any]]:
        """The n regions of largest contribution: row, col, the box (x0, y0, x1, y1, `box`)
        and the contribution."""
        g = self.regions.shape[0]
        flat = self.regions.ravel()
        order = np.argsort(-flat, kind="stable")[:n]
        return [
            {
                "row": int(i // g),
                "col": int(i % g),
                "box": self.box(i // g, i % g),
                "contribution": float(flat[i]),
            }
            for i in order.tolist()
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "modality": self.modality,
            "total": self.total,
            "regions": self.regions.tolist(),
            "top_regions": self.top_regions(),
            "square": None if self.hw is None else list(square_on_photo(*self.hw, self.circle)),
            "frames": self.frames,
            "phases": self.phases,
        }


@dataclass(frozen=True)
class Explanation:
    """A query and one result: the score and where it comes from on each side."""

    similarity: str
    score: float  # query · weights · result of the embeddings recomputed from the media
    search_score: float  # the same from the vectors a search uses (stored, or the upload's)
    grid: int
    query: SideMap
    result: SideMap

    @property
    def max_error(self) -> float:
        """The largest gap between a side's sum and `search_score` (the faithfulness check)."""
        return max(
            abs(self.query.total - self.search_score), abs(self.result.total - self.search_score)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "similarity": self.similarity,
            "score": self.score,
            "search_score": self.search_score,
            "grid": self.grid,
            "sum_check": {
                "query_sum": self.query.total,
                "result_sum": self.result.total,
                "max_error": self.max_error,
            },
            "query": self.query.to_dict(),
            "result": self.result.to_dict(),
        }


def side_map(side: SideParts, other: np.ndarray, case_id: str | None) -> SideMap:
    """`side`'s parts scored against `other` (D,), the other side's vector already times the
    similarity's weights: the contribution of each region (and frame, for FFA)."""
    contrib = side.parts.astype(np.float64) @ np.asarray(other, np.float64)  # (R,) or (T, R)
    per_region = contrib if contrib.ndim == 1 else contrib.sum(0)
    g = math.isqrt(per_region.size)
    if g * g != per_region.size:
        raise ValueError(f"{per_region.size} regions are not a square grid")
    where = {"hw": side.hw, "circle": side.circle}
    if contrib.ndim == 1:
        return SideMap(case_id, side.modality, per_region.reshape(g, g), **where)
    frames = frame_rows(contrib.sum(1), side.times_s, side.attention)
    return SideMap(
        case_id, side.modality, per_region.reshape(g, g), frames, phase_rows(frames), **where
    )


def frame_rows(
    per_frame: np.ndarray, times_s: np.ndarray | None, attention: np.ndarray | None
) -> list[dict[str, Any]]:
    """One row per frame: its index, time, phase, attention weight and contribution."""
    t = np.zeros(len(per_frame)) if times_s is None else np.asarray(times_s, np.float64)
    a = np.full(len(per_frame), np.nan) if attention is None else np.asarray(attention)
    return [
        {
            "index": i,
            "time_s": float(t[i]),
            "phase": phase_of(float(t[i])),
            "attention": float(a[i]),
            "contribution": float(per_frame[i]),
        }
        for i in range(len(per_frame))
    ]


def phase_rows(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The frames' contributions summed per phase (every phase listed, in order)."""
    return [
        {
            "phase": name,
            "start_s": start,
            "end_s": None if math.isinf(end) else end,
            "frames": sum(f["phase"] == name for f in frames),
            "contribution": float(sum(f["contribution"] for f in frames if f["phase"] == name)),
        }
        for name, start, end in PHASES
    ]


def explain_pair(
    query: SideParts,
    result: SideParts,
    weights: np.ndarray,
    *,
    similarity: str,
    search_score: float,
    ids: tuple[str | None, str],
) -> Explanation:
    """The explanation of one query/result pair under `weights` (the similarity's factors).
    `ids`: the query's case id (None: an upload) and the result's."""
    w = np.asarray(weights, np.float64)
    q, r = query.vector, result.vector
    q_map = side_map(query, w * r, ids[0])
    r_map = side_map(result, w * q, ids[1])
    return Explanation(
        similarity=similarity,
        score=float(q @ (w * r)),
        search_score=float(search_score),
        grid=q_map.regions.shape[0],
        query=q_map,
        result=r_map,
    )


def explanation_lines(explanation: Explanation, top: int = TOP_REGIONS) -> list[str]:
    """A readable summary: the score and its sum check, each side's top regions and, for
    an FFA side, its phases."""
    e = explanation
    lines = [
        f"{e.similarity} score {e.search_score:.6f} (as searched); recomputed {e.score:.6f}",
        f"sum check: query regions {e.query.total:.6f}, result regions {e.result.total:.6f}, "
        f"max error {e.max_error:.2e}",
    ]
    for name, side in (("query", e.query), ("result", e.result)):
        who = side.case_id or "upload"
        lines.append(f"{name} {who} ({side.modality}), top regions of the {e.grid}x{e.grid} grid:")
        lines += [
            f"  row {r['row']:>2} col {r['col']:>2}  {r['contribution']:+.4f}"
            for r in side.top_regions(top)
        ]
        for p in side.phases or []:
            end = "" if p["end_s"] is None else f"{p['end_s']:g}"
            lines.append(
                f"  phase {p['phase']:<8} {p['start_s']:g}-{end} s  {p['frames']:>2} frames  "
                f"{p['contribution']:+.4f}"
            )
    return lines
