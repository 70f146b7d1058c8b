"""Generator loss weights at an equal iteration budget: held-out PSNR/SSIM against baselines.

    .venv/bin/python benchmarks/generator_weights.py data/phantom256 --iters 1000 \\
        --config old='{"gan": 1, "feat": 10, "l1": 10, "gv": 1, "_loop": {"ss_max": 0.5}}' \\
        --config new='{}'

Each config is `NAME=JSON` of `LossWeights` fields (the defaults fill the rest) plus an
optional `_loop` dict of `training_loop` keywords. Every config trains from the same
seed on the cohort's train split; one report evaluates them all on the test split with
the two baselines. Prints the table, writes benchmarks/results/generator_weights.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from encoder.train import training_loop
from encoder.train.step import LossWeights
from retrieval.data.cohort import Cohort
from retrieval.data.training_data import load_paired
from retrieval.models.generation import evaluate_runs, generation_table

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort", type=Path)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--config", action="append", required=True, help="NAME=JSON")
    parser.add_argument("--runs", type=Path, default=RESULTS / "generator_weights")
    args = parser.parse_args()
    configs = {}
    for item in args.config:
        name, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--config must be NAME=JSON, got {item!r}")
        configs[name] = json.loads(text or "{}")
    train = load_paired(Cohort.open(args.cohort), size=128, split="train")
    seconds = {}
    for name, weights in configs.items():
        loop = dict(weights.pop("_loop", {}))
        t0 = time.perf_counter()
        training_loop(
            run_dir=args.runs / name,
            data=train,
            scale="tiny",
            iters=args.iters,
            loss_weights=LossWeights(**weights),
            **loop,
        )
        seconds[name] = time.perf_counter() - t0
    report = evaluate_runs({n: args.runs / n for n in configs}, args.cohort)
    report["train_seconds"] = seconds
    report["configs"] = {n: args.config[i] for i, n in enumerate(configs)}
    print(generation_table(report))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generator_weights.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
