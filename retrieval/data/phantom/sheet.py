"""Contact sheets: one row per case, the colour photo beside FFA frames at set phases."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from retrieval.data.cohort import DIAGNOSES
from retrieval.data.media_write import write_png

from .case import PhantomCase, check_params, phantom_case
from .meta import case_meta, check_seed

log = logging.getLogger(__name__)
PHASES_S = (18.0, 25.0, 45.0, 600.0)  # arterial, arteriovenous, venous, late (typical eye)
PHASE_NAMES = ("arterial", "AV", "venous", "late")
CASE_PHASES = ("arterial", "laminar", "venous")  # keys of PhantomCase.phases_s, then 600 s
LABEL_H = 14  # pixels of the caption band above each row
GAP = 2


def _case_phases(case: PhantomCase) -> list[float]:
    """The case's own phase onsets (its dye arrives 8-15 s after injection), else typical times."""
    if not all(k in case.phases_s for k in CASE_PHASES):
        return list(PHASES_S)
    return [
        case.phases_s["arterial"] + 0.5,
        case.phases_s["laminar"] + 0.5,
        case.phases_s["venous"] + 10.0,
        600.0,
    ]


def contact_sheet(cases: list[PhantomCase], phases_s: Sequence[float] | None = None) -> np.ndarray:
    """(H, W, 3) uint8: per case a row of CF | FFA nearest each phase, captioned.

    `phases_s` fixes the times for every row; by default each row uses its case's own
    arterial, arteriovenous (laminar), venous and late times.
    """
    if not cases:
        raise ValueError("cases must not be empty")
    size = cases[0].cf.shape[0]
    if any(c.cf.shape[0] != size for c in cases):
        raise ValueError("all cases of a contact sheet must have the same size")
    n_cols = len(PHASE_NAMES) if phases_s is None else len(phases_s)
    names = PHASE_NAMES if n_cols == len(PHASE_NAMES) else [""] * n_cols
    cols = 1 + n_cols
    width = cols * size + (cols - 1) * GAP
    row_h = LABEL_H + size
    sheet = Image.new("RGB", (width, len(cases) * (row_h + GAP) - GAP), (16, 16, 16))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, case in enumerate(cases):
        y = r * (row_h + GAP)
        caption = f"{case.diagnosis}  {case.eye} {case.age}{case.sex}  {case.case_id}"
        draw.text((2, y + 1), caption, fill=(235, 235, 235), font=font)
        sheet.paste(Image.fromarray(case.cf), (0, y + LABEL_H))
        for k, t in enumerate(_case_phases(case) if phases_s is None else phases_s):
            i = int(np.argmin(np.abs(case.times_s - t)))
            x = (k + 1) * (size + GAP)
            sheet.paste(Image.fromarray(case.ffa[i]).convert("RGB"), (x, y + LABEL_H))
            label = f"{names[k]} {case.times_s[i]:.0f}s".strip()
            draw.text((x + 2, y + LABEL_H + 1), label, fill=(255, 255, 160), font=font)
    return np.asarray(sheet)


def first_of_each(
    seed: int, diagnoses: Sequence[str] = DIAGNOSES, limit: int = 10_000
) -> list[int]:
    """Indices of the first case of each diagnosis in cohort `seed` (metadata only)."""
    want = list(diagnoses)
    found: dict[str, int] = {}
    for i in range(limit):
        d = case_meta(seed, i).diagnosis
        if d in want and d not in found:
            found[d] = i
            if len(found) == len(want):
                break
    return [found[d] for d in want if d in found]


def write_preview(
    path: str | Path, *, seed: int = 0, size: int = 128, frames: int = 16
) -> np.ndarray:
    """Write a contact sheet PNG with the first case of each diagnosis; return it."""
    check_params(size, frames)
    check_seed(seed)
    cases = [phantom_case(seed, i, size=size, frames=frames) for i in first_of_each(seed)]
    sheet = contact_sheet(cases)
    write_png(path, sheet)
    log.info("phantom preview: %s (%d rows)", path, len(cases))
    return sheet
