"""GET /map (2-D projection of the indexed embeddings) and GET /model (identity, curves, report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from ...insights import find_report, project_2d, read_curves, read_json, umap_available
from ..deps import EngineDep, SettingsDep
from ..schemas import MapResponse, ModelInfo

router = APIRouter(tags=["system"])


@router.get("/map", response_model=MapResponse, summary="2-D map of the indexed embeddings")
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
) -> dict:
    if limit > settings.map_max_points:
        raise HTTPException(422, f"limit: at most {settings.map_max_points} points (got {limit})")
    if method == "umap" and not umap_available():
        raise HTTPException(422, "method: umap needs umap-learn, which is not installed (use pca)")
    key = (engine.generation, modality, method, limit)
    cache: dict = request.app.state.map_cache
    if key not in cache:
        cache.clear()  # one map at a time: the latest
        cache[key] = await run_in_threadpool(_map, engine, modality, method, limit)
    return cache[key]


def _map(engine, modality: str, method: str, limit: int) -> dict[str, Any]:
    modalities = ("cf", "ffa") if modality == "all" else (modality,)
    cases, mods, vectors, total = engine.snapshot_vectors(modalities, limit)
    xy, used, explained = project_2d(vectors, method)
    points = [
        {"case_id": c.case_id, "modality": m, "diagnosis": c.diagnosis,
         "x": float(x), "y": float(y)}
        for c, m, (x, y) in zip(cases, mods, xy.tolist(), strict=True)
    ]  # fmt: skip
    return {
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
    embedder_config = read_json(Path(embedder_dir) / "config.json") if embedder_dir else None
    return {
        "encoder_id": engine.encoder_id,
        "dim": encoder.dim,
        "image_size": encoder.image_size,
        "run": Path(run).name if run is not None else None,
        "embedder": embedder_config,
        "curves": curves,
        "report": read_json(report),
        "report_name": report.name if report is not None else None,
    }
