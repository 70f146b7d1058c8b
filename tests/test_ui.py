"""The dashboard: its HTTP client, and every page through `streamlit.testing.v1.AppTest`.

Offline tests point the pages at a port where nothing listens (every page must show a
readable error, never a traceback). Live tests run the real API in-process
(`live_api`: uvicorn in a thread over the `pixel_index` fixture, real HTTP) and drive
the pages through it: upload a CF photo, get rows, open a case, find similar, compare,
map, model; `model_api` serves the `tiny_index` (a real micro model) for a search
through synthesis. The browser test (tests/e2e/test_browser.py) drives `streamlit run`.
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
        at.switch_page(f"pages/{page}.py").run()
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
    row = {"rank": 1, "case_id": "ph0-00017", "score": 0.9, "modality": "ffa",
           "diagnosis": "PDR", "eye": "OD", "lesions": ["leakage"],
           "cf_url": "/cases/ph0-00017/cf", "ffa_url": "/cases/ph0-00017/ffa"}  # fmt: skip
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
    at.switch_page("pages/compare.py").run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert [s.value for s in at.subheader] == ["Colour fundus photos", "Angiograms on one clock"]
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


def test_model_page_shows_curves_and_identity(live_api):
    at = open_page(live_api.url, "model")
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert {m.label for m in at.metric} >= {"dimension", "image size"}
    assert at.multiselect[0].value == ["Loss/G_total", "Loss/D_total"]
    assert [s.value for s in at.subheader] == ["Training curves", "Evaluation"]
    assert at.dataframe[0].value["name"].tolist() == ["model"]  # the report's generation table


def test_model_page_renders_a_report_as_tables(monkeypatch):
    """The report shapes `evaluate` writes → generation and retrieval tables."""
    from ui import components

    report = {
        "split": "test",
        "models": {"model": {"psnr": 19.2, "ssim": 0.33, "fvd_proxy": 0.5}},
        "baselines": {"mean": {"psnr": 19.9, "ssim": 0.4, "fvd_proxy": 6.0}},
        "retrieval": {"backbones": {"model": {
            "cf2ffa": {"R@1": 0.3, "R@5": 0.6, "R@10": 0.8, "mAP": 0.4},
            "ffa2cf": {"R@1": 0.3, "R@5": 0.6, "R@10": 0.8, "mAP": 0.4},
            "cf2cf": {"P@10": 0.5, "by_diagnosis": {"PDR": 0.6}},
            "cf2ffa_via": {"direct": {"mAP": 0.4}, "synthesis": {"mAP": 0.3},
                           "fused": {"mAP": 0.45}, "best_by_mAP": "fused"},
        }}},
    }  # fmt: skip
    tables = components.report_tables({"report": json.loads(json.dumps(report))})
    generation, pairs, precision = tables.values()
    assert [r["name"] for r in generation] == ["model", "mean"]
    assert [(r["task"], r["via"]) for r in pairs] == [
        ("CF → FFA", "direct"), ("FFA → CF", "direct"),
        ("CF → FFA", "synthesis"), ("CF → FFA", "fused"),
    ]  # fmt: skip
    assert [r["diagnosis"] for r in precision] == ["all", "PDR"]


def test_ui_command_runs_streamlit_on_the_app_with_the_api_url(monkeypatch):
    import subprocess

    from typer.testing import CliRunner

    from retrieval.cli import app

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

    at.switch_page("pages/search.py").run()  # the results are still there
    at.button(key="res_0_1_compare").click().run()  # "Compare" on the 2nd → Compare
    no_exception(at)
    assert at.title[0].value == "Compare"
    assert at.selectbox(key="compare_pick").value == second
