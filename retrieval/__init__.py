"""The engine that joins data, models and index.

Subpackages: `data` (cohorts, media, ingestion, the phantom), `models` (generator and
embedder jobs), `search` (the engine), `evaluation` (held-out reports), `api` (the HTTP
service) and `apps` (the CLI and the demo). docs/architecture.md gives the layers.
"""

from retrieval.data.cohort import (
    CATALOG_SCHEMA,
    DIAGNOSES,
    SPLITS,
    Case,
    Cohort,
    hash_split,
    patient_split,
)

from .errors import (
    CohortError,
    Fundus2VideoError,
    ManifestError,
    MediaTooLarge,
    UnreadableImage,
    UnreadableVideo,
)

__all__ = [
    "CATALOG_SCHEMA",
    "DIAGNOSES",
    "SPLITS",
    "Case",
    "Cohort",
    "CohortError",
    "Fundus2VideoError",
    "ManifestError",
    "MediaTooLarge",
    "UnreadableImage",
    "UnreadableVideo",
    "hash_split",
    "patient_split",
]
