"""GET /cases/{case_id}/explain: why another case matches this one, region by region
(and frame by frame, phase by phase, for an angiogram). `explanations` turns a search's
top results into the same bodies, for POST /search's `explain` flag."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool
from pydantic_core import to_json

from retrieval.errors import UnknownCase
from retrieval.search.engine import CaseQuery, Engine, SearchResult
from retrieval.search.engine import Query as EngineQuery

from ..deps import EngineDep
from ..schemas import ErrorResponse, ExplanationResponse, Modality, Similarity

router = APIRouter(tags=["search"])

EXPLAIN_DESCRIPTION = (
    "The `similarity` score between the case's `modality` embedding and the other case's "
    "`target` embedding, split over the regions of both (a 16x16 grid for the trained "
    "embedder: `regions[row][col]`, row-major from the top left of the image padded to a "
    "square), each side's regions summing to the score (`sum_check`); for an FFA side, "
    "also over its frames (the time-attention pooling is a weighted sum) and phases "
    "(arterial < 20 s, venous 20 s to 5 min, late from 5 min after injection). Values are "
    "signed: a negative region pulls the two apart. Runs the model on both cases' media."
)
SIMILARITY_HELP = (
    "The score explained: clinical (the same disease), pair (the same eye) or combined; "
    "default clinical (pair for an encoder without a clinical part)."
)
CaseId = Annotated[str, Path(description="The query's case id.", examples=["ph0-00017"])]


@router.get(
    "/cases/{case_id}/explain",
    response_model=ExplanationResponse,
    summary="Why another case matches this one: per-region (and per-frame) shares of the score",
    description=EXPLAIN_DESCRIPTION,
    responses={404: {"model": ErrorResponse, "description": "Unknown case id or `other`."}},
)
async def explain(
    case_id: CaseId,
    engine: EngineDep,
    other: Annotated[
        str,
        Query(
            min_length=1,
            max_length=200,
            description="The result's case id.",
            examples=["ph0-00042"],
        ),
    ],
    similarity: Annotated[Similarity | None, Query(description=SIMILARITY_HELP)] = None,
    modality: Annotated[
        Modality, Query(description="Which of the case's embeddings queries: cf or ffa.")
    ] = "cf",
    target: Annotated[
        Modality | None,
        Query(description="Which of the other case's embeddings: cf or ffa (default: modality)."),
    ] = None,
) -> dict[str, Any]:
    engine.case(case_id)  # 404 for the path's case id first
    try:
        found = await run_in_threadpool(
            engine.explain, CaseQuery(case_id, modality), other, similarity, target
        )
    except UnknownCase as err:
        raise HTTPException(404, f"other: unknown case_id {other!r}: no such case") from err
    return found.to_dict()


def explanations(
    engine: Engine, query: EngineQuery, result: SearchResult, top: int
) -> list[dict[str, Any]]:
    """The explanations of `result`'s first `top` hits for `query` (by its own embedding,
    with the search's similarity), as `ExplanationResponse` bodies."""
    others = [(hit.case.case_id, hit.modality) for hit in result.hits[:top]]
    if not others:
        return []
    found = engine.explain_many(query, others, result.similarity)
    return [e.to_dict() for e in found]


def with_explanations(body: bytes, found: list[dict[str, Any]]) -> bytes:
    """A `SearchResponse` JSON body (`convert.search_body`: `explanations` null, last) with
    its `explanations` set to `found`."""
    empty = b'"explanations":null}'
    if not body.endswith(empty):
        raise ValueError("a search body ends with its null explanations")
    return body[: -len(empty)] + b'"explanations":' + to_json(found) + b"}"
