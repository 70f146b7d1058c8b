"""Relevance feedback: one round of a simulated clinician, before vs after.

For each held-out query case (its stored CF vector): the top 10 of the archive; every
result with the query's diagnosis marked positive, every other one negative; the search
run again with those marks (marked cases are left out of the new results). Precision@10
(the share of results with the query's diagnosis) before and after, for both strategies
of `retrieval.search.feedback` and each similarity.

No test label is used to tune: Rocchio's α/β/γ are chosen on the VAL queries against the
TRAIN cases; the TEST queries then search the archive (train + val). The marks of the
simulated clinician use each test query's diagnosis, as a clinician would know it.

    python benchmarks/feedback_bench.py --index indexes/c
    python benchmarks/feedback_bench.py --index indexes/c --targets cf ffa --quick

Prints a table and writes benchmarks/results/feedback_bench.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from retrieval.search.engine import Engine
from retrieval.search.feedback import DEFAULT_FEEDBACK, FEEDBACK_STRATEGIES, Rocchio

OUT = Path(__file__).parent / "results" / "feedback_bench.json"
BETAS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
GAMMAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def precision(hits, diagnosis: str) -> float:
    return float(np.mean([h.case.diagnosis == diagnosis for h in hits])) if hits else 0.0


def one_round(engine, case, target, gallery, similarity, k, strategy) -> tuple[float, float]:
    """(precision@k before, after one round of marks) for one query case."""
    flt = {"split": gallery}
    common = dict(filters=flt, similarity=similarity, suggestion=False)
    before = engine.search(case.case_id, target, k, **common).hits
    pos = [h.case.case_id for h in before if h.case.diagnosis == case.diagnosis]
    neg = [h.case.case_id for h in before if h.case.diagnosis != case.diagnosis]
    after = engine.search(
        case.case_id, target, k, **common, positive=pos, negative=neg, feedback=strategy
    ).hits
    return precision(before, case.diagnosis), precision(after, case.diagnosis)


def evaluate(engine, cases, target, gallery, similarity, k, strategy) -> dict:
    pairs = np.asarray(
        [one_round(engine, c, target, gallery, similarity, k, strategy) for c in cases]
    )
    before, after = pairs[:, 0], pairs[:, 1]
    return {
        "queries": len(cases),
        "before": round(float(before.mean()), 4),
        "after": round(float(after.mean()), 4),
        "gain": round(float((after - before).mean()), 4),
        "improved": int((after > before).sum()),
        "worse": int((after < before).sum()),
    }


def tune_rocchio(engine, val_cases, target, similarity, k, quick: bool) -> tuple[Rocchio, dict]:
    """α = 1; β, γ maximising VAL precision@k after one round (gallery: train cases)."""
    grid = list(itertools.product((0.5, 1.0, 2.0), (0.0, 0.5))) if quick else None
    grid = grid or list(itertools.product(BETAS, GAMMAS))
    scores = {}
    for beta, gamma in grid:
        r = Rocchio(1.0, beta, gamma)
        scores[(beta, gamma)] = evaluate(engine, val_cases, target, ["train"], similarity, k, r)
    best = max(scores, key=lambda bg: (scores[bg]["after"], -bg[0], -bg[1]))
    table = {f"beta={b},gamma={g}": v["after"] for (b, g), v in scores.items()}
    return Rocchio(1.0, *best), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", default="indexes/c")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--targets", nargs="+", default=["cf", "ffa"])
    parser.add_argument("--similarities", nargs="+", default=["clinical", "pair"])
    parser.add_argument("--quick", action="store_true", help="a smaller tuning grid")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    engine = Engine.open(args.index)
    all_cases = engine.cases(0, engine.case_count)[1]
    val = [c for c in all_cases if c.split == "val" and c.diagnosis]
    test = [c for c in all_cases if c.split == "test" and c.diagnosis]
    rows, t0 = [], time.perf_counter()
    for target, similarity in itertools.product(args.targets, args.similarities):
        tuned, grid = tune_rocchio(engine, val, target, similarity, args.k, args.quick)
        strategies = {"rocchio (default weights)": "rocchio", "rocchio (tuned on val)": tuned}
        strategies["best_score"] = "best_score"
        for name, strategy in strategies.items():
            res = evaluate(engine, test, target, ["train", "val"], similarity, args.k, strategy)
            rows.append(
                {
                    "task": f"CF->{target.upper()}",
                    "similarity": similarity,
                    "strategy": name,
                    **res,
                    "weights": None
                    if strategy == "best_score"
                    else vars(strategy if isinstance(strategy, Rocchio) else Rocchio()),
                    "val_grid": grid if strategy is tuned else None,
                }
            )
    head = f"{'task':8} {'similarity':10} {'strategy':26} {'before':>7} {'after':>7} {'gain':>7}"
    print(head + f" {'better':>6} {'worse':>6}")
    for r in rows:
        print(
            f"{r['task']:8} {r['similarity']:10} {r['strategy']:26} {r['before']:7.3f} "
            f"{r['after']:7.3f} {r['gain']:+7.3f} {r['improved']:6d} {r['worse']:6d}"
        )
    report = {
        "index": str(args.index),
        "encoder_id": engine.encoder_id,
        "k": args.k,
        "queries": "test split (stored CF vectors); gallery train + val; tuned on val vs train",
        "default_feedback": DEFAULT_FEEDBACK,
        "strategies": list(FEEDBACK_STRATEGIES),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
