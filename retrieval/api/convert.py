"""Engine records → response bodies.

`case_record` gives a dict for `CaseRecord`; `search_body` gives a search's JSON body:
a dict of `SearchResponse`'s shape (every field, in its order) written by pydantic's
JSON writer. It is not validated per request (that would cost ~15 µs more than the
~25 µs of writing it); tests hold the bodies to the model, byte for byte.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import quote

from pydantic_core import to_json

from retrieval.data.cohort import CASE_FIELDS
from retrieval.data.media_write import SYNTHETIC_LABEL
from retrieval.search.engine import MODALITIES, CaseInfo, SearchResult, suggestion_record

from .schemas import QueryInfo, SearchFilters
from .synthetic import SyntheticStore

_QUERY = dict.fromkeys(QueryInfo.model_fields)  # every field, null unless given
_FILTERS = dict.fromkeys(SearchFilters.model_fields)


@lru_cache(maxsize=65536)
def case_urls(case_id: str) -> tuple[str, str]:
    q = quote(case_id, safe="")
    return f"/cases/{q}/cf", f"/cases/{q}/ffa"


def case_record(case: CaseInfo) -> dict[str, Any]:
    """The case as `CaseRecord`: its catalog fields (tuples as lists) and media URLs."""
    record: dict[str, Any] = {}
    for f in CASE_FIELDS:
        value = getattr(case, f.name)
        record[f.name] = list(value) if isinstance(value, tuple) else value
    cf_url, ffa_url = case_urls(case.case_id)
    return {
        **record,
        "modalities": list(MODALITIES),
        "added": case.added,
        "cf_url": cf_url,
        "ffa_url": ffa_url,
        "synthetic": False,
    }


def search_body(
    result: SearchResult,
    encoder_id: str,
    store: SyntheticStore,
    query_extra: dict[str, Any] | None = None,
) -> bytes:
    """A search as its `SearchResponse` JSON body; `query_extra` adds to `query` (an
    upload's size). The synthesized query video, if any, goes to `store`."""
    rows = []
    for hit in result.hits:
        case = hit.case
        cf_url, ffa_url = case_urls(case.case_id)
        rows.append(
            {
                "rank": hit.rank,
                "case_id": case.case_id,
                "score": hit.score,
                "modality": hit.modality,
                "diagnosis": case.diagnosis,
                "eye": case.eye,
                "lesions": case.lesions,
                "cf_url": cf_url,
                "ffa_url": ffa_url,
                "synthetic": False,
                "region": None if hit.region is None else list(hit.region),
                "region_score": hit.region_score,
                "vessel_match": hit.vessel_match,
            }
        )
    body = {
        "query": {**_QUERY, **result.query, **(query_extra or {})},
        "target": result.target,
        "via": result.via,
        "similarity": result.similarity,
        "k": result.k,
        "filters": {**_FILTERS, **result.filters},
        "score_kind": result.score_kind,
        "candidates": result.candidates,
        "vessel_checked": result.vessel_checked,
        "results": rows,
        "synthetic_query": _synthetic(result, store),
        "suggestion": suggestion_record(result),
        "encoder_id": encoder_id,
        "timings_ms": result.timings_ms,
        "explanations": None,  # POST /search with explain: routes.explain.with_explanations
    }
    return to_json(body)


def _synthetic(result: SearchResult, store: SyntheticStore) -> dict[str, Any] | None:
    """The synthesized query video's description; its frames go to the in-memory store."""
    if result.synthetic is None:
        return None
    frames, times = result.synthetic.frames, result.synthetic.times_s
    token = store.put(frames, times)
    return {
        "synthetic": True,
        "label": SYNTHETIC_LABEL,
        "frames": int(frames.shape[0]),
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "times_s": [round(float(t), 3) for t in times],
        "video_url": f"/synthetic/{token}",
        "media_type": "video/mp4",
        "expires_in_s": int(store.ttl_s),
    }
