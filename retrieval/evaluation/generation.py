"""Generation metrics on held-out patients: each run and the two baselines on the same
frames (`encoder.evaluate.evaluate_generation`), the report's table, the report file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from encoder import create_generator, evaluate_generation, read_checkpoint_config
from encoder.evaluate import VIDEO_METRICS
from index.atomic import atomic_write_text
from retrieval.data.cohort import Cohort
from retrieval.data.training_data import load_paired
from retrieval.evaluation.held_out import check_no_leak, check_split


def evaluate_runs(
    runs: dict[str, str | Path],
    cohort: str | Path,
    *,
    split: str = "test",
    i3d_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generation metrics of each run and the two baselines on the same held-out frames."""
    opened = Cohort.open(cohort)
    check_split(opened, split)
    first = next(iter(runs.values()))
    size = read_checkpoint_config(first)["model"]["generator"]["image_size"]
    test = load_paired(opened, size=size, split=split, progress=progress)
    for run in runs.values():
        check_no_leak(run, set(test.patient_ids), split)
    train = load_paired(opened, size=size, split="train", frames=test.frames, progress=progress)
    models = {name: create_generator(run) for name, run in runs.items()}
    report = evaluate_generation(models, test, train, i3d_path=i3d_path)
    report["split"] = split
    report["cohort"] = str(opened.root)
    report["runs"] = {
        name: {"path": str(run), "training": read_checkpoint_config(run).get("training")}
        for name, run in runs.items()
    }
    return report


def generation_table(report: dict[str, Any]) -> str:
    """The report's rows as a text table (models, then baselines); a metric a row lacks
    (a report written before it existed) shows as `-`."""
    cols = (*VIDEO_METRICS, report["distribution_metric"])
    lines = [f"{'':<12}{'name':<20}" + "".join(f"{c:>14}" for c in cols)]
    for group in ("models", "baselines"):
        for name, row in report[group].items():
            cells = "".join(f"{row[c]:>14.4f}" if c in row else f"{'-':>14}" for c in cols)
            lines.append(f"{group[:-1]:<12}{name:<20}{cells}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """The report as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
