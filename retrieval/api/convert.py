"""Engine records → response bodies.

`case_record` gives a dict for `CaseRecord`. `SearchJSON` writes a `SearchResponse`
straight to JSON bytes: each case's fields that never change (id, diagnosis, eye,
lesions, URLs) are serialized once and kept, so a search response costs a few string
joins instead of building and validating ~100 objects. Tests hold its output to the
model (`SearchResponse.model_validate_json` round-trips it exactly).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from retrieval.search.engine import MODALITIES, CaseInfo, SearchResult, suggestion_record

from .schemas import SYNTHETIC_LABEL
from .synthetic import SyntheticStore

_QUERY_FIELDS = (
    "kind",
    "modality",
    "similarity",
    "case_id",
    "width",
    "height",
    "frames",
    "bytes",
)
_FILTER_FIELDS = ("diagnosis", "eye", "split", "lesion")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@lru_cache(maxsize=65536)
def case_urls(case_id: str) -> tuple[str, str]:
    q = quote(case_id, safe="")
    return f"/cases/{q}/cf", f"/cases/{q}/ffa"


def case_record(case: CaseInfo) -> dict[str, Any]:
    cf_url, ffa_url = case_urls(case.case_id)
    return {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "eye": case.eye,
        "age": case.age,
        "sex": case.sex,
        "diagnosis": case.diagnosis,
        "lesions": list(case.lesions),
        "split": case.split,
        "source": case.source,
        "ffa_times_s": list(case.ffa_times_s) if case.ffa_times_s is not None else None,
        "modalities": list(MODALITIES),
        "added": case.added,
        "cf_url": cf_url,
        "ffa_url": ffa_url,
        "synthetic": False,
    }


def _number(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else "0.0"  # FAISS scores are finite


class SearchJSON:
    """Serializer of `SearchResponse` bodies with per-case fragments kept (by row id: row
    ids are never reused and a case's fields never change)."""

    def __init__(self, max_cases: int = 500_000):
        self.max_cases = max_cases
        self._cases: dict[int, tuple[str, str]] = {}

    def _case(self, case: CaseInfo) -> tuple[str, str]:
        parts = self._cases.get(case.row_id)
        if parts is None:
            cf_url, ffa_url = case_urls(case.case_id)
            head = '"case_id":' + _dumps(case.case_id)
            tail = (
                f'"diagnosis":{_dumps(case.diagnosis)},"eye":{_dumps(case.eye)},'
                f'"lesions":{_dumps(list(case.lesions))},"cf_url":{_dumps(cf_url)},'
                f'"ffa_url":{_dumps(ffa_url)},"synthetic":false'
            )
            if len(self._cases) >= self.max_cases:
                self._cases.clear()
            parts = self._cases[case.row_id] = (head, tail)
        return parts

    def dumps(
        self,
        result: SearchResult,
        encoder_id: str,
        store: SyntheticStore,
        query_extra: dict[str, Any] | None = None,
    ) -> bytes:
        rows = []
        for hit in result.hits:
            head, tail = self._case(hit.case)
            rows.append(
                f'{{"rank":{hit.rank},{head},"score":{_number(hit.score)},'
                f'"modality":"{hit.modality}",{tail}}}'
            )
        query = dict.fromkeys(_QUERY_FIELDS)
        query.update(result.query)
        query.update(query_extra or {})
        filters = dict.fromkeys(_FILTER_FIELDS)
        filters.update((k, list(v)) for k, v in result.filters.items())
        head = {
            "query": query,
            "target": result.target,
            "via": result.via,
            "similarity": result.similarity,
            "k": result.k,
            "filters": filters,
            "score_kind": result.score_kind,
            "candidates": result.candidates,
        }
        tail = {
            "synthetic_query": _synthetic(result, store),
            "suggestion": suggestion_record(result),
            "encoder_id": encoder_id,
            "timings_ms": result.timings_ms,
        }
        text = f'{_dumps(head)[:-1]},"results":[{",".join(rows)}],{_dumps(tail)[1:]}'
        return text.encode()


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
