"""Region-of-interest queries: the geometry of a box on a photo and the embedder's grid.

A region is a box `(x0, y0, x1, y1)` in normalised coordinates of a CF photo (0 ≤ x0 <
x1 ≤ 1, 0 ≤ y0 < y1 ≤ 1; x to the right, y down). The embedder sees the photo's FOV
square (`encoder.fov.fov_square`: the square around its field-of-view circle) cut into a
grid × grid of regions; `to_square` / `from_square` move a box between the photo and that
square (given the circle: `photo_circle`; without one, the photo centre-padded to a
square), and `box_cells` / `cells_box` between a box and the grid cells it covers.

How a region searches ("anywhere in other eyes", chosen by `benchmarks/region_bench.py`):
the clinical part of the query is computed from the box's regions alone (the per-region
lesion detectors pooled over them, projected: what the box holds, not where) and mixed
with the whole photo's (`anchored`: a share `REGION_SHARE` for the box, the rest the
photo's context, chosen on val queries); it ranks the archive by the cosine with each
case's clinical part. Each of the top hits is then searched, window by window (a window
= the box's size in regions, every position), for the part of its photo most like the
box alone: that window is the hit's `region`, its cosine the hit's `region_score`. The
alternative measured against it, "same place in other eyes" (similarity pair: only the
pair-part entries of the box's regions compared, `pair_mask`), finds the same anatomy at
the same place rather than the same lesion; its hits' `region` is the box itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import QueryError

if TYPE_CHECKING:  # encoder (torch) is imported on first use: the engine starts without it
    from encoder.fov import FovCircle

Box = tuple[float, float, float, float]
Cells = tuple[int, int, int, int]  # row0, row1, col0, col1 (end exclusive)
REGION_EXAMPLE = "0.55,0.40,0.75,0.60"
# The box's share of a region query's clinical part; the rest is the whole photo's (its
# context). Chosen on val queries against train (`benchmarks/region_bench.py --queries val`):
# precision@10 of the box's lesion type 0.564 for the box alone, 0.853 for the whole photo,
# 0.857 / 0.862 / 0.865 / 0.865 / 0.826 at shares 0.1 / 0.2 / 0.3 / 0.4 / 0.5 (418 boxes
# on 113 val cases): 0.4, the larger of the two best, so that the box weighs the most.
REGION_SHARE = 0.4
_NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"
_TEXT = re.compile(rf"{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}")


def parse_region(value: str | Sequence[float] | None, name: str = "region") -> Box | None:
    """A box from "x0,y0,x1,y1" or four numbers (None: no region); QueryError names `name`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        if not _TEXT.fullmatch(value):
            raise QueryError(
                f"{name} must be four numbers x0,y0,x1,y1 (e.g. {REGION_EXAMPLE}), got {value!r}"
            )
        value = [float(v) for v in value.split(",")]
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise QueryError(f"{name} must be four numbers x0,y0,x1,y1, got {value!r}") from None
    return check_region(box, name)


def check_region(box: Sequence[float], name: str = "region") -> Box:
    """`box` as a Box once it is four finite numbers in [0, 1] with x0 < x1 and y0 < y1."""
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise QueryError(f"{name} must be four finite numbers x0,y0,x1,y1, got {list(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise QueryError(
            f"{name} must lie in [0, 1] with x0 < x1 and y0 < y1 (normalised x0,y0,x1,y1 "
            f"on the query photo), got {x0:g},{y0:g},{x1:g},{y1:g}"
        )
    return (x0, y0, x1, y1)


def format_region(box: Box) -> str:
    """The "x0,y0,x1,y1" text of a box (4 decimals), as `parse_region` reads it."""
    return ",".join(f"{v:.4f}" for v in box)


def photo_circle(image: np.ndarray, stored: Sequence[float] | None = None) -> FovCircle:
    """The FOV circle the embedder crops `image` by: `stored` ([cx, cy, r], a catalog's
    `cf_fov`) when known, else detected (`encoder.fov.detect_fov`)."""
    from encoder.fov import detect_fov, stored_circle

    known = stored_circle(stored)
    return detect_fov(image) if known is None else known


def _square_frame(h: int, w: int, circle: FovCircle | None) -> tuple[float, float, float]:
    """(side, x offset, y offset) in pixels: where the model's square lies on an h x w
    photo, its left and top edge at -offset. The FOV square of `circle`, or without one
    the photo centre-padded to a square."""
    if circle is None:
        s = max(h, w)
        return float(s), float((s - w) // 2), float((s - h) // 2)
    from encoder.fov import fov_box

    left, top, side = fov_box(circle)
    return float(side), float(-left), float(-top)


def square_on_photo(h: int, w: int, circle: FovCircle | None = None) -> Box:
    """Where the model's square lies on an h x w photo: x0, y0, x1, y1 as fractions of
    the photo (beyond [0, 1] where the square overhangs it)."""
    s, ox, oy = _square_frame(h, w, circle)
    return (-ox / w, -oy / h, (s - ox) / w, (s - oy) / h)


def to_square(box: Box, h: int, w: int, circle: FovCircle | None = None) -> Box:
    """A box on an h x w photo → the same box on the model's square (`_square_frame`)."""
    s, ox, oy = _square_frame(h, w, circle)
    x0, y0, x1, y1 = box
    return ((ox + x0 * w) / s, (oy + y0 * h) / s, (ox + x1 * w) / s, (oy + y1 * h) / s)


def from_square(box: Box, h: int, w: int, circle: FovCircle | None = None) -> Box:
    """A box on the model's square of an h x w photo → on the photo (clipped to it)."""
    s, ox, oy = _square_frame(h, w, circle)
    x0, y0, x1, y1 = box

    def clip(v: float) -> float:
        return min(max(v, 0.0), 1.0)

    return (
        clip((x0 * s - ox) / w),
        clip((y0 * s - oy) / h),
        clip((x1 * s - ox) / w),
        clip((y1 * s - oy) / h),
    )


def box_cells(box: Box, grid: int) -> Cells:
    """The grid cells a box (on the square) covers: every cell it overlaps by more than a
    quarter of the cell's side, at least one."""
    x0, y0, x1, y1 = box

    def span(a: float, b: float) -> tuple[int, int]:
        lo = min(int(math.floor(a * grid + 0.25)), grid - 1)
        hi = max(int(math.ceil(b * grid - 0.25)), lo + 1)
        return lo, min(hi, grid)

    r0, r1 = span(y0, y1)
    c0, c1 = span(x0, x1)
    return r0, r1, c0, c1


def cells_box(cells: Cells, grid: int) -> Box:
    """The box (on the square) of grid cells rows r0:r1, columns c0:c1."""
    r0, r1, c0, c1 = cells
    return (c0 / grid, r0 / grid, c1 / grid, r1 / grid)


def cells_mask(cells: Cells, grid: int) -> np.ndarray:
    """bool (grid, grid): True on the cells (row-major, as the embedder's regions)."""
    r0, r1, c0, c1 = cells
    mask = np.zeros((grid, grid), bool)
    mask[r0:r1, c0:c1] = True
    return mask


def pair_mask(cells: Cells, grid: int, pair_dim: int, out_dim: int) -> np.ndarray:
    """float32 (out_dim,): 1 on the pair-part entries of the cells' regions, 0 elsewhere
    ("same place in other eyes": region r owns entries [r·m, (r+1)·m), m = pair_dim / grid²)."""
    m = pair_dim // (grid * grid)
    regions = np.flatnonzero(cells_mask(cells, grid).ravel())
    out = np.zeros(out_dim, np.float32)
    for r in regions:
        out[r * m : (r + 1) * m] = 1.0
    return out


def best_window(scores: np.ndarray, rows: int, cols: int) -> tuple[Cells, float]:
    """The best of a (grid - rows + 1, grid - cols + 1) window score map: its cells, score."""
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return (int(i), int(i) + rows, int(j), int(j) + cols), float(scores[i, j])


@dataclass(frozen=True)
class RegionQuery:
    """A region query's box on its photo and the grid cells it covers on the square."""

    box: Box  # normalised on the query photo
    cells: Cells  # on the embedder's grid x grid regions of the padded square
    grid: int
    vector: np.ndarray | None = field(default=None, compare=False)  # the box's own (1, D)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols): the box's size in regions (the size of the windows it is matched to)."""
        r0, r1, c0, c1 = self.cells
        return r1 - r0, c1 - c0


def region_query(
    box: Box, hw: tuple[int, int], grid: int, circle: FovCircle | None = None
) -> RegionQuery:
    """The region query of `box` on a photo of (height, width) `hw` whose FOV circle is
    `circle` (`photo_circle`), on a grid x grid."""
    return RegionQuery(box, box_cells(to_square(box, *hw, circle), grid), grid)


def locate(
    rq: RegionQuery,
    hw: tuple[int, int],
    scores: np.ndarray | None,
    circle: FovCircle | None = None,
) -> tuple[Box, float | None]:
    """The matching region of a hit whose photo is (height, width) `hw` with FOV circle
    `circle`: the best window of its score map (`scores`, (grid - rows + 1, grid - cols +
    1)) and its score, or, without a map ("same place"), the query's own cells."""
    if scores is None:
        return from_square(cells_box(rq.cells, rq.grid), *hw, circle), None
    cells, score = best_window(np.asarray(scores), *rq.shape)
    return from_square(cells_box(cells, rq.grid), *hw, circle), score


def anchored(region: np.ndarray, whole: np.ndarray, dims: np.ndarray, share: float) -> np.ndarray:
    """A region query vector (1, D) whose entries `dims` (bool (D,): the clinical part) are
    `share` x the box's + (1 - share) x the whole photo's, at the box's norm there."""
    out = np.array(region, np.float32, copy=True)
    mixed = share * out[:, dims] + (1 - share) * np.asarray(whole, np.float32)[:, dims]
    norm = np.linalg.norm(mixed, axis=1, keepdims=True)
    out[:, dims] = (
        mixed * np.linalg.norm(out[:, dims], axis=1, keepdims=True) / np.maximum(norm, 1e-12)
    )
    return out


def region_info(info: dict[str, Any], rq: RegionQuery | None) -> dict[str, Any]:
    """A search result's `query` description, with the region (box and cells) when one."""
    if rq is None:
        return info
    return {**info, "region": list(rq.box), "region_cells": list(rq.cells)}
