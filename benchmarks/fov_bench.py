"""Field-of-view detection (`encoder.fov`) on phantom cases framed like a real cohort.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fov_bench.py [--cases 1000] [--size 128] \
        [--seed 7] [--out benchmarks/results/fov.json]

Each phantom case is rendered in a 3:2 frame (black sides) with a field of view drawn
from 30-55 degrees, its circle's diameter 0.9-1.12 x the frame height (above 1: cut at
the top and bottom) and its centre shifted by up to 0.06 x the height; the case knows
its true circle (`PhantomCase.fov_circle`). Rows: the CF photo; the same photo darkened
to a fifth; with a black notch on the circle's edge and white text burned into two
corners; the FFA video (one circle over its frames, the first before the dye). For each:
the share of cases whose centre and radius are both within 2 % of the frame height, the
median and largest centre and radius errors (% of the height) and the time per image.
Target: >= 99 % within 2 %. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import finish_report, report_header  # noqa: E402
from encoder.fov import FovCircle, detect_fov, detect_video_fov  # noqa: E402
from retrieval.data.phantom import PhantomCase, phantom_case  # noqa: E402

FRAMING = {"aspect": 1.5, "fov_deg": (30.0, 55.0), "circle": (0.9, 1.12), "shift": 0.06}
TOLERANCE = 0.02  # of the frame height


def dark(case: PhantomCase) -> np.ndarray:
    return (case.cf.astype(np.float32) * 0.2).astype(np.uint8)


def marked(case: PhantomCase) -> np.ndarray:
    """The photo with a black notch on the circle's edge and white text in two corners."""
    img = Image.fromarray(case.cf)
    draw = ImageDraw.Draw(img)
    cx, cy, r = case.fov_circle
    h, w = case.cf.shape[:2]
    a = np.radians(37 * int(case.case_id.rsplit("-", 1)[-1]) % 360)  # a different place each
    nx, ny, n = cx + r * np.cos(a), cy + r * np.sin(a), max(2, h // 24)
    draw.rectangle([nx - n, ny - n, nx + n, ny + n], fill=(0, 0, 0))
    draw.rectangle([0, 0, w // 5, h // 12], fill=(255, 255, 255))
    draw.text((w - w // 6, h - h // 8), "OD 45", fill=(255, 255, 255))
    return np.asarray(img)


ROWS: dict[str, Callable[[PhantomCase], FovCircle]] = {
    "cf": lambda c: detect_fov(c.cf),
    "cf dark (x0.2)": lambda c: detect_fov(dark(c)),
    "cf notch + text": lambda c: detect_fov(marked(c)),
    "ffa video": lambda c: detect_video_fov(c.ffa),
}


def errors(found: FovCircle, truth: tuple[float, float, float], height: int) -> tuple[float, float]:
    """(centre error, radius error) as shares of the frame height."""
    cx, cy, r = truth
    return float(np.hypot(found.cx - cx, found.cy - cy)) / height, abs(found.r - r) / height


def summary(errs: list[tuple[float, float]], seconds: float) -> dict:
    e = np.asarray(errs)
    return {
        "cases": len(e),
        "within_2pct": float(np.mean(e.max(axis=1) <= TOLERANCE)),
        "centre_err_pct_median": float(100 * np.median(e[:, 0])),
        "centre_err_pct_max": float(100 * e[:, 0].max()),
        "radius_err_pct_median": float(100 * np.median(e[:, 1])),
        "radius_err_pct_max": float(100 * e[:, 1].max()),
        "ms_per_image": 1000 * seconds / len(e),
    }


def bench(cases: int, size: int, seed: int, frames: int) -> dict:
    errs: dict[str, list[tuple[float, float]]] = {name: [] for name in ROWS}
    spent = dict.fromkeys(ROWS, 0.0)
    cut = 0
    for i in range(cases):
        case = phantom_case(seed, i, size=size, frames=frames, **FRAMING)
        cut += case.fov_circle[1] - case.fov_circle[2] < -0.5
        for name, detect in ROWS.items():
            t = time.perf_counter()
            found = detect(case)
            spent[name] += time.perf_counter() - t
            errs[name].append(errors(found, case.fov_circle, size))
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{cases}", file=sys.stderr)
    return {
        "cut_at_top": cut,
        "rows": {name: summary(errs[name], spent[name]) for name in ROWS},
    }


def table(report: dict) -> str:
    lines = [
        f"FOV detection: {report['cases']} phantom cases, {report['size']} px high, 3:2, "
        f"30-55 deg, circle 0.9-1.12 x height, shift <= 0.06 ({report['cut_at_top']} cut)",
        f"{'row':<18}{'cases':>6}{'<=2%':>8}{'centre med':>12}{'max':>8}"
        f"{'radius med':>12}{'max':>8}{'ms':>7}",
    ]
    for name, r in report["rows"].items():
        lines.append(
            f"{name:<18}{r['cases']:>6}{100 * r['within_2pct']:>7.1f}%"
            f"{r['centre_err_pct_median']:>11.3f}%{r['centre_err_pct_max']:>7.2f}%"
            f"{r['radius_err_pct_median']:>11.3f}%{r['radius_err_pct_max']:>7.2f}%"
            f"{r['ms_per_image']:>7.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--size", type=int, default=128, help="frame height, pixels")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fov.json"))
    args = ap.parse_args()
    started = time.time()
    report = {
        **report_header("fov", started),
        "cases": args.cases,
        "size": args.size,
        "framing": FRAMING,
        **bench(args.cases, args.size, args.seed, args.frames),
    }
    finish_report(report, started, table(report), args.out)


if __name__ == "__main__":
    main()
