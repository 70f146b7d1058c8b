"""Explaining a match: per-region (and per-frame, per-phase) shares that sum to the score
the search reports, on the trained micro model (`tiny_index`) and on the pixel double;
the engine, the HTTP route and POST /search's `explain` flag, the CLI, the dashboard's
client and its heat-map overlay."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from retrieval.search.explain import (
    PHASES,
    SideParts,
    explain_pair,
    explanation_lines,
    phase_of,
)

TOL = 1e-4
PAIRS = (("cf", "cf"), ("cf", "ffa"), ("ffa", "ffa"), ("ffa", "cf"))


@pytest.fixture(scope="module")
def tiny_engine(tiny_index):
    from retrieval.search.engine import Engine

    engine = Engine.open(tiny_index.index)
    yield engine
    engine.close()


def _test_case(cohort) -> str:
    catalog = pl.read_parquet(cohort / "catalog.parquet")
    return catalog.filter(pl.col("split") == "test")["case_id"][0]


def _check_sides(found, score: float) -> None:
    """Each side's regions (and an FFA side's frames and phases) sum to `score`."""
    assert abs(found.search_score - score) <= TOL
    for side in (found.query, found.result):
        assert abs(float(side.regions.sum()) - score) <= TOL, side.modality
        if side.modality == "ffa":
            assert side.frames and side.phases
            assert abs(sum(f["contribution"] for f in side.frames) - score) <= TOL
            assert abs(sum(p["contribution"] for p in side.phases) - score) <= TOL
            assert sum(p["frames"] for p in side.phases) == len(side.frames)
            assert abs(sum(f["attention"] for f in side.frames) - 1) <= 1e-5
        else:
            assert side.frames is None and side.phases is None


@pytest.mark.parametrize(("modality", "target"), PAIRS)
def test_region_parts_sum_to_the_search_score_on_the_trained_model(
    tiny_engine, tiny_index, modality, target
):
    from retrieval.search.engine import CaseQuery

    query = CaseQuery(_test_case(tiny_index.cohort), modality)
    assert set(tiny_engine.similarities) == {"combined", "pair", "clinical"}
    for similarity in tiny_engine.similarities:
        result = tiny_engine.search(query, target, 4, similarity=similarity)
        others = [(h.case.case_id, h.modality) for h in result.hits]
        found = tiny_engine.explain_many(query, others, similarity)
        for hit, one in zip(result.hits, found, strict=True):
            _check_sides(one, hit.score)
            assert one.similarity == similarity and one.grid == 4  # the micro model's 4x4
            assert one.result.case_id == hit.case.case_id
        assert found[0].max_error <= TOL


def test_an_uploaded_photo_and_video_are_explained_against_their_hits(tiny_engine, tiny_index):
    from retrieval.data.media import read_cf, read_ffa
    from retrieval.search.engine import CFQuery, FFAQuery

    catalog = pl.read_parquet(tiny_index.cohort / "catalog.parquet")
    row = catalog.filter(pl.col("split") == "val").row(0, named=True)
    photo = read_cf(tiny_index.cohort / row["cf_path"])
    video = read_ffa(tiny_index.cohort / row["ffa_path"])
    for query, target in ((CFQuery(photo), "ffa"), (FFAQuery(video, row["ffa_times_s"]), "cf")):
        hit = tiny_engine.search(query, target, 1, similarity="clinical").hits[0]
        found = tiny_engine.explain(query, hit.case.case_id, "clinical", target)
        _check_sides(found, hit.score)
        assert found.query.case_id is None


def test_explain_names_a_bad_parameter(tiny_engine, tiny_index):
    from retrieval.errors import QueryError, UnknownCase

    case = _test_case(tiny_index.cohort)
    with pytest.raises(UnknownCase, match="nope"):
        tiny_engine.explain(case, "nope")
    with pytest.raises(QueryError, match="similarity"):
        tiny_engine.explain(case, case, similarity="nearest")
    with pytest.raises(QueryError, match="target"):
        tiny_engine.explain(case, case, target="both")


def test_the_embedder_parts_add_up_to_its_embedding(tiny_index):
    from retrieval.data.media import read_cf, read_ffa
    from retrieval.models.embedding import QueryEncoder

    encoder = QueryEncoder.open(tiny_index.run)
    row = pl.read_parquet(tiny_index.cohort / "catalog.parquet").row(0, named=True)
    photo = read_cf(tiny_index.cohort / row["cf_path"])
    video = read_ffa(tiny_index.cohort / row["ffa_path"])
    parts = encoder.cf_parts(photo)
    assert parts.shape == (16, encoder.dim)
    np.testing.assert_allclose(parts.sum(0), encoder.embed_cf([photo])[0], atol=1e-5)
    dim = encoder.embedder.config.dim  # the pair part: region r fills its own slice only
    assert np.count_nonzero(parts[3, :dim]) <= dim // 16
    fparts, times, attention = encoder.ffa_parts(video, row["ffa_times_s"])
    assert fparts.shape == (len(video), 16, encoder.dim)
    np.testing.assert_allclose(times, row["ffa_times_s"], rtol=1e-6)
    expect = encoder.embed_ffa([video], [np.asarray(row["ffa_times_s"], np.float32)])[0]
    np.testing.assert_allclose(fparts.sum((0, 1)), expect, atol=1e-5)
    assert attention.shape == (len(video),) and abs(attention.sum() - 1) < 1e-5


def test_the_pixel_double_splits_exactly_too(pixel_index):
    from retrieval.search.engine import CaseQuery, Engine
    from retrieval.testing import PixelEncoder

    engine = Engine.open(pixel_index, encoder=PixelEncoder())
    case = engine.cases(0, 1)[1][0].case_id
    for modality, target in PAIRS:
        hit = engine.search(CaseQuery(case, modality), target, 1).hits[0]
        found = engine.explain(CaseQuery(case, modality), hit.case.case_id, None, target)
        _check_sides(found, hit.score)
        assert found.grid == 8


# -- the math alone -----------------------------------------------------------------------
def test_phases_follow_the_documented_bounds():
    assert [p[0] for p in PHASES] == ["arterial", "venous", "late"]
    assert phase_of(0.0) == phase_of(19.9) == "arterial"
    assert phase_of(20.0) == phase_of(299.0) == "venous"
    assert phase_of(300.0) == phase_of(600.0) == "late"


def test_a_known_decomposition_gives_known_maps():
    rng = np.random.default_rng(0)
    q = SideParts("cf", rng.standard_normal((4, 5)))  # 2x2 regions, 5 dims
    r_parts = rng.standard_normal((3, 4, 5))  # 3 frames
    r = SideParts("ffa", r_parts, np.array([10.0, 30.0, 400.0]), np.array([0.2, 0.5, 0.3]))
    w = np.array([1.0, 1.0, 0.0, 2.0, 1.0])
    score = q.vector @ (w * r.vector)
    found = explain_pair(q, r, w, similarity="pair", search_score=score, ids=(None, "b"))
    assert found.score == pytest.approx(score)
    np.testing.assert_allclose(found.query.regions.ravel(), q.parts @ (w * r.vector))
    np.testing.assert_allclose(found.result.regions.ravel(), (r_parts @ (w * q.vector)).sum(0))
    assert [p["phase"] for p in found.result.phases] == ["arterial", "venous", "late"]
    assert [p["frames"] for p in found.result.phases] == [1, 1, 1]
    top = found.query.top_regions(1)[0]
    assert top["contribution"] == pytest.approx(found.query.regions.max())
    assert top["box"][2] - top["box"][0] == pytest.approx(0.5)
    body = json.loads(json.dumps(found.to_dict()))
    assert body["sum_check"]["max_error"] < 1e-9 and body["query"]["case_id"] is None
    text = "\n".join(explanation_lines(found))
    assert "sum check" in text and "phase venous" in text


# -- the HTTP API, the CLI, the client -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_client(tiny_engine):
    from retrieval.api import Settings, create_app

    with TestClient(create_app(Settings(), engine=tiny_engine)) as client:
        yield client


def test_get_explain_sums_to_the_similar_score(tiny_client, tiny_index):
    case = _test_case(tiny_index.cohort)
    similar = tiny_client.get(f"/cases/{case}/similar", params={"target": "ffa", "k": 2}).json()
    hit = similar["results"][1]
    got = tiny_client.get(
        f"/cases/{case}/explain", params={"other": hit["case_id"], "target": "ffa"}
    )
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["similarity"] == similar["similarity"]
    assert abs(body["search_score"] - hit["score"]) <= TOL
    assert abs(np.sum(body["result"]["regions"]) - hit["score"]) <= TOL
    assert abs(np.sum(body["query"]["regions"]) - hit["score"]) <= TOL
    assert np.asarray(body["query"]["regions"]).shape == (4, 4)
    assert [p["phase"] for p in body["result"]["phases"]] == ["arterial", "venous", "late"]
    assert body["query"]["phases"] is None
    # the phantom's FOV circle fills 0.95 of its square frame: the square is the frame
    for side in (body["query"], body["result"]):
        np.testing.assert_allclose(side["square"], [0, 0, 1, 1], atol=0.05)


def test_explain_errors_name_the_parameter(tiny_client, tiny_index):
    case = _test_case(tiny_index.cohort)
    missing = tiny_client.get(f"/cases/{case}/explain", params={"other": "nope"})
    assert missing.status_code == 404 and missing.json()["detail"].startswith("other:")
    assert "request_id" in missing.json()
    assert tiny_client.get("/cases/nope/explain", params={"other": case}).status_code == 404
    for params, name in (
        ({}, "other"),
        ({"other": case, "similarity": "x"}, "similarity"),
        ({"other": case, "target": "both"}, "target"),
    ):
        bad = tiny_client.get(f"/cases/{case}/explain", params=params)
        assert bad.status_code == 422 and bad.json()["detail"].startswith(name), bad.text


def test_post_search_explains_its_top_results(tiny_client, tiny_index):
    from retrieval.api.schemas import SearchResponse

    catalog = pl.read_parquet(tiny_index.cohort / "catalog.parquet")
    data = (tiny_index.cohort / catalog["cf_path"][2]).read_bytes()
    form = {"k": "5", "target": "both", "explain": "true", "explain_top": "2"}
    got = tiny_client.post("/search", files={"file": ("q.png", data, "image/png")}, data=form)
    assert got.status_code == 200, got.text
    body = got.json()
    assert len(body["explanations"]) == 2
    for row, found in zip(body["results"], body["explanations"], strict=False):
        assert found["result"]["case_id"] == row["case_id"]
        assert found["result"]["modality"] == row["modality"]
        assert abs(found["search_score"] - row["score"]) <= TOL
        assert found["sum_check"]["max_error"] <= TOL
    assert got.content == SearchResponse.model_validate_json(got.content).model_dump_json().encode()
    plain = tiny_client.post("/search", files={"file": ("q.png", data, "image/png")})
    assert plain.json()["explanations"] is None  # unless asked for
    form["explain_top"] = "11"
    bad = tiny_client.post("/search", files={"file": ("q.png", data, "image/png")}, data=form)
    assert bad.status_code == 422 and bad.json()["detail"].startswith("explain_top")


def test_openapi_documents_the_route_with_examples(tiny_client):
    spec = tiny_client.get("/openapi.json").json()
    route = spec["paths"]["/cases/{case_id}/explain"]["get"]
    assert {p["name"] for p in route["parameters"]} >= {"case_id", "other", "similarity"}
    schema = spec["components"]["schemas"]["ExplanationResponse"]
    assert schema["example"]["sum_check"]["max_error"] < TOL


def test_cli_explain_prints_the_sum_check(tiny_index):
    from retrieval.apps.cli import app

    case = _test_case(tiny_index.cohort)
    catalog = pl.read_parquet(tiny_index.cohort / "catalog.parquet")
    other = catalog["case_id"][0]
    runner = CliRunner()
    out = runner.invoke(app, ["explain", str(tiny_index.index), case, other, "--target", "ffa"])
    assert out.exit_code == 0, out.output
    assert "sum check" in out.output and "phase arterial" in out.output
    got = runner.invoke(app, ["explain", str(tiny_index.index), case, other, "--json"])
    body = json.loads(got.stdout[got.stdout.index("{") :])
    assert abs(np.sum(body["query"]["regions"]) - body["search_score"]) <= TOL
    bad = runner.invoke(app, ["explain", str(tiny_index.index), case, "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_the_client_fetches_an_explanation(live_api):
    from ui.client import ApiClient

    api = ApiClient(live_api.url)
    case = api.cases(limit=2).items
    found = api.explain(case[0]["case_id"], case[1]["case_id"], target="ffa")
    assert found["result"]["modality"] == "ffa" and found["grid"] == 8
    assert abs(np.sum(found["query"]["regions"]) - found["search_score"]) <= TOL
    data = live_api.cohort / pl.read_parquet(live_api.cohort / "catalog.parquet")["cf_path"][0]
    response = api.search(data.read_bytes(), "q.png", k=3, explain_top=2)
    assert [e["result"]["case_id"] for e in response.explanations] == [
        r.case_id for r in response.results[:2]
    ]


def test_heat_overlay_blends_the_map_over_the_image():
    from ui.components import HEAT_NEGATIVE, HEAT_POSITIVE, heat_overlay, phase_table

    gray = np.full((40, 60), 100, np.uint8)  # not square: the map spans the padded square
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    regions = [[1.0, 0.0], [0.0, -1.0]]
    out = heat_overlay(buf.getvalue(), regions, 1.0)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out[0, 0], HEAT_POSITIVE, atol=30)  # hot top left
    np.testing.assert_allclose(out[-1, -1], HEAT_NEGATIVE, atol=30)  # cold bottom right
    assert (heat_overlay(gray, regions, 0.0) == 100).all()  # opacity 0: the image alone
    # the field-of-view square (the API's `square`): the map covers its right half only
    right = heat_overlay(gray, regions, 1.0, [0.5, 0.0, 1.0, 0.75])  # 30 x 30 px
    assert (right[:, :30] == 100).all()  # left of the square: no map
    np.testing.assert_allclose(right[0, 30], HEAT_POSITIVE, atol=30)
    np.testing.assert_allclose(right[29, 59], HEAT_NEGATIVE, atol=30)
    assert (right[30:] == 100).all()  # below the square: no map
    side = {
        "phases": [
            {"phase": "late", "start_s": 300.0, "end_s": None, "frames": 2, "contribution": 0.25}
        ]
    }
    assert phase_table(side) == [
        {"phase": "late", "seconds": "300–", "frames": 2, "share of score": 0.25}
    ]


def test_compare_page_overlays_the_heat_map_with_an_opacity_slider(model_api):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[1] / "ui" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=120)
    at.session_state["api_url"] = model_api.url
    at.run()
    at.switch_page("views/compare.py").run()
    catalog = pl.read_parquet(model_api.cohort / "catalog.parquet")
    at.text_input(key="compare_left").set_value(catalog["case_id"][0])
    at.text_input(key="compare_right").set_value(catalog["case_id"][1]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert "Why this match" in [s.value for s in at.subheader]
    text = " ".join(m.value for m in at.markdown)
    assert "score" in text and "query regions sum to" in text
    slider = at.slider(key="explain_opacity")
    assert slider.value == pytest.approx(0.6)
    slider.set_value(0.2).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.slider(key="explain_opacity").value == pytest.approx(0.2)
