"""The engine that joins data, model and index: cohorts, ingestion, query planning,
evaluation, the HTTP API and the CLI."""

from .cohort import CATALOG_SCHEMA, DIAGNOSES, SPLITS, Case, Cohort, hash_split, patient_split
from .errors import (
    CohortError,
    Fundus2VideoError,
    ManifestError,
    MediaTooLarge,
    UnreadableImage,
    UnreadableVideo,
)

__all__ = [
    "CATALOG_SCHEMA", "DIAGNOSES", "SPLITS", "Case", "Cohort", "CohortError",
    "Fundus2VideoError", "ManifestError", "MediaTooLarge", "UnreadableImage",
    "UnreadableVideo", "hash_split", "patient_split",
]  # fmt: skip
