"""The Compare page's match explanation in headless Chromium: a search, then the heat
maps over both photos (the trained micro model of `tiny_index`, served as `serve` does).
The screenshot goes to the test's tmp folder, or to $EXPLAIN_SHOT when set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.test_browser import (
    WAIT_MS,
    dashboard_for,
    page,
    search_a_test_photo,
    settle,
)

pytestmark = pytest.mark.browser
IMAGES_LOADED = (
    "[...document.querySelectorAll('[data-testid=stImage] img')]"
    ".every(i => i.complete && i.naturalWidth > 0)"
)
__all__ = ["page"]  # the fixture, shared with test_browser


def test_compare_page_shows_the_heat_map_of_a_result(model_api, page, tmp_path):  # noqa: F811
    with dashboard_for(model_api.url) as url:
        page.goto(url)
        search_a_test_photo(page, model_api)
        settle(page)

        page.locator("[data-testid=stSidebarNav]").get_by_role("link", name="Compare").click()
        page.get_by_role("heading", name="Why this match").wait_for(timeout=WAIT_MS)
        page.get_by_text("query regions sum to").wait_for(timeout=WAIT_MS)
        settle(page)
        # the second result (the first is the photo's own case, a perfect match)
        page.locator("[data-testid=stSelectbox]").first.click()
        page.get_by_role("option").filter(has_text="#2 ").click()
        page.get_by_text("query regions sum to").wait_for(timeout=WAIT_MS)
        settle(page)
        page.set_viewport_size({"width": 1400, "height": 2900})  # the heat maps too
        page.wait_for_function(IMAGES_LOADED, timeout=30_000)
        shot = tmp_path / "compare-explain.png"
        shot = Path(os.environ.get("EXPLAIN_SHOT", shot))
        page.screenshot(path=str(shot), full_page=True)
        body = page.inner_text("body")
        assert "share of the score" in body and "Heat map opacity" in body
        assert page.locator("[data-testid=stException]").count() == 0
        assert page.locator("[data-testid=stAlertContentError]").count() == 0
        assert page.locator("[data-testid=stImage] img").count() >= 4  # photos + 2 heat maps
        assert shot.stat().st_size > 10_000
