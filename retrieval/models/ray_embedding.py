"""Batch embedding on Ray Data: `fundus2video index RUN COHORT --out INDEX --ray`.

The catalog becomes a Ray Dataset of case rows. Decode tasks read each case's media and
crop it to its field of view (`map_batches` over tasks, as many in parallel as the
cluster has CPUs); an actor pool embeds the crops (`map_batches` over actors, each
loading the embedder once, one GPU per actor where the cluster has GPUs). The driver
writes the vectors as parquet shards of `shard_cases` consecutive catalog rows, each one
atomically, into a shards folder, and `build_index` builds the index from them.

A job that dies (or is killed) resumes: the shards on disk are kept and only the rows of
the missing ones are embedded again. `plan.json` in the shards folder pins what the
shards were made from (encoder, precision, the cohort's cases and media); a different
plan is refused, naming the field, rather than mixed in.

Nothing here is imported without `--ray`: `ray` is in the `scale` extra.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from encoder.embedder import embed_cf_array
from encoder.fov import fov_square, fov_square_video, stored_circle
from index.atomic import atomic_path, atomic_write_text
from retrieval.data.cohort import Case, Cohort
from retrieval.data.media import read_cf, read_ffa
from retrieval.errors import Fundus2VideoError

from .embedding import QueryEncoder, video_times

PLAN_NAME = "plan.json"
SHARD_CASES = 256  # catalog rows per parquet shard: what a killed job loses at most
BATCH_CASES = 16  # cases per decode / embed batch


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: `address` None starts a local Ray (all this machine's CPUs);
    "auto" or ray://host:10001 joins a cluster. `workers` embedding actors, each with
    `cpus_per_worker` threads; GPUs: one per actor when the cluster has them."""

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    shards: Path | None = None  # default: the index folder's path + ".shards"
    shard_cases: int = SHARD_CASES

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise Fundus2VideoError(f"--ray-workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise Fundus2VideoError(
                f"--ray-cpus-per-worker must be > 0, got {self.cpus_per_worker}"
            )
        if self.shard_cases < 1:
            raise Fundus2VideoError(f"shard size must be >= 1 case, got {self.shard_cases}")


def shards_folder(out: str | Path, options: RayOptions) -> Path:
    return Path(options.shards) if options.shards else Path(f"{Path(out)}.shards")


def embed_cohort_ray(
    encoder: QueryEncoder, cohort: Cohort, shards: Path, options: RayOptions, progress=True
) -> tuple[np.ndarray, np.ndarray]:
    """Every case of `cohort` (catalog order) → CF and FFA embeddings (N, D), embedded on
    Ray into the parquet shards in `shards` (resuming from those already there)."""
    cases = cohort.cases()
    n, size = len(cases), options.shard_cases
    _check_plan(shards, _plan(encoder, cases, size))
    todo = [k for k in range((n + size - 1) // size) if not _shard_path(shards, k).is_file()]
    rows = [r for k in todo for r in range(k * size, min(n, (k + 1) * size))]
    if rows:
        _run(encoder, cases, rows, shards, options, progress)
    return _read_shards(shards, n, size, encoder.dim)


def _plan(encoder: QueryEncoder, cases: list[Case], shard_cases: int) -> dict[str, Any]:
    media = hashlib.sha256()
    for c in cases:
        media.update(f"{c.case_id}\0{c.cf_path}\0{c.ffa_path}\0{c.ffa_times_s}\n".encode())
    return {
        "encoder_id": encoder.encoder_id,
        "precision": encoder.precision,
        "cases": len(cases),
        "shard_cases": shard_cases,
        "cases_sha256": media.hexdigest(),
    }


def _check_plan(shards: Path, plan: dict[str, Any]) -> None:
    path = shards / PLAN_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in plan if old.get(k) != plan[k]]
        if changed:
            raise Fundus2VideoError(
                f"{shards}: its shards were made with another {', '.join(changed)}; "
                "remove the folder to start over, or pass another --ray-shards"
            )
        return
    shards.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(plan, indent=2))


def _shard_path(shards: Path, k: int) -> Path:
    return shards / f"shard-{k:06d}.parquet"


def _run(encoder, cases, rows, shards, options: RayOptions, progress: bool) -> None:
    try:
        import ray  # the scale extra
    except ImportError as e:
        raise Fundus2VideoError("--ray needs Ray: pip install -e '.[scale]'") from e

    started = not ray.is_initialized()
    if started:
        # locally, room for the decode tasks beside the actors (else they would starve)
        cpus = max(os.cpu_count() or 1, math.ceil(options.workers * options.cpus_per_worker) + 1)
        local = {"num_cpus": cpus} if options.address is None else {}
        ray.init(address=options.address, log_to_driver=False, logging_level="WARNING", **local)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours: tqdm
        items = [_item(i, cases[i]) for i in rows]
        blocks = math.ceil(len(rows) / BATCH_CASES)
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            _decode, fn_kwargs={"size": encoder.image_size}, batch_size=BATCH_CASES, num_cpus=0.5
        )
        ds = ds.map_batches(
            _EmbedActor,
            fn_constructor_kwargs={
                "run": str(encoder.run_dir),
                "embedder_dir": str(encoder.embedder_dir),
                "precision": encoder.precision,
                "threads": max(1, int(options.cpus_per_worker)),
            },
            batch_size=BATCH_CASES,
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_cpus=options.cpus_per_worker,
            num_gpus=1 if gpus else 0,
        )
        _write_shards(ds, rows, shards, options.shard_cases, progress)
    finally:
        if started:
            ray.shutdown()


def _item(row: int, case: Case) -> dict[str, Any]:
    return {
        "row": row,
        "cf_path": str(case.cf_path),
        "ffa_path": str(case.ffa_path),
        "times": list(case.ffa_times_s) if case.ffa_times_s is not None else [],
        "cf_fov": list(case.cf_fov) if case.cf_fov is not None else [],
        "ffa_fov": list(case.ffa_fov) if case.ffa_fov is not None else [],
    }


def _decode(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A decode task: case rows → CF squares (n, S, S, 3), FFA squares (T, S, S) each and
    their frame times, as the single-process path crops them."""
    cf, ffa, times = [], [], []
    for i in range(len(batch["row"])):
        cf.append(fov_square(read_cf(batch["cf_path"][i]), size, _circle(batch["cf_fov"][i])))
        video = read_ffa(batch["ffa_path"][i])
        ffa.append(fov_square_video(video, size, _circle(batch["ffa_fov"][i])))
        t = np.asarray(batch["times"][i], np.float32)
        times.append(video_times(t if len(t) else None, len(video)))
    return {"row": batch["row"], "cf": np.stack(cf), "ffa": _ragged(ffa), "times": _ragged(times)}


def _circle(values: Any):
    return stored_circle(list(values) if values is not None and len(values) else None)


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays that may differ in shape (videos of different lengths)."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


class _EmbedActor:
    """One embedding worker: loads the embedder once, embeds batches of crops."""

    def __init__(self, run: str, embedder_dir: str, precision: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.encoder = QueryEncoder.open(run, embedder_dir, precision=precision)
        if torch.cuda.is_available():  # an actor given a GPU
            self.encoder.embedder.to("cuda")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cf = embed_cf_array(self.encoder.embedder, np.stack(list(batch["cf"])))
        ffa = self.encoder.embed_ffa_squares(list(batch["ffa"]), list(batch["times"]))
        return {"row": batch["row"], "cf": cf, "ffa": ffa}


def _write_shards(ds, rows: list[int], shards: Path, size: int, progress: bool) -> None:
    """Collect the actors' output (in any order); write each shard once it is whole."""
    want: dict[int, int] = {}
    for r in rows:
        want[r // size] = want.get(r // size, 0) + 1
    got: dict[int, dict[str, list]] = {}
    with tqdm(total=len(rows), desc="embed (ray)", unit="case", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for row, cf, ffa in zip(batch["row"], batch["cf"], batch["ffa"], strict=True):
                part = got.setdefault(int(row) // size, {"row": [], "cf": [], "ffa": []})
                part["row"].append(int(row))
                part["cf"].append(np.asarray(cf, np.float32))
                part["ffa"].append(np.asarray(ffa, np.float32))
                if len(part["row"]) == want[int(row) // size]:
                    _write_shard(_shard_path(shards, int(row) // size), got.pop(int(row) // size))
            bar.update(len(batch["row"]))


def _write_shard(path: Path, part: dict[str, list]) -> None:
    dim = len(part["cf"][0])
    frame = pl.DataFrame(
        {
            "row": np.asarray(part["row"], np.int64),
            "cf": np.stack(part["cf"]),
            "ffa": np.stack(part["ffa"]),
        },
        schema={"row": pl.Int64, "cf": pl.Array(pl.Float32, dim), "ffa": pl.Array(pl.Float32, dim)},
    ).sort("row")
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def _read_shards(shards: Path, n: int, size: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    cf, ffa = np.zeros((n, dim), np.float32), np.zeros((n, dim), np.float32)
    for k in range((n + size - 1) // size):
        frame = pl.read_parquet(_shard_path(shards, k))
        expected = np.arange(k * size, min(n, (k + 1) * size))
        if not np.array_equal(frame["row"].to_numpy(), expected):
            raise Fundus2VideoError(f"{_shard_path(shards, k)}: not rows {expected[0]}..")
        cf[expected] = frame["cf"].to_numpy()
        ffa[expected] = frame["ffa"].to_numpy()
    return cf, ffa
