"""Request and response models of the HTTP API (the contract the dashboard codes against).

Every JSON body the API returns is one of these models; every error is `ErrorResponse`
(`detail` is always a readable string naming the bad value). Field names follow the
README's data contract: a result row is `{rank, case_id, score, modality, diagnosis, eye, lesions,
cf_url, ffa_url}` plus `synthetic`. URLs are relative to the API's base URL.

Multipart forms (declared on the routes, listed here for clients):

- `POST /search`: `file` (CF image or FFA video), `target` (cf | ffa | both, default
  cf), `k` (default 10), `via` (direct | synthesis | fused), `similarity` (clinical |
  pair | combined; default clinical, the same disease; pair finds a photo's own
  angiogram; pair is the only one for an encoder without a clinical part), `modality` (cf | ffa:
  overrides the detected kind of `file`), `times` (an FFA upload's frame times,
  comma-separated seconds), filters `diagnosis`, `eye`, `split`, `lesion` (repeat a
  field, or separate values by commas, for "any of").
- `POST /generate`: `file` (CF image), `times` (optional comma-separated seconds).
  Answers an MP4 with `X-Synthetic: true` and `X-Frame-Times`.
- `POST /cases`: `case_id`, `cf` (image), `ffa` (video) and optional `patient_id`,
  `eye`, `age`, `sex`, `diagnosis`, `lesions`, `split` (default train), `source`
  (default api), `ffa_times_s` (comma-separated seconds).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from retrieval.data.cohort import CASE_FIELDS, CatalogField
from retrieval.data.media_write import SYNTHETIC_LABEL
from retrieval.data.vessel_check import VESSEL_WEIGHT
from retrieval.search.queries import SUGGESTION_LABEL
from retrieval.search.region import format_region, parse_region

Modality = Literal["cf", "ffa"]
Target = Literal["cf", "ffa", "both"]
Via = Literal["direct", "synthesis", "fused"]
Eye = Literal["OD", "OS"]
Split = Literal["train", "val", "test"]
Similarity = Literal["combined", "pair", "clinical"]
FeedbackStrategy = Literal["rocchio", "best_score"]

_CASE_EXAMPLE = {
    **{f.name: f.example for f in CASE_FIELDS},
    "modalities": ["cf", "ffa"],
    "added": False,
    "cf_url": "/cases/ph0-00017/cf",
    "ffa_url": "/cases/ph0-00017/ffa",
    "synthetic": False,
}
_ROW_EXAMPLE = {
    "rank": 1,
    "case_id": "ph0-00017",
    "score": 0.912,
    "modality": "ffa",
    "diagnosis": "PDR",
    "eye": "OD",
    "lesions": ["microaneurysm", "neovascularisation", "leakage"],
    "cf_url": "/cases/ph0-00017/cf",
    "ffa_url": "/cases/ph0-00017/ffa",
    "synthetic": False,
}
_SUGGESTION_EXAMPLE = {
    "diagnosis": "PDR",
    "probability": 0.93,
    "abstained": False,
    "probabilities": {"PDR": 0.93, "NPDR": 0.05, "normal": 0.02},
    "supporting_case_ids": [
        "ph0-00017",
        "ph0-00042",
        "ph0-00051",
        "ph0-00060",
        "ph0-00071",
        "ph0-00088",
        "ph0-00093",
    ],
    "neighbours": 10,
    "calibrated": True,
    "label": SUGGESTION_LABEL,
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldError(_Model):
    loc: list[str | int] = Field(description="Where the bad value is: e.g. ['query', 'k'].")
    msg: str
    type: str


class DuplicateMatch(_Model):
    """An indexed case whose CF photo or FFA video is a near-duplicate of another's."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "case_id": "ph0-00012",
                "modality": "cf",
                "distance": 0.04,
                "threshold": 0.2,
            }
        }
    )
    case_id: str = Field(description="The indexed case it repeats.")
    modality: Literal["cf", "ffa"] = Field(description="Which media are near-duplicates.")
    distance: float = Field(description="1 - the best view cosine (0: the same picture).")
    threshold: float = Field(description="At or below this distance a pair is a near-duplicate.")


class ErrorResponse(_Model):
    """Every 4xx/5xx answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "detail": "k: Input should be less than or equal to 100 (got 1000)",
                "errors": None,
                "request_id": "5f0c2a9e1b7d4c3a",
            }
        }
    )
    detail: str = Field(description="What was wrong, naming the parameter, file or case.")
    errors: list[FieldError] | None = Field(
        default=None, description="Validation errors one by one (422 only)."
    )
    request_id: str | None = Field(default=None, description="Also in the X-Request-ID header.")
    duplicates: list[DuplicateMatch] | None = Field(
        default=None,
        description="409 from POST /cases only: the indexed cases the new one near-duplicates, "
        "nearest first (`allow_duplicate=true` adds it anyway).",
    )


# --------------------------------------------------------------------------- health, stats


class Health(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "status": "ok",
                "version": "0.1.0",
                "loaded": True,
                "encoder_id": "embedder-3f2a9c1d",
                "cases": 128,
                "modalities": ["cf", "ffa"],
            }
        }
    )
    status: Literal["ok"] = "ok"
    version: str
    loaded: bool = Field(description="Whether an index (and its encoder) is loaded.")
    encoder_id: str | None = None
    cases: int | None = None
    modalities: list[str] = Field(default_factory=list)


class IndexStats(_Model):
    count: int = Field(description="Live vectors.")
    key: str = Field(description="FAISS factory string, e.g. Flat or HNSW32.")
    dim: int
    device: str = Field(description="cpu or gpu.")
    tombstones: int
    recall_estimate: float | None = None
    search_params: dict[str, int] = Field(default_factory=dict)


class Limits(_Model):
    max_k: int
    max_page: int
    max_upload_bytes: int = Field(description="Largest request body (all files together).")
    max_pixels: int = Field(description="Largest image or video frame, in pixels.")
    max_frames: int
    max_video_pixels: int = Field(description="Largest video: frames x width x height.")
    accepted_types: dict[str, list[str]] = Field(
        description="Content types accepted per kind of upload (cf, ffa)."
    )


class SuggestionModelInfo(_Model):
    calibrated: bool = Field(description="Temperature and smoothing fitted on the val split.")
    k: int = Field(description="Neighbours that vote.")
    temperature: float
    smoothing: float
    abstain_below: float = Field(description="Top probability under which it abstains.")
    similarity: Similarity = Field(description="The similarity the neighbours are found by.")
    classes: list[str] = Field(description="The diagnoses it can suggest.")
    fitted_on: dict[str, Any] = Field(default_factory=dict)


class Stats(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "encoder_id": "embedder-3f2a9c1d",
                "catalog_rows": 128,
                "added_cases": 1,
                "modalities": {
                    "cf": {
                        "count": 128,
                        "key": "Flat",
                        "dim": 256,
                        "device": "cpu",
                        "tombstones": 0,
                        "recall_estimate": 1.0,
                        "search_params": {},
                    },
                },
                "device": "cpu",
                "dim": 256,
                "image_size": 128,
                "diagnoses": {"normal": 40, "PDR": 12},
                "splits": {"train": 90, "val": 19, "test": 19},
                "index_created_at": "2025-01-01T12:00:00+00:00",
                "similarities": ["combined", "pair", "clinical"],
                "default_similarity": {"same_modality": "clinical", "cross_modal": "clinical"},
                "suggestion": {
                    "cf": {
                        "calibrated": True,
                        "k": 10,
                        "temperature": 0.05,
                        "smoothing": 0.1,
                        "abstain_below": 0.5,
                        "similarity": "clinical",
                        "classes": ["normal", "PDR"],
                        "fitted_on": {"split": "val", "queries": 19},
                    }
                },
                "limits": {
                    "max_k": 100,
                    "max_page": 500,
                    "max_upload_bytes": 67108864,
                    "max_pixels": 40000000,
                    "max_frames": 512,
                    "max_video_pixels": 268435456,
                    "accepted_types": {"cf": ["image/png"], "ffa": ["video/mp4"]},
                },
            }
        }
    )
    encoder_id: str
    catalog_rows: int
    added_cases: int = Field(description="Cases added through POST /cases (still present).")
    modalities: dict[str, IndexStats]
    device: str
    dim: int
    image_size: int
    diagnoses: dict[str, int]
    splits: dict[str, int]
    index_created_at: str | None = None
    similarities: list[Similarity] = Field(
        default_factory=list, description="The similarities a search may ask for."
    )
    default_similarity: dict[str, Similarity] = Field(
        default_factory=dict,
        description="What a search uses when it names none: same_modality, cross_modal.",
    )
    suggestion: dict[str, SuggestionModelInfo] = Field(
        default_factory=dict,
        description="Diagnosis-suggestion models per query modality (none: no suggestion).",
    )
    limits: Limits


# --------------------------------------------------------------------------- search


class SearchFilters(_Model):
    """Metadata filters applied inside the search (a case must match every given field)."""

    diagnosis: list[str] | None = None
    eye: list[Eye] | None = None
    split: list[Split] | None = None
    lesion: list[str] | None = Field(default=None, description="Any of these lesions.")


def _region_text(value: str | None) -> str | None:
    """A region parameter "x0,y0,x1,y1" checked (`retrieval.search.region.parse_region`)."""
    try:
        box = parse_region(value)
    except ValueError as err:
        raise ValueError(str(err).removeprefix("region ")) from None
    return None if box is None else format_region(box)


Region = Annotated[str | None, AfterValidator(_region_text)]
REGION_HELP = (
    "Search by a region of the CF query photo: a box x0,y0,x1,y1 in normalised coordinates "
    "(0-1, x right, y down; x0 < x1, y0 < y1). With the default similarity the box's "
    "content is looked for anywhere in other eyes (each result's `region` says where it "
    "matched); with similarity pair, at the same place. A CF query only, via direct."
)


class ResultRow(_Model):
    model_config = ConfigDict(json_schema_extra={"example": _ROW_EXAMPLE})
    rank: int = Field(ge=1, description="1 = best.")
    case_id: str
    score: float = Field(
        description="Cosine of the search's `similarity` (direct, synthesis) or RRF score (fused)."
    )
    modality: Modality = Field(description="Which index the hit came from.")
    diagnosis: str | None = None
    eye: str | None = None
    lesions: list[str] = Field(default_factory=list)
    cf_url: str
    ffa_url: str
    synthetic: bool = Field(default=False, description="Always false: results are real cases.")
    region: list[float] | None = Field(
        default=None,
        description="A region query: the part of this case's CF photo that matched the box "
        "(normalised x0, y0, x1, y1; the box's size, placed where it matches best; with "
        "similarity pair, the same place). Null for a whole-photo query.",
        examples=[[0.5, 0.375, 0.6875, 0.5625]],
    )
    region_score: float | None = Field(
        default=None,
        description="A region query: the clinical cosine of that part with the box (null: "
        "pair similarity or no region).",
    )
    vessel_match: float | None = Field(
        default=None,
        description="A vessel-checked search (similarity pair, via direct, `vessel_check` on): "
        "how well the query's vessels lie on this case's once turned, scaled and shifted onto "
        "them, 0-1 (a photo and its own angiogram: about 0.25-0.7; another eye: mostly below "
        f"0.2). The results are then ordered by score + {VESSEL_WEIGHT} x vessel_match. Null "
        "otherwise.",
        examples=[0.48],
    )


class QueryInfo(_Model):
    kind: Literal["upload", "case"]
    modality: Modality
    similarity: Similarity | None = Field(default=None, description="As `similarity`.")
    case_id: str | None = Field(default=None, description="For a case query.")
    width: int | None = None
    height: int | None = None
    frames: int | None = Field(default=None, description="For an FFA query.")
    bytes: int | None = Field(default=None, description="Size of the upload.")
    region: list[float] | None = Field(
        default=None, description="A region query's box (normalised x0, y0, x1, y1)."
    )
    region_cells: list[int] | None = Field(
        default=None,
        description="The embedder's grid cells the box covers: row0, row1, col0, col1 (end "
        "exclusive) on the model's square: the photo's field-of-view square.",
    )
    positive: list[str] | None = Field(
        default=None, description="Relevance feedback: the case ids marked relevant."
    )
    negative: list[str] | None = Field(
        default=None, description="Relevance feedback: the case ids marked not relevant."
    )
    feedback: FeedbackStrategy | None = Field(
        default=None, description="The strategy that used them (null: no feedback)."
    )


class SyntheticVideo(_Model):
    """An FFA video synthesized from the CF query (via synthesis or fused): not a real angiogram."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "synthetic": True,
                "label": SYNTHETIC_LABEL,
                "frames": 16,
                "width": 128,
                "height": 128,
                "times_s": [0.0, 10.0, 14.0, 20.0, 30.0, 60.0, 300.0, 600.0],
                "video_url": "/synthetic/Qm9ndXMtdG9rZW4",
                "media_type": "video/mp4",
                "expires_in_s": 600,
            }
        }
    )
    synthetic: Literal[True] = True
    label: str = Field(default=SYNTHETIC_LABEL, description="Burned into every frame.")
    frames: int
    width: int
    height: int
    times_s: list[float]
    video_url: str = Field(description="GET it (MP4, in-memory, expires) to show the video.")
    media_type: str = "video/mp4"
    expires_in_s: int


class DiagnosisSuggestion(_Model):
    """The diagnoses of the query's nearest labelled archive cases, voted into probabilities.

    Decision support from similar cases, never a diagnosis: always shown with `label`.
    """

    model_config = ConfigDict(json_schema_extra={"example": _SUGGESTION_EXAMPLE})
    diagnosis: str = Field(description="The most probable diagnosis among the neighbours.")
    probability: float = Field(ge=0, le=1)
    abstained: bool = Field(description="probability < the model's abstain threshold.")
    probabilities: dict[str, float] = Field(description="Every known diagnosis; sums to 1.")
    supporting_case_ids: list[str] = Field(description="Neighbours with that diagnosis.")
    neighbours: int = Field(description="How many neighbours voted.")
    calibrated: bool = Field(description="Whether the vote was calibrated on the val split.")
    label: str = Field(default=SUGGESTION_LABEL)


# --------------------------------------------------------------------------- explanations

_SIDE_EXAMPLE = {
    "case_id": "ph0-00017",
    "modality": "ffa",
    "total": 0.84,
    "regions": [[0.01] * 16 for _ in range(16)],
    "top_regions": [
        {"row": 9, "col": 4, "box": [0.25, 0.5625, 0.3125, 0.625], "contribution": 0.39}
    ],
    "square": [0.0, 0.0, 1.0, 1.0],
    "frames": [
        {"index": 0, "time_s": 11.1, "phase": "arterial", "attention": 0.7, "contribution": 0.5}
    ],
    "phases": [
        {"phase": "arterial", "start_s": 0.0, "end_s": 20.0, "frames": 1, "contribution": 0.5},
        {"phase": "venous", "start_s": 20.0, "end_s": 300.0, "frames": 0, "contribution": 0.0},
        {"phase": "late", "start_s": 300.0, "end_s": None, "frames": 0, "contribution": 0.0},
    ],
}
_EXPLANATION_EXAMPLE = {
    "similarity": "clinical",
    "score": 0.97287,
    "search_score": 0.97287,
    "grid": 16,
    "sum_check": {"query_sum": 0.97287, "result_sum": 0.97287, "max_error": 2e-8},
    "query": {
        **_SIDE_EXAMPLE,
        "case_id": "ph0-00003",
        "modality": "cf",
        "frames": None,
        "phases": None,
    },
    "result": _SIDE_EXAMPLE,
}


class RegionShare(_Model):
    row: int = Field(description="Grid row, from the top.")
    col: int = Field(description="Grid column, from the left.")
    box: list[float] = Field(
        description="x0, y0, x1, y1 in [0, 1] of the photo (or frame), clipped to it."
    )
    contribution: float


class FrameShare(_Model):
    index: int
    time_s: float = Field(description="Seconds after injection.")
    phase: Literal["arterial", "venous", "late"]
    attention: float = Field(description="The frame's weight in the time-attention pooling.")
    contribution: float = Field(description="The frame's share of the score.")


class PhaseShare(_Model):
    phase: Literal["arterial", "venous", "late"]
    start_s: float
    end_s: float | None = Field(description="null: open-ended (the late phase).")
    frames: int
    contribution: float


class SideExplanation(_Model):
    model_config = ConfigDict(json_schema_extra={"example": _SIDE_EXAMPLE})
    case_id: str | None = Field(description="null for an uploaded query.")
    modality: Modality
    total: float = Field(description="The sum of `regions`: the score.")
    regions: list[list[float]] = Field(
        description="grid x grid signed shares of the score, row-major from the top left of "
        "the model's square (`square`)."
    )
    top_regions: list[RegionShare]
    square: list[float] | None = Field(
        default=None,
        description="Where the model's square lies on the photo (or frame): x0, y0, x1, y1 as "
        "fractions of it, beyond [0, 1] where the square overhangs it. It is the bounding "
        "square of the field-of-view circle; null: the photo centre-padded to a square.",
    )
    frames: list[FrameShare] | None = Field(description="FFA only: each frame's share.")
    phases: list[PhaseShare] | None = Field(
        description="FFA only: arterial (< 20 s), venous (20 s to 5 min), late (from 5 min)."
    )


class SumCheck(_Model):
    query_sum: float
    result_sum: float
    max_error: float = Field(description="Largest |side sum - search_score|.")


class ExplanationResponse(_Model):
    """Why a result matched its query: the score split over both sides' regions."""

    model_config = ConfigDict(json_schema_extra={"example": _EXPLANATION_EXAMPLE})
    similarity: Similarity
    score: float = Field(description="The cosine of the embeddings recomputed from the media.")
    search_score: float = Field(description="The score a search reports for this pair.")
    grid: int = Field(description="Regions per side of the map.")
    sum_check: SumCheck
    query: SideExplanation
    result: SideExplanation


class SearchResponse(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "query": {
                    "kind": "case",
                    "modality": "cf",
                    "case_id": "ph0-00003",
                    "similarity": "combined",
                },
                "target": "ffa",
                "via": "direct",
                "similarity": "combined",
                "k": 1,
                "filters": {"diagnosis": ["PDR"]},
                "score_kind": "cosine",
                "candidates": 12,
                "results": [_ROW_EXAMPLE],
                "synthetic_query": None,
                "suggestion": _SUGGESTION_EXAMPLE,
                "encoder_id": "embedder-3f2a9c1d",
                "timings_ms": {"embed": 0.0, "search": 0.4, "total": 0.6},
            }
        }
    )
    query: QueryInfo
    target: Target
    via: Via
    similarity: Similarity = Field(
        description="How the results were scored: combined, pair (same eye) or clinical "
        "(same disease)."
    )
    k: int
    filters: SearchFilters
    score_kind: Literal["cosine", "rrf", "best_score"] = Field(
        description="cosine; rrf (via fused); best_score (feedback=best_score: in (0, 1) "
        "when closer to a positive than to every negative, else in (-1, 0))."
    )
    candidates: int = Field(description="Indexed items the filters allow in the target index.")
    vessel_checked: bool = Field(
        default=False,
        description="Whether the vessel check re-ranked the results (see `vessel_check`).",
    )
    results: list[ResultRow]
    synthetic_query: SyntheticVideo | None = Field(
        default=None, description="The synthesized FFA video of the query (synthesis, fused)."
    )
    suggestion: DiagnosisSuggestion | None = Field(
        default=None,
        description="Diagnosis suggested by the query's nearest labelled cases in its own "
        "modality (decision support, not a diagnosis); null when the index has no model.",
    )
    encoder_id: str
    timings_ms: dict[str, float]
    explanations: list[ExplanationResponse] | None = Field(
        default=None,
        description="With `explain` (POST /search): why each of the top `explain_top` "
        "results matched, in rank order (by the direct cosine of the query's own embedding).",
    )


# --------------------------------------------------------------------------- cases


def _case_field(f: CatalogField) -> tuple[Any, Any]:
    """A catalog field in `CaseRecord`: the case id is always there; any other may be
    null, or empty for a list whose empty value means none (lesions)."""
    if f.name == "case_id":
        return f.python_type, Field(description=f.description)
    if f.empty is not None:
        return f.python_type, Field(default_factory=list, description=f.description)
    return f.python_type | None, Field(default=None, description=f.description)


_CaseMetadata = create_model(
    "_CaseMetadata", __base__=_Model, **{f.name: _case_field(f) for f in CASE_FIELDS}
)


class CaseRecord(_CaseMetadata):
    """A catalog case: its metadata (the catalog fields except the media paths) and the
    URLs of its media."""

    model_config = ConfigDict(json_schema_extra={"example": _CASE_EXAMPLE})
    modalities: list[Modality] = Field(description="Indexes that hold this case.")
    added: bool = Field(description="Added through POST /cases (media stored with the index).")
    cf_url: str
    ffa_url: str
    synthetic: bool = False


class CasePage(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {"total": 128, "offset": 0, "limit": 1, "items": [_CASE_EXAMPLE]}
        }
    )
    total: int = Field(description="Cases matching the filters.")
    offset: int
    limit: int
    items: list[CaseRecord]


class DeletedCase(_Model):
    model_config = ConfigDict(
        json_schema_extra={"example": {"case_id": "new-001", "deleted": True, "catalog_rows": 127}}
    )
    case_id: str
    deleted: Literal[True] = True
    catalog_rows: int


# --------------------------------------------------------------------------- map, model


class DuplicateList(_Model):
    """GET /cases/{case_id}/duplicates: indexed cases near-duplicating this one."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "case_id": "ph0-00003",
                "items": [
                    {"case_id": "ph0-00012", "modality": "cf", "distance": 0.04, "threshold": 0.2}
                ],
            }
        }
    )
    case_id: str
    items: list[DuplicateMatch]


class MapPoint(_Model):
    case_id: str
    modality: Modality
    diagnosis: str | None = None
    x: float
    y: float


class MapResponse(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "similarity": "clinical",
                "method": "pca",
                "total": 256,
                "sampled": False,
                "explained_variance": [0.31, 0.12],
                "points": [
                    {
                        "case_id": "ph0-00001",
                        "modality": "cf",
                        "diagnosis": "normal",
                        "x": 0.12,
                        "y": -0.4,
                    },
                ],
            }
        }
    )
    similarity: Similarity = Field(
        description="The space projected: that similarity's part of each vector (clinical: "
        "the same disease, pair: the same eye, combined: as stored)."
    )
    method: Literal["pca", "umap"]
    total: int = Field(description="Indexed vectors in the chosen modalities.")
    sampled: bool = Field(description="True when only `limit` of them are shown.")
    explained_variance: list[float] | None = Field(
        default=None, description="PCA: variance ratio of x and y."
    )
    points: list[MapPoint]


class Curve(_Model):
    """A training run's `stats.jsonl`, columnar: `iters[i]` goes with `series[name][i]`."""

    source: str = Field(description="Which run: generator or embedder.")
    iters: list[int]
    series: dict[str, list[float | None]]


class ModelInfo(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "encoder_id": "embedder-3f2a9c1d",
                "dim": 256,
                "image_size": 128,
                "precision": "bfloat16",
                "run": "full",
                "embedder": {"backbone": "generator"},
                "curves": {
                    "generator": {
                        "source": "generator",
                        "iters": [10, 20],
                        "series": {"Loss/G_l1": [0.42, 0.31]},
                    },
                },
                "report": None,
                "report_name": None,
                "reliability_url": None,
            }
        }
    )
    encoder_id: str
    dim: int
    image_size: int
    precision: str = Field(
        default="float32",
        description="The backbone's precision (float32 or bfloat16), as the index was built.",
    )
    run: str | None = Field(default=None, description="The run folder's name.")
    embedder: dict[str, Any] | None = Field(default=None, description="The embedder's config.")
    curves: dict[str, Curve]
    report: dict[str, Any] | None = Field(
        default=None, description="The latest evaluation report found, as written."
    )
    report_name: str | None = None
    reliability_url: str | None = Field(
        default=None, description="The suggestion's reliability diagram (PNG), when present."
    )
