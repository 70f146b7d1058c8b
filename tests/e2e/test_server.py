"""Real servers on free loopback ports, queried over HTTP.

- `fundus2video serve` in a subprocess over the `tiny_index` fixture (a real trained
  micro model): the curl path of the README, search by upload and by case, media, a
  synthesized video.
- uvicorn in a thread over the `pixel_index` (no model): 16 clients x 25 requests at
  once, mixing searches by case and by upload with adds and deletes: no errors, and
  every search answers as it does when run alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from retrieval.api import Settings, create_app
from retrieval.apps.processes import free_port, wait_http
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mp4_bytes, png_bytes
from retrieval.search.engine import Engine
from retrieval.testing import PixelEncoder

CLIENTS, REQUESTS = 16, 25


@contextlib.contextmanager
def uvicorn_thread(app) -> Iterator[str]:
    """uvicorn serving `app` from a thread (on a port it binds itself: a socket handed in
    by the caller answers ~40 ms late, as if Nagle's algorithm met delayed ACKs)."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def serve_subprocess(index: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "from retrieval.apps.cli import app; app()",
        "serve",
        str(index),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ready", timeout=120, alive=lambda: process.poll() is None)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            out, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        serve_subprocess.output = out  # for the log checks


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_fundus2video_serve_answers_over_http(tiny_index, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(tiny_index.index, index)
    with serve_subprocess(index) as url, httpx.Client(base_url=url, timeout=60) as http:
        health = http.get("/health").json()
        assert health["loaded"] and health["cases"] > 0
        page = http.get("/cases", params={"split": "test", "limit": 1}).json()
        case = page["items"][0]
        photo = http.get(case["cf_url"]).content
        body = http.post(
            "/search",
            files={"file": ("q.png", photo, "image/png")},
            data={"target": "ffa", "k": "5"},
        ).json()
        assert len(body["results"]) == 5 and body["encoder_id"] == health["encoder_id"]
        similar = http.get(f"/cases/{case['case_id']}/similar", params={"target": "ffa"}).json()
        assert case["case_id"] not in [r["case_id"] for r in similar["results"]]
        assert body["similarity"] == similar["similarity"] == "clinical"  # the default
        suggestion = similar["suggestion"]  # the index's model, decision support only
        assert suggestion["label"].endswith("not a diagnosis)")
        assert case["case_id"] not in suggestion["supporting_case_ids"]
        assert sum(suggestion["probabilities"].values()) == pytest.approx(1.0)
        fused = http.post(
            "/search",
            files={"file": ("q.png", photo, "image/png")},
            data={"target": "ffa", "via": "fused", "k": "3"},
        ).json()
        video = http.get(fused["synthetic_query"]["video_url"])
        assert video.headers["x-synthetic"] == "true" and len(read_ffa(video.content)) > 1
        part = http.get(case["ffa_url"], headers={"Range": "bytes=0-1023"})
        assert part.status_code == 206 and len(part.content) == 1024
        generated = http.post("/generate", files={"file": ("q.png", photo, "image/png")})
        assert generated.headers["x-synthetic"] == "true"
        assert http.get("/model").json()["curves"]  # the run's stats.jsonl
    output = serve_subprocess.output
    assert "GET /cases/{case_id}/similar 200" in output
    assert case["case_id"] not in output  # logs name routes, never cases


def test_serve_refuses_a_missing_index(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from retrieval.apps.cli import app; app()",
            "serve",
            str(tmp_path / "nowhere"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "nowhere" in result.stderr


# --------------------------------------------------------------------------- concurrency


@pytest.fixture
def pixel_server(pixel_index, tmp_path):
    shutil.copytree(pixel_index, tmp_path / "index")
    engine = Engine.open(tmp_path / "index", encoder=PixelEncoder())
    # one client address sends every request: no search limit (tests/test_access.py has them)
    settings = Settings(open_writes=True, rate_search="")
    with uvicorn_thread(create_app(settings, engine=engine)) as url:
        yield url, engine


def test_concurrent_clients_match_serial_runs(pixel_server):
    url, engine = pixel_server
    cases = engine.cases(0, 100)[1]
    photos = {c.case_id: c.cf_path.read_bytes() for c in cases[:6]}
    churn_cf = png_bytes(np.ascontiguousarray(read_cf(cases[0].cf_path)[:, ::-1]))
    churn_ffa = mp4_bytes(np.ascontiguousarray(read_ffa(cases[0].ffa_path)[:, :, ::-1]))

    def search(http: httpx.Client, i: int) -> tuple[tuple, list]:
        case = cases[i % len(cases)]
        if i % 3 == 2:  # by upload
            cid = list(photos)[i % len(photos)]
            r = http.post(
                "/search",
                files={"file": ("q.png", photos[cid], "image/png")},
                data={"k": "5", "target": "ffa", "vessel_check": "false"},
            )
            key = ("upload", cid)
        else:
            target = ("cf", "ffa")[i % 2]
            params = {"k": 5, "target": target, "vessel_check": False}  # the index's ranking
            r = http.get(f"/cases/{case.case_id}/similar", params=params)
            key = ("case", case.case_id, target)
        assert r.status_code == 200, r.text
        return key, [(row["case_id"], row["score"]) for row in r.json()["results"]]

    with httpx.Client(base_url=url, timeout=60) as http:
        serial = dict(search(http, i) for i in range(CLIENTS * REQUESTS))

    updates: list[int] = []

    def client(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for j in range(REQUESTS):
                if worker == 0:  # the writer: add and delete one case, over and over
                    if j % 2 == 0:
                        r = http.post(
                            "/cases",
                            data={"case_id": "churn", "split": "val"},
                            files={
                                "cf": ("c.png", churn_cf, "image/png"),
                                "ffa": ("f.mp4", churn_ffa, "video/mp4"),
                            },
                        )
                        assert r.status_code == 201, r.text
                    else:
                        assert http.delete("/cases/churn").status_code == 200
                    updates.append(j)
                    continue
                key, got = search(http, worker * REQUESTS + j)
                others = [g for g in got if g[0] != "churn"]
                assert others == serial[key][: len(others)] and len(others) >= 4, key

    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client, w) for w in range(CLIENTS)]:
            future.result()  # re-raises any client's failure
    assert len(updates) == REQUESTS
    with httpx.Client(base_url=url) as http:
        assert http.get("/health").json()["cases"] == len(cases) + 1  # 13 adds, 12 deletes
        assert http.get("/cases/churn").json()["split"] == "val"
