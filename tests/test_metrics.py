"""Prometheus metrics (GET /metrics, read with prometheus_client's own parser), the
readiness probe (GET /ready), the engine's failed-save flag, the client's `ready()`, the
dashboard's sidebar line, `serve`'s start-up line and the sample Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from retrieval.api import Settings, create_app
from retrieval.api.fastpath import SimilarFastPath
from retrieval.api.metrics import REFUSAL_REASONS, UNROUTED
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mp4_bytes, png_bytes
from retrieval.errors import PersistError
from retrieval.search.engine import Engine
from retrieval.testing import PixelEncoder
from ui.client import ApiClient

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
SIMILAR = "/cases/{case_id}/similar"


def open_settings(**kwargs) -> Settings:
    """Settings that let adds and deletes through without a write key."""
    return Settings(open_writes=True, **kwargs)


def open_engine(pixel_index: Path, tmp: Path) -> Engine:
    path = tmp / "index"
    shutil.copytree(pixel_index, path)
    return Engine.open(path, encoder=PixelEncoder())


@pytest.fixture
def engine(pixel_index, tmp_path) -> Engine:
    return open_engine(pixel_index, tmp_path)


def scrape(client: TestClient, **kwargs) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics: (name, sorted labels) → value."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests(samples: dict, method: str, route: str, status: int) -> float:
    name = "fundus2video_http_requests_total"
    return value(samples, name, method=method, route=route, status=str(status))


def searches(samples: dict, via: str, target: str) -> float:
    return value(samples, "fundus2video_search_duration_seconds_count", via=via, target=target)


def media(engine: Engine, case_id: str) -> tuple[bytes, bytes]:
    case = engine.case(case_id)
    return png_bytes(read_cf(case.cf_path)), mp4_bytes(read_ffa(case.ffa_path))


# --------------------------------------------------------------------------- /metrics


def test_requests_searches_updates_and_refusals_move_the_metrics(engine, monkeypatch):
    answered = []
    original = SimilarFastPath._answer

    async def spy(self, scope, case_id):
        body = await original(self, scope, case_id)
        answered.append(body is not None)
        return body

    monkeypatch.setattr(SimilarFastPath, "_answer", spy)
    first, second = (c.case_id for c in engine.cases(0, 2)[1])
    with TestClient(create_app(open_settings(), engine=engine)) as client:
        before = scrape(client)
        assert client.get(f"/cases/{first}/similar", params={"k": 3}).status_code == 200
        assert answered == [True]  # the fast path answered it, not the route
        photo, video = media(engine, first)
        query = {"file": ("q.png", photo, "image/png")}
        found = client.post("/search", files=query, data={"target": "ffa"})
        assert found.status_code == 200
        refused = client.post("/search", files={"file": ("q.txt", b"hello", "text/plain")})
        assert refused.status_code == 415
        files = {"cf": ("cf.png", photo, "image/png"), "ffa": ("ffa.mp4", video, "video/mp4")}
        duplicate = client.post("/cases", files=files, data={"case_id": "new-1"})
        assert duplicate.status_code == 409  # the same media as an indexed case
        added = client.post(
            "/cases", files=files, data={"case_id": "new-1", "allow_duplicate": "true"}
        )
        assert added.status_code == 201, added.text
        grown = scrape(client)
        assert client.delete(f"/cases/{second}").status_code == 200
        assert client.delete(f"/cases/{second}").status_code == 404
        after = scrape(client)

    assert requests(after, "GET", SIMILAR, 200) - requests(before, "GET", SIMILAR, 200) == 1
    assert requests(after, "POST", "/search", 200) == 1
    assert requests(after, "POST", "/search", 415) == 1
    assert requests(after, "POST", "/cases", 201) == 1 and requests(after, "POST", "/cases", 409)
    assert requests(after, "DELETE", "/cases/{case_id}", 200) == 1
    assert requests(after, "DELETE", "/cases/{case_id}", 404) == 1
    assert requests(after, "GET", "/metrics", 200) == 2  # the scrapes before this one
    latency = "fundus2video_http_request_duration_seconds_count"
    assert value(after, latency, method="GET", route=SIMILAR, status="200") == 1
    assert value(after, latency, method="POST", route="/search", status="200") == 1
    # labels hold templates, never a path with a case id
    routes = {dict(labels).get("route") for _, labels in after}
    assert not any(first in str(r) or second in str(r) for r in routes)

    assert searches(before, "direct", "cf") == 0
    assert searches(after, "direct", "cf") == 1  # the fast path's search
    assert searches(after, "direct", "ffa") == 1  # the upload's
    assert value(after, "fundus2video_search_duration_seconds_sum", via="direct", target="cf") > 0

    rejected = "fundus2video_uploads_rejected_total"
    assert value(after, rejected, reason="bad_type") == 1
    assert sum(value(after, rejected, reason=r) for r in REFUSAL_REASONS) == 1
    assert value(after, "fundus2video_cases_added_total", result="ok") == 1
    assert value(after, "fundus2video_cases_added_total", result="rejected") == 1
    assert value(after, "fundus2video_cases_deleted_total", result="ok") == 1
    assert value(after, "fundus2video_cases_deleted_total", result="rejected") == 1
    for modality in ("cf", "ffa"):  # read at scrape time: the add and the delete show
        assert value(before, "fundus2video_cases", modality=modality) == 24
        assert value(grown, "fundus2video_cases", modality=modality) == 25
        assert value(after, "fundus2video_cases", modality=modality) == 24


def test_search_listener_lives_as_long_as_the_app(engine):
    app = create_app(open_settings(), engine=engine)
    registry = app.state.metrics.registry
    count = "fundus2video_search_duration_seconds_count"
    labels = {"via": "direct", "target": "cf"}
    case_id = engine.cases(0, 1)[1][0].case_id
    with TestClient(app):
        engine.search(case_id, "cf", 3)  # the Python API: counted by the serving app
        assert registry.get_sample_value(count, labels) == 1
    engine.search(case_id, "cf", 3)  # after shutdown: no longer
    assert registry.get_sample_value(count, labels) == 1


def test_search_latency_by_via_and_target(engine):
    case_id = engine.cases(0, 1)[1][0].case_id
    with TestClient(create_app(open_settings(), engine=engine)) as client:
        for via in ("synthesis", "fused"):
            params = {"via": via, "target": "ffa", "k": 2}
            assert client.get(f"/cases/{case_id}/similar", params=params).status_code == 200
        params = {"target": "both", "k": 2, "diagnosis": "PDR,normal"}  # filters: the route
        assert client.get(f"/cases/{case_id}/similar", params=params).status_code == 200
        samples = scrape(client)
    assert searches(samples, "synthesis", "ffa") == 1
    assert searches(samples, "fused", "ffa") == 1
    assert searches(samples, "direct", "both") == 1
    assert searches(samples, "direct", "cf") == 0
    assert requests(samples, "GET", SIMILAR, 200) == 3


def test_refused_uploads_are_counted_by_reason(engine):
    case_id = engine.cases(0, 1)[1][0].case_id
    photo, _ = media(engine, case_id)  # 64 x 64
    tight = Settings(max_upload_bytes=20_000, max_pixels=3000, max_frames=3)
    tiny = png_bytes(np.zeros((8, 8, 3), np.uint8))
    sends = {
        "too_large": ("big.png", b"\x89PNG" + bytes(30_000), "image/png"),
        "too_many_pixels": ("q.png", photo, "image/png"),
        "too_many_frames": ("v.mp4", mp4_bytes(np.zeros((6, 32, 32), np.uint8)), "video/mp4"),
        "undecodable": ("q.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "image/png"),
        "too_small": ("q.png", tiny, "image/png"),
        "bad_type": ("q.gif", b"GIF89a" + bytes(16), "image/gif"),
    }
    assert set(sends) == set(REFUSAL_REASONS)
    with TestClient(create_app(tight, engine=engine)) as client:
        statuses = {
            r: client.post("/search", files={"file": f}).status_code for r, f in sends.items()
        }
        samples = scrape(client)
    assert statuses == {
        "too_large": 413,
        "too_many_pixels": 413,
        "too_many_frames": 413,
        "undecodable": 422,
        "too_small": 422,
        "bad_type": 415,
    }
    for reason in REFUSAL_REASONS:
        assert value(samples, "fundus2video_uploads_rejected_total", reason=reason) == 1, reason
    # refused by the body limit before routing: still labelled by its route template
    assert requests(samples, "POST", "/search", 413) == 3


def test_unknown_paths_share_one_label(engine):
    with TestClient(create_app(open_settings(), engine=engine)) as client:
        for path in ("/nope", "/secret/123", "/cases/x/y/z"):
            assert client.get(path).status_code == 404
        samples = scrape(client)
    assert requests(samples, "GET", UNROUTED, 404) == 3
    assert not any("nope" in str(labels) or "secret" in str(labels) for _, labels in samples)


def test_metrics_need_the_api_key_unless_public(engine):
    with TestClient(create_app(Settings(api_key="s3cret"), engine=engine)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/ready").status_code == 200 and client.get("/health").status_code == 200
        samples = scrape(client, headers={"X-API-Key": "s3cret"})
        assert requests(samples, "GET", "/metrics", 401) == 1
    public = Settings(api_key="s3cret", metrics_public=True)
    with TestClient(create_app(public, engine=engine)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/stats").status_code == 401  # the rest still needs the key


def test_each_app_has_its_own_registry(engine):
    case_id = engine.cases(0, 1)[1][0].case_id
    with (
        TestClient(create_app(open_settings(), engine=engine)) as one,
        TestClient(create_app(open_settings(), engine=engine)) as two,
    ):
        assert one.get(f"/cases/{case_id}").status_code == 200
        assert requests(scrape(one), "GET", "/cases/{case_id}", 200) == 1
        assert requests(scrape(two), "GET", "/cases/{case_id}", 200) == 0


def test_load_times_are_gauges(engine):
    assert set(engine.load_seconds) == {"model", "index"}
    with TestClient(create_app(open_settings(), engine=engine)) as client:
        samples = scrape(client)
    assert value(samples, "fundus2video_model_load_seconds") == engine.load_seconds["model"]
    assert value(samples, "fundus2video_index_load_seconds") == engine.load_seconds["index"] > 0


# --------------------------------------------------------------------------- /ready


def test_ready_is_503_until_the_engine_is_loaded(engine):
    app = create_app(Settings())
    with TestClient(app) as client:
        waiting = client.get("/ready")
        assert waiting.status_code == 503
        body = waiting.json()
        assert body["ready"] is False and body["missing"] == ["model", "index"]
        assert not body["model_loaded"] and not body["index_loaded"] and body["cases"] is None
        assert "no model and no index" in body["detail"]
        assert client.get("/health").status_code == 200  # liveness: the process answers
        assert value(scrape(client), "fundus2video_ready") == 0
        assert "fundus2video_cases" not in {name for name, _ in scrape(client)}

        app.state.engine = engine  # loaded
        ready = client.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {
            "ready": True,
            "model_loaded": True,
            "index_loaded": True,
            "last_save_ok": True,
            "cases": 24,
            "missing": [],
            "detail": None,
        }
        assert value(scrape(client), "fundus2video_ready") == 1


def test_a_background_load_answers_503_loading_until_the_index_is_open(
    pixel_index, tmp_path, monkeypatch
):
    """`serve` listens at once: /ready is 503 "loading" while the index opens, then 200."""
    opening, release = threading.Event(), threading.Event()
    real_open = Engine.open

    def slow_open(path, **kwargs):
        opening.set()
        assert release.wait(30)
        return real_open(path, encoder=PixelEncoder())

    monkeypatch.setattr(Engine, "open", slow_open)
    index = tmp_path / "index"
    shutil.copytree(pixel_index, index)
    app = create_app(open_settings(index=index, load_in_background=True))
    with TestClient(app) as client:
        assert opening.wait(30)
        loading = client.get("/ready")
        assert loading.status_code == 503 and loading.json()["detail"].startswith("loading")
        assert client.get("/health").json()["loaded"] is False  # alive, not ready
        assert client.get("/cases").status_code == 503
        assert value(scrape(client), "fundus2video_ready") == 0
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.05)
        assert client.get("/cases").json()["total"] == 24
        assert value(scrape(client), "fundus2video_ready") == 1


def test_a_failed_background_load_is_503_and_says_so_without_the_error(tmp_path, monkeypatch):
    def broken_open(path, **kwargs):
        raise OSError(5, f"Input/output error: {path}/vectors-cf.faiss")

    monkeypatch.setattr(Engine, "open", broken_open)
    app = create_app(open_settings(index=tmp_path, load_in_background=True))
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while app.state.load_state != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        failed = client.get("/ready")
        assert failed.status_code == 503
        assert "could not be loaded" in failed.json()["detail"]
        assert str(tmp_path) not in failed.text and "Input/output" not in failed.text
        assert client.get("/health").status_code == 200
    # without the background load, a bad index stops the startup itself
    blocking = create_app(open_settings(index=tmp_path))
    with pytest.raises(OSError, match="Input/output"), TestClient(blocking):
        pass


def test_serve_refuses_a_folder_that_is_not_an_index_before_listening(tmp_path):
    from typer.testing import CliRunner

    from retrieval.apps.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", str(tmp_path), "--port", "9"])
    assert result.exit_code == 2 and "manifest" in result.output and str(tmp_path) in result.output


def test_a_failed_save_sets_the_engine_flag_and_ready_503(engine, monkeypatch):
    first, second = (c.case_id for c in engine.cases(0, 2)[1])

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    assert engine.save_error is None
    monkeypatch.setattr(engine._folder, "save", full_disk)  # this folder object only
    with pytest.raises(PersistError):
        engine.remove_case(first)
    assert "No space left on device" in engine.save_error
    assert engine.case_count == 24  # the last saved index was reloaded

    with TestClient(create_app(open_settings(), engine=engine)) as client:
        failing = client.get("/ready")
        assert failing.status_code == 503
        body = failing.json()
        assert body["missing"] == ["index_save"] and body["last_save_ok"] is False
        assert body["model_loaded"] and body["index_loaded"] and body["cases"] == 24
        assert "No space" not in body["detail"]  # no server paths or errors on a public route
        assert client.get(f"/cases/{first}/similar").status_code == 200  # searches still work
        assert value(scrape(client), "fundus2video_ready") == 0
        # the reloaded folder saves again: a successful update clears the flag
        assert client.delete(f"/cases/{second}").status_code == 200
        assert engine.save_error is None
        assert client.get("/ready").status_code == 200


def test_a_failed_save_over_http_counts_as_a_failed_delete(engine):
    case_id = engine.cases(0, 1)[1][0].case_id

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    engine._folder.save = full_disk
    with TestClient(create_app(open_settings(), engine=engine)) as client:
        assert client.delete(f"/cases/{case_id}").status_code == 503
        assert client.get("/ready").status_code == 503
        samples = scrape(client)
    assert value(samples, "fundus2video_cases_deleted_total", result="failed") == 1
    assert requests(samples, "DELETE", "/cases/{case_id}", 503) == 1


def test_openapi_describes_ready_and_metrics(engine):
    with TestClient(create_app(open_settings(), engine=engine)) as client:
        paths = client.get("/openapi.json").json()["paths"]
    ready, metrics = paths["/ready"]["get"], paths["/metrics"]["get"]
    for op in (ready, metrics):
        assert op["summary"] and op["description"]
    assert ready["responses"]["200"]["content"]["application/json"]["example"]["ready"] is True
    examples = ready["responses"]["503"]["content"]["application/json"]["examples"]
    assert {e["value"]["missing"][0] for e in examples.values()} == {"model", "index_save"}
    assert "fundus2video_" in metrics["responses"]["200"]["content"]["text/plain"]["example"]
    assert "security" not in ready and "security" in metrics


# --------------------------------------------------------------------------- surfaces


def test_client_ready_returns_the_body_of_a_503():
    def handler(request: httpx.Request) -> httpx.Response:
        status = {"/ready": 503}.get(request.url.path, 500)
        return httpx.Response(status, json={"ready": False, "missing": ["index"], "detail": "x"})

    client = ApiClient("http://api.test", transport=httpx.MockTransport(handler))
    assert client.ready()["missing"] == ["index"]
    with pytest.raises(Exception, match="500"):
        client.health()


def test_sidebar_says_loading_when_ready_is_503(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from ui import client as client_mod

    loading = {"ready": False, "missing": ["model", "index"], "detail": "loading: ..."}
    failed = {"ready": False, "missing": ["index_save"], "detail": "save failed"}
    unloadable = {**loading, "detail": "not ready: the index folder could not be loaded"}
    for body, words in (
        (loading, "loading"),
        (failed, "last save of the index failed"),
        (unloadable, "connected, but the index folder could not be loaded"),
    ):
        monkeypatch.setattr(client_mod.ApiClient, "ready", lambda self, body=body: body)
        monkeypatch.setattr(client_mod.ApiClient, "health", lambda self: {"loaded": True})
        at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=60)
        at.session_state["api_url"] = f"http://sidebar-{words[:4]}.test"
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        captions = " ".join(c.value for c in at.sidebar.caption)
        assert words in captions, captions


def test_serve_names_the_probe_and_metrics_urls(engine):
    from retrieval.apps.cli import serve_banner

    url = "http://127.0.0.1:8000"
    app = create_app(open_settings(), engine=engine)
    lines = serve_banner(24, Path("INDEX"), url, app).splitlines()
    assert lines[0].startswith(f"serving 24 cases from INDEX at {url}")
    assert f"{url}/ready" in lines[1] and f"{url}/metrics" in lines[1]
    keyed = create_app(open_settings(api_key="k" * 16), engine=engine)
    assert "API key required" in serve_banner(24, Path("I"), url, keyed)
    public = create_app(open_settings(api_key="k" * 16, metrics_public=True), engine=engine)
    assert "API key required" not in serve_banner(24, Path("I"), url, public).splitlines()[1]


def test_grafana_dashboard_uses_only_exported_metrics(engine):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    used = {m for e in exprs for m in re.findall(r"\bfundus2video_[a-z_]+", e)}
    case_id = engine.cases(0, 1)[1][0].case_id
    with TestClient(create_app(open_settings(), engine=engine)) as client:
        client.get(f"/cases/{case_id}/similar")
        exported = {name for name, _ in scrape(client)}
    assert used and used <= exported, used - exported
    for needed in (
        "fundus2video_http_requests_total",
        "fundus2video_http_request_duration_seconds_bucket",
        "fundus2video_search_duration_seconds_bucket",
        "fundus2video_cases",
        "fundus2video_uploads_rejected_total",
    ):
        assert needed in used, needed
