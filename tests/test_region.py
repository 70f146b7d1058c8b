"""Region-of-interest queries: the box geometry, the engine, the API, the CLI, the client
and the dashboard (`retrieval.search.region`, `Engine.search(region=...)`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from streamlit.testing.v1 import AppTest

from retrieval.api import Settings, create_app
from retrieval.data.media import read_cf
from retrieval.errors import QueryError
from retrieval.search.engine import CaseQuery, CFQuery, Engine, FFAQuery
from retrieval.search.region import (
    best_window,
    box_cells,
    cells_box,
    from_square,
    locate,
    pair_mask,
    parse_region,
    region_query,
    to_square,
)
from retrieval.testing import PixelEncoder
from ui.client import ApiClient, Result

APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"


# -- geometry ------------------------------------------------------------------------------
def test_parse_region_reads_text_and_numbers_and_names_the_parameter():
    assert parse_region("0.1, 0.2,0.5,0.6") == (0.1, 0.2, 0.5, 0.6)
    assert parse_region([0, 0, 1, 1]) == (0.0, 0.0, 1.0, 1.0)
    assert parse_region(None) is None and parse_region("  ") is None
    for bad in ("0.1,0.2,0.5", "a,b,c,d", "0.5,0.2,0.1,0.6", "0,0,1.5,1", "0,0.5,1,0.5"):
        with pytest.raises(QueryError, match="region"):
            parse_region(bad)
    with pytest.raises(QueryError, match="roi"):
        parse_region([0, 0, float("nan"), 1], name="roi")


def test_square_mapping_round_trips_on_a_wide_photo():
    box = (0.1, 0.2, 0.6, 0.9)
    sq = to_square(box, 100, 200)  # 100 high, 200 wide: padded by 50 rows above and below
    assert sq == pytest.approx((0.1, (50 + 20) / 200, 0.6, (50 + 90) / 200))
    assert from_square(sq, 100, 200) == pytest.approx(box)
    assert from_square((0.0, 0.0, 1.0, 1.0), 100, 200) == (0.0, 0.0, 1.0, 1.0)  # clipped


def test_box_cells_cover_the_box_and_at_least_one_cell():
    assert box_cells((0.25, 0.5, 0.5, 1.0), 4) == (2, 4, 1, 2)
    assert box_cells((0.0, 0.0, 1.0, 1.0), 16) == (0, 16, 0, 16)
    assert box_cells((0.51, 0.51, 0.52, 0.52), 16) == (8, 9, 8, 9)  # a sliver: one cell
    assert cells_box((2, 4, 1, 2), 4) == (0.25, 0.5, 0.5, 1.0)


def test_pair_mask_selects_the_entries_of_the_boxs_regions():
    mask = pair_mask((0, 1, 1, 3), grid=4, pair_dim=32, out_dim=40)  # 2 entries per region
    assert mask.shape == (40,) and mask.sum() == 4
    assert np.flatnonzero(mask).tolist() == [2, 3, 4, 5]  # regions 1 and 2 of row 0


def test_locate_takes_the_best_window_or_the_same_place():
    rq = region_query((0.0, 0.0, 0.5, 0.25), (64, 64), 4)  # 1 row x 2 cols
    assert rq.cells == (0, 1, 0, 2) and rq.shape == (1, 2)
    scores = np.zeros((4, 3), np.float32)
    scores[3, 1] = 0.9
    assert best_window(scores, 1, 2) == ((3, 4, 1, 3), pytest.approx(0.9))
    box, score = locate(rq, (64, 64), scores)
    assert box == (0.25, 0.75, 0.75, 1.0) and score == pytest.approx(0.9)
    assert locate(rq, (64, 64), None) == ((0.0, 0.0, 0.5, 0.25), None)


# -- the engine (PixelEncoder: a region is its crop's embedding) ---------------------------
@pytest.fixture(scope="module")
def engine(pixel_index, tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("region") / "index"
    shutil.copytree(pixel_index, path)
    return Engine.open(path, encoder=PixelEncoder())


BOX = (0.25, 0.25, 0.75, 0.625)  # 4 x 3 of the 8 x 8 cells: cells rows 2:5, cols 2:6


def test_region_search_ranks_by_the_boxs_content(engine):
    case = engine.cases(0, 1)[1][0]
    result = engine.search(case.case_id, k=5, region=BOX)
    crop = engine.encoder.embed_cf_region([read_cf(case.cf_path)], (2, 5, 2, 6))  # (1, D)
    ids = np.asarray([c.row_id for c in engine.cases(0, 100)[1] if c.row_id != case.row_id])
    scores = engine.vectors("cf", ids) @ crop[0]
    order = np.argsort(-scores)[:5]
    assert [h.case.row_id for h in result.hits] == ids[order].tolist()
    assert [h.score for h in result.hits] == pytest.approx(scores[order].tolist(), abs=1e-5)
    best = ids[order].tolist()
    assert result.query["region"] == list(BOX) and result.query["region_cells"] == [2, 5, 2, 6]
    whole = engine.search(case.case_id, k=5)
    assert [h.case.row_id for h in whole.hits] != best  # the region changed the ranking
    assert result.suggestion == whole.suggestion  # the suggestion stays the whole photo's


def test_region_hits_say_where_they_matched(engine):
    case = engine.cases(0, 1)[1][0]
    result = engine.search(case.case_id, k=4, region=BOX, exclude_self=False)
    for hit in result.hits:
        x0, y0, x1, y1 = hit.region
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert (x1 - x0, y1 - y0) == pytest.approx((0.5, 0.375))  # the box's size in cells
        assert -1 <= hit.region_score <= 1 + 1e-6
    own = next(h for h in result.hits if h.case.row_id == case.row_id)
    assert own.region == pytest.approx(BOX) and own.region_score == pytest.approx(1.0, abs=1e-5)


def test_region_search_of_an_uploaded_photo_equals_its_case_query(engine):
    case = engine.cases(0, 1)[1][0]
    image = read_cf(case.cf_path)
    by_case = engine.search(case.case_id, k=5, region="0.25,0.25,0.75,0.625", exclude_self=False)
    by_upload = engine.search(CFQuery(image), k=5, region=BOX)
    assert [h.case.case_id for h in by_upload.hits] == [h.case.case_id for h in by_case.hits]
    assert [h.region for h in by_upload.hits] == [h.region for h in by_case.hits]


def test_region_search_refuses_what_it_cannot_answer_naming_region(engine):
    case = engine.cases(0, 1)[1][0]
    with pytest.raises(QueryError, match="region"):
        engine.search(case.case_id, region="0.5,0.5,0.2,0.9")
    with pytest.raises(QueryError, match="region.*FFA"):
        engine.search(CaseQuery(case.case_id, "ffa"), region=BOX)
    with pytest.raises(QueryError, match="region.*FFA"):
        engine.search(FFAQuery(np.zeros((3, 32, 32), np.uint8)), region=BOX)
    with pytest.raises(QueryError, match="region.*via"):
        engine.search(case.case_id, target="ffa", via="synthesis", region=BOX)


# -- the real embedder (tiny_index): the box's vector is the embedder's own -----------------
def test_a_box_over_the_whole_photo_is_the_whole_photos_embedding(tiny_index):
    from retrieval.models.embedding import QueryEncoder

    enc = QueryEncoder.open(tiny_index.run)
    g = enc.region_grid
    images = [read_cf(p) for p in sorted((tiny_index.cohort / "cf").glob("*.png"))[:3]]
    whole = enc.embed_cf(images)
    region = enc.embed_cf_region(images, (0, g, 0, g))
    np.testing.assert_allclose(region, whole, atol=1e-5)
    maps = enc.locate_cf_region(region[0], images, (g, g))
    assert maps.shape == (3, 1, 1)
    d = enc.embedder.config.dim
    clin = whole[:, d:] / np.linalg.norm(whole[:, d:], axis=1, keepdims=True)
    np.testing.assert_allclose(maps[:, 0, 0], clin @ clin[0], atol=1e-5)
    assert enc.locate_cf_region(region[0], images, (g, g), "pair") is None
    part = enc.embed_cf_region(images[:1], (0, 1, 0, 2))[0]  # 2 regions of g x g
    m = d // (g * g)
    assert np.count_nonzero(part[:d]) <= 2 * m and np.abs(part[2 * m : d]).max() == 0


def test_region_search_through_the_real_model_locates_its_own_window(tiny_index, tmp_path):
    shutil.copytree(tiny_index.index, tmp_path / "index")
    engine = Engine.open(tmp_path / "index")
    case = engine.cases(0, 1)[1][0]
    result = engine.search(case.case_id, k=24, region=(0.5, 0.0, 1.0, 0.5), exclude_self=False)
    assert result.similarity == "clinical" and result.query["region_cells"] == [0, 2, 2, 4]
    own = next(h for h in result.hits if h.case.case_id == case.case_id)
    assert own.region_score == pytest.approx(1.0, abs=1e-4)  # its own window is the box
    assert own.region == pytest.approx((0.5, 0.0, 1.0, 0.5))
    same_place = engine.search(case.case_id, k=3, region=(0.5, 0.0, 1.0, 0.5), similarity="pair")
    assert all(h.region == pytest.approx((0.5, 0.0, 1.0, 0.5)) for h in same_place.hits)
    assert all(h.region_score is None for h in same_place.hits)


def test_cli_search_takes_a_region(tiny_index):
    from typer.testing import CliRunner

    from retrieval.apps.cli import app

    photo = sorted((tiny_index.cohort / "cf").glob("*.png"))[0]
    runner = CliRunner()
    args = ["search", str(tiny_index.index), str(photo), "--target", "cf", "--k", "3"]
    out = runner.invoke(app, [*args, "--region", "0.5,0,1,0.5"])
    assert out.exit_code == 0, out.output
    assert out.output.count("[matched at ") == 3
    bad = runner.invoke(app, ["search", str(tiny_index.index), str(photo), "--region", "1,0,0,1"])
    assert bad.exit_code == 2 and "region" in bad.output


# -- the API --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(Settings(), engine=engine)) as c:
        yield c


def _png(engine: Engine) -> tuple[str, bytes]:
    case = engine.cases(0, 1)[1][0]
    return case.case_id, Path(case.cf_path).read_bytes()


def test_api_search_and_similar_take_a_region(client, engine):
    case_id, png = _png(engine)
    files = {"file": ("q.png", png, "image/png")}
    up = client.post("/search", files=files, data={"k": "3", "region": "0.25,0.25,0.75,0.625"})
    assert up.status_code == 200, up.text
    body = up.json()
    assert body["query"]["region"] == list(BOX)
    assert all(len(r["region"]) == 4 and r["region_score"] is not None for r in body["results"])
    sim = client.get(f"/cases/{case_id}/similar", params={"k": 3, "region": "0.25,0.25,0.75,0.625"})
    assert sim.status_code == 200, sim.text
    assert [r["case_id"] for r in sim.json()["results"]] == [
        h.case.case_id for h in engine.search(case_id, k=3, region=BOX).hits
    ]
    plain = client.get(f"/cases/{case_id}/similar", params={"k": 3}).json()
    assert all(r["region"] is None for r in plain["results"])


@pytest.mark.parametrize("value", ["0.5,0.5", "1,0,0,1", "a,b,c,d", "0,0,2,1"])
def test_api_names_a_malformed_region(client, engine, value):
    case_id, png = _png(engine)
    sim = client.get(f"/cases/{case_id}/similar", params={"region": value})
    assert sim.status_code == 422
    assert sim.json()["errors"][0]["loc"][-1] == "region" and "region" in sim.json()["detail"]
    files = {"file": ("q.png", png, "image/png")}
    up = client.post("/search", files=files, data={"region": value})
    assert up.status_code == 422 and up.json()["errors"][0]["loc"][-1] == "region"


def test_api_refuses_a_region_on_an_angiogram(client, engine):
    case_id, _ = _png(engine)
    r = client.get(f"/cases/{case_id}/similar", params={"region": "0,0,0.5,0.5", "modality": "ffa"})
    assert r.status_code == 422 and "region" in r.json()["detail"]


def test_openapi_documents_the_region(client):
    spec = client.get("/openapi.json").json()
    params = spec["paths"]["/cases/{case_id}/similar"]["get"]["parameters"]
    region = next(p for p in params if p["name"] == "region")
    assert region["schema"].get("examples") or region.get("examples") or region.get("example")
    row = spec["components"]["schemas"]["ResultRow"]["properties"]
    assert "region" in row and "region_score" in row


# -- the client and the dashboard -------------------------------------------------------------
def test_client_sends_the_region_and_reads_the_match():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["query"] = dict(request.url.params)
        row = {
            "rank": 1,
            "case_id": "a",
            "score": 0.5,
            "modality": "cf",
            "region": [0, 0, 0.5, 0.5],
        }
        body = {"results": [row], "query": {"region": [0.1, 0.2, 0.3, 0.4]}}
        return httpx.Response(200, json=body)

    api = ApiClient("http://api.test", transport=httpx.MockTransport(handler))
    response = api.similar("a", region=(0.1, 0.2, 0.3, 0.4))
    assert seen["query"]["region"] == "0.1000,0.2000,0.3000,0.4000"
    assert response.region == (0.1, 0.2, 0.3, 0.4)
    assert response.results[0].region == (0.0, 0.0, 0.5, 0.5)
    assert (
        Result.from_json({"rank": 1, "case_id": "b", "score": 0.1, "modality": "cf"}).region is None
    )


def test_search_page_searches_a_region_and_outlines_the_matches(live_api):
    case_id = sorted((live_api.cohort / "cf").glob("*.png"))[0].stem
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["api_url"] = live_api.url
    at.run()
    at.segmented_control(key="search_source").set_value("Catalog case").run()
    at.text_input(key="search_case_id").set_value(case_id).run()
    at.toggle(key="search_region_on").set_value(True).run()
    at.slider(key="search_rx").set_range(0.25, 0.75).run()
    at.slider(key="search_ry").set_range(0.25, 0.625).run()
    assert not at.exception, [e.value for e in at.exception]
    next(b for b in at.button if b.label == "Search").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    response = at.session_state["results"]
    assert response.region == pytest.approx(BOX)
    assert response.results and all(r.region is not None for r in response.results)
    assert any(c.value.startswith("matched region (") for c in at.caption)
