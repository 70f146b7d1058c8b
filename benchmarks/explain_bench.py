"""Match explanations on held-out phantom queries: faithfulness and where the maps point.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/explain_bench.py indexes/c \
        [--seed 1] [--queries 40] [--out benchmarks/results/explain.json]

Queries: the index's test split (the first --queries of them, catalog order); gallery: the
archive (train + val). For every query, (query modality, target) pair and similarity,
the top archive hit is explained (`Engine.explain`) and we record:

- faithfulness: the largest |sum of a side's region shares - the score the search
  reported| over both sides (the target: <= 1e-4), and the same for an FFA side's frames;
- pointing: whether the query's most contributing region (its own map, over its own
  photo or angiogram) holds a lesion pixel, against chance (the share of field-of-view
  regions that hold one), and the same for the optic disc and the large vessels. The
  lesion, disc and vessel masks come from re-rendering the phantom case from its seed
  and index (the case id is ph<seed>-<index>).
- the mean seconds per explanation (both sides run through the model, on this CPU).

Nothing is tuned here: the phase bounds and the decomposition are fixed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from retrieval.data.phantom.case import phantom_case
from retrieval.search.engine import CaseQuery, Engine

PAIRS = (("cf", "cf"), ("cf", "ffa"), ("ffa", "ffa"), ("ffa", "cf"))
ARCHIVE = {"split": ["train", "val"]}


def cell_masks(mask: np.ndarray, grid: int) -> np.ndarray:
    """(H, W) bool → (grid, grid) bool: a region holds at least one pixel of the mask."""
    h, w = mask.shape
    side = max(h, w)
    padded = np.zeros((side, side), bool)
    top, left = (side - h) // 2, (side - w) // 2
    padded[top : top + h, left : left + w] = mask
    cells = padded[: side - side % grid, : side - side % grid]
    step = cells.shape[0] // grid
    return cells.reshape(grid, step, grid, step).any(axis=(1, 3))


def truth(case_id: str, seed: int, grid: int) -> dict[str, np.ndarray]:
    """The phantom case's lesion, disc and vessel regions, and its field of view."""
    index = int(case_id.split("-")[1])
    case = phantom_case(seed, index, size=128, frames=2)
    if case.case_id != case_id:
        raise SystemExit(f"{case_id}: not phantom seed {seed} (rendered {case.case_id})")
    lesion = np.zeros_like(case.fov)
    for m in case.masks.values():
        lesion |= m
    vessels = case.anatomy["artery"] | case.anatomy["vein"]
    return {
        "lesion": cell_masks(lesion, grid),
        "disc": cell_masks(case.anatomy["disc"], grid),
        "vessel": cell_masks(vessels, grid),
        "fov": cell_masks(case.fov, grid),
    }


def measure(engine: Engine, queries: list[str], seed: int) -> list[dict]:
    rows = []
    for case_id in queries:
        cells = None
        for modality, target in PAIRS:
            for similarity in engine.similarities:
                query = CaseQuery(case_id, modality)
                hit = engine.search(query, target, 1, filters=ARCHIVE, similarity=similarity).hits[
                    0
                ]
                t = time.perf_counter()
                found = engine.explain(query, hit.case.case_id, similarity, target)
                seconds = time.perf_counter() - t
                if cells is None:
                    cells = truth(case_id, seed, found.grid)
                top = np.unravel_index(np.argmax(found.query.regions), found.query.regions.shape)
                frames = [s for s in (found.query, found.result) if s.frames]
                rows.append(
                    {
                        "query": case_id,
                        "pair": f"{modality}->{target}",
                        "similarity": similarity,
                        "score": hit.score,
                        "region_error": max(
                            abs(found.query.total - hit.score), abs(found.result.total - hit.score)
                        ),
                        "frame_error": max(
                            (
                                abs(sum(f["contribution"] for f in s.frames) - hit.score)
                                for s in frames
                            ),
                            default=0.0,
                        ),
                        "has_lesion": bool(cells["lesion"].any()),
                        **{
                            f"top_on_{k}": bool(cells[k][top]) for k in ("lesion", "disc", "vessel")
                        },
                        **{
                            f"chance_{k}": float(cells[k][cells["fov"]].mean())
                            for k in ("lesion", "disc", "vessel")
                        },
                        "seconds": seconds,
                    }
                )
    return rows


def summary(rows: list[dict]) -> list[dict]:
    frame = pl.DataFrame(rows)
    lesioned = pl.col("has_lesion")
    return (
        frame.group_by("pair", "similarity", maintain_order=True)
        .agg(
            n=pl.len(),
            max_region_error=pl.col("region_error").max(),
            max_frame_error=pl.col("frame_error").max(),
            top_on_lesion=pl.col("top_on_lesion").filter(lesioned).mean(),
            chance_lesion=pl.col("chance_lesion").filter(lesioned).mean(),
            top_on_disc=pl.col("top_on_disc").mean(),
            chance_disc=pl.col("chance_disc").mean(),
            top_on_vessel=pl.col("top_on_vessel").mean(),
            chance_vessel=pl.col("chance_vessel").mean(),
            seconds=pl.col("seconds").mean(),
        )
        .to_dicts()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("index", type=Path)
    ap.add_argument("--seed", type=int, default=1, help="The phantom cohort's seed.")
    ap.add_argument("--queries", type=int, default=40, help="Test queries (catalog order).")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/explain.json"))
    args = ap.parse_args()
    engine = Engine.open(args.index)
    catalog = pl.read_parquet(args.index / "catalog.parquet")
    queries = catalog.filter(pl.col("split") == "test")["case_id"].to_list()[: args.queries]
    rows = measure(engine, queries, args.seed)
    table = summary(rows)
    head = f"{'pair':<9}{'similarity':<10}{'n':>4}{'max err':>10}{'frame err':>10}"
    head += f"{'lesion':>8}{'chance':>8}{'disc':>7}{'chance':>8}{'vessel':>8}{'chance':>8}{'s':>6}"
    print(head)
    for r in table:
        print(
            f"{r['pair']:<9}{r['similarity']:<10}{r['n']:>4}{r['max_region_error']:>10.1e}"
            f"{r['max_frame_error']:>10.1e}{r['top_on_lesion']:>8.2f}{r['chance_lesion']:>8.2f}"
            f"{r['top_on_disc']:>7.2f}{r['chance_disc']:>8.2f}{r['top_on_vessel']:>8.2f}"
            f"{r['chance_vessel']:>8.2f}{r['seconds']:>6.2f}"
        )
    worst = max(r["max_region_error"] for r in table)
    verdict = "met" if worst <= 1e-4 else "MISSED"
    print(f"largest region-sum error {worst:.2e} (target <= 1e-4: {verdict})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"index": str(args.index), "queries": len(queries), "summary": table, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
