"""The held-out split of an evaluation: it must exist, hold cases, and share no patient
with the training data of anything evaluated on it."""

from __future__ import annotations

from pathlib import Path

from retrieval.data.cohort import SPLITS, Cohort
from retrieval.errors import CohortError, Fundus2VideoError
from retrieval.models.generation import training_data_info


class SplitLeak(Fundus2VideoError):
    """An evaluation split shares patients with a run's training data."""


def check_split(cohort: Cohort, split: str) -> None:
    """Refuse a split name outside the data contract, or a split without cases."""
    if split not in SPLITS:
        raise CohortError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not cohort.cases(split):
        raise CohortError(f"{cohort.root}: no cases in split {split!r}")


def check_no_leak(run: str | Path, patient_ids: set[str], split: str) -> None:
    """Refuse an evaluation split that shares patients with the run's training data.

    `run` is a generator run or an embedder folder: both record their training patients.
    """
    recorded = training_data_info(run).get("patient_ids")
    if recorded is None:
        raise Fundus2VideoError(
            f"{run}: its training_options.json does not list the training patients, so "
            f"split {split!r} cannot be checked for leaks; retrain it with this version"
        )
    shared = patient_ids & set(recorded)
    if shared:
        raise SplitLeak(
            f"split {split!r} shares {len(shared)} patient(s) with the training data of {run} "
            f"(e.g. {', '.join(sorted(shared)[:3])}); evaluate on held-out patients"
        )
