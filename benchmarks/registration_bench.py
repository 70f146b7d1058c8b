"""CF↔FFA registration on phantom pairs: corner error before and after, speed, quality.

    .venv/bin/python benchmarks/registration_bench.py [--sizes 128 512] [--cases 50]

Each phantom pair is misregistered on purpose and knows by how much
(`PhantomCase.registration`). The corner error is the mean distance between the four
image corners mapped by the estimated and by the true CF → FFA transform ("before":
the identity, i.e. no registration). Each pair's FFA is also registered against another
patient's CF (a wrong pair), to see where `MIN_QUALITY` separates the two. Prints a
table and writes a JSON report. Targets: median corner error <= 1 px at 128 px and
<= 3 px at 512 px.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.atomic import atomic_write_text  # noqa: E402
from retrieval.data.phantom import phantom_case  # noqa: E402
from retrieval.data.registration import (  # noqa: E402
    MIN_QUALITY,
    corner_error,
    register_pair,
    similarity_matrix,
)

log = logging.getLogger("registration_bench")
TARGETS = {128: 1.0, 512: 3.0}  # median corner error, px


def true_matrix(case) -> np.ndarray:
    """The phantom's CF → FFA transform as a 2x3 matrix."""
    dx, dy, deg = case.registration  # about the field of view's centre
    return similarity_matrix(dx, dy, deg, case.fov_circle[:2])


def _quantiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
        "min": float(a.min()),
    }


LIFELIKE = {"aspect": 1.5, "shift": 0.05, "fov_deg": (30.0, 55.0), "circle": (0.9, 1.12)}


def bench(size: int, cases: int, seed: int, frames: int, framing: dict) -> dict:
    """Register `cases` phantom pairs at `size` px, and as many wrong pairs."""
    rendered = [phantom_case(seed, i, size=size, frames=frames, **framing) for i in range(cases)]
    before, after, seconds, quality, wrong_quality = [], [], [], [], []
    for i, case in enumerate(rendered):
        truth = true_matrix(case)
        t0 = time.perf_counter()
        reg = register_pair(case.cf, case.ffa, case.times_s)
        seconds.append(time.perf_counter() - t0)
        shape = case.ffa.shape[1:]
        before.append(corner_error(np.eye(3)[:2], truth, shape))
        after.append(corner_error(reg.matrix, truth, shape))
        quality.append(reg.quality)
        other = next(
            o
            for k in range(1, cases)
            if (o := rendered[(i + k * 7) % cases]).patient_id != case.patient_id
        )
        wrong_quality.append(register_pair(other.cf, case.ffa, case.times_s).quality)
    q, w = np.asarray(quality), np.asarray(wrong_quality)
    ok_after = [e for e, good in zip(after, q >= MIN_QUALITY, strict=True) if good]
    return {
        "size": size,
        "cases": cases,
        "before_px": _quantiles(before),
        "after_px": _quantiles(after),
        "s_per_pair": float(np.mean(seconds)),
        "quality": _quantiles(quality),
        "wrong_quality": _quantiles(wrong_quality),
        "true_ok_rate": float((q >= MIN_QUALITY).mean()),
        "wrong_ok_rate": float((w >= MIN_QUALITY).mean()),
        "ok_after_px": _quantiles(ok_after) if ok_after else None,
        "target_median_px": TARGETS.get(size),
        "per_pair": {
            "before_px": before,
            "after_px": after,
            "quality": quality,
            "wrong_quality": wrong_quality,
        },
    }


def _print(rows: list[dict]) -> None:
    print(
        f"{'size':>5} {'pairs':>5} {'before med':>10} {'p90':>6} {'after med':>9} {'p90':>6} "
        f"{'max':>6} {'s/pair':>6} {'q min':>6} {'wrong q max':>11} {'ok':>5} {'wrong ok':>8}"
    )
    for r in rows:
        b, a = r["before_px"], r["after_px"]
        print(
            f"{r['size']:>5} {r['cases']:>5} {b['median']:>10.2f} {b['p90']:>6.2f} "
            f"{a['median']:>9.2f} {a['p90']:>6.2f} {a['max']:>6.2f} {r['s_per_pair']:>6.2f} "
            f"{r['quality']['min']:>6.3f} {r['wrong_quality']['max']:>11.3f} "
            f"{r['true_ok_rate']:>5.2f} {r['wrong_ok_rate']:>8.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument(
        "--lifelike", action="store_true", help="3:2 frames, shifted circles, 30-55 degrees"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/registration_bench.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    for size in args.sizes:
        log.info("size %d: %d pairs", size, args.cases)
        framing = LIFELIKE if args.lifelike else {}
        rows.append(bench(size, args.cases, args.seed, args.frames, framing))
    _print(rows)
    report = {
        "benchmark": "registration",
        "min_quality": MIN_QUALITY,
        "seed": args.seed,
        "framing": LIFELIKE if args.lifelike else "square",
        "results": rows,
        "env": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    for r in rows:
        target = r["target_median_px"]
        if target is not None and r["after_px"]["median"] > target:
            log.warning(
                "size %d: median %.2f px > target %.1f", r["size"], r["after_px"]["median"], target
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
