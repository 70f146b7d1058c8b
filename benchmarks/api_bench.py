"""API benchmark: search latency (p50/p95/p99) and QPS over HTTP at 1, 4 and 16 clients.

On one 100k-case index (synthetic vectors, d=256; `choose_index_key` picks HNSW32 and
tunes efSearch to recall@10 >= 0.95), three systems answer the same queries:

- `faiss`: raw FAISS `search` in-process on the very same index (reconstructed query
  vector, k+1 results, the tuned efSearch): the floor of any search;
- `minimal`: a FastAPI service of a few lines (below) wrapping the same FAISS file,
  returning ids: the floor of any HTTP search service;
- `ours`: `retrieval.api` (`create_app` over `Engine`), search by case id
  (`GET /cases/{id}/similar`) and by uploaded CF image (`POST /search`: PNG decode,
  embedding by `retrieval.testing.PixelEncoder`, search; no model weights needed).

Each server is its own uvicorn process (one worker, no access log, OMP_NUM_THREADS=1;
ours logs one line per request, as `fundus2video serve` does). Clients are threads of
this process, each with its own keep-alive connection (`RawHttp`: a few lines over a
socket, so that the client's cost stays far below the servers'), sending requests
back to back; each row is `--rounds` interleaved slices of `--seconds` in all, after a
warm-up. The built index is cached under `--cache` (gitignored).

    .venv/bin/python benchmarks/api_bench.py            # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/api_bench.py --n 20000 --seconds 2   # quick look
"""

from __future__ import annotations

import os

# One OpenMP thread per search, here and in both servers (they inherit it): single-query
# searches gain nothing from a team, whose idle spinning starves 2 cores. libgomp reads
# this once, when FAISS loads, so it is set before any import that loads FAISS.
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import contextlib
import json
import platform
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import httpx
import numpy as np
import polars as pl
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from index_bench import clustered_vectors  # noqa: E402, I001  (benchmarks/ is on sys.path)

from index import VectorIndex, load_index_folder, read_manifest, save_index_folder  # noqa: E402
from retrieval.apps.processes import free_port  # noqa: E402
from retrieval.data.cohort import CATALOG_SCHEMA, DIAGNOSES  # noqa: E402
from retrieval.data.phantom import write_phantom_cohort  # noqa: E402
from retrieval.testing import PixelEncoder  # noqa: E402

K = 10
MINIMAL_SERVICE = """
import os, faiss
from fastapi import FastAPI

index = faiss.read_index(os.environ["BENCH_FAISS"])
params = faiss.SearchParametersHNSW(efSearch=int(os.environ["BENCH_EF"]))
app = FastAPI()


@app.get("/similar/{i}")
def similar(i: int, k: int = 10):
    D, I = index.search(index.reconstruct(i)[None], k + 1, params=params)
    return {"ids": [int(j) for j in I[0] if j != i][:k]}
"""
OUR_SERVICE = """
import logging, sys, uvicorn
from retrieval.api import Settings, create_app
from retrieval.search.engine import Engine
from retrieval.testing import PixelEncoder

# logging as `fundus2video serve` sets it up
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
engine = Engine.open(sys.argv[1], encoder=PixelEncoder(dim=int(sys.argv[2])))
# one client address sends everything: no rate limits (they would answer 429)
settings = Settings(rate_search="", rate_generate="", rate_write="")
uvicorn.run(create_app(settings, engine=engine), host="127.0.0.1", port=int(sys.argv[3]),
            access_log=False, log_config=None)
"""


# --------------------------------------------------------------------------- the index


def build_index(cache: Path, n: int, d: int, seed: int) -> Path:
    """The 100k-case index folder (cached): synthetic vectors, a catalog, phantom media."""
    folder = cache / f"index-n{n}-d{d}-s{seed}"
    if (folder / "manifest.json").is_file():
        return folder
    cohort = cache / "cohort"
    if not (cohort / "catalog.parquet").is_file():
        write_phantom_cohort(cohort, cases=8, size=128, frames=8, seed=seed, progress=False)
    media = pl.read_parquet(cohort / "catalog.parquet")
    cf = clustered_vectors(n, d, rank=64, clusters=100, spread=1.0, noise=0.1, seed=seed)
    rng = np.random.default_rng(seed + 1)
    ffa = cf + 0.3 * rng.standard_normal(cf.shape).astype(np.float32) / np.sqrt(d)
    ffa /= np.linalg.norm(ffa, axis=1, keepdims=True)
    pick = np.arange(n) % media.height
    catalog = pl.DataFrame(
        {
            "case_id": [f"syn-{i:06d}" for i in range(n)],
            "patient_id": [f"synp-{i // 2:06d}" for i in range(n)],
            "eye": np.where(np.arange(n) % 2, "OS", "OD"),
            "age": rng.integers(20, 90, n).astype(np.int32),
            "sex": np.where(rng.random(n) < 0.5, "F", "M"),
            "diagnosis": np.asarray(DIAGNOSES)[rng.integers(0, len(DIAGNOSES), n)],
            "lesions": [["leakage"] if i % 3 == 0 else [] for i in range(n)],
            "split": np.asarray(["train", "val", "test"])[(np.arange(n) // 2) % 3],
            "cf_path": [str(cohort / media["cf_path"][int(j)]) for j in pick],
            "ffa_path": [str(cohort / media["ffa_path"][int(j)]) for j in pick],
            "ffa_times_s": [media["ffa_times_s"][int(j)].to_list() for j in pick],
            "source": ["synthetic"] * n,
        },
        schema=CATALOG_SCHEMA,
    ).with_row_index("row_id")
    ids = np.arange(n, dtype=np.int64)
    tqdm.write(f"building the {n:,}-vector index (cached in {folder}) ...")
    indexes = {"cf": VectorIndex.build(cf, ids), "ffa": VectorIndex.build(ffa, ids)}
    encoder_id = PixelEncoder(dim=d).encoder_id
    save_index_folder(folder, indexes, catalog, encoder_id, {"cohort_dir": str(cohort)})
    return folder


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def server(cmd: list[str], env: dict[str, str], url: str, log: Path) -> Iterator[str]:
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{cmd[:3]} exited with {process.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/openapi.json", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise TimeoutError(f"{url} did not start; see {log}")
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


# --------------------------------------------------------------------------- load


def run_load(
    make_call: Callable[[], Callable[[int], None]], clients: int, seconds: float, warmup: float
) -> list[float]:
    """`clients` threads calling back to back; the latencies (ms) after the warm-up."""
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        call = make_call()
        i = w * 1_000_003
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    break
                call(i)
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    latencies[w].append(t1 - t0)
                i += 1
        except BaseException as err:  # noqa: BLE001 - reported by the caller
            errors.append(err)
        finally:
            close = getattr(call, "close", None)
            if close is not None:
                close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [x * 1000 for w in latencies for x in w]  # ms


def summarize(latencies_ms: list[float], clients: int, seconds: float) -> dict:
    lat = np.asarray(latencies_ms)
    return {
        "clients": clients,
        "requests": int(lat.size),
        "qps": lat.size / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_ms": float(lat.mean()),
    }


_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)")


class RawHttp:
    """A keep-alive HTTP/1.1 client of a few lines, over a plain socket.

    Requests are encoded once, up front; a response is read to its Content-Length.
    It costs the client tens of µs a request, where httpx costs ~0.5 ms, so the
    servers, not this process's GIL, set the pace.
    """

    def __init__(self, port: int, requests: list[bytes]):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.requests, self.buf = requests, b""

    def __call__(self, i: int) -> None:
        self.sock.sendall(self.requests[i % len(self.requests)])
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        length = int(_LENGTH.search(head)[1])
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        if head[9:12] != b"200":
            raise RuntimeError(f"{head[:12].decode()}: {body[:200]!r}")

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def get_request(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


def upload_request(port: int, path: str, photo: bytes, fields: dict[str, str]) -> bytes:
    """A multipart/form-data POST with one file (`file`) and text fields."""
    boundary = "bench-7d1c5e"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + photo
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    )
    return head.encode() + body


# --------------------------------------------------------------------------- report


def print_table(rows: list[dict]) -> None:
    head = f"{'system':<10}{'query':<9}{'clients':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
    head += f"{'QPS':>9}{'requests':>10}"
    tqdm.write(head)
    tqdm.write("-" * len(head))
    for r in rows:
        tqdm.write(
            f"{r['system']:<10}{r['query']:<9}{r['clients']:>8}{r['p50_ms']:>9.2f}"
            f"{r['p95_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['qps']:>9.0f}{r['requests']:>10}"
        )


def criterion(rows: list[dict]) -> dict:
    def get(system: str, clients: int) -> dict:
        return next(
            r
            for r in rows
            if r["system"] == system and r["query"] == "case" and r["clients"] == clients
        )

    ours1, min1, ours4, min4 = get("ours", 1), get("minimal", 1), get("ours", 4), get("minimal", 4)
    bound = 1.5 * min1["p50_ms"] + 1.0
    return {
        "p50_at_1_client_ms": {
            "ours": ours1["p50_ms"],
            "minimal": min1["p50_ms"],
            "bound": bound,
            "ok": ours1["p50_ms"] <= bound,
        },
        "qps_at_4_clients": {
            "ours": ours4["qps"],
            "minimal": min4["qps"],
            "ratio": ours4["qps"] / min4["qps"],
            "ok": ours4["qps"] >= min4["qps"],
        },
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="indexed cases")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrencies")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds before measuring")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks/results/cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/api_bench.json")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    args.cache.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    folder = build_index(args.cache, args.n, args.dim, args.seed)
    manifest = read_manifest(folder)
    ef = manifest["modalities"]["cf"]["search_params"].get("efSearch", 64)
    loaded = load_index_folder(folder)
    raw = loaded.indexes["cf"]._index  # the bare FAISS index (IndexIDMap2 over HNSW)
    params = (
        faiss.SearchParametersHNSW(efSearch=ef) if "HNSW" in manifest["index_keys"]["cf"] else None
    )
    rng = np.random.default_rng(args.seed)
    query_ids = rng.choice(args.n, 4096, replace=False)
    case_ids = [f"syn-{i:06d}" for i in query_ids]
    cohort = Path(manifest["extra"]["cohort_dir"])
    photos = [p.read_bytes() for p in sorted((cohort / "cf").glob("*.png"))]

    def raw_call() -> Callable[[int], None]:
        def call(i: int) -> None:
            q = int(query_ids[i % len(query_ids)])
            raw.search(raw.reconstruct(q)[None], K + 1, params=params)

        return call

    our_port, min_port = free_port(), free_port()
    minimal_py = args.cache / "minimal_service.py"
    minimal_py.write_text(textwrap.dedent(MINIMAL_SERVICE))
    systems = [("faiss", "case"), ("minimal", "case"), ("ours", "case"), ("ours", "upload")]
    # Interleaved rounds: background load on a shared machine drifts over minutes, so
    # every system gets a slice of each stretch of time instead of one block of it.
    plan = [(sq, c, r) for c in clients for r in range(args.rounds) for sq in systems]
    collected: dict[tuple, list[float]] = {}
    bar = tqdm(total=len(plan), desc="api bench", unit="run")
    our_cmd = [sys.executable, "-c", OUR_SERVICE, str(folder), str(args.dim), str(our_port)]
    min_cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "minimal_service:app",
        "--port",
        str(min_port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    min_env = {
        "BENCH_FAISS": str(folder / "cf.faiss"),
        "BENCH_EF": str(ef),
        "PYTHONPATH": str(args.cache),
    }
    with (
        server(min_cmd, min_env, f"http://127.0.0.1:{min_port}", args.cache / "minimal.log"),
        server(our_cmd, {}, f"http://127.0.0.1:{our_port}", args.cache / "ours.log"),
    ):
        requests = {
            ("minimal", "case"): (
                min_port,
                [get_request(min_port, f"/similar/{i}?k={K}") for i in query_ids],
            ),
            ("ours", "case"): (
                our_port,
                [get_request(our_port, f"/cases/{c}/similar?k={K}") for c in case_ids],
            ),
            ("ours", "upload"): (
                our_port,
                [upload_request(our_port, "/search", photo, {"k": str(K)}) for photo in photos],
            ),
        }
        share = args.seconds / args.rounds
        for (system, query), c, r in plan:
            bar.set_postfix_str(f"{system} {query} x{c} round {r + 1}")
            if system == "faiss":
                make = raw_call
            else:
                port, encoded = requests[(system, query)]
                make = lambda port=port, encoded=encoded: RawHttp(port, encoded)  # noqa: E731
            lat = run_load(make, c, share, args.warmup if r == 0 else args.warmup / 3)
            collected.setdefault((system, query, c), []).extend(lat)
            bar.update()
            if r == args.rounds - 1:
                row = summarize(collected[(system, query, c)], c, args.seconds)
                tqdm.write(
                    f"{system:<8} {query:<7} x{c:<3} p50 {row['p50_ms']:.2f} ms  "
                    f"p99 {row['p99_ms']:.2f} ms  {row['qps']:.0f} QPS"
                )
    bar.close()
    rows = [
        {"system": system, "query": query, **summarize(lat, c, args.seconds)}
        for (system, query, c), lat in collected.items()
    ]
    rows.sort(key=lambda r: ([s for s, _ in systems].index(r["system"]), r["query"], r["clients"]))
    print_table(rows)
    verdict = criterion(rows)
    report = {
        "benchmark": "api",
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "k": K,
        },
        "index": {
            "key": manifest["index_keys"]["cf"],
            "efSearch": ef,
            "n": args.n,
            "dim": args.dim,
            "recall_estimate": manifest["modalities"]["cf"].get("recall_estimate"),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "load_average_at_end": list(os.getloadavg()),
        },
        "minimal_service": textwrap.dedent(MINIMAL_SERVICE).strip(),
        "results": rows,
        "criterion": verdict,
        "elapsed_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    p50, qps = verdict["p50_at_1_client_ms"], verdict["qps_at_4_clients"]
    tqdm.write(
        f"\nby case id, 1 client: p50 {p50['ours']:.2f} ms vs bound {p50['bound']:.2f} ms "
        f"(1.5 x minimal {p50['minimal']:.2f} + 1): {'OK' if p50['ok'] else 'MISSED'}"
    )
    tqdm.write(
        f"by case id, 4 clients: {qps['ours']:.0f} QPS vs minimal {qps['minimal']:.0f} "
        f"({qps['ratio']:.2f}x): {'OK' if qps['ok'] else 'MISSED'}"
    )
    tqdm.write(f"report: {args.out}  ({report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
