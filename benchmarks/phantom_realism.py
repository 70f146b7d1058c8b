"""Phantom realism: the phantom's colour photos measured against real photos, same scale.

    .venv/bin/python benchmarks/phantom_realism.py [--cases 64] [--real DIR] [--baseline PATH]
        [--out PATH]

The real reference is scikit-image's fundus photo (`skimage.data.retina`, bundled
with the package) and its variations (`realism.photo_variations`: narrower fields,
exposure, gamma, white balance, soft focus, lower resolution, JPEG): only one real
photo ships with the installed packages, so its range is that of plausible
acquisitions of one eye. `--real DIR` adds every photo in DIR (png / jpg / tif, e.g.
a public fundus dataset you have) as a second reference, "real DIR", measured the
same way and reported beside the first, and "real (both)" pools every real photo;
nothing is downloaded. The phantom: `phantom_case(seed, i, size=512)` for the first
`--cases` cases. `--baseline` takes an earlier run's JSON (e.g. of the phantom before
a change) and shows its phantom column as "before". Prints the table and writes a JSON
report.
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
from retrieval.data.media import CF_SUFFIXES, read_cf  # noqa: E402
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


def _folder_rows(folder: Path) -> dict[str, dict[str, float]]:
    """Every photo in `folder` (by name) measured at scale."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in CF_SUFFIXES)
    if not paths:
        raise ValueError(f"--real {folder}: no photos ({', '.join(sorted(CF_SUFFIXES))})")
    return {
        p.name: measure_at_scale(read_cf(p)).as_dict()
        for p in tqdm(paths, desc="real photos", unit="photo")
    }


def _phantom_rows(seed: int, cases: int) -> list[dict]:
    rows = []
    for i in tqdm(range(cases), desc="phantom photos", unit="case"):
        case = phantom_case(seed, i, size=SCALE_PX, frames=2)
        rows.append({"index": i, "diagnosis": case.diagnosis, **measure(case.cf).as_dict()})
    return rows


def _fmt(d: dict[str, float] | None) -> str:
    return f"{d['min']:.3f}-{d['max']:.3f} ({d['median']:.3f})" if d else "-"


def _print_table(references: dict, before: dict | None, after: dict, insides: dict) -> None:
    """references / insides: reference name -> its summary / the phantom's share inside."""
    heads = [*references, "phantom before", "phantom after", *(f"in {r}" for r in insides)]
    print(f"{'metric':<14} " + " ".join(f"{h:>20}" for h in heads))
    for k in METRICS:
        b = before.get(k) if before else None
        cells = [_fmt(r[k]) for r in references.values()] + [_fmt(b), _fmt(after[k])]
        star = "*" if k in ONE_SIDED else " "
        shares = [f"{inside[k]:>19.0%}{star}" for inside in insides.values()]
        print(f"{k:<14} " + " ".join(f"{c:>20}" for c in cells) + " " + " ".join(shares))
    print("min-max (median); * inside: at most the real maximum (fainter is fine)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", type=Path, help="a folder of real photos: a second reference")
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
    if args.real is not None and not args.real.is_dir():
        p.error(f"--real {args.real} is not a folder")
    real_rows = _real_rows()
    real = _summary(list(real_rows.values()))
    folder_rows = _folder_rows(args.real) if args.real is not None else {}
    folder = f"real {args.real.name}" if folder_rows else None
    references = {"real (skimage retina)": real}
    if folder_rows:
        references[folder] = _summary(list(folder_rows.values()))
        references["real (both)"] = _summary([*real_rows.values(), *folder_rows.values()])
    rows = _phantom_rows(args.seed, args.cases)
    after = _summary(rows)
    insides = {name: _inside(rows, ref) for name, ref in references.items()}
    _print_table(references, before, after, insides)
    report = {
        "benchmark": "phantom_realism",
        "scale_px": SCALE_PX,
        "seed": args.seed,
        "real": real,
        "real_photos": real_rows,
        "phantom": after,
        "phantom_inside_real": insides["real (skimage retina)"],
        "real_folder": str(args.real) if args.real is not None else None,
        "real_folder_summary": references.get(folder),
        "real_folder_photos": folder_rows,
        "phantom_inside_real_folder": insides.get(folder),
        "real_both": references.get("real (both)"),
        "phantom_inside_real_both": insides.get("real (both)"),
        "phantom_before": before,
        "phantom_cases": rows,
        "env": {"python": platform.python_version(), "numpy": np.__version__},
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
