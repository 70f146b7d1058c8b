"""What the access layer costs a search by case id: `GET /cases/{id}/similar` answered by
the fast path, called in-process on the ASGI app (no network, no HTTP client), with and
without keys and rate limits.

Rows: no key and no limits (the floor); a search limit per client address; a read and a
write key configured and a limit per key (the request carries the read key); interleaved
in rounds. The limit is 10^6/minute, so that no request is refused while the moving
window holds every request of the run (the worst case of its bookkeeping).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/access_bench.py [--requests 3000 --rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.api import Settings, create_app  # noqa: E402
from retrieval.data.phantom import write_phantom_cohort  # noqa: E402
from retrieval.search.engine import Engine  # noqa: E402
from retrieval.testing import PixelEncoder, build_pixel_index  # noqa: E402

READ, WRITE = "bench-read-key-0123456789", "bench-write-key-0123456789"
CONFIGS = {
    "no keys, no limits": ({"rate_search": ""}, None),
    "no keys, limit per address": ({"rate_search": "1000000/minute"}, None),
    "read + write keys, limit per key": (
        {"api_key": READ, "write_key": WRITE, "rate_search": "1000000/minute"},
        READ,
    ),
}


async def one_request(app, path: str, key: str | None) -> float:
    """Seconds for one GET through the whole ASGI stack; checks the 200."""
    headers = [(b"host", b"bench")] + ([(b"x-api-key", key.encode())] if key else [])
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"k=10",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("bench", 80),
        "state": {},
    }
    status = {}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            status["code"] = message["status"]

    t0 = time.perf_counter()
    await app(scope, receive, send)
    elapsed = time.perf_counter() - t0
    assert status["code"] == 200, status
    return elapsed


async def measure(app, paths: list[str], key: str | None, requests: int, start: int) -> list[float]:
    return [await one_request(app, paths[(start + i) % len(paths)], key) for i in range(requests)]


async def run_all(apps: dict, paths: list[str], requests: int, rounds: int) -> dict:
    """Each configuration's seconds per request, in `rounds` interleaved slices."""
    times: dict[str, list[float]] = {label: [] for label in apps}
    for app, key in apps.values():
        await measure(app, paths, key, 200, 0)  # warm-up
    for r in tqdm(range(rounds), desc="rounds"):
        for label, (app, key) in apps.items():
            times[label] += await measure(app, paths, key, requests // rounds, r)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="Per configuration.")
    parser.add_argument("--rounds", type=int, default=10, help="Interleaved slices.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/access.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_phantom_cohort(root / "cohort", cases=24, size=64, frames=6, seed=5, progress=False)
        build_pixel_index(root / "cohort", root / "index")
        engine = Engine.open(root / "index", encoder=PixelEncoder())
        paths = [f"/cases/{c.case_id}/similar" for c in engine.cases(0, 24)[1]]
        apps = {
            label: (create_app(Settings(**settings), engine=engine), key)
            for label, (settings, key) in CONFIGS.items()
        }
        times = asyncio.run(run_all(apps, paths, args.requests, args.rounds))
        rows = {
            label: {
                "p50_us": statistics.median(t) * 1e6,
                "p95_us": statistics.quantiles(t, n=20)[-1] * 1e6,
            }
            for label, t in times.items()
        }
        engine.close()
    print(f"| configuration | p50 µs | p95 µs |  ({args.requests} requests, {platform.node()})")
    print("|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['p50_us']:.0f} | {row['p95_us']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"requests": args.requests, "rows": rows}, indent=2))
    tmp_out.replace(args.out)


if __name__ == "__main__":
    main()
