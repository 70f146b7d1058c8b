"""Phantom realism: the phantom's colour photos measured against real photos, same scale.

    .venv/bin/python benchmarks/phantom_realism.py [--cases 64] [--baseline PATH] [--out PATH]

The real reference is scikit-image's fundus photo (`skimage.data.retina`, bundled
with the package) and its variations (`realism.photo_variations`: narrower fields,
exposure, gamma, white balance, soft focus, lower resolution, JPEG): only one real
photo ships with the installed packages, so its range is that of plausible
acquisitions of one eye. The phantom: `phantom_case(seed, i, size=512)` for the
first `--cases` cases. `--baseline` takes an earlier run's JSON (e.g. of the phantom
before a change) and shows its phantom column as "before". Prints the table and
writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.atomic import atomic_write_text  # noqa: E402
from retrieval.data.phantom import phantom_case  # noqa: E402
from retrieval.data.phantom.realism import (  # noqa: E402
    METRICS,
    SCALE_PX,
    measure,
    measure_at_scale,
    photo_variations,
)

log = logging.getLogger("phantom_realism")
ONE_SIDED = {"pale_pattern"}  # fainter than the real photo is fine: at most its maximum


def _summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for k in METRICS:
        a = np.array([r[k] for r in rows])
        out[k] = {"min": a.min(), "median": np.median(a), "max": a.max(), "n": len(a)}
    return {k: {s: float(v) for s, v in d.items()} for k, d in out.items()}


def _inside(rows: list[dict[str, float]], real: dict[str, dict[str, float]]) -> dict:
    """metric -> fraction of phantom photos inside the real range (pale: at most its max)."""
    out = {}
    for k in METRICS:
        lo = -np.inf if k in ONE_SIDED else real[k]["min"]
        out[k] = float(np.mean([lo <= r[k] <= real[k]["max"] for r in rows]))
    return out


def _real_rows() -> dict[str, dict[str, float]]:
    from skimage.data import retina

    return {
        name: measure_at_scale(img).as_dict() for name, img in photo_variations(retina()).items()
    }


def _phantom_rows(seed: int, cases: int) -> list[dict]:
    rows = []
    for i in tqdm(range(cases), desc="phantom photos", unit="case"):
        case = phantom_case(seed, i, size=SCALE_PX, frames=2)
        rows.append({"index": i, "diagnosis": case.diagnosis, **measure(case.cf).as_dict()})
    return rows


def _fmt(d: dict[str, float] | None) -> str:
    return f"{d['min']:.3f}-{d['max']:.3f} ({d['median']:.3f})" if d else "-"


def _print_table(real: dict, before: dict | None, after: dict, inside: dict) -> None:
    head = ("metric", "real", "phantom before", "phantom after", "after inside")
    print(f"{head[0]:<14} {head[1]:>20} {head[2]:>20} {head[3]:>20} {head[4]:>13}")
    for k in METRICS:
        b = before.get(k) if before else None
        print(
            f"{k:<14} {_fmt(real[k]):>20} {_fmt(b):>20} {_fmt(after[k]):>20} "
            f"{inside[k]:>12.0%}{'*' if k in ONE_SIDED else ' '}"
        )
    print("min-max (median); * inside: at most the real maximum (fainter is fine)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", type=Path, help="an earlier run's JSON: its phantom is 'before'")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/phantom_realism.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cases < 1:
        p.error(f"--cases must be at least 1, got {args.cases}")
    before = None
    if args.baseline is not None:
        if not args.baseline.is_file():
            p.error(f"--baseline {args.baseline} is not a file")
        before = json.loads(args.baseline.read_text())["phantom"]
    real_rows = _real_rows()
    real = _summary(list(real_rows.values()))
    rows = _phantom_rows(args.seed, args.cases)
    after = _summary(rows)
    inside = _inside(rows, real)
    _print_table(real, before, after, inside)
    report = {
        "benchmark": "phantom_realism",
        "scale_px": SCALE_PX,
        "seed": args.seed,
        "real": real,
        "real_photos": real_rows,
        "phantom": after,
        "phantom_inside_real": inside,
        "phantom_before": before,
        "phantom_cases": rows,
        "env": {"python": platform.python_version(), "numpy": np.__version__},
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
