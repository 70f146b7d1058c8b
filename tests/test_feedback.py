"""Relevance feedback ("more like these, not like those"): the two strategies of
`retrieval.search.feedback` on tiny synthetic vectors, the engine's `positive` /
`negative` / `feedback` keywords over the `pixel_index` fixture, the HTTP API (POST
/search, GET /cases/{id}/similar, the fast path's bytes, the errors), the CLI, the
client, and the dashboard's thumbs / Refine / Clear marks controls (AppTest)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from retrieval.api import Settings, create_app
from retrieval.data.media import read_cf
from retrieval.errors import QueryError, UnknownCase
from retrieval.search import feedback as fb
from retrieval.search.engine import CFQuery, Engine
from retrieval.testing import PixelEncoder
from ui.client import ApiClient

# --------------------------------------------------------------------------- the math


def unit(*rows) -> np.ndarray:
    x = np.asarray(rows, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# a query on the x axis; a cluster A up and to the right, a cluster B down and to the right
GALLERY = unit([1, 0.9, 0], [1, 1.0, 0], [1, 1.1, 0], [1, -0.9, 0], [1, -1.0, 0], [1, -1.1, 0])
ROWS = [10, 11, 12, 20, 21, 22]  # row ids: A = 10-12, B = 20-22
ONES = np.ones(3, np.float32)


def fake_search(vec: np.ndarray, n: int) -> list[tuple[float, int, str]]:
    scores = GALLERY @ vec.reshape(-1)
    order = np.argsort(-scores, kind="stable")[:n]
    return [(float(scores[i]), ROWS[i], "cf") for i in order]


def fake_vectors(modality: str, rows) -> np.ndarray:
    return GALLERY[[ROWS.index(int(r)) for r in rows]]


def ranked(strategy, positive=(), negative=(), k=4, exclude=(), query=None):
    pos = GALLERY[[ROWS.index(r) for r in positive]] if positive else np.zeros((0, 3))
    neg = GALLERY[[ROWS.index(r) for r in negative]] if negative else np.zeros((0, 3))
    spec = fb.FeedbackSpec((), (), strategy if isinstance(strategy, str) else "rocchio")
    if isinstance(strategy, fb.Rocchio):
        spec = fb.FeedbackSpec((), (), "rocchio", strategy.alpha, strategy.beta, strategy.gamma)
    feedback = fb.Feedback(spec, pos, neg, frozenset([*positive, *negative, *exclude]))
    q = unit([1, 0, 0]) if query is None else query
    return fb.feedback_rank(feedback, q, ONES, k, fake_search, fake_vectors)


@pytest.mark.parametrize("strategy", fb.FEEDBACK_STRATEGIES)
def test_a_positive_pulls_its_neighbours_up_and_is_left_out(strategy):
    hits = ranked(strategy, positive=[12])
    rows = [r for _, r, _ in hits]
    assert 12 not in rows
    assert set(rows[:2]) == {10, 11}  # its cluster first
    scores = [s for s, _, _ in hits]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("strategy", fb.FEEDBACK_STRATEGIES)
def test_a_negative_pushes_its_neighbours_down_and_is_left_out(strategy):
    hits = ranked(strategy, negative=[10], k=5)
    rows = [r for _, r, _ in hits]
    assert 10 not in rows
    assert set(rows[:3]) == {20, 21, 22}  # the other cluster first
    assert set(rows[3:]) == {11, 12}


def test_without_feedback_the_query_ties_both_clusters():
    """The control: the query alone sits between the clusters (A and B interleave)."""
    rows = [r for _, r, _ in fake_search(unit([1, 0, 0])[0], 6)]
    assert {rows[0], rows[1]} == {10, 20}


def test_rocchio_moves_the_query_and_keeps_a_cosine():
    q = unit([1, 0, 0])
    moved = fb.rocchio(q, GALLERY[:1], GALLERY[3:4], ONES, alpha=1, beta=1, gamma=0.5)
    assert moved.shape == (1, 3) and np.isclose(np.linalg.norm(moved), 1, atol=1e-6)
    assert moved[0, 1] > 0  # towards the positive (y > 0), away from the negative (y < 0)
    expected = q + GALLERY[0] - 0.5 * GALLERY[3]
    assert np.allclose(moved, expected / np.linalg.norm(expected), atol=1e-6)


def test_rocchio_normalises_in_the_similarity_space():
    """With factors that keep only part of the vector, the norm is taken there: a moved
    query of a stored vector scores that vector by its part cosine."""
    w = np.asarray([0.0, 2.0, 2.0], np.float32)  # the 'clinical' half, stored × sqrt(1/2)
    x = np.asarray([[0.6, 0.4, 0.4]], np.float32) / np.sqrt(0.32 / 0.5)  # part norm² = 1/2
    moved = fb.rocchio(x * w, np.zeros((0, 3)), np.zeros((0, 3)), w)
    assert np.isclose(float(fb.sim_norm(moved, w)[0]), 1, atol=1e-6)
    assert np.isclose((moved @ x.T).item(), 1, atol=1e-5)  # its own part cosine


def test_rocchio_refuses_examples_that_cancel_the_query():
    q = unit([1, 0, 0])
    with pytest.raises(QueryError, match="positive, negative"):
        fb.rocchio(q, np.zeros((0, 3)), q, ONES, alpha=1, beta=0, gamma=1)


def test_best_scores_follow_qdrants_rule():
    cands = unit([1, 0, 0], [0, 1, 0])
    pos, neg = unit([1, 0.1, 0]), unit([0.1, 1, 0])
    scores = fb.best_scores(cands, pos, neg)
    assert 0 < scores[0] < 1 and -1 < scores[1] < 0
    assert np.isclose(scores[0], fb.squash(cands[0] @ pos[0]))
    assert np.isclose(scores[1], -fb.squash(cands[1] @ neg[0]))
    assert np.allclose(fb.best_scores(cands, pos, np.zeros((0, 3))), fb.squash(cands @ pos[0]))


def test_check_feedback_names_the_bad_parameter():
    assert fb.check_feedback(None, [], "rocchio") is None
    spec = fb.check_feedback(["a", "a", "b"], np.zeros((2, 4)), "best_score", dim=4)
    assert spec.positive == ("a", "b") and len(spec.negative) == 2
    assert spec.strategy == "best_score"
    with pytest.raises(QueryError, match="feedback must be one of rocchio, best_score"):
        fb.check_feedback(["a"], None, "nearest")
    with pytest.raises(QueryError, match="positive, negative: case 'b' is in both lists"):
        fb.check_feedback(["a", "b"], ["b"])
    with pytest.raises(QueryError, match="negative: a vector example"):
        fb.check_feedback(None, [np.zeros(3)], dim=4)
    with pytest.raises(QueryError, match="negative: a vector example"):
        fb.check_feedback(None, [np.full(4, np.nan)], dim=4)
    with pytest.raises(QueryError, match="Rocchio beta"):
        fb.Rocchio(1, -1, 0)
    assert fb.check_feedback(["a"], None, fb.Rocchio(1, 3, 0)).beta == 3


# --------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine(pixel_index, tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("feedback") / "index"
    shutil.copytree(pixel_index, path)
    return Engine.open(path, encoder=PixelEncoder())


@pytest.fixture(scope="module")
def query_id(engine) -> str:
    return engine.cases(0, 1)[1][0].case_id


def ids(result) -> list[str]:
    return [h.case.case_id for h in result.hits]


@pytest.mark.parametrize("strategy", fb.FEEDBACK_STRATEGIES)
def test_engine_feedback_moves_towards_positives_and_leaves_examples_out(
    engine, query_id, strategy
):
    before = engine.search(query_id, "cf", 12, suggestion=False, vessel_check=False)
    far = ids(before)[-1]  # the least similar of the 12
    near = ids(before)[:2]
    after = engine.search(
        query_id, "cf", 12, suggestion=False, positive=[far], negative=near, feedback=strategy
    )
    got = ids(after)
    assert far not in got and not set(near) & set(got) and query_id not in got
    # the positive's own nearest neighbour (among the rest) climbs
    rest = [c for c in engine.search(far, "cf", 24, suggestion=False, vessel_check=False).hits]
    neighbour = next(h.case.case_id for h in rest if h.case.case_id not in (query_id, *near))
    old = ids(before).index(neighbour) if neighbour in ids(before) else 99
    assert got.index(neighbour) < old
    assert after.query["positive"] == [far] and after.query["negative"] == near
    assert after.query["feedback"] == strategy
    assert after.score_kind == ("best_score" if strategy == "best_score" else "cosine")


def test_engine_default_strategy_and_raw_vectors(engine, query_id):
    plain = engine.search(query_id, "cf", 5, suggestion=False)
    assert "feedback" not in plain.query and plain.score_kind == "cosine"
    target = ids(engine.search(query_id, "cf", 24, suggestion=False))[-1]
    row = engine.case(target).row_id
    both = np.concatenate([engine.vectors(m, [row]) for m in ("cf", "ffa")])  # (2, D)
    by_vector = engine.search(query_id, "cf", 23, suggestion=False, positive=[both])
    by_id = engine.search(query_id, "cf", 22, suggestion=False, positive=[target])
    assert by_vector.query["feedback"] == fb.DEFAULT_FEEDBACK
    assert by_vector.query["positive"] == []  # a vector names no case
    assert target in ids(by_vector)  # not left out: it was given as vectors
    # a case id stands for its stored vectors in every modality
    rest = [h for h in by_vector.hits if h.case.case_id != target]
    assert [h.case.case_id for h in rest] == ids(by_id)
    assert np.allclose([h.score for h in rest], [h.score for h in by_id.hits])
    cf_only = engine.search(query_id, "cf", 24, suggestion=False, positive=[both[0]])
    assert [h.score for h in cf_only.hits] != [h.score for h in by_vector.hits]


def test_engine_feedback_on_an_upload_and_both_targets(engine, query_id):
    image = read_cf(engine.case(query_id).cf_path)
    other = ids(engine.search(query_id, "cf", 3, suggestion=False))[-1]
    for target in ("cf", "ffa", "both"):
        for strategy in fb.FEEDBACK_STRATEGIES:
            result = engine.search(
                CFQuery(image), target, 6, positive=[other], feedback=strategy, suggestion=False
            )
            assert len(result.hits) == 6 and other not in ids(result)
            modalities = {h.modality for h in result.hits}
            assert modalities <= ({"cf", "ffa"} if target == "both" else {target})


def test_engine_feedback_errors_name_the_parameter(engine, query_id):
    other = ids(engine.search(query_id, "cf", 2, suggestion=False))[0]
    with pytest.raises(UnknownCase, match="negative: unknown case_id 'nope'"):
        engine.search(query_id, positive=[other], negative=["nope"])
    with pytest.raises(QueryError, match="in both lists"):
        engine.search(query_id, positive=[other], negative=[other])
    with pytest.raises(QueryError, match="feedback must be one of"):
        engine.search(query_id, positive=[other], feedback="max")
    with pytest.raises(QueryError, match="positive: a vector example"):
        engine.search(query_id, positive=[np.zeros(5)])


# --------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(Settings(), engine=engine)) as c:
        yield c


def test_api_similar_takes_repeated_positive_and_negative(client, engine, query_id):
    plain = client.get(f"/cases/{query_id}/similar", params={"k": 8}).json()
    first, second, last = (r["case_id"] for r in np.array(plain["results"])[[0, 1, -1]])
    params = {"k": 8, "positive": [last], "negative": [first, second], "feedback": "best_score"}
    body = client.get(f"/cases/{query_id}/similar", params=params).json()
    got = [r["case_id"] for r in body["results"]]
    assert len(got) == 8 and not {first, second, last} & set(got)
    assert body["query"]["positive"] == [last] and body["query"]["negative"] == [first, second]
    assert body["query"]["feedback"] == "best_score" and body["score_kind"] == "best_score"
    assert plain["query"]["feedback"] is None and plain["query"]["positive"] is None


def test_feedback_bodies_follow_the_response_model(client, query_id):
    from retrieval.api.schemas import QueryInfo, SearchResponse

    url = f"/cases/{query_id}/similar"
    near = [r["case_id"] for r in client.get(url, params={"k": 2}).json()["results"]]
    for strategy in ("rocchio", "best_score"):
        params = {"positive": near[0], "negative": near[1], "feedback": strategy}
        response = client.get(url, params=params)
        model = SearchResponse.model_validate_json(response.content)
        assert list(response.json()["query"]) == list(QueryInfo.model_fields)  # in order
        assert model.query.feedback == strategy and model.query.negative == [near[1]]
        assert model.score_kind == ("best_score" if strategy == "best_score" else "cosine")


def test_api_upload_search_takes_feedback(client, engine, query_id):
    case = engine.case(query_id)
    other = ids(engine.search(query_id, "cf", 1, suggestion=False))[0]
    files = {"file": ("q.png", Path(case.cf_path).read_bytes(), "image/png")}
    data = {"target": "cf", "k": "5", "positive": [other]}
    body = client.post("/search", data=data, files=files).json()
    assert body["query"]["positive"] == [other] and body["query"]["feedback"] == "rocchio"
    assert other not in [r["case_id"] for r in body["results"]]


def test_api_feedback_errors(client, query_id):
    url = f"/cases/{query_id}/similar"
    r = client.get(url, params={"positive": "nope"})
    assert r.status_code == 404 and r.json()["detail"].startswith("positive: unknown case_id")
    r = client.get(url, params={"positive": query_id, "negative": query_id})
    assert r.status_code == 422 and "in both lists" in r.json()["detail"]
    r = client.get(url, params={"positive": query_id, "feedback": "max"})
    assert r.status_code == 422 and "feedback" in r.json()["detail"]
    assert r.json()["request_id"]


def test_api_feedback_is_documented_with_examples(client):
    spec = client.get("/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/cases/{case_id}/similar"]["get"]["parameters"]}
    for name in ("positive", "negative", "feedback"):
        assert params[name]["description"] or params[name]["schema"].get("description")
    assert params["positive"].get("examples") or params["positive"]["schema"].get("examples")
    form = spec["paths"]["/search"]["post"]["requestBody"]["content"]["multipart/form-data"]
    ref = form["schema"]["$ref"].rsplit("/", 1)[-1]
    props = spec["components"]["schemas"][ref]["properties"]
    assert {"positive", "negative", "feedback"} <= set(props)


def test_fast_path_and_route_give_the_same_bytes_with_feedback(engine, query_id, monkeypatch):
    """The fast path answers feedback searches itself (the same bytes as the route) and
    leaves an unknown example id to the route."""
    from retrieval.api import fastpath

    monkeypatch.setattr("retrieval.search.engine._ms", lambda t0: 0.0)
    answered, similar_body = [], fastpath.similar_body

    async def recorded(*args):
        answered.append(await similar_body(*args))
        return answered[-1]

    monkeypatch.setattr(fastpath, "similar_body", recorded)
    near = ids(engine.search(query_id, "cf", 3, suggestion=False))
    url = f"/cases/{query_id}/similar?positive={near[0]}&negative={near[1]}&negative={near[2]}"
    headers = {"X-Request-ID": "same-id"}
    with (
        TestClient(create_app(Settings(fast_path=True), engine=engine)) as fast,
        TestClient(create_app(Settings(fast_path=False), engine=engine)) as slow,
    ):
        for u in (url, url + "&feedback=best_score", url.replace(near[0], "nope")):
            a, b = fast.get(u, headers=headers), slow.get(u, headers=headers)
            assert (a.status_code, a.content) == (b.status_code, b.content)
    assert a.status_code == 404 and len(answered) == 2  # the two good ones, by the fast path


# --------------------------------------------------------------------------- client, CLI


def test_client_sends_repeated_marks():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        query = {"kind": "case", "modality": "cf", "positive": ["a"], "negative": ["b", "c"]}
        return httpx.Response(200, json={"results": [], "query": {**query, "feedback": "rocchio"}})

    api = ApiClient("http://api.test", transport=httpx.MockTransport(handler))
    found = api.similar("q", positive=["a"], negative=["b", "c"], feedback="rocchio")
    assert seen[0].url.params.get_list("negative") == ["b", "c"]
    assert seen[0].url.params.get_list("positive") == ["a"]
    assert found.feedback == {"positive": ["a"], "negative": ["b", "c"], "feedback": "rocchio"}
    api.search(b"x", "q.png", positive=["a"], negative=["b"])
    body = seen[1].content.decode("latin-1")
    assert 'name="positive"\r\n\r\na' in body and 'name="negative"\r\n\r\nb' in body


def test_cli_search_takes_positive_and_negative(engine, query_id, monkeypatch):
    from retrieval.apps.cli import app

    monkeypatch.setattr(Engine, "open", classmethod(lambda cls, path, **kw: engine))
    near = ids(engine.search(query_id, "cf", 2, suggestion=False))
    args = ["search", str(engine.path), str(engine.case(query_id).cf_path), "--target", "cf"]
    args += ["--positive", near[0], "--negative", near[1], "--k", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "refined by 1 positive, 1 negative (rocchio)" in result.output
    assert near[0] not in result.output and near[1] not in result.output
    bad = CliRunner().invoke(app, [*args[:5], "--positive", "nope"])
    assert bad.exit_code != 0 and "positive: unknown case_id 'nope'" in bad.output


# --------------------------------------------------------------------------- the dashboard


def test_search_page_thumbs_refine_and_clear(live_api):
    from tests.test_ui import a_cf_photo, button, no_exception, open_page, search_upload

    _, data = a_cf_photo(live_api.cohort)
    at = search_upload(open_page(live_api.url), "query.png", data)
    first = at.session_state["results"].results
    up, down = first[0].case_id, first[1].case_id
    at.button(key="res_0_0_up").click().run()
    at.button(key="res_0_1_down").click().run()
    no_exception(at)
    assert at.session_state["feedback_marks"] == {up: "up", down: "down"}
    marks = " ".join(c.value for c in at.caption)
    assert f":material/thumb_up: {up}" in marks and f":material/thumb_down: {down}" in marks
    assert at.button(key="res_0_0_up").proto.type == "primary"

    button(at, "Refine").click().run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    refined = at.session_state["results"]
    assert refined.feedback == {"positive": [up], "negative": [down], "feedback": "rocchio"}
    assert not {up, down} & {r.case_id for r in refined.results}
    assert "Refined by 1 relevant and 1 not relevant" in " ".join(c.value for c in at.caption)

    button(at, "Clear marks").click().run()
    no_exception(at)
    assert at.session_state["feedback_marks"] == {}
    assert button(at, "Refine").disabled
