"""Generator loss weights at an equal iteration budget: held-out PSNR/SSIM against baselines.

    .venv/bin/python benchmarks/generator_weights.py data/phantom256 --iters 1000 \\
        --config old='{"loss_weights": {"gan": 1, "feat": 10, "l1": 10, "gv": 1}, "ss_max": 0.5}' \\
        --config new='{}'

Each config is `NAME=JSON` of `GeneratorTrainOptions` fields; "loss_weights" holds
`LossWeights` fields. The defaults fill the rest. Every config trains from the same
seed on the cohort's train split; one report evaluates them all on the test split with
the two baselines. Prints the table, writes benchmarks/results/generator_weights.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from encoder.train import GeneratorTrainOptions, training_loop
from retrieval.data.cohort import Cohort
from retrieval.data.training_data import load_paired
from retrieval.evaluation.generation import evaluate_runs, generation_table

RESULTS = Path(__file__).parent / "results"


def parse_options(text: str, base: GeneratorTrainOptions) -> GeneratorTrainOptions:
    """`base` with the fields of a JSON object; its "loss_weights" replace base's weights."""
    fields = json.loads(text or "{}")
    weights = dataclasses.replace(base.loss_weights, **fields.pop("loss_weights", {}))
    return dataclasses.replace(base, loss_weights=weights, **fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort", type=Path)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--config", action="append", required=True, help="NAME=JSON")
    parser.add_argument("--runs", type=Path, default=RESULTS / "generator_weights")
    args = parser.parse_args()
    base = GeneratorTrainOptions(scale="tiny", iters=args.iters)
    configs = {}
    for item in args.config:
        name, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--config must be NAME=JSON, got {item!r}")
        try:
            configs[name] = parse_options(text, base)
        except (TypeError, ValueError) as e:
            parser.error(f"--config {name}: {e}")
    train = load_paired(Cohort.open(args.cohort), size=128, split="train")
    seconds = {}
    for name, options in configs.items():
        t0 = time.perf_counter()
        training_loop(options, run_dir=args.runs / name, data=train)
        seconds[name] = time.perf_counter() - t0
    report = evaluate_runs({n: args.runs / n for n in configs}, args.cohort)
    report["train_seconds"] = seconds
    report["configs"] = {n: args.config[i] for i, n in enumerate(configs)}
    print(generation_table(report))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generator_weights.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
