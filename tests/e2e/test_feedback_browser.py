"""Relevance feedback in headless Chromium: a search, a thumbs-up on a result card,
"Refine", and the refined results (the marked case left out, the marks listed)."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.test_browser import (
    WAIT_MS,
    dashboard_for,
    page,
    search_a_test_photo,
    settle,
    sync_api,
)

pytestmark = pytest.mark.browser
__all__ = ["page"]  # the fixture, shared with test_browser


def top_result(api_url: str, cf) -> str:
    """The first result of the page's default search (k 9, CF photos) for this photo."""
    files = {"file": (cf.name, cf.read_bytes(), "image/png")}
    found = httpx.post(f"{api_url}/search", data={"k": "9"}, files=files, timeout=60).json()
    return found["results"][0]["case_id"]


def test_refine_a_search_with_a_thumbs_up(live_api, page, tmp_path):  # noqa: F811
    with dashboard_for(live_api.url) as url:
        page.goto(url)
        cf = search_a_test_photo(page, live_api)
        settle(page)
        refine = page.get_by_role("button", name="Refine")
        sync_api.expect(refine).to_be_disabled()  # nothing marked yet

        first = top_result(live_api.url, cf)
        sync_api.expect(page.locator("code").filter(has_text=first).first).to_be_visible()
        page.locator(".st-key-res_0_0_up button").first.click()
        marks = page.get_by_text("Marks:")
        sync_api.expect(marks).to_contain_text(first, timeout=WAIT_MS)
        settle(page)
        sync_api.expect(refine).to_be_enabled()
        refine.click()
        page.get_by_text("Refined by 1 relevant and 0 not relevant").wait_for(timeout=WAIT_MS)
        settle(page)
        page.screenshot(path=str(tmp_path / "refined.png"), full_page=True)

        cards = page.locator("[data-testid=stMarkdownContainer]").filter(has_text="· score")
        shown = cards.all_inner_texts()  # "#1 · case id · score 0.97" of each card
        assert len(shown) == 9 and not any(first in card for card in shown)  # left out
        sync_api.expect(page.get_by_text("Marks:")).to_contain_text(first)  # still listed
        assert page.locator("[data-testid=stException]").count() == 0
        assert page.locator("[data-testid=stAlertContentError]").count() == 0

        page.get_by_role("button", name="Clear marks").click()
        page.get_by_text("Mark results relevant or not").wait_for(timeout=WAIT_MS)
        sync_api.expect(page.get_by_role("button", name="Refine")).to_be_disabled()
