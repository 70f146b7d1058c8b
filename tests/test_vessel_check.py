"""The vessel check of pair searches (`retrieval.data.vessel_check`, `retrieval.search.vessels`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.cohort import Cohort
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.phantom import write_phantom_cohort
from retrieval.data.vessel_check import (
    CHECK_DEPTH,
    VESSEL_WEIGHT,
    QueryPrint,
    agreement,
    cf_print,
    ffa_print,
    rerank,
    top_agreements,
)
from retrieval.search.engine import Engine
from retrieval.search.queries import CFQuery
from retrieval.testing import PixelEncoder, build_pixel_index


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    root = tmp_path_factory.mktemp("vessels") / "cohort"
    write_phantom_cohort(root, cases=6, size=128, frames=8, seed=3, progress=False)
    return Cohort.open(root)


def _narrower_field(photo: np.ndarray) -> np.ndarray:
    """A camera that sees 80 % of the field: black outside a centred circle."""
    h, w = photo.shape[:2]
    y, x = np.mgrid[:h, :w]
    inside = np.hypot((x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1) <= 0.8
    return np.where(inside[..., None], photo, 0).astype(np.uint8)


def _turned_and_zoomed(photo: np.ndarray) -> np.ndarray:
    """A camera that turns the eye by 5° and sees 80 % of its field."""
    turned = Image.fromarray(photo).rotate(5, resample=Image.Resampling.BILINEAR)
    return _narrower_field(np.asarray(turned))


def _agreements(cohort: Cohort, photo_of) -> np.ndarray:
    """(cases, cases): how each case's (perturbed) photo agrees with every case's FFA."""
    cases = cohort.cases()
    ffa = [ffa_print(read_ffa(c.ffa_path), c.ffa_times_s) for c in cases]
    queries = [QueryPrint.of(cf_print(photo_of(read_cf(c.cf_path)))) for c in cases]
    return np.array([[agreement(q, f) for f in ffa] for q in queries])


@pytest.mark.parametrize("photo_of", [lambda im: im, _turned_and_zoomed], ids=["clean", "moved"])
def test_a_photo_agrees_most_with_its_own_angiogram(cohort, photo_of):
    found = _agreements(cohort, photo_of)
    assert ((found >= 0) & (found <= 1)).all()
    own, others = np.diag(found), found[~np.eye(len(found), dtype=bool)].reshape(len(found), -1)
    assert (own > others.max(axis=1)).all(), found.round(3)
    assert own.min() > 0.15 and np.median(others) < 0.1, found.round(3)


def test_a_narrower_field_still_sets_the_own_angiogram_clearly_apart(cohort):
    # the quarter-side tiles alone lead the best other eye by 0.025 here: where the
    # narrower photo is black, the outer tiles agree with no one; the eighth-side tiles
    # measure the small branches, which no other eye shares (0.144 with both)
    found = _agreements(cohort, _narrower_field)
    own, others = np.diag(found), found[~np.eye(len(found), dtype=bool)].reshape(len(found), -1)
    assert (own - others.max(axis=1)).min() > 0.1, found.round(3)


def test_no_vessels_agree_with_nothing(cohort):
    case = cohort.cases()[0]
    black = QueryPrint.of(cf_print(np.zeros((128, 128, 3), np.uint8)))
    assert agreement(black, ffa_print(read_ffa(case.ffa_path), case.ffa_times_s)) == 0.0


def _recoloured(photo: np.ndarray, amplitude: int) -> np.ndarray:
    """The photo with its colour (chroma) moved in 2 × 2 blocks at constant luma, as a
    JPEG's 4:2:0 chroma does."""
    ycc = np.asarray(Image.fromarray(photo).convert("YCbCr")).astype(np.int16)
    h, w = photo.shape[:2]
    shift = np.random.default_rng(0).integers(-amplitude, amplitude + 1, (h // 2, w // 2, 2))
    ycc[: h // 2 * 2, : w // 2 * 2, 1:] += shift.repeat(2, 0).repeat(2, 1)
    recoloured = Image.fromarray(np.clip(ycc, 0, 255).astype(np.uint8), "YCbCr")
    return np.asarray(recoloured.convert("RGB"))


def test_the_photo_print_reads_luma_so_a_colour_change_leaves_it(cohort):
    for case in cohort.cases():
        photo = read_cf(case.cf_path)
        clean, recoloured = cf_print(photo), cf_print(_recoloured(photo, 20))
        # unit maps: 1 is the same map (a print of the green channel: 0.93 on the first case)
        assert float((clean.vessels * recoloured.vessels).sum()) > 0.98


def test_top_agreements_fill_each_querys_best_and_compare_each_pair_once(cohort):
    cases = cohort.cases()
    ffa = [ffa_print(read_ffa(c.ffa_path), c.ffa_times_s) for c in cases]
    photos = [cf_print(read_cf(c.cf_path)) for c in cases]
    asked: list[int] = []

    def query(q: int):
        asked.append(q)
        return photos[q]

    scores = np.random.default_rng(0).random((len(cases), len(cases)))
    found: dict = {}
    got = top_agreements(scores, query, ffa, found)
    direct = [[agreement(QueryPrint.of(p), f) for f in ffa] for p in photos]
    assert np.allclose(got, direct)  # CHECK_DEPTH covers all 6 candidates
    assert len(found) == len(cases) ** 2 and asked == list(range(len(cases)))
    assert np.array_equal(top_agreements(scores, query, ffa, found), got)
    assert len(asked) == len(cases)  # nothing compared twice
    many = CHECK_DEPTH + 10
    shallow = np.arange(many, dtype=np.float64)[None, ::-1]  # candidate 0 best
    prints = [ffa[0]] * many
    deep = top_agreements(shallow, lambda q: photos[0], prints)
    assert (deep[0, :CHECK_DEPTH] > 0).all() and (deep[0, CHECK_DEPTH:] == 0).all()


def test_rerank_adds_the_weighted_agreement_to_the_cosine():
    cosines = [0.90, 0.85, 0.80, 0.70]
    matches = [0.05, 0.10, 0.45, 0.00]
    order = rerank(cosines, matches)
    assert order.tolist() == [2, 1, 0, 3]  # 1.475, 1.0, 0.975, 0.70 at a weight of 1.5
    checked = np.add(cosines, VESSEL_WEIGHT * np.asarray(matches))
    assert order.tolist() == np.argsort(-checked, kind="stable").tolist()
    assert rerank([0.5, 0.5], [0.0, 0.0]).tolist() == [0, 1]  # ties keep the given order


@pytest.fixture(scope="module")
def engine(cohort, tmp_path_factory):
    index = tmp_path_factory.mktemp("vessels-index") / "index"
    build_pixel_index(cohort.root, index)
    eng = Engine.open(index, encoder=PixelEncoder())
    yield eng
    eng.close()


def test_pair_search_is_vessel_checked_and_finds_moved_photos_angiograms(engine):
    cases = engine.cases()[1]
    found = []
    for case in cases:
        photo = _turned_and_zoomed(read_cf(case.cf_path))
        checked = engine.search(CFQuery(photo), target="ffa", k=3, similarity="pair")
        plain = engine.search(CFQuery(photo), "ffa", 3, similarity="pair", vessel_check=False)
        assert checked.vessel_checked and not plain.vessel_checked
        assert all(h.vessel_match is not None for h in checked.hits)
        assert all(h.vessel_match is None for h in plain.hits)
        scores = [h.score + VESSEL_WEIGHT * h.vessel_match for h in checked.hits]
        assert scores == sorted(scores, reverse=True)
        assert "vessel_print" in checked.timings_ms
        found.append(checked.hits[0].case.case_id == case.case_id)
    assert all(found), found


def test_the_check_leaves_other_searches_alone(engine):
    first, second = engine.cases()[1][:2]
    marked = engine.search(
        first.case_id, target="ffa", similarity="pair", positive=[second.case_id]
    )
    boxed = engine.search(first.case_id, similarity="pair", region=(0.2, 0.2, 0.6, 0.6))
    for result in (marked, boxed):
        assert not result.vessel_checked
        assert all(h.vessel_match is None for h in result.hits)


def test_a_case_query_reads_its_stored_media_and_never_blocks(engine):
    from retrieval.search.engine import WouldBlock

    first = engine.cases()[1][0]
    result = engine.search(first.case_id, "ffa", 2, similarity="pair", exclude_self=False)
    assert result.vessel_checked and result.hits[0].case.case_id == first.case_id
    with pytest.raises(WouldBlock):
        engine.search(first.case_id, target="ffa", similarity="pair", blocking=False)
    plain = engine.search(
        first.case_id, "ffa", similarity="pair", vessel_check=False, blocking=False
    )
    assert not plain.vessel_checked


# -- the API, the CLI and the dashboard ------------------------------------------------------
def test_api_searches_are_vessel_checked_unless_turned_off(engine):
    from fastapi.testclient import TestClient

    from retrieval.api import Settings, create_app

    case = engine.cases()[1][2]
    files = {"file": ("q.png", Path(case.cf_path).read_bytes(), "image/png")}
    form = {"target": "ffa", "k": "3", "similarity": "pair"}
    with TestClient(create_app(Settings(), engine=engine)) as client:
        up = client.post("/search", files=files, data=form).json()
        off = client.post("/search", files=files, data={**form, "vessel_check": "false"}).json()
        params = {"target": "ffa", "k": 3, "similarity": "pair", "exclude_self": False}
        sim = client.get(f"/cases/{case.case_id}/similar", params=params).json()
        schema = client.get("/openapi.json").json()
    assert up["vessel_checked"] and all(0 <= r["vessel_match"] <= 1 for r in up["results"])
    assert up["results"][0]["case_id"] == case.case_id
    assert not off["vessel_checked"] and all(r["vessel_match"] is None for r in off["results"])
    assert sim["vessel_checked"] and sim["results"][0]["case_id"] == case.case_id
    similar = schema["paths"]["/cases/{case_id}/similar"]["get"]["parameters"]
    assert any(p["name"] == "vessel_check" for p in similar)
    row = schema["components"]["schemas"]["ResultRow"]["properties"]["vessel_match"]
    assert row.get("examples") and f"score + {VESSEL_WEIGHT} x" in row["description"]


def test_cli_search_prints_vessel_matches(tiny_index):
    from typer.testing import CliRunner

    from retrieval.apps.cli import app

    photo = sorted((tiny_index.cohort / "cf").glob("*.png"))[0]
    args = ["search", str(tiny_index.index), str(photo), "--k", "2", "--similarity", "pair"]
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    body = json.loads(out.output)
    assert body["vessel_checked"] and len(body["results"]) == 2
    assert all(0 <= r["vessel_match"] <= 1 for r in body["results"])
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0 and table.output.count("[vessels ") == 2
    plain = CliRunner().invoke(app, [*args, "--no-vessel-check"])
    assert plain.exit_code == 0 and "[vessels " not in plain.output


def test_client_sends_vessel_check_and_reads_matches():
    import httpx

    from ui.client import ApiClient

    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(request.url.params)
        row = {"rank": 1, "case_id": "b", "score": 0.9, "modality": "ffa", "vessel_match": 0.4}
        return httpx.Response(200, json={"results": [row], "vessel_checked": True})

    api = ApiClient("http://api.test", transport=httpx.MockTransport(handler))
    response = api.similar("a", similarity="pair", vessel_check=False)
    assert seen["vessel_check"] == "false" and seen["similarity"] == "pair"
    assert response.vessel_checked and response.results[0].vessel_match == 0.4


def test_search_page_checks_vessels_for_pair_searches(live_api):
    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[1] / "ui" / "app.py"
    case_id = sorted((live_api.cohort / "cf").glob("*.png"))[0].stem
    at = AppTest.from_file(str(app), default_timeout=120)
    at.session_state["api_url"] = live_api.url
    at.run()
    at.segmented_control(key="search_source").set_value("Catalog case").run()
    at.text_input(key="search_case_id").set_value(case_id).run()
    assert not [c for c in at.checkbox if c.key == "search_vessels"]  # clinical: no box
    at.selectbox(key="search_similarity").set_value("pair").run()
    assert at.checkbox(key="search_vessels").value is True
    next(b for b in at.button if b.label == "Search").click().run()
    assert not at.exception, [e.value for e in at.exception]
    response = at.session_state["results"]
    assert response.vessel_checked and all(r.vessel_match is not None for r in response.results)
    assert any(c.value.startswith("vessels agree ") for c in at.caption)
    assert any("re-ranked by the vessel check" in c.value for c in at.caption)
    at.checkbox(key="search_vessels").uncheck().run()
    next(b for b in at.button if b.label == "Search").click().run()
    response = at.session_state["results"]
    assert not response.vessel_checked and all(r.vessel_match is None for r in response.results)
