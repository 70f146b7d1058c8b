"""End to end in a real browser: the API and `streamlit run` as they ship, driven by
headless Chromium (Debian's /usr/bin/chromium through Playwright; never downloaded).

Run with `make test-browser` (installs chromium when apt is available).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is absent: install Debian's chromium (`make chromium`, or "
        "`apt-get install -y chromium`) to run the browser tests",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

WAIT_MS = 120_000  # a search through a cold tiny model on a 2-core CPU


def settle(page) -> None:
    """Wait until the script run is over and every video can show a frame."""
    page.wait_for_load_state("networkidle")
    page.locator("[data-testid=stStatusWidget]").wait_for(state="detached", timeout=WAIT_MS)
    page.wait_for_function(
        "[...document.querySelectorAll('video')].every(v => v.readyState >= 2)", timeout=30_000
    )


@contextlib.contextmanager
def dashboard_for(api_url: str) -> Iterator[str]:
    """`streamlit run ui/app.py -- --api URL` on a free port, as `fundus2video ui` starts it."""
    from retrieval.apps.demo import start_dashboard
    from retrieval.apps.processes import free_port, stop_process

    proc, url = start_dashboard(api_url, "127.0.0.1", free_port(0))
    try:
        yield url
    finally:
        stop_process(proc)


def search_a_test_photo(page, api) -> Path:
    """Open the dashboard's Search page, upload the API's first test CF photo and search;
    returns the photo's path once the results are shown."""
    catalog = pl.read_parquet(api.cohort / "catalog.parquet")
    cf = api.cohort / catalog.filter(pl.col("split") == "test")["cf_path"][0]
    page.get_by_role("heading", name="Search similar cases").wait_for(timeout=WAIT_MS)
    page.locator("input[type=file]").set_input_files(str(cf))
    search = page.get_by_role("button", name="Search", exact=True)
    sync_api.expect(search).to_be_enabled(timeout=60_000)  # the upload has landed
    search.click()
    # the results' count ("9 similar cases"), not the heading or the suggestion's label
    page.get_by_text(re.compile(r"^\d+ similar cases$")).wait_for(timeout=WAIT_MS)
    return cf


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield browser.new_page(viewport={"width": 1400, "height": 2200})
        browser.close()


def test_upload_a_cf_photo_and_see_similar_cases(model_api, page, tmp_path):
    """The real API over the tiny_index (a trained micro model), as the demo runs it."""
    with dashboard_for(model_api.url) as url:
        page.goto(url)
        search_a_test_photo(page, model_api)
        page.get_by_text("SYNTHETIC", exact=False).first.wait_for(timeout=WAIT_MS)
        settle(page)
        page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
        body = page.inner_text("body")
        assert "#1" in body and "score" in body
        assert "Suggestion from similar cases" in body and "not a diagnosis" in body
        assert page.locator("[data-testid=stException]").count() == 0
        assert page.locator("[data-testid=stAlertContentError]").count() == 0
        assert page.locator("video").count() >= 1  # the synthesized angiogram plays inline
        assert (tmp_path / "search.png").stat().st_size > 10_000

        # the matching real angiograms: same photo, target FFA; each result is a video
        page.get_by_text("Angiograms (FFA)").click()
        page.get_by_role("button", name="Search", exact=True).click()
        page.get_by_text("FFA angiogram").first.wait_for(timeout=WAIT_MS)
        settle(page)
        page.screenshot(path=str(tmp_path / "search-ffa.png"), full_page=True)
        assert page.locator("video").count() >= 2  # the synthetic one + real results
        assert page.locator("[data-testid=stException]").count() == 0


def test_a_page_url_opened_first_gets_the_whole_app(live_api, page):
    """The first browser of a fresh server opening /browse sees the app's navigation
    (the pages live in ui/views/, so Streamlit's legacy multipage mode never runs one
    page file alone)."""
    with dashboard_for(live_api.url) as url:
        page.goto(f"{url}/browse")
        page.get_by_role("heading", name="Browse the catalog").wait_for(timeout=WAIT_MS)
        settle(page)
        nav = page.locator("[data-testid=stSidebarNav]").inner_text()
        assert "Embedding map" in nav and "Search" in nav  # st.navigation's titles
        assert page.locator("[data-testid=stException]").count() == 0
