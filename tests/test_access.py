"""Who may do what: read and write keys, named keys, rate limits (route and fast path),
the audit log of writes, CORS, and the surfaces that expose them."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from retrieval.api import Settings, create_app
from retrieval.api import access as access_module
from retrieval.api.access import AccessConfigError, classify
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mp4_bytes, png_bytes
from retrieval.search.engine import Engine
from retrieval.testing import PixelEncoder
from ui.client import ApiClient, ApiError

READ, WRITE = "read-s3cret-0123456789", "write-s3cret-0123456789"
FILE_READ, FILE_WRITE = "pacs-viewer-key-0123456789", "ingest-robot-key-0123456789"


@pytest.fixture(scope="module")
def engine(pixel_index, tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("access") / "index"
    shutil.copytree(pixel_index, path)
    return Engine.open(path, encoder=PixelEncoder())


@pytest.fixture(scope="module")
def case(engine):
    return engine.cases(0, 1)[1][0]


@pytest.fixture(scope="module")
def new_case(case) -> dict:
    """Multipart files of a new case (the first case's media, mirrored: not a duplicate)."""
    image = np.ascontiguousarray(read_cf(case.cf_path)[:, ::-1])
    video = np.ascontiguousarray(read_ffa(case.ffa_path)[:, :, ::-1])
    return {
        "cf": ("a.png", png_bytes(image), "image/png"),
        "ffa": ("b.mp4", mp4_bytes(video), "video/mp4"),
    }


def app_for(engine: Engine, **settings):
    return TestClient(create_app(Settings(**settings), engine=engine))


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


# --------------------------------------------------------------------------- roles


def test_read_key_reads_write_key_writes(engine, case, new_case):
    with app_for(engine, api_key=READ, write_key=WRITE) as client:
        similar = f"/cases/{case.case_id}/similar"
        photo = {"file": ("q.png", case.cf_path.read_bytes(), "image/png")}
        assert client.get(similar, headers=key(READ)).status_code == 200  # the fast path
        assert client.post("/search", files=photo, headers=key(READ)).status_code == 200
        form = {"case_id": "by-reader"}
        refused = client.post("/cases", files=new_case, data=form, headers=key(READ))
        assert refused.status_code == 403, refused.text
        assert "'read' may only read" in refused.json()["detail"]
        assert "FUNDUS2VIDEO_WRITE_KEY" in refused.json()["detail"]
        gone = client.delete(f"/cases/{case.case_id}", headers=key(READ))
        assert gone.status_code == 403 and engine.case(case.case_id)
        for anonymous in (
            client.get(similar),
            client.post("/cases", files=new_case, data=form),
            client.delete(f"/cases/{case.case_id}"),
            client.delete(f"/cases/{case.case_id}", headers=key("wrong")),
        ):
            assert anonymous.status_code == 401, anonymous.text
            assert anonymous.headers["www-authenticate"] == "APIKey"
        # the write key also reads, and writes
        assert client.get(similar, headers=key(WRITE)).status_code == 200
        form = {"case_id": "by-writer"}
        added = client.post("/cases", files=new_case, data=form, headers=key(WRITE))
        assert added.status_code == 201, added.text
        assert client.delete("/cases/by-writer", headers=key(WRITE)).status_code == 200


def test_writes_need_a_write_key_unless_open_writes(engine, case, new_case):
    with app_for(engine) as client:  # no key configured at all: reads open, writes closed
        assert client.get(f"/cases/{case.case_id}").status_code == 200
        refused = client.post("/cases", files=new_case, data={"case_id": "x"})
        assert refused.status_code == 403
        assert "set FUNDUS2VIDEO_WRITE_KEY" in refused.json()["detail"]
        assert client.delete(f"/cases/{case.case_id}").status_code == 403
    with app_for(engine, api_key=READ, open_writes=True) as client:  # as before write keys
        assert client.delete("/cases/nope").status_code == 401
        assert client.delete("/cases/nope", headers=key(READ)).status_code == 404
    with app_for(engine, write_key=WRITE, open_writes=True) as client:  # a write key wins
        assert client.delete("/cases/nope").status_code == 401
        assert client.delete("/cases/nope", headers=key(WRITE)).status_code == 404
        assert client.get(f"/cases/{case.case_id}").status_code == 200  # no read key: open


def test_keys_are_compared_in_constant_time_with_every_key(engine, case, monkeypatch, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "pacs", "role": "read", "key": FILE_READ}]}))
    compared: list[tuple[bytes, bytes]] = []
    real = access_module.secrets.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    with app_for(engine, api_key=READ, write_key=WRITE, keys_file=keys) as client:
        monkeypatch.setattr(access_module.secrets, "compare_digest", spy)
        for fast_path_url in (f"/cases/{case.case_id}/similar", "/stats"):
            compared.clear()
            assert client.get(fast_path_url, headers=key(FILE_READ)).status_code == 200
            given = {a for a, _ in compared}
            assert given == {FILE_READ.encode()}, fast_path_url
            # every configured key, each time the request is identified
            assert {b for _, b in compared} == {READ.encode(), WRITE.encode(), FILE_READ.encode()}
        compared.clear()
        assert client.delete("/cases/nope", headers=key(FILE_READ)).status_code == 403
        assert compared and {a for a, _ in compared} == {FILE_READ.encode()}


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_named_keys_from_a_file(engine, new_case, tmp_path, suffix):
    path = tmp_path / f"keys{suffix}"
    rows = [("pacs-viewer", "read", FILE_READ), ("ingest-robot", "write", FILE_WRITE)]
    if suffix == ".json":
        path.write_text(
            json.dumps({"keys": [dict(zip(("name", "role", "key"), r, strict=True)) for r in rows]})
        )
    else:
        path.write_text(
            "".join(f'[[keys]]\nname = "{n}"\nrole = "{r}"\nkey = "{k}"\n' for n, r, k in rows)
        )
    with app_for(engine, keys_file=path) as client:
        assert client.get("/stats").status_code == 401  # a read key exists: reads need a key
        assert client.get("/stats", headers=key(FILE_READ)).status_code == 200
        refused = client.delete("/cases/nope", headers=key(FILE_READ))
        assert refused.status_code == 403 and "'pacs-viewer' may only read" in refused.text
        assert client.delete("/cases/nope", headers=key(FILE_WRITE)).status_code == 404


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("{", "cannot read it"),
        ('{"keys": []}', "non-empty list `keys`"),
        ('{"keys": [{"name": "a", "role": "admin", "key": "' + "k" * 20 + '"}]}', "role must be"),
        ('{"keys": [{"name": "a b", "role": "read", "key": "' + "k" * 20 + '"}]}', "name must"),
        ('{"keys": [{"name": "a", "role": "read", "key": "short"}]}', "16+ characters"),
        ('{"keys": [{"name": "a", "role": "read"}]}', "exactly the fields"),
        ('{"keys": [{"name": "read", "role": "read", "key": "' + "k" * 20 + '"}]}', "named 'read'"),
        ('{"keys": [{"name": "a", "role": "write", "key": "' + READ + '"}]}', "the same key"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_it(engine, tmp_path, content, fragment):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(AccessConfigError) as err:
        create_app(Settings(api_key=READ, keys_file=path), engine=engine)
    assert fragment in str(err.value)
    assert READ not in str(err.value) and "k" * 20 not in str(err.value)
    if fragment != "the same key" and "named" not in fragment:
        assert str(path) in str(err.value)


def test_empty_keys_and_bad_rates_are_refused(engine):
    with pytest.raises(AccessConfigError, match="FUNDUS2VIDEO_WRITE_KEY is set but empty"):
        create_app(Settings(write_key=""), engine=engine)
    with pytest.raises(ValidationError, match="rate_search") as err:
        Settings(rate_search="lots")
    assert "600/minute" in str(err.value)
    assert Settings(rate_write=" 5/second;100/minute ").rate_write == "5/second;100/minute"


# --------------------------------------------------------------------------- rate limits


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_burst_over_the_search_limit_is_429(engine, case, fast_path, monkeypatch):
    from retrieval.api import fastpath

    answered: list[str] = []
    similar_body = fastpath.similar_body

    async def recorded(*args):
        answered.append(args[3])
        return await similar_body(*args)

    monkeypatch.setattr(fastpath, "similar_body", recorded)  # the fast path's answers only
    url = f"/cases/{case.case_id}/similar"
    with app_for(
        engine, api_key=READ, write_key=WRITE, rate_search="3/minute", fast_path=fast_path
    ) as client:
        assert [client.get(url, headers=key(READ)).status_code for _ in range(3)] == [200] * 3
        assert len(answered) == (3 if fast_path else 0)
        over = client.get(url, headers=key(READ), params={"k": 2})
        assert over.status_code == 429 and len(answered) == (3 if fast_path else 0)
        assert 1 <= int(over.headers["retry-after"]) <= 60
        body = over.json()
        assert body["request_id"] == over.headers["x-request-id"]
        assert "FUNDUS2VIDEO_RATE_SEARCH" in body["detail"] and "3 per 1 minute" in body["detail"]
        photo = {"file": ("q.png", case.cf_path.read_bytes(), "image/png")}
        assert client.post("/search", files=photo, headers=key(READ)).status_code == 429
        explain = client.get(
            f"/cases/{case.case_id}/explain", params={"other": "x"}, headers=key(READ)
        )
        assert explain.status_code == 429
        # per key: another key (and the unlimited routes) still answer
        assert client.get(url, headers=key(WRITE)).status_code == 200
        assert client.get(f"/cases/{case.case_id}", headers=key(READ)).status_code == 200
        assert client.get(url, headers=key("wrong")).status_code == 401  # by address: 1 of 3


def test_generate_and_write_limits_count_every_attempt(engine):
    with app_for(
        engine, write_key=WRITE, rate_generate="1/minute", rate_write="2/minute"
    ) as client:
        first = client.post("/generate", files={"file": ("x.png", b"nope", "image/png")})
        assert first.status_code == 415  # not an image: refused, and counted
        second = client.post("/generate", files={"file": ("x.png", b"nope", "image/png")})
        assert second.status_code == 429 and "FUNDUS2VIDEO_RATE_GENERATE" in second.text
        statuses = [client.delete("/cases/nope", headers=key(WRITE)).status_code for _ in range(3)]
        assert statuses == [404, 404, 429]
        assert client.delete("/cases/nope").status_code == 401  # another caller: its address


def test_an_empty_rate_is_no_limit(engine, case):
    with app_for(engine, rate_search="") as client:
        url = f"/cases/{case.case_id}/similar"
        assert {client.get(url, params={"k": 1}).status_code for _ in range(30)} == {200}


# --------------------------------------------------------------------------- audit


def test_the_audit_log_has_one_line_per_write_attempt(engine, case, new_case, tmp_path, caplog):
    log_path = tmp_path / "audit.jsonl"
    caplog.set_level(logging.INFO, logger="fundus2video.audit")
    settings = {
        "api_key": READ,
        "write_key": WRITE,
        "audit_log": log_path,
        "rate_write": "4/minute",
    }
    with app_for(engine, **settings) as client:
        attempts = [
            client.post("/cases", files=new_case, data={"case_id": "audited"}, headers=key(WRITE)),
            client.post("/cases", files=new_case, data={"case_id": "audited"}, headers=key(WRITE)),
            client.post("/cases", files=new_case, data={"case_id": "r1"}, headers=key(READ)),
            client.delete("/cases/audited"),
            client.post("/cases", data={"case_id": "no-media"}, headers=key(WRITE)),
            client.delete("/cases/audited", headers=key(WRITE)),
            client.delete("/cases/audited", headers=key(WRITE)),  # this key's 5th: over 4
            client.get(f"/cases/{case.case_id}/similar", headers=key(READ)),  # not a write
        ]
    assert [a.status_code for a in attempts] == [201, 409, 403, 401, 422, 200, 429, 200]
    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(e["status"], e["key"], e["method"], e["case_id"]) for e in lines] == [
        (201, "write", "POST", "audited"),
        (409, "write", "POST", "audited"),
        (403, "read", "POST", "r1"),
        (401, None, "DELETE", "audited"),
        (422, "write", "POST", "no-media"),
        (200, "write", "DELETE", "audited"),
        (429, "write", "DELETE", "audited"),
    ]
    assert {e["route"] for e in lines} == {"/cases", "/cases/{case_id}"}
    assert [e["key_sent"] for e in lines] == [True, True, True, False, True, True, True]
    assert all(e["client"] == "testclient" and e["request_id"] for e in lines)
    assert all(datetime.fromisoformat(e["time"]).utcoffset().total_seconds() == 0 for e in lines)
    assert [r.getMessage() for r in caplog.records if r.name == "fundus2video.audit"] == (
        text.splitlines()
    )
    for secret in (READ, WRITE):  # never the key material, in the file or the log
        assert secret not in text and secret not in caplog.text


def test_a_bad_audit_log_path_is_refused_naming_it(engine, tmp_path):
    with pytest.raises(AccessConfigError, match="FUNDUS2VIDEO_AUDIT_LOG") as err:
        create_app(Settings(audit_log=tmp_path / "missing" / "audit.jsonl"), engine=engine)
    assert "missing" in str(err.value)


# --------------------------------------------------------------------------- contract


READ_ONLY_POSTS = {("POST", "/search"), ("POST", "/generate")}


def test_every_state_changing_route_needs_the_write_key(engine, case):
    app = create_app(Settings(api_key=READ, write_key=WRITE), engine=engine)
    paths = app.openapi()["paths"]
    changing = {
        (method.upper(), path)
        for path, operations in paths.items()
        for method in operations
        if method not in ("get", "head")
    } - READ_ONLY_POSTS
    assert changing == {("POST", "/cases"), ("DELETE", "/cases/{case_id}")}
    with TestClient(app) as client:
        for method, path in changing:
            concrete = path.replace("{case_id}", case.case_id)
            refused = client.request(method, concrete, headers=key(READ))
            assert refused.status_code == 403, (method, path)
            assert paths[path][method.lower()]["security"] == [{"WriteKey": []}]
            assert classify(method, concrete)[0].kind == "write", (method, path)
    for rule in access_module.ROUTE_CLASSES:  # the limits name real routes
        assert rule.method.lower() in paths[rule.template], rule


def test_openapi_documents_keys_and_limits(engine):
    spec = create_app(Settings(), engine=engine).openapi()
    schemes = spec["components"]["securitySchemes"]
    assert "FUNDUS2VIDEO_WRITE_KEY" in schemes["WriteKey"]["description"]
    assert "FUNDUS2VIDEO_API_KEY" in schemes["APIKeyHeader"]["description"]
    for path, method in (("/cases", "post"), ("/cases/{case_id}", "delete")):
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"WriteKey": []}]
        for status in ("401", "403", "429"):
            example = operation["responses"][status]["content"]["application/json"]["example"]
            assert example["detail"], (path, status)
        assert "Retry-After" in operation["responses"]["429"]["headers"]
    for path, method in (
        ("/search", "post"),
        ("/cases/{case_id}/similar", "get"),
        ("/generate", "post"),
    ):
        assert "429" in spec["paths"][path][method]["responses"], path
    assert "429" not in spec["paths"]["/cases/{case_id}"]["get"]["responses"]


def test_cors_is_off_by_default_and_covers_the_fast_path_when_set(engine, case):
    origin = {"Origin": "https://viewer.example.org"}
    url = f"/cases/{case.case_id}/similar"
    assert Settings.model_fields["cors_origins"].description
    with app_for(engine) as client:
        assert "access-control-allow-origin" not in client.get(url, headers=origin).headers
    with app_for(
        engine, cors_origins=["https://viewer.example.org"], rate_search="1/minute"
    ) as client:
        answered, limited = client.get(url, headers=origin), client.get(url, headers=origin)
        assert (answered.status_code, limited.status_code) == (200, 429)
        for response in (answered, limited):
            assert response.headers["access-control-allow-origin"] == origin["Origin"]
        assert "retry-after" in limited.headers["access-control-expose-headers"].lower()


# --------------------------------------------------------------------------- surfaces


def test_client_sends_the_write_key_for_writes_and_reads_errors():
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path == "/stats":
            return httpx.Response(200, json={})
        if request.headers.get("x-api-key") != "w":
            body = {"detail": "the key 'read' may only read", "request_id": "r"}
            return httpx.Response(403, json=body)
        if request.method == "DELETE":
            detail = "too many write requests: retry in 7 s"
            return httpx.Response(429, json={"detail": detail}, headers={"Retry-After": "7"})
        return httpx.Response(201, json={"case_id": "n1"})

    client = ApiClient(
        "http://api", api_key="r", write_key="w", transport=httpx.MockTransport(answer)
    )
    client.stats()
    assert client.add_case("n1", ("a.png", b"png"), ("b.mp4", b"mp4")) == {"case_id": "n1"}
    with pytest.raises(ApiError) as err:
        client.delete_case("n1")
    assert [r.headers["x-api-key"] for r in sent] == ["r", "w", "w"]
    assert err.value.status == 429 and err.value.retry_after == 7.0
    assert str(err.value).startswith("Too many requests (HTTP 429 (/cases/n1))")
    reader = ApiClient("http://api", api_key="r", transport=httpx.MockTransport(answer))
    with pytest.raises(ApiError) as err:
        reader.add_case("n2", ("a.png", b"png"), ("b.mp4", b"mp4"))
    assert err.value.status == 403 and "Not allowed" in str(err.value)
    assert "may only read" in str(err.value) and err.value.retry_after is None


def test_serve_help_lists_the_access_settings():
    from typer.testing import CliRunner

    from retrieval.apps.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in (
        "FUNDUS2VIDEO_API_KEY",
        "FUNDUS2VIDEO_WRITE_KEY",
        "FUNDUS2VIDEO_KEYS_FILE",
        "FUNDUS2VIDEO_OPEN_WRITES",
        "FUNDUS2VIDEO_RATE_SEARCH",
        "FUNDUS2VIDEO_RATE_GENERATE",
        "FUNDUS2VIDEO_RATE_WRITE",
        "FUNDUS2VIDEO_CORS_ORIGINS",
        "--audit-log",
    ):
        assert name in result.output, name


def test_the_demo_opens_writes_explicitly(tmp_path, monkeypatch):
    from retrieval.apps import demo

    monkeypatch.delenv("FUNDUS2VIDEO_WRITE_KEY", raising=False)
    app = demo.demo_app(demo.DemoPaths.under(tmp_path))
    assert app.state.settings.open_writes and app.state.access.describe().endswith("writes open")


def test_serve_refuses_a_bad_rate_setting(tmp_path):
    from typer.testing import CliRunner

    from retrieval.apps.cli import app

    env = {"FUNDUS2VIDEO_RATE_WRITE": "often"}
    result = CliRunner().invoke(app, ["serve", str(tmp_path)], env=env)
    assert result.exit_code == 2, result.output
    assert "rate_write" in result.output and "600/minute" in result.output
