"""The dashboard: its HTTP client, and every page through `streamlit.testing.v1.AppTest`.

Offline tests point the pages at a port where nothing listens (every page must show a
readable error, never a traceback). Live tests run the real API in-process
(`live_api`: uvicorn in a thread over the `pixel_index` fixture, real HTTP) and drive
the pages through it: upload a CF photo, get rows, open a case, find similar, compare,
map, model; `model_api` serves the `tiny_index` (a real micro model) for a search
through synthesis. The similarity selector and the "Suggestion from similar cases" box
are checked live; an abstaining suggestion and the Model page's reliability diagram
through a patched client. The browser test (tests/e2e/test_browser.py) drives
`streamlit run`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from ui.client import ApiClient, ApiError, modality_of

APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"
PAGES = ("search", "compare", "browse", "map", "model")
TIMEOUT = 120  # s per script run: a search through synthesis runs the tiny generator on CPU


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: nothing listens there


def open_page(api_url: str, page: str = "search") -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state["api_url"] = api_url
    at.run()
    if page != "search":
        at.switch_page(f"views/{page}.py").run()
    return at


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert found, f"no button {label!r} among {[b.label for b in at.button]}"
    return found[0]


# -- the client ---------------------------------------------------------------------------
def _mock(handler) -> ApiClient:
    return ApiClient("http://api.test", transport=httpx.MockTransport(handler))


def test_client_turns_error_answers_into_readable_api_errors():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/cases/nope":
            return httpx.Response(404, json={"detail": "unknown case 'nope'"})
        if request.url.path == "/cases":
            body = {"detail": [{"loc": ["query", "limit"], "msg": "must be <= 500"}]}
            return httpx.Response(422, json=body)
        return httpx.Response(500, text="Internal Server Error")

    api = _mock(handler)
    with pytest.raises(ApiError) as e:
        api.case("nope")
    assert e.value.status == 404 and e.value.message == "unknown case 'nope'"
    with pytest.raises(ApiError) as e:
        api.cases(limit=9999)
    assert e.value.status == 422 and "limit: must be <= 500" in e.value.message
    with pytest.raises(ApiError) as e:
        api.model()
    assert e.value.status == 500 and "Internal Server Error" in str(e.value)


def test_client_reports_an_unreachable_server_by_its_url():
    url = _closed_port_url()
    with pytest.raises(ApiError) as e:
        ApiClient(url, timeout=5).health()
    assert e.value.status is None and url in e.value.message


def test_client_parses_search_results_and_synthetic_query():
    row = {
        "rank": 1,
        "case_id": "ph0-00017",
        "score": 0.9,
        "modality": "ffa",
        "diagnosis": "PDR",
        "eye": "OD",
        "lesions": ["leakage"],
        "cf_url": "/cases/ph0-00017/cf",
        "ffa_url": "/cases/ph0-00017/ffa",
    }
    synthetic = {"synthetic": True, "video_url": "/synthetic/abc", "times_s": [0.0, 30.0]}
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/synthetic/abc":
            return httpx.Response(200, content=b"MP4", headers={"X-Frame-Times": "0,30"})
        seen["body"] = request.content
        return httpx.Response(200, json={"results": [row], "synthetic_query": synthetic})

    api = _mock(handler)
    response = api.search(b"png", "q.png", target="ffa", k=3, via="synthesis", eye="OD")
    assert b'name="target"' in seen["body"] and b"synthesis" in seen["body"]
    (hit,) = response.results
    assert (hit.rank, hit.case_id, hit.modality) == (1, "ph0-00017", "ffa")
    assert hit.lesions == ("leakage",)
    assert not hit.synthetic
    video = api.synthetic(response.synthetic_query)
    assert video.synthetic and video.times_s == (0.0, 30.0) and video.data == b"MP4"


def test_modality_of_upload_names():
    assert modality_of("a.PNG") == "cf" and modality_of("b.tif") == "cf"
    assert modality_of("c.mp4") == "ffa" and modality_of("d.MKV") == "ffa"


# -- every page without an API: readable errors, no traceback ------------------------------
EXPECTED_OFFLINE = {
    "search": lambda at: at.file_uploader and button(at, "Search").disabled,
    "compare": lambda at: len(at.text_input) == 2,  # no search yet: two case ids
    "browse": lambda at: len(at.selectbox) >= 3,  # diagnosis, eye, split filters
    "map": lambda at: True,
    "model": lambda at: True,
}


@pytest.mark.parametrize("page", PAGES)
def test_page_without_api_shows_a_readable_error(page):
    url = _closed_port_url()
    at = open_page(url, page)
    no_exception(at)
    assert at.title, "every page has a title"
    assert EXPECTED_OFFLINE[page](at)
    errors = [e.value for e in at.error]
    assert all("Traceback" not in e for e in errors)
    if page == "compare":  # asks the API nothing before a search
        assert at.info
    else:
        assert any(url in e for e in errors), errors


# -- live: the real API in-process (uvicorn in a thread) over the pixel index ---------------
def a_cf_photo(cohort: Path, split: str = "test") -> tuple[str, bytes]:
    catalog = pl.read_parquet(cohort / "catalog.parquet")
    row = catalog.filter(pl.col("split") == split).row(0, named=True)
    return row["case_id"], (cohort / row["cf_path"]).read_bytes()


def search_upload(at: AppTest, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    at.file_uploader[0].set_value((name, data, mime))
    at.run()
    button(at, "Search").click().run()
    return at


def test_search_page_uploads_a_cf_photo_and_shows_rows(live_api):
    case_id, data = a_cf_photo(live_api.cohort)
    at = search_upload(open_page(live_api.url), f"{case_id}.png", data)
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    response = at.session_state["results"]
    assert response.results and [r.rank for r in response.results] == sorted(
        r.rank for r in response.results
    )
    assert any(s.value.endswith("similar cases") for s in at.subheader)
    shown = " ".join(m.value for m in at.markdown)
    assert f"#1** · `{response.results[0].case_id}`" in shown
    assert "SYNTHETIC" in shown  # the query's synthesized angiogram, labelled
    assert at.session_state["query"]["synthetic"].synthetic


def test_search_page_angiograms_through_synthesis(live_api):
    _, data = a_cf_photo(live_api.cohort)
    at = open_page(live_api.url)
    assert at.radio(key="search_via").disabled  # synthesis needs target = angiograms
    at.radio(key="search_target").set_value("ffa").run()
    at.radio(key="search_via").set_value("synthesis")
    at.number_input(key="search_k").set_value(3)
    search_upload(at, "query.png", data)
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    results = at.session_state["results"].results
    assert len(results) == 3 and {r.modality for r in results} == {"ffa"}
    assert at.session_state["query"]["synthetic"].times_s  # the synthesized video's clock


def test_search_through_the_trained_model(model_api):
    """The tiny_index's real (micro) model: angiograms of a photo, fused with synthesis."""
    case_id, data = a_cf_photo(model_api.cohort)
    at = open_page(model_api.url)
    at.radio(key="search_target").set_value("ffa").run()
    at.radio(key="search_via").set_value("fused")
    search_upload(at, f"{case_id}.png", data)
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    response = at.session_state["results"]
    assert response.results and {r.modality for r in response.results} == {"ffa"}
    assert response.raw["score_kind"] == "rrf" and response.synthetic_query is not None
    synthetic = at.session_state["query"]["synthetic"]
    assert synthetic.synthetic and synthetic.data[4:8] == b"ftyp"  # an MP4
    assert synthetic.times_s == tuple(response.synthetic_query["times_s"])


def test_search_page_shows_the_servers_message_for_a_bad_upload(live_api):
    at = search_upload(open_page(live_api.url), "broken.png", b"this is not a png", "image/png")
    no_exception(at)
    errors = [e.value for e in at.error]
    assert errors and all("Traceback" not in e for e in errors)
    assert "results" not in at.session_state


def test_compare_page_puts_query_and_result_on_one_clock(live_api):
    _, data = a_cf_photo(live_api.cohort)
    at = search_upload(open_page(live_api.url), "query.png", data)
    at.switch_page("views/compare.py").run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert [s.value for s in at.subheader] == [
        "Colour fundus photos",
        "Angiograms on one clock",
        "Why this match",
    ]
    (clock,) = at.select_slider
    assert clock.label.startswith("Seconds after injection")
    assert clock.value > 0  # starts near the venous peak, not on the black pre-dye frame
    last = float(clock.options[-1].removesuffix(" s"))  # options are shown as "600 s"
    clock.set_value(last).run()
    no_exception(at)
    assert at.select_slider[0].value == last
    pick = at.selectbox(key="compare_pick")
    pick.set_value(pick.options[-1].split()[1]).run()  # another result, another clock
    no_exception(at)
    assert at.select_slider[0].value in [
        float(o.removesuffix(" s")) for o in at.select_slider[0].options
    ]
    assert any("SYNTHETIC" in m.value for m in at.markdown)


def test_browse_page_pages_the_catalog_and_finds_similar(live_api):
    at = open_page(live_api.url, "browse")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    (table,) = [d for d in at.dataframe if "case_id" in d.value.columns]
    assert len(table.value) > 0
    case_id = str(table.value["case_id"].iloc[0])
    at.text_input(key="browse_case_input").set_value(case_id).run()
    no_exception(at)
    assert any(case_id in s.value for s in at.subheader)
    button(at, "Find similar").click().run()
    no_exception(at)
    assert at.session_state["query"]["case_id"] == case_id
    assert at.session_state["results"].results
    assert any(s.value.endswith("similar cases") for s in at.subheader)  # now on Search


def test_browse_page_names_an_unknown_case(live_api):
    at = open_page(live_api.url, "browse")
    at.text_input(key="browse_case_input").set_value("no-such-case").run()
    no_exception(at)
    assert any("no-such-case" in e.value for e in at.error), [e.value for e in at.error]


def test_map_page_draws_the_projection(live_api):
    at = open_page(live_api.url, "map")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert at.get("vega_lite_chart"), "the altair chart is drawn"
    assert "projected to 2-D" in at.caption[0].value
    space = at.selectbox(key="map_similarity")
    assert space.label == "Space" and space.options == ["Same eye (pair)"]  # /stats says
    assert "in the Same eye (pair) space" in at.caption[0].value


def test_map_page_space_selector_reaches_the_client(monkeypatch):
    from ui import client as client_mod

    asked = []

    def embedding_map(self, similarity=None):
        asked.append(similarity)
        point = {"case_id": "c-1", "modality": "cf", "diagnosis": "PDR", "x": 0.0, "y": 1.0}
        return {"method": "pca", "similarity": similarity, "points": [point]}

    stats = {"similarities": ["combined", "pair", "clinical"], "diagnoses": {"PDR": 1}}
    monkeypatch.setattr(client_mod.ApiClient, "health", lambda self: {"loaded": True, "cases": 1})
    monkeypatch.setattr(client_mod.ApiClient, "stats", lambda self: stats)
    monkeypatch.setattr(client_mod.ApiClient, "embedding_map", embedding_map)
    at = open_page("http://map-page.test", "map")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    space = at.selectbox(key="map_similarity")
    assert space.label == "Space" and space.value == "clinical" and asked == ["clinical"]
    assert space.options == ["Same disease (clinical)", "Same eye (pair)", "Combined"]
    assert "in the Same disease (clinical) space" in at.caption[0].value
    space.set_value("pair").run()
    no_exception(at)
    assert asked == ["clinical", "pair"]
    assert "in the Same eye (pair) space" in at.caption[0].value


def test_client_asks_the_map_for_a_similarity():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params)
        return httpx.Response(200, json={"method": "pca", "similarity": "pair", "points": []})

    assert _mock(handler).embedding_map("pair")["similarity"] == "pair"
    assert seen[-1]["similarity"] == "pair"
    _mock(handler).embedding_map()
    assert "similarity" not in seen[-1]  # the server's default


def test_model_page_shows_curves_and_identity(live_api):
    at = open_page(live_api.url, "model")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert {m.label for m in at.metric} >= {"dimension", "image size"}
    assert at.multiselect[0].value == ["Loss/G_total", "Loss/D_total"]
    assert [s.value for s in at.subheader] == ["Training curves", "Evaluation"]
    assert at.dataframe[0].value["name"].tolist() == ["model"]  # the report's generation table


VESSELS = {"vessel_auc": 0.81, "vessel_dice": 0.42, "curve_mae": 0.031}
CURVES = {
    "times_s": [8.0, 30.0, 120.0],
    "real": [0.1, 0.5, 0.3],
    "models": {"model": [0.12, 0.45, 0.31]},
    "baselines": {"mean": [0.2, 0.4, 0.3]},
}


def test_model_page_shows_vessel_metrics_and_brightness_curves(monkeypatch):
    from ui import client as client_mod

    report = {
        "split": "test",
        "models": {"model": {"psnr": 19.2, "ssim": 0.33, "fvd_proxy": 0.5, **VESSELS}},
        "baselines": {"mean": {"psnr": 19.9, "ssim": 0.4, "fvd_proxy": 6.0, **VESSELS}},
        "brightness_curves": CURVES,
    }
    card = {"encoder_id": "e", "dim": 8, "image_size": 32, "curves": {}, "report": report}
    monkeypatch.setattr(client_mod.ApiClient, "health", lambda self: {"loaded": True, "cases": 3})
    monkeypatch.setattr(client_mod.ApiClient, "model", lambda self: card)
    at = open_page("http://model-page-vessels.test", "model")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert {"vessel_auc", "vessel_dice", "curve_mae"} <= set(table.columns)
    assert table["vessel_auc"].tolist() == [0.81, 0.81]
    assert "mean FFA brightness" in texts(at) and "curve_mae" in texts(at)
    assert len(at.get("vega_lite_chart")) == 1  # the curves' line chart
    without = {**card, "report": {k: v for k, v in report.items() if k != "brightness_curves"}}
    monkeypatch.setattr(client_mod.ApiClient, "model", lambda self: without)
    at = open_page("http://model-page-no-curves.test", "model")
    no_exception(at)
    assert not at.get("vega_lite_chart") and "mean FFA brightness" not in texts(at)


def test_model_page_renders_a_report_as_tables(monkeypatch):
    """The report shapes `evaluate` writes → generation and retrieval tables."""
    from ui import components

    report = {
        "split": "test",
        "models": {"model": {"psnr": 19.2, "ssim": 0.33, "fvd_proxy": 0.5, **VESSELS}},
        "baselines": {"mean": {"psnr": 19.9, "ssim": 0.4, "fvd_proxy": 6.0}},
        "brightness_curves": CURVES,
        "retrieval": {
            "backbones": {
                "model": {
                    "cf2ffa": {"R@1": 0.3, "R@5": 0.6, "R@10": 0.8, "mAP": 0.4},
                    "ffa2cf": {"R@1": 0.3, "R@5": 0.6, "R@10": 0.8, "mAP": 0.4},
                    "cf2cf": {"P@10": 0.5, "by_diagnosis": {"PDR": 0.6}},
                    "cf2ffa_via": {
                        "direct": {"mAP": 0.4},
                        "synthesis": {"mAP": 0.3},
                        "fused": {"mAP": 0.45},
                        "best_by_mAP": "fused",
                    },
                }
            }
        },
    }
    tables = components.report_tables({"report": json.loads(json.dumps(report))})
    generation, pairs, precision = tables.values()
    assert [r["name"] for r in generation] == ["model", "mean"]
    assert {k: generation[0][k] for k in VESSELS} == VESSELS and "vessel_auc" not in generation[1]
    curves = components.brightness_curves(report)
    assert curves.columns.tolist() == ["seconds", "real", "model", "mean"]
    assert curves["real"].tolist() == CURVES["real"]
    assert components.brightness_curves({"models": report["models"]}) is None  # older report
    short = {**CURVES, "baselines": {"mean": [0.1]}}  # a curve of another length: left out
    assert components.brightness_curves({"brightness_curves": short}).columns[-1] == "model"
    assert [(r["task"], r["via"]) for r in pairs] == [
        ("CF → FFA", "direct"),
        ("FFA → CF", "direct"),
        ("CF → FFA", "synthesis"),
        ("CF → FFA", "fused"),
    ]
    assert [r["diagnosis"] for r in precision] == ["all", "PDR"]


def test_ui_command_runs_streamlit_on_the_app_with_the_api_url(monkeypatch):
    import subprocess

    from typer.testing import CliRunner

    from retrieval.apps.cli import app

    seen = {}

    class FakePopen:
        def __init__(self, cmd, *args, **kwargs):
            seen["cmd"] = cmd

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    result = CliRunner().invoke(app, ["ui", "--api", "http://10.0.0.2:9000", "--port", "8600"])
    assert result.exit_code == 0, result.output
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP)
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    assert cmd[-3:] == ["--", "--api", "http://10.0.0.2:9000"]
    assert "http://127.0.0.1:8600" in result.output


def test_result_buttons_open_the_case_and_the_comparison(live_api):
    _, data = a_cf_photo(live_api.cohort)
    at = search_upload(open_page(live_api.url), "query.png", data)
    second = at.session_state["results"].results[1].case_id
    at.button(key="res_0_1_open").click().run()  # "Case" on the 2nd result → Browse
    no_exception(at)
    assert at.title[0].value == "Browse the catalog"
    assert at.text_input(key="browse_case_input").value == second
    assert any(second in s.value for s in at.subheader)

    at.switch_page("views/search.py").run()  # the results are still there
    at.button(key="res_0_1_compare").click().run()  # "Compare" on the 2nd → Compare
    no_exception(at)
    assert at.title[0].value == "Compare"
    assert at.selectbox(key="compare_pick").value == second


# -- similarity and the diagnosis suggestion ---------------------------------------------
SUGGESTION = {
    "diagnosis": "PDR",
    "probability": 0.81,
    "abstained": False,
    "probabilities": {"PDR": 0.81, "NPDR": 0.12, "normal": 0.05, "CSC": 0.02},
    "supporting_case_ids": ["c-1", "c-7"],
    "neighbours": 10,
    "calibrated": True,
    "label": "suggestion from similar cases (decision support, not a diagnosis)",
}


def texts(at: AppTest) -> str:
    return " ".join(m.value for m in [*at.markdown, *at.caption, *at.warning])


def test_client_sends_similarity_and_reads_the_suggestion():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/model/reliability.png":
            return httpx.Response(200, content=b"\x89PNG")
        body = {"results": [], "similarity": "clinical", "suggestion": SUGGESTION}
        return httpx.Response(200, json=body)

    api = _mock(handler)
    response = api.search(b"png", "q.png", similarity="clinical")
    assert b'name="similarity"' in seen[-1].content and b"clinical" in seen[-1].content
    assert response.similarity == "clinical" and response.suggestion == SUGGESTION
    api.search(b"png", "q.png")
    assert b'name="similarity"' not in seen[-1].content  # the server's default
    api.similar("c-1", similarity="pair")
    assert seen[-1].url.params["similarity"] == "pair"
    api.similar("c-1")
    assert "similarity" not in seen[-1].url.params
    assert api.reliability_png() == b"\x89PNG"
    bare = _mock(lambda request: httpx.Response(200, json={"results": []}))
    assert bare.similar("x").suggestion is None and bare.similar("x").similarity is None


def test_search_page_shows_the_suggestion_box(live_api):
    case_id, data = a_cf_photo(live_api.cohort)
    at = open_page(live_api.url)
    selector = at.selectbox(key="search_similarity")
    assert selector.label == "Similarity"
    default = "Default (same disease; same eye without it)"
    assert selector.options == [default, "Same eye (pair)"]  # what /stats says
    search_upload(at, f"{case_id}.png", data)
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    suggestion = at.session_state["results"].suggestion
    assert suggestion is not None and bool(at.warning) is suggestion["abstained"]
    shown = texts(at)
    assert "**Suggestion from similar cases**" in shown
    assert "Decision support from the retrieved archive cases, not a diagnosis." in shown
    assert f"{suggestion['probability']:.2f}" in shown and "Top 3: " in shown
    top3 = sorted(suggestion["probabilities"].items(), key=lambda kv: -kv[1])[:3]
    assert " · ".join(f"{d} {p:.2f}" for d, p in top3) in shown
    for supporting in suggestion["supporting_case_ids"]:
        assert f"`{supporting}`" in shown
    assert ("abstained: no confident suggestion" in shown) is suggestion["abstained"]


def test_search_page_passes_the_similarity(live_api):
    case_id, _ = a_cf_photo(live_api.cohort)
    at = open_page(live_api.url)
    at.segmented_control(key="search_source").set_value("Catalog case").run()
    at.text_input(key="search_case_id").set_value(case_id).run()
    at.selectbox(key="search_similarity").set_value("pair").run()
    button(at, "Search").click().run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    response = at.session_state["results"]
    assert response.similarity == "pair" and response.raw["query"]["similarity"] == "pair"
    assert any("Ranked by Same eye (pair)" in c.value for c in at.caption)
    assert response.suggestion is not None
    assert case_id not in response.suggestion["supporting_case_ids"]


def test_search_page_says_when_the_suggestion_abstains(live_api, monkeypatch):
    from ui import client as client_mod

    real = client_mod.ApiClient.search

    def abstaining(self, *args, **kwargs):
        response = real(self, *args, **kwargs)
        raw = {**response.raw, "suggestion": {**SUGGESTION, "abstained": True, "probability": 0.41}}
        return client_mod.SearchResponse(response.results, raw)

    monkeypatch.setattr(client_mod.ApiClient, "search", abstaining)
    _, data = a_cf_photo(live_api.cohort)
    at = search_upload(open_page(live_api.url), "query.png", data)
    no_exception(at)
    assert [w.value for w in at.warning] == ["abstained: no confident suggestion"]
    shown = texts(at)
    assert "top: PDR · p = 0.41" in shown and "Top 3: PDR 0.81 · NPDR 0.12 · normal 0.05" in shown
    assert "`c-1`, `c-7`" in shown and "not a diagnosis" in shown


def test_search_page_without_a_suggestion_model_shows_no_box(live_api, monkeypatch):
    from ui import client as client_mod

    real = client_mod.ApiClient.search

    def bare(self, *args, **kwargs):
        response = real(self, *args, **kwargs)
        return client_mod.SearchResponse(response.results, {**response.raw, "suggestion": None})

    monkeypatch.setattr(client_mod.ApiClient, "search", bare)
    _, data = a_cf_photo(live_api.cohort)
    at = search_upload(open_page(live_api.url), "query.png", data)
    no_exception(at)
    assert at.session_state["results"].results
    assert "Suggestion from similar cases" not in texts(at)


def test_model_page_shows_the_reliability_diagram_and_suggestion_metrics(monkeypatch):
    from ui import client as client_mod
    from ui import components

    png = _png()
    card = {
        "encoder_id": "embedder-x",
        "dim": 48,
        "image_size": 32,
        "curves": {},
        "report_name": "report.json",
        "reliability_url": "/model/reliability.png",
        "report": {
            "retrieval": {
                "backbones": {
                    "model": {
                        "suggestion": {
                            "accuracy": 0.7,
                            "macro_f1": 0.6,
                            "ece": 0.05,
                            "coverage": 0.9,
                            "accuracy_answered": 0.75,
                            "reliability": [],
                        }
                    }
                }
            }
        },
    }
    monkeypatch.setattr(client_mod.ApiClient, "health", lambda self: {"loaded": True, "cases": 3})
    monkeypatch.setattr(client_mod.ApiClient, "model", lambda self: card)
    monkeypatch.setattr(client_mod.ApiClient, "reliability_png", lambda self, url="": png)
    at = open_page("http://model-page.test", "model")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert len(at.image) == 1 and "reliability" in texts(at)
    (table,) = [d for d in at.dataframe if "ece" in d.value.columns]
    assert table.value.iloc[0].to_dict() == {
        "backbone": "model",
        "accuracy": 0.7,
        "macro_f1": 0.6,
        "ece": 0.05,
        "coverage": 0.9,
        "accuracy_answered": 0.75,
    }
    # a nested (per modality) or partial suggestion block, and none at all
    nested = {"backbones": {"m": {"suggestion": {"cf": {"accuracy": 0.5}, "ffa": {"ece": 0.1}}}}}
    rows = components.suggestion_rows(nested)
    assert rows == [
        {"backbone": "m", "query": "cf", "accuracy": 0.5},
        {"backbone": "m", "query": "ffa", "ece": 0.1},
    ]
    assert components.suggestion_rows({"retrieval": {"backbones": {"m": {"cf2ffa": {}}}}}) == []
    assert components.suggestion_rows({}) == []


def test_model_page_without_a_reliability_diagram(monkeypatch):
    from ui import client as client_mod

    card = {
        "encoder_id": "e",
        "dim": 8,
        "image_size": 32,
        "curves": {},
        "report": None,
        "reliability_url": None,
    }
    fetched = []
    monkeypatch.setattr(client_mod.ApiClient, "health", lambda self: {"loaded": True, "cases": 3})
    monkeypatch.setattr(client_mod.ApiClient, "model", lambda self: card)
    monkeypatch.setattr(client_mod.ApiClient, "reliability_png", lambda *a: fetched.append(a))
    at = open_page("http://model-page-bare.test", "model")
    no_exception(at)
    assert not at.error and not at.image and not fetched


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    return buf.getvalue()


def test_the_dashboard_sends_the_read_key_from_the_environment(monkeypatch):
    from ui import state

    state.get_client.clear()
    monkeypatch.setenv(state.KEY_ENV, "read-key-0123456789")
    assert state.get_client("http://keyed.invalid")._http.headers["X-API-Key"] == (
        "read-key-0123456789"
    )
    monkeypatch.delenv(state.KEY_ENV)
    assert "X-API-Key" not in state.get_client("http://open.invalid")._http.headers
    state.get_client.clear()
