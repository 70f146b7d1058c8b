"""Phantom throughput: cases/s end to end (render + PNG + MP4 + catalog) in one process.

    .venv/bin/python benchmarks/phantom_bench.py [--sizes 128 512] [--out PATH]

Prints a table and writes a JSON report. Target: >= 20 cases/s at 128 px / 16 frames
on one core.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.data.media_write import mp4_bytes, png_bytes  # noqa: E402
from retrieval.data.phantom import phantom_case, write_phantom_cohort  # noqa: E402

log = logging.getLogger("phantom_bench")
TARGET_128 = 20.0


def _stage_times(size: int, frames: int, seed: int, n: int) -> dict[str, float]:
    """Mean seconds per case of each stage, on the first n cases."""
    render = png = mp4 = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        case = phantom_case(seed, i, size=size, frames=frames)
        t1 = time.perf_counter()
        png_bytes(case.cf)
        t2 = time.perf_counter()
        mp4_bytes(case.ffa)
        t3 = time.perf_counter()
        render, png, mp4 = render + t1 - t0, png + t2 - t1, mp4 + t3 - t2
    return {"render_ms": 1e3 * render / n, "png_ms": 1e3 * png / n, "mp4_ms": 1e3 * mp4 / n}


def bench(size: int, frames: int, cases: int, seed: int, repeats: int) -> dict:
    """Best-of-`repeats` end-to-end cohort write, plus a per-stage breakdown."""
    phantom_case(seed, 0, size=size, frames=frames)  # warm imports and caches
    walls = []
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_phantom_cohort(
                Path(tmp) / f"c{r}",
                cases=cases,
                size=size,
                frames=frames,
                seed=seed,
                workers=1,
                progress=False,
            )
            walls.append(time.perf_counter() - t0)
    best = min(walls)
    return {
        "size": size,
        "frames": frames,
        "cases": cases,
        "workers": 1,
        "wall_s": [round(w, 3) for w in walls],
        "cases_per_s": cases / best,
        "ms_per_case": 1e3 * best / cases,
        **_stage_times(size, frames, seed, min(cases, 20)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--cases", type=int, default=200, help="cases at 128 px (scaled by area)")
    p.add_argument("--min-cases", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/phantom_bench.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    for size in args.sizes:
        n = max(args.min_cases, int(args.cases * (128 / size) ** 2))
        log.info("size %d: %d cases x %d repeats", size, n, args.repeats)
        rows.append(bench(size, args.frames, n, args.seed, args.repeats))
    print(
        f"{'size':>5} {'frames':>6} {'cases':>5} {'cases/s':>8} {'ms/case':>8} "
        f"{'render':>7} {'png':>6} {'mp4':>6}"
    )
    for r in rows:
        print(
            f"{r['size']:>5} {r['frames']:>6} {r['cases']:>5} {r['cases_per_s']:>8.1f} "
            f"{r['ms_per_case']:>8.1f} {r['render_ms']:>7.1f} {r['png_ms']:>6.1f} "
            f"{r['mp4_ms']:>6.1f}"
        )
    report = {
        "benchmark": "phantom",
        "target_cases_per_s_128": TARGET_128,
        "results": rows,
        "env": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    small = [r for r in rows if r["size"] == 128 and r["frames"] == 16]
    if small and small[0]["cases_per_s"] < TARGET_128:
        log.warning(
            "below target: %.1f < %.1f cases/s at 128 px", small[0]["cases_per_s"], TARGET_128
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
