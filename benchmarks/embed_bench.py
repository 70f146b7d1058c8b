"""Embedding throughput (`embed_cohort`, and `index --ray`) and what precision costs.

    .venv/bin/python benchmarks/embed_bench.py RUN COHORT [--precision float32,bfloat16] \
        [--ray-workers 1,2] [--repeat 1] [--out benchmarks/results/embed.json]

For each precision: cases/s of the single-process path over every case of COHORT (one
CF photo and its FFA video each: decoding, the field-of-view crop, the backbone, the
heads), the best of `--repeat` passes; then, against the float32 vectors, the largest
difference, the smallest cosine and how many of each CF query's 10 nearest FFA vectors
(all cases) stay the same. With `--ray-workers`, the Ray Data path on a local Ray with
this machine's CPUs, each count of embedding actors sharing them, and its largest
difference from the single-process vectors of the same precision. Prints a table, writes
JSON. Time it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import finish_report, report_header  # noqa: E402
from retrieval.data.cohort import Cohort  # noqa: E402
from retrieval.models.embedding import QueryEncoder, embed_cohort  # noqa: E402


def single_process(run: Path, cohort: Cohort, precision: str, repeat: int):
    encoder = QueryEncoder.open(run, precision=precision)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        _, cf, ffa = embed_cohort(encoder, cohort, progress=False)
        best = min(best, time.perf_counter() - start)
    return encoder, len(cf) / best, cf, ffa


def top10_agreement(cf: np.ndarray, ffa: np.ndarray, ref_cf: np.ndarray, ref_ffa: np.ndarray):
    """Mean share of each CF query's 10 nearest FFA vectors that both embeddings share."""

    def top(q, g):
        return np.argsort(-(q @ g.T), axis=1)[:, :10]

    a, b = top(cf, ffa), top(ref_cf, ref_ffa)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b, strict=True)]))


def ray_rows(encoder, cohort, workers: list[int], cf, ffa) -> list[dict]:
    import os

    import ray

    from retrieval.models.ray_embedding import RayOptions, embed_cohort_ray

    cpus = os.cpu_count() or 1
    rows = []
    for n in workers:
        options = RayOptions(workers=n, cpus_per_worker=max(1.0, cpus // n))
        ray.init(num_cpus=cpus + 1, log_to_driver=False, logging_level="WARNING")
        try:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as shards:
                got_cf, got_ffa = embed_cohort_ray(
                    encoder, cohort, Path(shards), options, progress=False
                )
            seconds = time.perf_counter() - start
        finally:
            ray.shutdown()
        diff = max(np.abs(got_cf - cf).max(), np.abs(got_ffa - ffa).max())
        rows.append(
            {
                "workers": n,
                "cpus_per_worker": options.cpus_per_worker,
                "cases_per_s": len(cf) / seconds,
                "max_abs_diff": float(diff),
            }
        )
    return rows


def bench(args) -> dict:
    cohort = Cohort.open(args.cohort)
    rows, ref, encoder = [], None, None
    for precision in args.precision.split(","):
        encoder, rate, cf, ffa = single_process(args.run, cohort, precision, args.repeat)
        row = {"precision": precision, "cases_per_s": rate}
        if ref is None:
            ref = (cf, ffa)
        else:
            row["max_abs_diff"] = float(max(np.abs(cf - ref[0]).max(), np.abs(ffa - ref[1]).max()))
            row["min_cosine"] = float(min((cf * ref[0]).sum(1).min(), (ffa * ref[1]).sum(1).min()))
            row["cf2ffa_top10_agreement"] = top10_agreement(cf, ffa, *ref)
        rows.append(row)
    out = {"cases": len(cohort), "single_process": rows}
    if args.ray_workers:
        workers = [int(n) for n in args.ray_workers.split(",")]
        out["ray"] = ray_rows(encoder, cohort, workers, cf, ffa)
        out["ray_precision"] = encoder.precision
    return out


def table(report: dict) -> str:
    lines = [f"embedding: {report['cases']} cases ({report['date']})", ""]
    lines.append(f"{'precision':<10} {'cases/s':>8} {'max|diff|':>10} {'min cos':>8} {'top10':>6}")
    for r in report["single_process"]:
        diff, cos, agree = (
            r.get(k) for k in ("max_abs_diff", "min_cosine", "cf2ffa_top10_agreement")
        )
        lines.append(
            f"{r['precision']:<10} {r['cases_per_s']:>8.2f} "
            + (f"{diff:>10.4f} {cos:>8.4f} {agree:>6.3f}" if diff is not None else f"{'(ref)':>10}")
        )
    for r in report.get("ray", []):
        lines.append(
            f"ray ({report['ray_precision']}) {r['workers']} worker(s) x {r['cpus_per_worker']:g} "
            f"CPU: {r['cases_per_s']:.2f} cases/s, max|diff| {r['max_abs_diff']:.1e}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("cohort", type=Path)
    ap.add_argument("--precision", default="float32,bfloat16")
    ap.add_argument("--ray-workers", default="", help="e.g. 1,2 (needs the scale extra)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/embed.json"))
    args = ap.parse_args()
    started = time.time()
    report = {
        **report_header("embed", started),
        **bench(args),
    }
    finish_report(report, started, table(report), args.out)


if __name__ == "__main__":
    main()
