"""The catalog: GET /cases (paged, filtered), GET/DELETE /cases/{case_id}, POST /cases.

The routes that change the index are on `write_router` (the app gives it the write-key
rule, `deps.require_write_key`); the others on `router`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Response, UploadFile

from retrieval.data.duplicates import duplicate_match
from retrieval.search.engine import NewCase

from ..convert import case_record
from ..deps import EngineDep, SettingsDep
from ..schemas import CasePage, CaseRecord, DeletedCase, DuplicateList, ErrorResponse
from ..settings import HARD_MAX_PAGE
from ..uploads import parse_times, read_upload, split_values
from .search import CASE_ERRORS, FILTER_HELP, UPLOAD_ERRORS, CaseId

router = APIRouter(tags=["cases"])


def _case_link(operation_ref: str, description: str) -> dict:
    """An OpenAPI link from a response holding `case_id` to an operation on that case."""
    return {
        "operationRef": operation_ref,
        "parameters": {"case_id": "$response.body#/case_id"},
        "description": description,
    }


CASE_LINKS = {  # what a client can do next with an added case (OpenAPI links)
    "GetCase": _case_link("#/paths/~1cases~1%7Bcase_id%7D/get", "The added case."),
    "SimilarCases": _case_link(
        "#/paths/~1cases~1%7Bcase_id%7D~1similar/get", "Cases similar to the added case."
    ),
    "DeleteCase": _case_link("#/paths/~1cases~1%7Bcase_id%7D/delete", "Remove the added case."),
}
write_router = APIRouter(tags=["cases"])  # POST /cases, DELETE /cases/{case_id}


@router.get("/cases", response_model=CasePage, summary="One page of the catalog, filtered")
def list_cases(
    engine: EngineDep,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=2**31, description="Cases to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=HARD_MAX_PAGE, description="Page size.")] = 50,
    diagnosis: Annotated[list[str] | None, Query(description=FILTER_HELP)] = None,
    eye: Annotated[list[str] | None, Query(description="OD and/or OS.")] = None,
    split: Annotated[list[str] | None, Query(description="train, val and/or test.")] = None,
    lesion: Annotated[list[str] | None, Query(description="Any of these lesions.")] = None,
) -> dict:
    if limit > settings.max_page:
        raise HTTPException(422, f"limit: at most {settings.max_page} cases per page (got {limit})")
    filters = {
        "diagnosis": split_values(diagnosis),
        "eye": split_values(eye),
        "split": split_values(split),
        "lesion": split_values(lesion),
    }
    total, page = engine.cases(offset, limit, filters)
    return {
        "total": total,
        "offset": offset,
        "limit": limit,
        "items": [case_record(c) for c in page],
    }


@router.get(
    "/cases/{case_id}", response_model=CaseRecord, summary="One case", responses=CASE_ERRORS
)
def get_case(case_id: CaseId, engine: EngineDep) -> dict:
    return case_record(engine.case(case_id))


@write_router.post(
    "/cases",
    response_model=CaseRecord,
    status_code=201,
    summary="Add a case (CF photo + FFA video + metadata) without rebuilding",
    responses={
        201: {"description": "The added case.", "links": CASE_LINKS},
        **UPLOAD_ERRORS,
        409: {
            "model": ErrorResponse,
            "description": "The case id is already in the index, or its CF photo or FFA video "
            "is a near-duplicate of an indexed case's (`duplicates` names the existing case "
            "ids; send `allow_duplicate=true` to add it anyway).",
            "content": {
                "application/json": {
                    "example": {
                        "detail": "case 'new-0001': its cf is a near-duplicate of case "
                        "'ph0-00012' (distance 0.040 <= 0.200); pass allow_duplicate to add it "
                        "anyway",
                        "errors": None,
                        "request_id": "5f0c2a9e1b7d4c3a",
                        "duplicates": [
                            {
                                "case_id": "ph0-00012",
                                "modality": "cf",
                                "distance": 0.04,
                                "threshold": 0.2,
                            }
                        ],
                    }
                }
            },
        },
    },
)
def add_case(
    response: Response,
    engine: EngineDep,
    settings: SettingsDep,
    case_id: Annotated[str, Form(min_length=1, max_length=200, examples=["new-0001"])],
    cf: Annotated[UploadFile, File(description="The CF photo (PNG, JPEG, TIFF).")],
    ffa: Annotated[UploadFile, File(description="The FFA video (MP4, MOV, AVI, MKV, TIFF).")],
    patient_id: Annotated[
        str | None, Form(max_length=200, description="Default: the case id.")
    ] = None,
    eye: Annotated[str | None, Form(description="OD or OS.")] = None,
    age: Annotated[int | None, Form(ge=0, le=130)] = None,
    sex: Annotated[str | None, Form(max_length=20)] = None,
    diagnosis: Annotated[str | None, Form(max_length=100, examples=["PDR"])] = None,
    lesions: Annotated[list[str] | None, Form(description=FILTER_HELP)] = None,
    split: Annotated[str, Form(description="train, val or test.")] = "train",
    source: Annotated[str, Form(max_length=100)] = "api",
    ffa_times_s: Annotated[
        str | None, Form(description="Comma-separated seconds, one per frame.")
    ] = None,
    allow_duplicate: Annotated[
        bool,
        Form(description="Add it even if its CF or FFA is a near-duplicate of an indexed case's."),
    ] = False,
    register: Annotated[
        bool,
        Form(
            description="Register the CF to the FFA (from their vessel maps, a second or "
            "two) and store the transform and its quality, as ingest does; false: only "
            "measure the fields of view."
        ),
    ] = True,
) -> dict:
    image = read_upload(cf, settings, field="cf", expect="cf")
    video = read_upload(ffa, settings, field="ffa", expect="ffa")
    times = parse_times(ffa_times_s, "ffa_times_s")
    new = NewCase(
        case_id=case_id,
        patient_id=patient_id or None,
        eye=eye or None,
        age=age,
        sex=sex or None,
        diagnosis=diagnosis or None,
        lesions=tuple(split_values(lesions) or ()),
        split=split,
        source=source,
        ffa_times_s=tuple(times) if times is not None else None,
    )
    added = engine.add_case(
        new, image.array, video.array, allow_duplicate=allow_duplicate, register=register
    )
    record = case_record(added)
    response.headers["Location"] = record["cf_url"].removesuffix("/cf")
    return record


@write_router.delete(
    "/cases/{case_id}",
    response_model=DeletedCase,
    summary="Remove a case from the index (and its stored media, if it was added)",
    responses=CASE_ERRORS,
)
def delete_case(case_id: CaseId, engine: EngineDep) -> dict:
    case = engine.remove_case(case_id)
    return {"case_id": case.case_id, "deleted": True, "catalog_rows": engine.case_count}


@router.get(
    "/cases/{case_id}/duplicates",
    response_model=DuplicateList,
    summary="Indexed cases whose CF photo or FFA video near-duplicates this case's",
    responses=CASE_ERRORS,
)
def case_duplicates(case_id: CaseId, engine: EngineDep) -> dict:
    pairs = engine.duplicates_of(case_id)
    return {"case_id": case_id, "items": [duplicate_match(p) for p in pairs]}
