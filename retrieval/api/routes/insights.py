"""GET /map (2-D projection of the indexed embeddings), GET /model (identity, curves, report)
and GET /model/reliability.png (the diagnosis suggestion's reliability diagram)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from retrieval.search.engine import check_similarity, default_similarity
from retrieval.search.insights import (
    find_report,
    project_2d,
    read_curves,
    read_json,
    umap_available,
)

from ..deps import EngineDep, SettingsDep
from ..schemas import ErrorResponse, MapResponse, ModelInfo, Similarity

router = APIRouter(tags=["system"])
RELIABILITY_URL = "/model/reliability.png"
RELIABILITY_KEY = "reliability_png"  # in the report: the PNG's path, relative to its folder
MAP_SIMILARITY_HELP = (
    "The space projected, as a search by that similarity sees it: clinical (the clinical "
    "part alone: the same disease), pair (the pair part alone: the same eye across "
    "modalities) or combined (the vectors as stored). Default: clinical, or pair when the "
    "index's encoder has no clinical part (the only one it then supports: another is a 422)."
)
MAP_DESCRIPTION = (
    "Each stored vector is restricted to the `similarity`'s part (times the square root of "
    "its query factors, so that inner products are that similarity's scores), then "
    "projected to 2-D. The response echoes the `similarity`."
)


@router.get(
    "/map",
    response_model=MapResponse,
    summary="2-D map of the indexed embeddings",
    description=MAP_DESCRIPTION,
)
async def embedding_map(
    engine: EngineDep,
    settings: SettingsDep,
    request: Request,
    modality: Annotated[
        Literal["cf", "ffa", "all"], Query(description="Whose embeddings: cf, ffa or all.")
    ] = "all",
    method: Annotated[
        Literal["auto", "pca", "umap"], Query(description="auto: UMAP when installed, else PCA.")
    ] = "auto",
    limit: Annotated[
        int, Query(ge=10, le=1_000_000, description="Most points (a seeded sample beyond).")
    ] = 5000,
    similarity: Annotated[Similarity | None, Query(description=MAP_SIMILARITY_HELP)] = None,
) -> dict:
    if limit > settings.map_max_points:
        raise HTTPException(422, f"limit: at most {settings.map_max_points} points (got {limit})")
    if method == "umap" and not umap_available():
        raise HTTPException(422, "method: umap needs umap-learn, which is not installed (use pca)")
    if similarity is None:
        similarity = default_similarity(engine.similarities)
    check_similarity(similarity, engine.similarities)  # QueryError: a 422 naming it
    key = (engine.generation, modality, method, limit, similarity)
    cache: dict = request.app.state.map_cache
    if key not in cache:
        for old in [k for k in cache if k[:-1] != key[:-1]]:
            del cache[old]  # the latest map only, once per similarity
        cache[key] = await run_in_threadpool(_map, engine, modality, method, limit, similarity)
    return cache[key]


def _map(engine, modality: str, method: str, limit: int, similarity: str) -> dict[str, Any]:
    modalities = ("cf", "ffa") if modality == "all" else (modality,)
    cases, mods, vectors, total = engine.snapshot_vectors(modalities, limit, similarity=similarity)
    xy, used, explained = project_2d(vectors, method)
    points = [
        {
            "case_id": c.case_id,
            "modality": m,
            "diagnosis": c.diagnosis,
            "x": float(x),
            "y": float(y),
        }
        for c, m, (x, y) in zip(cases, mods, xy.tolist(), strict=True)
    ]
    return {
        "similarity": similarity,
        "method": used,
        "total": total,
        "sampled": len(points) < total,
        "explained_variance": explained,
        "points": points,
    }


@router.get("/model", response_model=ModelInfo, summary="The encoder, its curves, its evaluation")
def model_info(engine: EngineDep, settings: SettingsDep) -> dict:
    encoder = engine.encoder
    run = getattr(encoder, "run_dir", None)
    embedder_dir = getattr(encoder, "embedder_dir", None)
    curves = {}
    for source, folder in (("generator", run), ("embedder", embedder_dir)):
        if folder is not None:
            curve = read_curves(Path(folder) / "stats.jsonl")
            if curve is not None:
                curves[source] = {"source": source, **curve}
    report = find_report(settings.report, run, engine.path)
    report_body = read_json(report)
    embedder_config = read_json(Path(embedder_dir) / "config.json") if embedder_dir else None
    png = reliability_png_path(report, report_body)
    return {
        "encoder_id": engine.encoder_id,
        "dim": encoder.dim,
        "image_size": encoder.image_size,
        "precision": getattr(encoder, "precision", "float32"),
        "run": Path(run).name if run is not None else None,
        "embedder": embedder_config,
        "curves": curves,
        "report": report_body,
        "report_name": report.name if report is not None else None,
        "reliability_url": RELIABILITY_URL if png is not None else None,
    }


@router.get(
    RELIABILITY_URL,
    summary="Reliability diagram of the diagnosis suggestion (PNG)",
    description=(
        "Accuracy against confidence of the suggestion from similar cases, drawn by "
        "`fundus2video evaluate` beside its report (the report's `reliability_png`, else "
        "`<report>.reliability.png`). 404 when the report has none."
    ),
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The diagram."},
        404: {"model": ErrorResponse, "description": "No report, or no diagram beside it."},
    },
)
def reliability_diagram(engine: EngineDep, settings: SettingsDep) -> Response:
    report = find_report(settings.report, getattr(engine.encoder, "run_dir", None), engine.path)
    png = reliability_png_path(report, read_json(report))
    if png is None:
        where = f"beside {report.name}" if report is not None else "(no evaluation report found)"
        raise HTTPException(404, f"no reliability diagram {where}; run `fundus2video evaluate`")
    return Response(png.read_bytes(), media_type="image/png")


def reliability_png_path(report: Path | None, body: dict[str, Any] | None) -> Path | None:
    """The reliability PNG of a report: its `reliability_png` (relative to the report's
    folder, at the top level or under `retrieval`), else `<report stem>.reliability.png`."""
    if report is None:
        return None
    names = []
    for part in (body or {}, (body or {}).get("retrieval")):
        if isinstance(part, dict) and isinstance(part.get(RELIABILITY_KEY), str):
            names.append(part[RELIABILITY_KEY])
    names.append(f"{report.stem}.reliability.png")
    for name in names:
        path = report.parent / name
        if path.suffix.lower() == ".png" and path.is_file():
            return path
    return None
