"""What a search takes and gives: queries, results, filters, and reciprocal-rank fusion.

Plain data and pure functions (no index, no model), shared by `retrieval.search.engine`, the
API and the evaluation. `retrieval.search.engine` re-exports them, and the similarity
rules of `retrieval.models.similarity`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.data.cohort import EYES, SPLITS, Case
from retrieval.errors import QueryError

if TYPE_CHECKING:
    from retrieval.models.suggestion import Suggestion, SuggestionModel

MODALITIES = ("cf", "ffa")
TARGETS = ("cf", "ffa", "both")
VIAS = ("direct", "synthesis", "fused")
RRF_K = 60  # the constant of reciprocal-rank fusion (Cormack et al. 2009)
FILTER_KEYS = {"diagnosis": "diagnosis", "eye": "eye", "split": "split", "lesion": "lesions"}
SUGGESTION_LABEL = "suggestion from similar cases (decision support, not a diagnosis)"


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class CFQuery:
    image: np.ndarray  # uint8 (H, W, 3)


@dataclass(frozen=True)
class FFAQuery:
    frames: np.ndarray  # uint8 (T, H, W)
    times_s: Sequence[float] | None = None


@dataclass(frozen=True)
class CaseQuery:
    case_id: str
    modality: str = "cf"  # which of the case's embeddings queries


Query = CFQuery | FFAQuery | CaseQuery


def as_query(query: Query | str | np.ndarray) -> Query:
    """A query object. A bare string is a case id (queried by its CF embedding); a uint8
    array (H, W, 3) is a CF photo, (T, H, W) an FFA video of unknown frame times."""
    if isinstance(query, str):
        return CaseQuery(query)
    if isinstance(query, CFQuery | FFAQuery | CaseQuery):
        return query
    if isinstance(query, np.ndarray) and query.ndim == 3:
        return CFQuery(query) if query.shape[2] == 3 else FFAQuery(query)
    raise TypeError(
        f"a query is CFQuery, FFAQuery, CaseQuery, a case id or a (H, W, 3) / (T, H, W) array, "
        f"got {type(query).__name__}"
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class CaseInfo(Case):
    """One catalog row as the engine serves it: a `Case` (media paths resolved against
    the index folder) and its row id."""

    row_id: int
    added: bool  # media stored in the index folder (added through the engine)


@dataclass(slots=True)
class Hit:
    rank: int  # 1 = best
    score: float  # the similarity's cosine (direct, synthesis) or RRF score (fused)
    modality: str  # the index the hit came from
    case: CaseInfo
    # a region query: the part of the hit's CF photo that matched (normalised x0, y0, x1,
    # y1) and that window's own cosine with the query's box (`retrieval.search.region`)
    region: tuple[float, float, float, float] | None = None
    region_score: float | None = None
    # a vessel-checked pair search: how well the query's vessels lie on this case's, 0-1
    # (`retrieval.search.vessels`); the hits are ordered by score + VESSEL_WEIGHT x this
    vessel_match: float | None = None


@dataclass(frozen=True)
class SyntheticQuery:
    """The FFA video synthesized from a CF query: frames marked SYNTHETIC, never a real one."""

    frames: np.ndarray  # uint8 (T, S, S), the label burned in
    times_s: np.ndarray  # (T,)
    synthetic: bool = True


@dataclass
class SearchResult:
    hits: list[Hit]
    target: str
    via: str
    k: int
    query: dict[str, Any]  # kind, modality, case_id, similarity
    filters: dict[str, tuple[str, ...]]
    score_kind: str  # cosine | rrf
    candidates: int  # items of the target index(es) the filters allow
    synthetic: SyntheticQuery | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    similarity: str = "pair"  # how the hits were scored (SIMILARITIES)
    # the diagnosis suggested by the query's nearest labelled cases (decision support),
    # and the model that made it; None when the index has no model for the modality
    suggestion: Suggestion | None = None
    suggestion_model: SuggestionModel | None = None
    vessel_checked: bool = False  # a pair search re-ranked by the vessel check


def suggestion_record(result: SearchResult) -> dict[str, Any] | None:
    """The search's diagnosis suggestion as the API's `DiagnosisSuggestion` (None: none)."""
    if result.suggestion is None:
        return None
    s, model = result.suggestion, result.suggestion_model
    return {
        "diagnosis": s.diagnosis,
        "probability": float(s.probability),
        "abstained": bool(s.abstained),
        "probabilities": {str(d): float(p) for d, p in s.probabilities.items()},
        "supporting_case_ids": list(s.supporting_case_ids),
        "neighbours": int(s.neighbours),
        "calibrated": bool(model is not None and model.calibrated),
        "label": SUGGESTION_LABEL,
    }


@dataclass(frozen=True)
class NewCase:
    """Metadata of a case to add: the catalog fields except the media (they come as arrays)."""

    case_id: str
    patient_id: str | None = None  # default: the case id
    eye: str | None = None
    age: int | None = None
    sex: str | None = None
    diagnosis: str | None = None
    lesions: tuple[str, ...] = ()
    split: str = "train"
    ffa_times_s: tuple[float, ...] | None = None
    source: str = "api"


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Any]], k: int = RRF_K
) -> list[tuple[Any, float]]:
    """Fuse rankings (each a sequence of ids, best first) by Σ 1 / (k + rank), rank from 1.

    An id repeated within one ranking counts at its first place only. Returns every id
    with its fused score, best first; ties keep the order in which ids first appear
    (ranking by ranking).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    scores: dict[Any, float] = {}
    for ranking in rankings:
        seen = set()
        for rank, item in enumerate(ranking, start=1):
            if item in seen:
                continue
            seen.add(item)
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    order = {item: i for i, item in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def normalize_filters(filters: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """`{"diagnosis": "PDR", "eye": ["OD"]}` → sorted value tuples; None/empty values dropped."""
    out: dict[str, tuple[str, ...]] = {}
    for key, value in (filters or {}).items():
        if key not in FILTER_KEYS:
            raise QueryError(f"unknown filter {key!r}; filters are {', '.join(FILTER_KEYS)}")
        if value is None:
            continue
        values = [value] if isinstance(value, str) else list(value)
        values = sorted({str(v) for v in values if v is not None and str(v) != ""})
        if not values:
            continue
        allowed = {"eye": EYES, "split": SPLITS}.get(key)
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise QueryError(f"filter {key}={bad[0]!r} is not one of {', '.join(allowed)}")
        out[key] = tuple(values)
    return out


def check_times(times: Sequence[float] | np.ndarray, what: str = "times") -> np.ndarray:
    t = np.asarray(times, dtype=np.float32)
    if t.ndim != 1 or len(t) < 1:
        raise QueryError(f"{what} must be a list of seconds, got {np.asarray(times).tolist()}")
    if not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(np.diff(t) < 0):
        raise QueryError(f"{what} must be finite, non-negative and increasing, got {t.tolist()}")
    return t
