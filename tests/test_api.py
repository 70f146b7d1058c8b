"""The HTTP API through `TestClient` over a phantom index (`pixel_index`, no model):
every route, every error path, limits, the API key, privacy of uploads and logs,
similarity and the diagnosis suggestion, the reliability diagram, and schemathesis
against /openapi.json (no 5xx for anything it sends)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from retrieval.api import Settings, create_app
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mp4_bytes, png_bytes
from retrieval.search.engine import SIMILARITIES, CaseQuery, CFQuery, Engine
from retrieval.search.insights import project_2d
from retrieval.testing import PixelEncoder

ROUTES = {
    ("GET", "/health"),
    ("GET", "/stats"),
    ("POST", "/search"),
    ("GET", "/cases/{case_id}/similar"),
    ("GET", "/cases/{case_id}/explain"),
    ("GET", "/cases"),
    ("GET", "/cases/{case_id}"),
    ("GET", "/cases/{case_id}/cf"),
    ("GET", "/cases/{case_id}/ffa"),
    ("POST", "/generate"),
    ("POST", "/cases"),
    ("DELETE", "/cases/{case_id}"),
    ("GET", "/map"),
    ("GET", "/model"),
}
ROW_KEYS = {
    "rank",
    "case_id",
    "score",
    "modality",
    "diagnosis",
    "eye",
    "lesions",
    "cf_url",
    "ffa_url",
    "synthetic",
    "region",
    "region_score",
    "vessel_match",
}


def open_engine(pixel_index: Path, tmp: Path) -> Engine:
    path = tmp / "index"
    shutil.copytree(pixel_index, path)
    return Engine.open(path, encoder=PixelEncoder())


@pytest.fixture(scope="module")
def engine(pixel_index, tmp_path_factory) -> Engine:
    return open_engine(pixel_index, tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(Settings(open_writes=True), engine=engine)) as c:
        yield c


@pytest.fixture
def fresh(pixel_index, tmp_path):
    """A client over a private copy of the index (for updates), and its engine."""
    engine = open_engine(pixel_index, tmp_path)
    with TestClient(create_app(Settings(open_writes=True), engine=engine)) as c:
        yield c, engine


@pytest.fixture(scope="module")
def case(engine):
    return engine.cases(0, 1)[1][0]


def upload(data: bytes, name: str = "query.png", content_type: str = "image/png") -> dict:
    return {"file": (name, data, content_type)}


def png_declaring(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header declares width x height (a decompression bomb)."""
    data = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --------------------------------------------------------------------------- routes


def test_openapi_lists_every_route_with_models_and_examples(client):
    spec = client.get("/openapi.json").json()
    ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert ROUTES <= ops
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert op.get("summary"), (method, path)
            assert "200" in op["responses"] or "201" in op["responses"], (method, path)
    schemas = spec["components"]["schemas"]
    for name in ("SearchResponse", "ResultRow", "CaseRecord", "CasePage", "Stats", "ErrorResponse"):
        assert "example" in schemas[name] or "examples" in schemas[name], name
    assert "APIKeyHeader" in spec["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200


def test_health_and_stats(client, engine):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["loaded"] and health["cases"] == 24
    stats = client.get("/stats").json()
    assert stats["modalities"]["cf"]["count"] == stats["modalities"]["ffa"]["count"] == 24
    assert stats["modalities"]["cf"]["key"] == "Flat" and stats["device"] == "cpu"
    assert stats["encoder_id"] == engine.encoder_id and sum(stats["diagnoses"].values()) == 24
    assert (
        stats["limits"]["max_k"] == 100 and "image/png" in stats["limits"]["accepted_types"]["cf"]
    )


def test_similar_is_the_engine_search(client, engine, case):
    body = client.get(f"/cases/{case.case_id}/similar", params={"target": "ffa", "k": 4}).json()
    expected = engine.search(case.case_id, "ffa", k=4)  # both vessel-checked (pair, the default)
    assert [r["case_id"] for r in body["results"]] == [h.case.case_id for h in expected.hits]
    assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in expected.hits])
    row = body["results"][0]
    assert set(row) == ROW_KEYS and row["rank"] == 1 and row["synthetic"] is False
    assert row["cf_url"] == f"/cases/{row['case_id']}/cf" and row["modality"] == "ffa"
    assert body["query"]["kind"] == "case" and body["query"]["case_id"] == case.case_id
    assert body["synthetic_query"] is None and body["score_kind"] == "cosine"
    with_self = client.get(f"/cases/{case.case_id}/similar", params={"exclude_self": False})
    assert with_self.json()["results"][0]["case_id"] == case.case_id
    by_ffa = client.get(f"/cases/{case.case_id}/similar", params={"modality": "ffa", "k": 2})
    assert by_ffa.json()["query"]["modality"] == "ffa"


def test_similar_filters(client, case):
    params = [("target", "cf"), ("k", 30), ("eye", "OD"), ("split", "train,val")]
    body = client.get(f"/cases/{case.case_id}/similar", params=params).json()
    assert body["filters"]["eye"] == ["OD"] and body["filters"]["split"] == ["train", "val"]
    page = client.get("/cases", params=[("eye", "OD"), ("split", "train"), ("split", "val")]).json()
    expected = {c["case_id"] for c in page["items"]} - {case.case_id}
    assert {r["case_id"] for r in body["results"]} == expected
    assert body["candidates"] == page["total"]


def test_search_by_uploaded_photo_and_video(client, case):
    cf = case.cf_path.read_bytes()
    body = client.post("/search", files=upload(cf), data={"k": "3", "target": "cf"}).json()
    assert body["results"][0]["case_id"] == case.case_id and body["results"][0]["score"] > 0.99
    assert body["query"] == {
        "kind": "upload",
        "modality": "cf",
        "similarity": "pair",
        "case_id": None,
        "width": 64,
        "height": 64,
        "frames": None,
        "bytes": len(cf),
        "positive": None,
        "negative": None,
        "feedback": None,
        "region": None,
        "region_cells": None,
    }
    video = case.ffa_path.read_bytes()
    times = ",".join(str(t) for t in case.ffa_times_s)
    form = {"target": "ffa", "k": "2", "times": times}
    by_video = client.post("/search", files=upload(video, "v.mp4", "video/mp4"), data=form).json()
    assert by_video["query"]["modality"] == "ffa" and by_video["query"]["frames"] == 6
    assert by_video["results"][0]["case_id"] == case.case_id
    unnamed = client.post("/search", files=upload(video, "blob", "application/octet-stream"))
    assert unnamed.json()["query"]["modality"] == "ffa"  # decided by the content
    both = client.post("/search", files=upload(cf), data={"target": "both", "k": "5"}).json()
    assert both["candidates"] == 48 and len(both["results"]) == 5
    filtered = client.post(
        "/search", files=upload(cf), data={"k": "50", "diagnosis": ["PDR", "NPDR"]}
    ).json()
    assert {r["diagnosis"] for r in filtered["results"]} <= {"PDR", "NPDR"}


def test_search_through_synthesis_shows_the_marked_video(client, engine, case):
    cf = case.cf_path.read_bytes()
    for via in ("synthesis", "fused"):
        body = client.post("/search", files=upload(cf), data={"via": via, "target": "ffa"}).json()
        assert body["via"] == via and len(body["results"]) == 10
        synthetic = body["synthetic_query"]
        assert synthetic["synthetic"] is True and synthetic["label"] == "SYNTHETIC"
        assert all(r["synthetic"] is False for r in body["results"])  # real cases
    assert body["score_kind"] == "rrf"
    video = client.get(synthetic["video_url"])
    assert video.status_code == 200 and video.headers["x-synthetic"] == "true"
    assert video.headers["x-frame-times"] == ",".join(f"{t:g}" for t in synthetic["times_s"])
    frames = read_ffa(video.content)  # (T, S, S)
    marked, _ = engine.generate(read_cf(case.cf_path))
    plain, _ = engine.encoder.synthesize_unmarked(read_cf(case.cf_path))
    assert frames.shape == marked.shape
    assert np.abs(frames.astype(int) - marked).mean() < np.abs(frames.astype(int) - plain).mean()
    part = client.get(synthetic["video_url"], headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == video.content[:10]
    by_case = client.get(f"/cases/{case.case_id}/similar", params={"via": "fused", "target": "ffa"})
    assert by_case.json()["synthetic_query"]["synthetic"] is True


def test_generate_returns_a_marked_mp4(client, engine, case):
    cf = case.cf_path.read_bytes()
    response = client.post("/generate", files=upload(cf), data={"times": "0,12,30,60"})
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    assert response.headers["x-synthetic"] == "true"
    assert response.headers["x-frame-times"] == "0,12,30,60"
    frames = read_ffa(response.content)
    marked, _ = engine.generate(read_cf(case.cf_path), [0, 12, 30, 60])
    assert frames.shape == marked.shape == (4, 32, 32)
    assert np.abs(frames.astype(int) - marked).mean() < 6  # H.264 is lossy
    default = client.post("/generate", files=upload(cf))
    assert len(read_ffa(default.content)) == len(engine.default_times())


def test_cases_paging_and_one_case(client, engine, case):
    first = client.get("/cases", params={"limit": 10}).json()
    second = client.get("/cases", params={"limit": 10, "offset": 10}).json()
    assert first["total"] == 24 and len(first["items"]) == 10 and len(second["items"]) == 10
    everything = [c.case_id for c in engine.cases(0, 100)[1]]
    assert [c["case_id"] for c in first["items"] + second["items"]] == everything[:20]
    pdr = client.get("/cases", params={"diagnosis": "PDR", "limit": 500}).json()
    assert pdr["total"] == len(pdr["items"]) and all(c["diagnosis"] == "PDR" for c in pdr["items"])
    one = client.get(f"/cases/{case.case_id}").json()
    assert one == first["items"][0]
    assert one["ffa_times_s"] == list(case.ffa_times_s) and one["added"] is False
    assert "cf_path" not in one  # server paths stay on the server


def test_media_routes_and_ranges(client, case):
    cf = client.get(f"/cases/{case.case_id}/cf")
    assert cf.status_code == 200 and cf.headers["content-type"] == "image/png"
    assert cf.content == case.cf_path.read_bytes()
    data = case.ffa_path.read_bytes()
    ffa = client.get(f"/cases/{case.case_id}/ffa")
    assert ffa.status_code == 200 and ffa.content == data
    assert ffa.headers["accept-ranges"] == "bytes" and ffa.headers["x-frame-times"]
    for header, (start, end) in [
        ("bytes=0-99", (0, 99)),
        ("bytes=100-", (100, len(data) - 1)),
        ("bytes=-50", (len(data) - 50, len(data) - 1)),
        ("bytes=10-5000000", (10, len(data) - 1)),
    ]:
        part = client.get(f"/cases/{case.case_id}/ffa", headers={"Range": header})
        assert part.status_code == 206, header
        assert part.headers["content-range"] == f"bytes {start}-{end}/{len(data)}"
        assert part.content == data[start : end + 1]
    beyond = client.get(f"/cases/{case.case_id}/ffa", headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert "outside" in beyond.json()["detail"]
    garbled = client.get(f"/cases/{case.case_id}/ffa", headers={"Range": "pages=1-2"})
    assert garbled.status_code == 200 and garbled.content == data  # ignored, as RFC 9110 allows


def test_map_and_model(client):
    body = client.get("/map").json()
    assert body["method"] == "pca" and body["total"] == 48 and len(body["points"]) == 48
    assert {p["modality"] for p in body["points"]} == {"cf", "ffa"}
    assert len(body["explained_variance"]) == 2 and body["sampled"] is False
    assert client.get("/map").json() == body  # cached until the index changes
    sample = client.get("/map", params={"limit": 10, "modality": "cf"}).json()
    assert sample["sampled"] and len(sample["points"]) == 10 and sample["total"] == 24
    assert body["similarity"] == "pair"  # the pixel encoder has no clinical part
    assert client.get("/map", params={"similarity": "pair"}).json() == body
    clinical = client.get("/map", params={"similarity": "clinical"})
    assert clinical.status_code == 422 and set(clinical.json()) >= {"detail", "request_id"}
    assert "similarity must be one of pair" in clinical.json()["detail"]
    model = client.get("/model").json()
    assert model["encoder_id"].startswith("pixel-") and model["curves"] == {}


# --------------------------------------------------------------------------- updates


def test_add_search_delete_and_restart(fresh, pixel_index):
    client, engine = fresh
    source = engine.cases(0, 1)[1][0]
    image = np.ascontiguousarray(read_cf(source.cf_path)[::-1])
    video = read_ffa(source.ffa_path)[:, ::-1]
    files = {
        "cf": ("a.png", png_bytes(image), "image/png"),
        "ffa": ("b.mp4", mp4_bytes(np.ascontiguousarray(video)), "video/mp4"),
    }
    form = {
        "case_id": "new-001",
        "eye": "OS",
        "diagnosis": "CSC",
        "lesions": "leakage,staining",
        "ffa_times_s": ",".join(str(t) for t in source.ffa_times_s),
        "age": "61",
    }
    added = client.post("/cases", files=files, data=form)
    assert added.status_code == 201, added.text
    record = added.json()
    assert added.headers["location"] == "/cases/new-001"
    assert record["added"] and record["lesions"] == ["leakage", "staining"] and record["age"] == 61
    found = client.post("/search", files=upload(png_bytes(image)), data={"k": "1"}).json()
    assert found["results"][0]["case_id"] == "new-001"  # visible to the next search
    assert client.get("/cases/new-001/cf").content == png_bytes(image)
    assert read_ffa(client.get("/cases/new-001/ffa").content).shape == video.shape
    assert client.post("/cases", files=files, data=form).status_code == 409
    # a restart: a new engine and app over the same folder
    with TestClient(
        create_app(
            Settings(open_writes=True), engine=Engine.open(engine.path, encoder=PixelEncoder())
        )
    ) as again:
        assert again.get("/cases/new-001").json() == record
        assert again.get("/health").json()["cases"] == 25
        deleted = again.delete("/cases/new-001")
        assert deleted.status_code == 200 and deleted.json()["catalog_rows"] == 24
        assert again.get("/cases/new-001").status_code == 404
        assert again.get("/cases/new-001/cf").status_code == 404
        assert again.delete("/cases/new-001").status_code == 404


def test_map_follows_updates(fresh):
    client, engine = fresh
    before = client.get("/map").json()["total"]
    client.delete(f"/cases/{engine.cases(0, 1)[1][0].case_id}")
    assert client.get("/map").json()["total"] == before - 2


# --------------------------------------------------------------------------- errors


def corrupt_png(case) -> bytes:
    return case.cf_path.read_bytes()[:200]  # a header, then nothing


@pytest.mark.parametrize(
    "method,url,kwargs,status,fragment",
    [
        ("GET", "/cases/nope", {}, 404, "unknown case_id 'nope'"),
        ("GET", "/cases/nope/similar", {}, 404, "unknown case_id"),
        ("GET", "/cases/nope/cf", {}, 404, "unknown case_id"),
        ("GET", "/cases/nope/ffa", {}, 404, "unknown case_id"),
        ("DELETE", "/cases/nope", {}, 404, "unknown case_id"),
        ("GET", "/synthetic/nope", {}, 404, "expired"),
        ("GET", "/nowhere", {}, 404, "Not Found"),
        ("PUT", "/cases", {}, 405, "Method Not Allowed"),
        (
            "GET",
            "/cases/{id}/similar?k=0",
            {},
            422,
            "k: Input should be greater than or equal to 1",
        ),
        ("GET", "/cases/{id}/similar?k=101", {}, 422, "k: at most 100"),
        ("GET", "/cases/{id}/similar?k=ten", {}, 422, "k: Input should be a valid integer"),
        ("GET", "/cases/{id}/similar?target=iris", {}, 422, "target: Input should be"),
        ("GET", "/cases/{id}/similar?via=magic", {}, 422, "via: Input should be"),
        ("GET", "/cases/{id}/similar?similarity=colour", {}, 422, "similarity: Input should be"),
        ("GET", "/cases/{id}/similar?similarity=clinical", {}, 422, "similarity must be one of"),
        (
            "POST",
            "/search",
            {"files": "photo", "data": {"similarity": "combined"}},
            422,
            "similarity must be one of pair",
        ),
        ("GET", "/cases/{id}/similar?via=synthesis", {}, 422, "use target=ffa"),
        ("GET", "/cases/{id}/similar?via=fused&modality=ffa&target=ffa", {}, 422, "FFA video"),
        ("GET", "/cases/{id}/similar?eye=left", {}, 422, "filter eye='left'"),
        ("GET", "/cases/{id}/similar?split=holdout", {}, 422, "filter split='holdout'"),
        ("GET", "/cases?limit=501", {}, 422, "limit: at most 500"),
        ("GET", "/cases?offset=-1", {}, 422, "offset"),
        ("GET", "/map?limit=20001", {}, 422, "limit: at most 20000"),
        ("GET", "/map?method=umap", {}, 422, "umap-learn"),
        ("GET", "/map?modality=oct", {}, 422, "modality"),
        ("GET", "/map?similarity=clinical", {}, 422, "similarity must be one of pair"),
        ("GET", "/map?similarity=colour", {}, 422, "similarity: Input should be"),
        ("POST", "/search", {}, 422, "file: Field required"),
        ("POST", "/search", {"files": upload(b"", "e.png")}, 422, "upload 'file' is empty"),
        (
            "POST",
            "/search",
            {"files": upload(b"GIF89a....", "x.gif", "image/gif")},
            415,
            "content type 'image/gif'",
        ),
        (
            "POST",
            "/search",
            {"files": upload(b"plain text, not an image")},
            415,
            "not a PNG, JPEG or TIFF image nor",
        ),
        ("POST", "/search", {"files": "corrupt"}, 422, "cannot read image upload 'file'"),
        (
            "POST",
            "/search",
            {"files": upload(png_declaring(100_000, 100_000))},
            413,
            "10,000,000,000 pixels exceeds the limit of 40,000,000",
        ),
        ("POST", "/search", {"files": "photo", "data": {"k": "0"}}, 422, "k: Input should be"),
        ("POST", "/search", {"files": "photo", "data": {"via": "fused"}}, 422, "target=ffa"),
        (
            "POST",
            "/search",
            {"files": "photo", "data": {"modality": "ffa"}},
            415,
            "content type 'image/png' is not one of video/mp4",
        ),
        (
            "POST",
            "/search",
            {"files": "video", "data": {"times": "0,1"}},
            422,
            "times has 2 values for 6 frames",
        ),
        (
            "POST",
            "/search",
            {"files": "video", "data": {"times": "soon"}},
            422,
            "times must be comma-separated seconds",
        ),
        ("POST", "/search", {"files": "tiny"}, 422, "smaller than 16 a side"),
        ("POST", "/generate", {"files": "video"}, 415, "content type 'video/mp4' is not one of"),
        ("POST", "/generate", {"files": "video?"}, 415, "must be a CF image"),
        ("POST", "/generate", {"files": "photo", "data": {"times": "30,10"}}, 422, "increasing"),
        (
            "POST",
            "/generate",
            {"files": "photo", "data": {"times": ",".join(["1"] * 65)}},
            422,
            "at most 64 frames",
        ),
        ("POST", "/cases", {"data": {"case_id": "x"}}, 422, "cf: Field required"),
        ("POST", "/cases", {"files": "pair", "data": {"case_id": "a/b"}}, 422, "case_id must be"),
        (
            "POST",
            "/cases",
            {"files": "pair", "data": {"case_id": "x", "eye": "L"}},
            422,
            "eye must be",
        ),
        ("POST", "/cases", {"files": "pair", "data": {"case_id": "x", "age": "-3"}}, 422, "age"),
        ("POST", "/cases", {"files": "pair", "data": {"case_id": "{id}"}}, 409, "already in the"),
        (
            "POST",
            "/cases",
            {"files": "swapped", "data": {"case_id": "x"}},
            415,
            "upload 'cf' must be a CF image",
        ),
    ],
)
def test_bad_input_is_a_4xx_naming_the_problem(client, case, method, url, kwargs, status, fragment):
    kwargs = dict(kwargs)
    photo, video = case.cf_path.read_bytes(), case.ffa_path.read_bytes()
    tiny = png_bytes(np.zeros((8, 8, 3), np.uint8))
    named = {
        "photo": upload(photo),
        "video": upload(video, "v.mp4", "video/mp4"),
        "corrupt": upload(corrupt_png(case)),
        "tiny": upload(tiny),
        "video?": upload(video, "v", "application/octet-stream"),
        "pair": {"cf": ("a.png", photo, "image/png"), "ffa": ("b.mp4", video, "video/mp4")},
        "swapped": {"cf": ("a", video, "application/octet-stream"), "ffa": ("b", photo, "")},
    }
    if isinstance(kwargs.get("files"), str):
        kwargs["files"] = named[kwargs["files"]]
    if "data" in kwargs:
        kwargs["data"] = {k: v.replace("{id}", case.case_id) for k, v in kwargs["data"].items()}
    response = client.request(method, url.replace("{id}", case.case_id), **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert fragment in body["detail"] and body["request_id"] == response.headers["x-request-id"]


def test_limits_are_configurable(pixel_index, tmp_path, case):
    engine = open_engine(pixel_index, tmp_path)
    tight = Settings(max_upload_bytes=20_000, max_frames=3, max_pixels=3000, max_k=5)
    with TestClient(create_app(tight, engine=engine)) as client:
        photo = case.cf_path.read_bytes()  # 64 x 64 = 4096 pixels
        big = client.post("/search", files=upload(photo), data={"k": "5"})
        assert big.status_code == 413 and "4,096 pixels exceeds the limit of 3,000" in big.text
        video = mp4_bytes(np.zeros((6, 32, 32), np.uint8))
        long = client.post("/search", files=upload(video, "v.mp4", "video/mp4"), data={"k": "5"})
        assert long.status_code == 413 and "6 frames of 32x32 exceed the limit of 3" in long.text
        body = client.post("/search", files=upload(b"\x89PNG" + bytes(30_000)))
        assert body.status_code == 413 and "exceeds the upload limit of 20,000 bytes" in body.text

        def chunks():  # no Content-Length: counted as it arrives
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
            for _ in range(10):
                yield bytes(5000)

        streamed = client.post(
            "/search", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"}
        )
        assert streamed.status_code == 413 and "upload limit" in streamed.json()["detail"]
        assert client.get(f"/cases/{case.case_id}/similar?k=6").status_code == 422
        assert client.get("/stats").json()["limits"]["max_upload_bytes"] == 20_000


def test_api_key(engine, case, monkeypatch):
    monkeypatch.setenv("FUNDUS2VIDEO_API_KEY", "s3cret")
    with TestClient(create_app(Settings(), engine=engine)) as client:
        assert client.get("/health").status_code == 200
        for url in (
            "/stats",
            "/cases",
            f"/cases/{case.case_id}",
            f"/cases/{case.case_id}/cf",
            "/map",
            "/model",
        ):
            refused = client.get(url)
            assert refused.status_code == 401 and "API key" in refused.json()["detail"], url
        assert client.post("/search", files=upload(b"x")).status_code == 401
        assert client.get("/stats", headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.get("/stats", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get(f"/cases/{case.case_id}/cf?api_key=s3cret").status_code == 200


def test_uploads_stay_in_memory(client, case, monkeypatch):
    def to_disk(self):
        raise AssertionError("an upload was spooled to disk")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", to_disk)
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    data = png_bytes(noise)
    assert len(data) > 4 * 2**20  # well past Starlette's 1 MB spooling threshold
    response = client.post("/search", files=upload(data), data={"k": "1"})
    assert response.status_code == 200 and response.json()["query"]["bytes"] == len(data)


def test_logs_carry_ids_timings_sizes_not_content(client, case, caplog):
    caplog.set_level(logging.INFO, logger="fundus2video.api")
    client.get(f"/cases/{case.case_id}/similar", headers={"X-Request-ID": "req-42"})
    photo = case.cf_path.read_bytes()
    client.post("/search", files=upload(photo, "Jane-Doe-1950-03-01.png"))
    client.get("/cases/Smith-John/cf")
    lines = [r.getMessage() for r in caplog.records if r.name == "fundus2video.api"]
    assert len(lines) == 3
    assert lines[0].startswith("req-42 GET /cases/{case_id}/similar 200 ")
    assert "ms in=0B" in lines[0] and f"in={len(photo)}" not in lines[1]
    assert "POST /search 200" in lines[1] and "in=" in lines[1] and "out=" in lines[1]
    for text in lines + [r.getMessage() for r in caplog.records]:
        assert case.case_id not in text and "Jane" not in text and "Smith" not in text


def test_no_index_loaded_is_503(tmp_path):
    with TestClient(create_app(Settings())) as client:
        assert client.get("/health").json()["loaded"] is False
        response = client.get("/stats")
        assert response.status_code == 503 and "no index" in response.json()["detail"]


# --------------------------------------------------------------------------- fuzzing


@pytest.mark.slow  # ~15 s: 14 operations x 2 modes x 20 examples
def test_schemathesis_finds_no_server_errors(pixel_index, tmp_path):
    """Anything the schema allows, and much it does not, is answered without a 5xx.

    Driven through the library (schemathesis' pytest loader needs a pytest < 9 internal).
    """
    app = create_app(Settings(), engine=open_engine(pixel_index, tmp_path))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    seen: set[str] = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.add(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=20,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case):
                response = case.call()
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except AssertionError:
                    failures.append(f"{case.method} {case.formatted_path}: {response.text[:200]}")
                    raise

            try:
                fuzz()
            except AssertionError:
                pass  # collected above; keep going to report every operation
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE  # nothing invalid to send (GET /health)
    assert {f"{m} {p}" for m, p in ROUTES} <= seen
    assert not failures, "\n".join(failures)


def test_range_of_an_in_memory_image(client, case):
    """A stored CF that is not a PNG is converted in memory (TIFF here)."""
    buf = io.BytesIO()
    Image.fromarray(read_cf(case.cf_path)).save(buf, format="TIFF")
    response = client.post("/search", files=upload(buf.getvalue(), "x.tif", "image/tiff"))
    assert response.status_code == 200 and response.json()["results"]
    assert (
        client.post("/search", files=upload(buf.getvalue()), data={"k": "1"}).json()["results"][0][
            "case_id"
        ]
        == case.case_id
    )
    assert CFQuery  # the engine's query type is what the route builds


# --------------------------------------------------------------------------- the fast path


@pytest.mark.parametrize(
    "path,answered",
    [
        ("{case}/similar", True),
        ("{case}/similar?k=1", True),
        ("{case}/similar?k=100", True),
        ("{case}/similar?target=ffa&k=7", True),
        ("{case}/similar?k=5&target=both&similarity=pair", True),
        ("{case}/similar?modality=ffa&target=cf", True),
        ("{case}/similar?exclude_self=false", True),
        ("{case}/similar?exclude_self=Yes", True),
        ("{case}/similar?api_key=anything", True),
        ("{case}/similar?eye=OD", True),
        ("{case}/similar?eye=OD,OS&split=train&split=test&lesion=leakage", True),
        ("{case}/similar?k=1&k=2", True),  # the last value, as FastAPI reads it
        ("{case}/similar?unknown=1", True),  # ignored, as by FastAPI
        ("{case}/similar?via=fused&target=ffa&k=3", True),
        # errors: the route writes them
        ("nope/similar", False),
        ("{case}/similar?k=0", False),
        ("{case}/similar?k=101", False),
        ("{case}/similar?k=abc", False),
        ("{case}/similar?target=iris", False),
        ("{case}/similar?exclude_self=maybe", False),
        ("{case}/similar?modality=oct", False),
        ("{case}/similar?eye=XX", False),
        ("{case}/similar?via=synthesis", False),  # synthesis needs target=ffa
        ("{case}/similar?similarity=clinical", False),  # not served by this encoder
        ("{case}/similar?similarity=", False),
    ],
)
def test_fast_path_and_route_give_the_same_bytes(engine, case, path, answered, monkeypatch):
    """The fast path answers through the route's own function (`similar_body`): the same
    bytes and status; what it does not answer (every error), the route does."""
    from retrieval.api import fastpath

    monkeypatch.setattr("retrieval.search.engine._ms", lambda t0: 0.0)  # timings alike
    monkeypatch.setattr("retrieval.api.synthetic.secrets.token_urlsafe", lambda n: "tok")
    bodies = []
    similar_body = fastpath.similar_body

    async def recorded(*args):
        bodies.append(await similar_body(*args))
        return bodies[-1]

    monkeypatch.setattr(fastpath, "similar_body", recorded)  # the fast path's calls only
    url = "/cases/" + path.format(case=case.case_id)
    headers = {"X-Request-ID": "same-id"}
    with (
        TestClient(create_app(Settings(fast_path=True), engine=engine)) as fast,
        TestClient(create_app(Settings(fast_path=False), engine=engine)) as slow,
    ):
        a, b = fast.get(url, headers=headers), slow.get(url, headers=headers)
    assert (a.status_code, a.content) == (b.status_code, b.content)
    assert a.headers["content-type"] == b.headers["content-type"] == "application/json"
    assert (a.status_code == 200) == answered and len(bodies) == answered
    if answered:
        assert bodies[0] == a.content and a.json()["suggestion"] is not None


def test_fast_path_keeps_the_api_key_rule(engine, case, monkeypatch):
    monkeypatch.setenv("FUNDUS2VIDEO_API_KEY", "s3cret")
    with TestClient(create_app(Settings(), engine=engine)) as client:
        url = f"/cases/{case.case_id}/similar"
        assert client.get(url).status_code == 401
        assert client.get(url, params={"api_key": "nope"}).status_code == 401
        assert client.get(url, params={"api_key": "s3cret"}).status_code == 200
        assert client.get(url, headers={"X-API-Key": "s3cret"}).status_code == 200


def test_a_search_waits_for_an_update_off_the_event_loop(fresh):
    """While an update holds the index, a search waits in a worker thread, not on the loop."""
    client, engine = fresh
    case = engine.cases(0, 1)[1][0]
    done: dict[str, int] = {}

    def get(name: str, url: str) -> threading.Thread:
        t = threading.Thread(target=lambda: done.setdefault(name, client.get(url).status_code))
        t.start()
        return t

    with engine._lock.write():  # what add_case / remove_case hold while they swap state
        search = get("search", f"/cases/{case.case_id}/similar")
        search.join(0.5)
        get("health", "/health").join(5)
        assert done == {"health": 200}  # the event loop is free; the search still waits
    search.join(10)
    assert done == {"health": 200, "search": 200}


def test_search_bodies_are_what_the_response_model_writes(fresh):
    """Search bodies (convert.search_body) are what the model writes, odd characters included."""
    from retrieval.api.schemas import SearchResponse

    client, engine = fresh
    source = engine.cases(0, 1)[1][0]
    files = {
        "cf": ("a.png", source.cf_path.read_bytes(), "image/png"),
        "ffa": ("b.mp4", source.ffa_path.read_bytes(), "video/mp4"),
    }
    odd = 'Ünïcode "quoted" <&> 眼'
    form = {"case_id": odd, "diagnosis": 'say "no"', "lesions": "a\\b,c"}
    form["allow_duplicate"] = "true"  # the same media as an indexed case
    assert client.post("/cases", files=files, data=form).status_code == 201
    photo, video = source.cf_path.read_bytes(), source.ffa_path.read_bytes()
    responses = [
        client.get(f"/cases/{source.case_id}/similar", params={"k": 30, "target": "both"}),
        client.get("/cases/%C3%9Cn%C3%AFcode%20%22quoted%22%20%3C%26%3E%20%E7%9C%BC/similar"),
        client.get(f"/cases/{source.case_id}/similar", params={"eye": "OD", "split": "train"}),
        client.post("/search", files=upload(photo), data={"via": "fused", "target": "ffa"}),
        client.post("/search", files=upload(video, "v.mp4", "video/mp4"), data={"k": "3"}),
    ]
    for response in responses:
        assert response.status_code == 200, response.text
        model = SearchResponse.model_validate_json(response.content)
        assert response.content == model.model_dump_json().encode()  # as the model writes it
    assert odd in {r["case_id"] for r in responses[0].json()["results"]}
    assert responses[1].json()["query"]["case_id"] == odd


# --------------------------------------------------------------------------- the real model


def test_every_route_against_a_real_index(tiny_index, tmp_path):
    """Settings name the index; the app's lifespan opens it (encoder from its manifest)."""
    path = tmp_path / "index"
    shutil.copytree(tiny_index.index, path)
    with TestClient(create_app(Settings(index=path, open_writes=True))) as client:
        assert client.get("/health").json()["loaded"]
        assert client.get("/stats").json()["catalog_rows"] == 24
        case = client.get("/cases", params={"split": "test", "limit": 1}).json()["items"][0]
        cid = case["case_id"]
        assert client.get(f"/cases/{cid}").json() == case
        photo = client.get(case["cf_url"]).content
        video = client.get(case["ffa_url"]).content
        assert client.get(case["ffa_url"], headers={"Range": "bytes=0-9"}).status_code == 206
        found = client.post("/search", files=upload(photo), data={"k": "1"}).json()
        assert found["results"][0]["case_id"] == cid
        for via in ("direct", "synthesis", "fused"):
            body = client.get(f"/cases/{cid}/similar", params={"target": "ffa", "via": via}).json()
            assert len(body["results"]) == 10, via
        fused = client.post("/search", files=upload(photo), data={"via": "fused", "target": "ffa"})
        synthetic = client.get(fused.json()["synthetic_query"]["video_url"])
        assert synthetic.headers["x-synthetic"] == "true" and read_ffa(synthetic.content).ndim == 3
        generated = client.post("/generate", files=upload(photo))
        assert generated.headers["x-synthetic"] == "true"
        files = {"cf": ("a.png", photo, "image/png"), "ffa": ("b.mp4", video, "video/mp4")}
        assert client.post("/cases", files=files, data={"case_id": "copy"}).status_code == 409
        form = {"case_id": "copy", "allow_duplicate": "true"}  # a near-duplicate, added anyway
        assert client.post("/cases", files=files, data=form).status_code == 201
        assert client.delete("/cases/copy").status_code == 200
        assert client.get("/map").json()["total"] == 48
        maps = {s: client.get("/map", params={"similarity": s}).json() for s in SIMILARITIES}
        assert client.get("/map").json() == maps["clinical"]  # the default: same disease
        assert [maps[s]["similarity"] for s in SIMILARITIES] == list(SIMILARITIES)
        xy = {s: [(p["x"], p["y"]) for p in m["points"]] for s, m in maps.items()}
        assert [p["case_id"] for p in maps["pair"]["points"]] == [
            p["case_id"] for p in maps["clinical"]["points"]
        ]
        assert not np.allclose(xy["clinical"], xy["pair"], atol=1e-3)  # two spaces
        model = client.get("/model").json()
        assert {"generator", "embedder"} <= set(model["curves"])
        built = json.loads((path / "manifest.json").read_text())["extra"]["precision"]
        assert model["precision"] == built  # queries are embedded as the index was
        config = model["embedder"]["embedder"]  # pair part (32) + clinical part
        assert model["dim"] == config["dim"] + config["clinical_dim"] == 32 + 16
        stats = client.get("/stats").json()
        assert stats["similarities"] == ["combined", "pair", "clinical"]
        assert stats["suggestion"]["cf"]["similarity"] == "clinical"
        same = client.get(f"/cases/{cid}/similar").json()
        cross = client.get(f"/cases/{cid}/similar", params={"target": "ffa"}).json()
        assert (same["similarity"], cross["similarity"]) == ("clinical", "clinical")
        assert same["suggestion"] == cross["suggestion"] is not None  # by the CF, either way
        assert sum(same["suggestion"]["probabilities"].values()) == pytest.approx(1.0)


# --------------------------------------------------------------------------- similarity, suggestion


class SplitPixelEncoder(PixelEncoder):
    """PixelEncoder serving every similarity: its vectors' halves stand for pair, clinical."""

    similarities = ("combined", "pair", "clinical")

    def similarity_weights(self, similarity: str) -> np.ndarray:
        out = np.ones(self.dim, np.float32)
        half = self.dim // 2
        if similarity == "pair":
            out[:half], out[half:] = np.sqrt(2), 0
        elif similarity == "clinical":
            out[:half], out[half:] = 0, np.sqrt(2)
        return out


def test_openapi_documents_similarity_and_suggestion(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    response = schemas["SearchResponse"]
    assert {"similarity", "suggestion"} <= set(response["properties"])
    assert response["example"]["suggestion"]["label"].endswith("not a diagnosis)")
    suggestion = schemas["DiagnosisSuggestion"]
    assert "example" in suggestion and set(suggestion["example"]) == set(suggestion["properties"])
    similar = spec["paths"]["/cases/{case_id}/similar"]["get"]
    (param,) = [p for p in similar["parameters"] if p["name"] == "similarity"]
    assert "Default: clinical" in param["description"]
    assert "not a diagnosis" in similar["description"]
    form = spec["paths"]["/search"]["post"]["requestBody"]["content"]["multipart/form-data"]
    ref = form["schema"]["$ref"].rsplit("/", 1)[-1]
    assert "similarity" in schemas[ref]["properties"]
    png = spec["paths"]["/model/reliability.png"]["get"]
    assert "image/png" in png["responses"]["200"]["content"] and "404" in png["responses"]
    map_op = spec["paths"]["/map"]["get"]
    (param,) = [p for p in map_op["parameters"] if p["name"] == "similarity"]
    assert "Default: clinical" in param["description"] and "similarity" in map_op["description"]
    assert schemas["MapResponse"]["example"]["similarity"] == "clinical"
    assert "similarity" in schemas["MapResponse"]["required"]


def test_similarity_defaults_per_query_type_and_is_echoed(pixel_index, tmp_path, case):
    path = tmp_path / "split"
    shutil.copytree(pixel_index, path)
    engine = Engine.open(path, encoder=SplitPixelEncoder())
    url = f"/cases/{case.case_id}/similar"
    photo = case.cf_path.read_bytes()
    for fast in (True, False):
        with TestClient(create_app(Settings(fast_path=fast), engine=engine)) as client:
            for params, expected in [
                ({}, "clinical"),
                ({"modality": "ffa", "target": "ffa"}, "clinical"),
                ({"target": "ffa"}, "clinical"),
                ({"target": "both"}, "clinical"),
                ({"target": "ffa", "similarity": "combined"}, "combined"),
                ({"similarity": "pair"}, "pair"),
                ({"target": "ffa", "similarity": "clinical"}, "clinical"),
            ]:
                body = client.get(url, params=params).json()
                assert body["similarity"] == body["query"]["similarity"] == expected, params
                query = CaseQuery(case.case_id, params.get("modality", "cf"))
                direct = engine.search(query, params.get("target", "cf"), similarity=expected)
                assert [r["case_id"] for r in body["results"]] == [
                    h.case.case_id for h in direct.hits
                ]
            by_photo = client.post("/search", files=upload(photo), data={"target": "ffa"}).json()
            assert by_photo["similarity"] == "clinical"
            pair = client.post("/search", files=upload(photo), data={"similarity": "pair"})
            assert pair.json()["similarity"] == "pair"


def test_map_projects_the_space_of_a_similarity(pixel_index, tmp_path):
    """Each stored vector times sqrt(the similarity's factors): inner products are that
    similarity's scores, and /map is the projection of exactly those vectors."""
    path = tmp_path / "split"
    shutil.copytree(pixel_index, path)
    engine = Engine.open(path, encoder=SplitPixelEncoder())
    _, _, stored, _ = engine.snapshot_vectors(("cf", "ffa"), 100)
    with TestClient(create_app(Settings(), engine=engine)) as client:
        default = client.get("/map", params={"method": "pca"}).json()
        assert default["similarity"] == "clinical"
        for similarity in SIMILARITIES:
            cases, mods, space, total = engine.snapshot_vectors(
                ("cf", "ffa"), 100, similarity=similarity
            )
            weights = engine.encoder.similarity_weights(similarity)
            np.testing.assert_allclose(space @ space.T, stored @ (stored * weights).T, atol=1e-5)
            body = client.get("/map", params={"similarity": similarity, "method": "pca"}).json()
            assert body["similarity"] == similarity and body["total"] == total == 48
            assert [(p["case_id"], p["modality"]) for p in body["points"]] == [
                (c.case_id, m) for c, m in zip(cases, mods, strict=True)
            ]
            xy, _, _ = project_2d(space, "pca")
            got = [(p["x"], p["y"]) for p in body["points"]]
            np.testing.assert_allclose(got, xy, rtol=1e-5, atol=1e-5)
        assert client.get("/map", params={"method": "pca"}).json() == default  # cached
        assert len(client.app.state.map_cache) == len(SIMILARITIES)  # one per similarity
    half = engine.encoder.dim // 2
    _, _, combined, _ = engine.snapshot_vectors(("cf", "ffa"), 100, similarity="combined")
    _, _, clinical, _ = engine.snapshot_vectors(("cf", "ffa"), 100, similarity="clinical")
    np.testing.assert_allclose(combined, stored)  # combined: as stored
    assert not clinical[:, :half].any() and clinical[:, half:].any()  # the clinical part


def test_suggestion_in_search_responses(client, engine, case):
    similar = client.get(f"/cases/{case.case_id}/similar", params={"target": "ffa"}).json()
    expected = engine.search(case.case_id, "ffa").suggestion
    model = engine.suggestion_model("cf")
    got = similar["suggestion"]
    assert got["label"] == "suggestion from similar cases (decision support, not a diagnosis)"
    assert got["diagnosis"] == expected.diagnosis and got["neighbours"] == model.k
    assert got["supporting_case_ids"] == list(expected.supporting_case_ids)
    assert got["calibrated"] is model.calibrated and got["abstained"] is expected.abstained
    assert sum(got["probabilities"].values()) == pytest.approx(1.0)
    assert got["probability"] == max(got["probabilities"].values())
    assert case.case_id not in got["supporting_case_ids"]
    video = case.ffa_path.read_bytes()
    by_video = client.post("/search", files=upload(video, "v.mp4", "video/mp4")).json()
    assert sum(by_video["suggestion"]["probabilities"].values()) == pytest.approx(1.0)
    classes = set(engine.suggestion_model("ffa").classes)
    assert set(by_video["suggestion"]["probabilities"]) == classes
    stats = client.get("/stats").json()
    assert stats["similarities"] == ["pair"] and set(stats["suggestion"]) == {"cf", "ffa"}
    assert stats["suggestion"]["cf"]["k"] == model.k
    assert stats["suggestion"]["cf"]["abstain_below"] == model.abstain_below


def test_suggestion_abstains_alike_on_both_paths(fresh):
    client, engine = fresh
    case = engine.cases(0, 1)[1][0]
    model = engine.suggestion_model("cf")
    engine._suggesters["cf"] = dataclasses.replace(model, abstain_below=1.0, calibrated=False)
    url = f"/cases/{case.case_id}/similar"
    fast = client.get(url).json()  # answered inline
    slow = client.get(url, params={"eye": "OD,OS"}).json()  # a filter: in a worker thread
    assert fast["suggestion"]["abstained"] is slow["suggestion"]["abstained"] is True
    assert fast["suggestion"] == slow["suggestion"] and fast["suggestion"]["calibrated"] is False
    photo = case.cf_path.read_bytes()
    assert client.post("/search", files=upload(photo)).json()["suggestion"]["abstained"] is True
    engine._suggesters.clear()  # an index without suggestion models
    assert client.get(url).json()["suggestion"] is None
    assert client.post("/search", files=upload(photo)).json()["suggestion"] is None


def test_reliability_diagram_route(engine, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"split": "test"}))
    with TestClient(create_app(Settings(report=report), engine=engine)) as client:
        missing = client.get("/model/reliability.png")
        assert missing.status_code == 404 and "reliability" in missing.json()["detail"]
        assert client.get("/model").json()["reliability_url"] is None
        png = png_bytes(np.full((8, 8, 3), 200, np.uint8))
        (tmp_path / "report.reliability.png").write_bytes(png)
        found = client.get("/model/reliability.png")
        assert found.status_code == 200 and found.headers["content-type"] == "image/png"
        assert found.content == png
        assert client.get("/model").json()["reliability_url"] == "/model/reliability.png"
        named = png_bytes(np.zeros((4, 4), np.uint8))
        (tmp_path / "figures").mkdir()
        (tmp_path / "figures" / "rel.png").write_bytes(named)
        report.write_text(json.dumps({"split": "test", "reliability_png": "figures/rel.png"}))
        assert client.get("/model/reliability.png").content == named
    with TestClient(create_app(Settings(report=tmp_path / "none.json"), engine=engine)) as bare:
        assert bare.get("/model/reliability.png").status_code == 404
