"""POST /search (an uploaded CF photo or FFA video) and GET /cases/{case_id}/similar.

The latter's body comes from `similar_body`, which `fastpath.SimilarFastPath` also calls.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field

from retrieval.data.vessel_check import CHECK_DEPTH
from retrieval.search.engine import CaseQuery, CFQuery, Engine, FFAQuery, WouldBlock
from retrieval.search.region import REGION_EXAMPLE

from ..convert import search_body
from ..deps import EngineDep, SettingsDep, SyntheticDep
from ..schemas import (
    REGION_HELP,
    ErrorResponse,
    FeedbackStrategy,
    Modality,
    Region,
    SearchResponse,
    Similarity,
    Target,
    Via,
)
from ..settings import HARD_MAX_K, Settings
from ..synthetic import SyntheticStore
from ..uploads import parse_times, read_upload, split_values
from .explain import explanations, with_explanations

router = APIRouter(tags=["search"])

UPLOAD_ERRORS = {
    413: {"model": ErrorResponse, "description": "The upload (or an image in it) is too large."},
    415: {"model": ErrorResponse, "description": "Not an accepted image or video type."},
}
CASE_ERRORS = {404: {"model": ErrorResponse, "description": "Unknown case id."}}
FILTER_HELP = "Repeat the field, or separate values by commas, for any of several values."
TARGET_HELP = "The index to search: cf, ffa, or both (merged by score)."
VIA_HELP = (
    "direct: the query's own embedding; synthesis: CF → synthesized FFA video → FFA index; "
    "fused: reciprocal-rank fusion of both (synthesis and fused: CF query, target ffa)."
)
SIMILARITY_HELP = (
    "How results are scored: clinical (the same disease), pair (the same eye, across "
    "modalities: a photo's own angiogram) or combined (both, as stored). Default: clinical; "
    "pair when the index's encoder has no clinical part (the only one it then supports: "
    "asking for another is a 422)."
)
VESSEL_CHECK_HELP = (
    "With similarity pair via direct (no feedback, no region): re-rank the "
    f"{CHECK_DEPTH} best by how well the query's vessels lie on each case's (each result's "
    "`vessel_match`), which keeps a photo's own angiogram on top when the camera turns, "
    "zooms, crops or blurs the eye. Costs about 0.1 s per unseen case and 0.03 s per "
    "compared one. Ignored otherwise."
)
SEARCH_DESCRIPTION = (
    "The response's `suggestion` is the diagnosis voted by the query's nearest labelled "
    "archive cases in its own modality (by the suggestion model's similarity, ignoring "
    "filters, never the query case itself): decision support from similar cases, not a "
    "diagnosis. It is null when the index has no suggestion model."
)
POSITIVE_HELP = (
    "Relevance feedback: case ids marked relevant (repeat the field); the query moves "
    "towards them. Example cases are left out of the results; an unknown id is a 404."
)
NEGATIVE_HELP = (
    "Relevance feedback: case ids marked not relevant (repeat the field); the query moves "
    "away from them. An id in both lists is a 422."
)
FEEDBACK_HELP = (
    "How positive/negative refine the query: rocchio (default; the query moved to "
    "α·q + β·mean(positive) − γ·mean(negative), scores are cosines) or best_score (each "
    "candidate scored by its best similarity to the query or a positive against its best "
    "to a negative)."
)
PositiveForm = Annotated[
    list[str] | None, Form(description=POSITIVE_HELP, examples=[["ph0-00017"]])
]
NegativeForm = Annotated[
    list[str] | None, Form(description=NEGATIVE_HELP, examples=[["ph0-00042"]])
]
JSON = "application/json"  # bodies are written by convert.search_body (= SearchResponse)
CaseId = Annotated[str, Path(description="A case id of the catalog.", examples=["ph0-00017"])]


def _check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise HTTPException(
            422, f"k: at most {settings.max_k} results per search (got {k}; FUNDUS2VIDEO_MAX_K)"
        )


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Ranked cases for an uploaded CF photo or FFA video",
    description=SEARCH_DESCRIPTION,
    responses=UPLOAD_ERRORS,
)
def search_upload(
    engine: EngineDep,
    settings: SettingsDep,
    store: SyntheticDep,
    file: Annotated[
        UploadFile,
        File(
            description="A CF photo (PNG, JPEG, TIFF) or an FFA video (MP4, MOV, AVI, MKV, "
            "multi-frame TIFF); processed in memory, never stored."
        ),
    ],
    target: Annotated[Target, Form(description=TARGET_HELP)] = "cf",
    k: Annotated[int, Form(ge=1, le=HARD_MAX_K, description="Number of results.")] = 10,
    via: Annotated[Via, Form(description=VIA_HELP)] = "direct",
    similarity: Annotated[Similarity | None, Form(description=SIMILARITY_HELP)] = None,
    modality: Annotated[
        Modality | None, Form(description="What `file` is (default: decided by its content).")
    ] = None,
    times: Annotated[
        str | None,
        Form(
            description="An FFA upload's frame times, comma-separated seconds.",
            examples=["0,15,30"],
        ),
    ] = None,
    diagnosis: Annotated[list[str] | None, Form(description=FILTER_HELP)] = None,
    eye: Annotated[list[str] | None, Form(description="OD and/or OS.")] = None,
    split: Annotated[list[str] | None, Form(description="train, val and/or test.")] = None,
    lesion: Annotated[list[str] | None, Form(description="Any of these lesions.")] = None,
    positive: PositiveForm = None,
    negative: NegativeForm = None,
    feedback: Annotated[FeedbackStrategy | None, Form(description=FEEDBACK_HELP)] = None,
    region: Annotated[Region, Form(description=REGION_HELP, examples=[REGION_EXAMPLE])] = None,
    vessel_check: Annotated[bool, Form(description=VESSEL_CHECK_HELP)] = True,
    explain: Annotated[
        bool, Form(description="Add `explanations`: why each of the top results matched.")
    ] = False,
    explain_top: Annotated[
        int, Form(ge=1, le=10, description="How many top results `explain` explains.")
    ] = 3,
) -> Response:
    _check_k(k, settings)
    upload = read_upload(file, settings, field="file", expect=modality)
    if upload.modality == "cf":
        query = CFQuery(upload.array)
    else:
        query = FFAQuery(upload.array, parse_times(times))
    filters = _filters(diagnosis, eye, split, lesion)
    marks = _feedback(positive, negative, feedback) | {"vessel_check": vessel_check}
    result = engine.search(
        query, target, k, via, filters, similarity=similarity, region=region, **marks
    )
    extra = {"width": upload.width, "height": upload.height, "bytes": upload.bytes}
    if upload.modality == "ffa":
        extra["frames"] = int(upload.array.shape[0])
    body = search_body(result, engine.encoder_id, store, extra)
    if explain:
        body = with_explanations(body, explanations(engine, query, result, explain_top))
    return Response(body, media_type=JSON)


class SimilarQuery(BaseModel):
    """The query parameters of GET /cases/{case_id}/similar (others are ignored)."""

    target: Target = Field("cf", description=TARGET_HELP)
    k: int = Field(10, ge=1, le=HARD_MAX_K, description="Number of results.")
    via: Via = Field("direct", description=VIA_HELP)
    similarity: Similarity | None = Field(None, description=SIMILARITY_HELP)
    modality: Modality = Field(
        "cf", description="Which of the case's embeddings queries: cf or ffa."
    )
    exclude_self: bool = Field(True, description="Leave the case itself out.")
    diagnosis: list[str] | None = Field(None, description=FILTER_HELP)
    eye: list[str] | None = Field(None, description="OD and/or OS.")
    split: list[str] | None = Field(None, description="train, val and/or test.")
    lesion: list[str] | None = Field(None, description="Any of these lesions.")
    positive: list[str] | None = Field(None, description=POSITIVE_HELP, examples=[["ph0-00017"]])
    negative: list[str] | None = Field(None, description=NEGATIVE_HELP, examples=[["ph0-00042"]])
    feedback: FeedbackStrategy | None = Field(None, description=FEEDBACK_HELP)
    region: Region = Field(None, description=REGION_HELP, examples=[REGION_EXAMPLE])
    vessel_check: bool = Field(True, description=VESSEL_CHECK_HELP)


@router.get(
    "/cases/{case_id}/similar",
    response_model=SearchResponse,
    summary="Ranked cases for a case already in the index",
    description=SEARCH_DESCRIPTION,
    responses=CASE_ERRORS,
)
async def similar(
    case_id: CaseId,
    params: Annotated[SimilarQuery, Query()],
    engine: EngineDep,
    settings: SettingsDep,
    store: SyntheticDep,
) -> Response:
    body = await similar_body(engine, settings, store, case_id, params)
    return Response(body, media_type=JSON)


async def similar_body(
    engine: Engine, settings: Settings, store: SyntheticStore, case_id: str, params: SimilarQuery
) -> bytes:
    """The body of GET /cases/{case_id}/similar (the route's and the fast path's)."""
    _check_k(params.k, settings)
    filters = _filters(params.diagnosis, params.eye, params.split, params.lesion)
    search = partial(
        engine.search,
        CaseQuery(case_id, params.modality),
        params.target,
        params.k,
        params.via,
        filters,
        exclude_self=params.exclude_self,
        similarity=params.similarity,
        region=params.region,
        vessel_check=params.vessel_check,
        **_feedback(params.positive, params.negative, params.feedback),
    )
    result = None
    if params.via == "direct" and not any(filters.values()):
        # index work only (sub-millisecond): inline, unless an update holds the index
        with contextlib.suppress(WouldBlock):
            result = search(blocking=False)
    if result is None:  # model work, filters, or waiting: off the event loop
        result = await run_in_threadpool(search)
    return search_body(result, engine.encoder_id, store)


def _feedback(positive, negative, feedback) -> dict:
    """The engine's feedback keywords: the ids as given (repeated values; an id may hold
    a comma), blank ones dropped."""
    return {
        "positive": [v for v in positive or () if v.strip()] or None,
        "negative": [v for v in negative or () if v.strip()] or None,
        "feedback": feedback,
    }


def _filters(diagnosis, eye, split, lesion) -> dict[str, list[str] | None]:
    return {
        "diagnosis": split_values(diagnosis),
        "eye": split_values(eye),
        "split": split_values(split),
        "lesion": split_values(lesion),
    }
