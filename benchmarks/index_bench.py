"""Index benchmark: every index type `choose_index_key` can pick, next to raw `IndexFlatIP`.

For each size n (d=256 by default) on the same synthetic vectors:
build time (train + add), tuning time, QPS at k=10 with 1 and 64 queries per
batch, recall@10 against exact search, and memory per vector.

Vectors: embedding-like — a Gaussian mixture (`--clusters` overlapping centres) on
a random `--rank`-dimensional subspace, plus isotropic noise, L2-normalised
(defaults give a mean top-1 cosine of ~0.72, and IVF needs ~16 probes of 1024
lists: neighbours straddle lists); queries are fresh draws from the same mixture
(not indexed). Ground truth: `IndexFlatIP`.
Memory per vector: `len(faiss.serialize_index(index)) / n` — the on-disk size,
which for `IndexIDMap2` omits its in-memory reverse map (`est_bytes_per_vector`,
from `index.keys.estimate_index_bytes`, includes it). QPS goes through
`VectorIndex.search` (locking, parameters, id handling included); the baseline row
is a bare FAISS `IndexFlatIP`.

    .venv/bin/python benchmarks/index_bench.py --sizes 100000 --threads 2

`--backend faiss,milvus` compares the vector-store backends instead, each with the index
type the rules choose (`choose_index_key`; Milvus maps it, `index.milvus`) over the same
vectors and a synthetic catalog: build time (insert, index, tuning), QPS of single
queries from 1 and 4 client threads, recall@10, and p50 / p95 latency unfiltered and
filtered (`diagnosis` = one of 7 values, inside the search: FAISS through an id selector,
Milvus through its boolean expression). Milvus runs on a Milvus Lite file (a temporary
one unless `--milvus-uri`, which may name a server; its token from
`FUNDUS2VIDEO_MILVUS_TOKEN`). Needs the `scale` extra for `milvus`.

    .venv/bin/python benchmarks/index_bench.py --sizes 100000 --backend faiss,milvus
"""

# ruff: noqa: E741  (D, I are FAISS's names for scores and ids)
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index import (  # noqa: E402
    VectorIndex,
    choose_index_key,
    choose_nlist,
    default_memory_budget,
    estimate_index_bytes,
    gpu_count,
    neighbour_recall,
)
from index.keys import HNSW_M, PQ_NBITS, pq_m_choices  # noqa: E402

K = 10
BASELINE = "IndexFlatIP"


def clustered_vectors(
    n: int,
    d: int,
    *,
    rank: int,
    clusters: int,
    spread: float,
    noise: float,
    seed: int,
    mixture_seed: int = 0,
) -> np.ndarray:
    """n embedding-like unit vectors (a mixture on a rank-`rank` subspace, plus noise)."""
    mix = np.random.default_rng(mixture_seed)
    centers = mix.standard_normal((clusters, rank)).astype(np.float32)
    proj = (mix.standard_normal((rank, d)) / np.sqrt(rank)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        z = centers[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, rank))
        x = z.astype(np.float32) @ proj
        x += noise * rng.standard_normal((m, d)).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def candidate_keys(n: int, d: int) -> list[str]:
    """One key per family `choose_index_key` can return, at this n and d."""
    nlist = choose_nlist(n)
    m = pq_m_choices(d)[0]  # the least lossy PQ choose_index_key emits
    return [
        "Flat",
        f"HNSW{HNSW_M}",
        f"IVF{nlist},Flat",
        f"IVF{nlist},SQ8",
        f"IVF{nlist},PQ{m}x{PQ_NBITS}",
    ]


def qps(search: Callable[[np.ndarray], object], q: np.ndarray, batch: int, budget_s: float):
    """Queries per second, batches of `batch`, stopping after `budget_s` (>= 2 batches)."""
    search(q[:batch])  # warm-up
    done, t0 = 0, time.perf_counter()
    for start in range(0, len(q) - batch + 1, batch):
        search(q[start : start + batch])
        done += batch
        if done >= 2 * batch and time.perf_counter() - t0 > budget_s:
            break
    return done / (time.perf_counter() - t0)


def bench_baseline(x, q, truth, budget_s, use_gpu) -> dict:
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    build = time.perf_counter() - t0
    size = len(faiss.serialize_index(flat))
    if use_gpu:
        flat = faiss.index_cpu_to_all_gpus(flat)
    _, I = flat.search(q, K)
    return {
        "key": BASELINE,
        "build_s": build,
        "tune_s": 0.0,
        "qps_b1": qps(lambda b: flat.search(b, K), q, 1, budget_s),
        "qps_b64": qps(lambda b: flat.search(b, K), q, 64, budget_s),
        "recall@10": neighbour_recall(I, truth),
        "bytes_per_vector": size / len(x),
        "est_bytes_per_vector": 4 * x.shape[1],
        "search_params": {},
        "device": "gpu" if use_gpu else "cpu",
    }


def bench_key(key, x, q, truth, budget_s, use_gpu, target_recall) -> dict:
    t0 = time.perf_counter()
    vi = VectorIndex.build(x, key=key, target_recall=target_recall, use_gpu=use_gpu)
    total = time.perf_counter() - t0
    tune = vi.build_timings["tune_s"]
    build = total - tune
    _, I = vi.search(q, K)
    row = {
        "key": vi.key,
        "build_s": build,
        "tune_s": tune,
        "qps_b1": qps(lambda b: vi.search(b, K), q, 1, budget_s),
        "qps_b64": qps(lambda b: vi.search(b, K), q, 64, budget_s),
        "recall@10": neighbour_recall(I, truth),
        "bytes_per_vector": len(vi.serialize()) / len(x),
        "est_bytes_per_vector": estimate_index_bytes(vi.key, len(x), x.shape[1]) / len(x),
        "search_params": vi.search_params,
        "device": vi.device,
    }
    return row


def print_table(rows: list[dict]) -> None:
    cols = [
        ("n", "{:>9,}"),
        ("key", "{:<16}"),
        ("build_s", "{:>8.1f}"),
        ("tune_s", "{:>7.1f}"),
        ("qps_b1", "{:>9,.0f}"),
        ("qps_b64", "{:>9,.0f}"),
        ("recall@10", "{:>9.3f}"),
        ("bytes_per_vector", "{:>8,.0f}"),
        ("search_params", "{!s:<18}"),
        ("device", "{:<4}"),
    ]
    names = {"bytes_per_vector": "B/vec", "search_params": "params", "recall@10": "recall@10"}
    header = " | ".join(
        f"{names.get(c, c):{'<' if '<' in f else '>'}{len(f.format(*_blank(c)))}}" for c, f in cols
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        params = ",".join(f"{k}={v}" for k, v in r["search_params"].items()) or "-"
        print(" | ".join(f.format(params if c == "search_params" else r[c]) for c, f in cols))


def _blank(column: str) -> tuple:
    return ("",) if column in ("key", "search_params", "device") else (0,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated n")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1024, help="held-out queries")
    parser.add_argument("--rank", type=int, default=64, help="intrinsic dimension")
    parser.add_argument("--clusters", type=int, default=100, help="mixture components")
    parser.add_argument("--spread", type=float, default=1.0, help="within-cluster std")
    parser.add_argument("--noise", type=float, default=0.1, help="isotropic noise std")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--time-per-qps", type=float, default=3.0, help="seconds per QPS figure")
    parser.add_argument("--keys", default=None, help="comma-separated subset of families")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even with GPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON report path")
    parser.add_argument("--backend", default=None, help="compare backends: faiss,milvus")
    parser.add_argument("--milvus-uri", default=None, help="Milvus URI (default: a Lite file)")
    parser.add_argument("--clients", default="1,4", help="client threads for the QPS figures")
    args = parser.parse_args(argv)
    if args.backend:
        return backend_main(args)
    args.out = args.out or Path("benchmarks/results/index_bench.json")

    faiss.omp_set_num_threads(args.threads)
    use_gpu = gpu_count() > 0 and not args.cpu
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows: list[dict] = []
    for n in sizes:
        mixture = dict(rank=args.rank, clusters=args.clusters, spread=args.spread, noise=args.noise)
        x = clustered_vectors(n, args.dim, seed=args.seed, **mixture)
        q = clustered_vectors(args.queries, args.dim, seed=args.seed + 1, **mixture)
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(x)
        truth = flat.search(q, K)[1]
        del flat
        keys = candidate_keys(n, args.dim)
        if args.keys:
            wanted = args.keys.split(",")
            keys = [k for k in keys if any(k.startswith(w) or w in k for w in wanted)]
        auto = choose_index_key(n, args.dim, default_memory_budget(), use_gpu=use_gpu)
        jobs = [BASELINE, *keys]
        for key in tqdm(jobs, desc=f"n={n:,}", unit="index"):
            if key == BASELINE:
                row = bench_baseline(x, q, truth, args.time_per_qps, use_gpu)
            else:
                row = bench_key(key, x, q, truth, args.time_per_qps, use_gpu, args.target_recall)
            rows.append({"n": n, "d": args.dim, "auto": row["key"] == auto, **row})
            gc.collect()
            tqdm.write(f"  {row['key']}: recall@10 {row['recall@10']:.3f}")
        del x
        gc.collect()

    print_table(rows)
    report = {
        "benchmark": "index",
        "config": {**vars(args), "out": str(args.out), "k": K},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "faiss": faiss.__version__,
            "gpus": gpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "memory_note": "bytes_per_vector = len(faiss.serialize_index(index)) / n",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- backends

DIAGNOSES = ("normal", "NPDR", "PDR", "BRVO", "CRVO", "wet-AMD", "CSC")
BACKEND_FILTER = {"diagnosis": ["PDR"]}


def synthetic_catalog(n: int, seed: int):
    """A catalog of n rows with the filter columns (diagnosis, eye, split, lesions)."""
    import polars as pl

    rng = np.random.default_rng(seed)
    lesions = (["microaneurysm"], ["haemorrhage", "leakage"], [], ["drusen"])
    return pl.DataFrame(
        {
            "row_id": np.arange(n, dtype=np.int64),
            "case_id": [f"case-{i}" for i in range(n)],
            "eye": rng.choice(["OD", "OS"], n),
            "diagnosis": rng.choice(DIAGNOSES, n),
            "split": rng.choice(["train", "val", "test"], n),
            "lesions": [lesions[i] for i in rng.integers(0, len(lesions), n)],
        },
        schema_overrides={"lesions": pl.List(pl.String)},
    )


def concurrent_qps(search: Callable[[np.ndarray], object], q: np.ndarray, clients: int, budget_s):
    """Single-query searches per second from `clients` threads, for about `budget_s`."""
    from concurrent.futures import ThreadPoolExecutor

    def worker(offset: int) -> int:
        done, t_end = 0, time.perf_counter() + budget_s
        while time.perf_counter() < t_end:
            i = (offset + done * clients) % len(q)
            search(q[i : i + 1])
            done += 1
        return done

    search(q[:1])  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(worker, range(clients)))
    return total / (time.perf_counter() - t0)


def latencies_ms(search: Callable[[np.ndarray], object], q: np.ndarray, n: int) -> np.ndarray:
    """Milliseconds of `n` single-query searches (after 20 warm-up ones)."""
    for i in range(min(20, len(q))):
        search(q[i : i + 1])
    out = []
    for i in range(min(n, len(q))):
        t0 = time.perf_counter()
        search(q[i : i + 1])
        out.append((time.perf_counter() - t0) * 1000)
    return np.asarray(out)


def build_backend(backend: str, x, catalog, args, workdir: Path):
    """The store of `backend` over `x` (ids = catalog row ids) and its filter argument."""
    from index import MilvusTarget, build_store, catalog_allowed_ids
    from index.backend import filtered_ids

    ids = catalog["row_id"].to_numpy()
    allowed = catalog_allowed_ids(catalog, BACKEND_FILTER)
    target, options = None, {"use_gpu": False}
    if backend == "milvus":
        target = MilvusTarget.from_env(args.milvus_uri or str(workdir / "bench.db"), "bench")
        allowed = filtered_ids(allowed, BACKEND_FILTER)
        options = {"progress": True}
    store = build_store(
        x,
        ids,
        modality="cf",
        backend=backend,
        milvus=target,
        encoder_id="bench",
        catalog=catalog,
        target_recall=args.target_recall,
        **options,
    )
    return store, allowed


def bench_backend(backend: str, x, q, catalog, truths, args, workdir: Path) -> dict:
    truth, filtered_truth = truths
    t0 = time.perf_counter()
    store, allowed = build_backend(backend, x, catalog, args, workdir)
    build_s = time.perf_counter() - t0
    plain = lambda b: store.search(b, K)  # noqa: E731
    filtered = lambda b: store.search(b, K, allowed=allowed)  # noqa: E731
    found = np.concatenate([plain(q[i : i + 64])[1] for i in range(0, len(q), 64)])
    found_f = np.concatenate([filtered(q[i : i + 64])[1] for i in range(0, len(q), 64)])
    lat, lat_f = latencies_ms(plain, q, 200), latencies_ms(filtered, q, 200)
    row = {
        "backend": backend,
        "key": store.key,
        "index_type": store.stats().get("index_type", store.key),
        "build_s": build_s,
        "build_timings": {k: round(v, 2) for k, v in store.build_timings.items()},
        "recall@10": neighbour_recall(found, truth),
        "filtered_recall@10": neighbour_recall(found_f, filtered_truth),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "filtered_p50_ms": float(np.percentile(lat_f, 50)),
        "filtered_p95_ms": float(np.percentile(lat_f, 95)),
        "search_params": store.search_params,
        "filter_selectivity": float(np.asarray(allowed).size / len(x)),
    }
    for c in [int(c) for c in args.clients.split(",")]:
        row[f"qps_c{c}"] = concurrent_qps(plain, q, c, args.time_per_qps)
    if backend == "milvus" and args.milvus_uri:
        store.drop()  # a server keeps collections; the temporary Lite file goes with workdir
    return row


def print_backend_table(rows: list[dict], clients: list[int]) -> None:
    cols = ["n", "backend", "key", "build_s", *[f"qps_c{c}" for c in clients], "recall@10"]
    cols += ["filtered_recall@10", "p50_ms", "filtered_p50_ms", "filtered_p95_ms"]
    print(" | ".join(f"{c:>12}" for c in cols))
    print("-" * (15 * len(cols)))
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:>12,.3f}" if isinstance(v, float) else f"{v!s:>12}")
        print(" | ".join(cells))


def backend_main(args) -> int:
    """`--backend`: the backends side by side (see the module docstring)."""
    import tempfile

    faiss.omp_set_num_threads(args.threads)
    load_at_start = os.getloadavg()  # more than ~0.5 per core: the machine was not idle
    backends = [b for b in args.backend.split(",") if b]
    out = args.out or Path("benchmarks/results/index_backends.json")
    rows: list[dict] = []
    mixture = dict(rank=args.rank, clusters=args.clusters, spread=args.spread, noise=args.noise)
    for n in [int(s) for s in args.sizes.split(",") if s]:
        x = clustered_vectors(n, args.dim, seed=args.seed, **mixture)
        q = clustered_vectors(args.queries, args.dim, seed=args.seed + 1, **mixture)
        catalog = synthetic_catalog(n, args.seed)
        keep = catalog["diagnosis"].is_in(BACKEND_FILTER["diagnosis"]).to_numpy()
        truth = faiss.knn(q, x, K, faiss.METRIC_INNER_PRODUCT)[1]
        filtered_truth = np.flatnonzero(keep)[
            faiss.knn(q, x[keep], K, faiss.METRIC_INNER_PRODUCT)[1]
        ]
        for backend in backends:
            with tempfile.TemporaryDirectory(prefix="index-bench-") as workdir:
                row = bench_backend(
                    backend, x, q, catalog, (truth, filtered_truth), args, Path(workdir)
                )
                if backend == "milvus":
                    from index.milvus import close_clients

                    close_clients()
            rows.append({"n": n, "d": args.dim, **row})
            tqdm.write(f"  n={n:,} {backend}: {row}")
            gc.collect()
    clients = [int(c) for c in args.clients.split(",")]
    print_backend_table(rows, clients)
    report = {
        "benchmark": "index_backends",
        "config": {**vars(args), "out": str(out), "k": K, "filter": BACKEND_FILTER},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "faiss": faiss.__version__,
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
