"""Where the dashboard finds the API, its cached client and cached tables, and the
one way pages call the API (`fetch`: errors become `st.error`, never a traceback)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from .client import DEFAULT_API, ApiClient, ApiError, CasePage, SearchResponse, Video

API_ENV = "FUNDUS2VIDEO_API"
KEY_ENV = "FUNDUS2VIDEO_API_KEY"  # the read key, when the server sets one
T = TypeVar("T")

# session_state keys shared between pages
API_URL = "api_url"
QUERY = "query"  # dict: kind ("cf" | "ffa"), name, data, content_type, case_id, synthetic
RESULTS = "results"  # SearchResponse of the last search
SEARCH_ERROR = "search_error"
CASE = "case_id"  # the case the Browse page shows
COMPARE = "compare_case"  # the result the Compare page shows


def _api_from_argv(argv: list[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--api")
    known, _ = parser.parse_known_args(argv)
    return known.api


def api_url(default: str | None = None) -> str:
    """The API's base URL: session state, else `--api` after `--`, else $FUNDUS2VIDEO_API."""
    if API_URL not in st.session_state:
        st.session_state[API_URL] = (
            default or _api_from_argv(sys.argv[1:]) or os.environ.get(API_ENV) or DEFAULT_API
        )
    return st.session_state[API_URL]


@st.cache_resource(show_spinner=False)
def get_client(base_url: str) -> ApiClient:
    """The API client, with the read key from $FUNDUS2VIDEO_API_KEY when it is set."""
    return ApiClient(base_url, api_key=os.environ.get(KEY_ENV) or None)


def client() -> ApiClient:
    return get_client(api_url())


def fetch(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """`fn(*args, **kwargs)`; on an `ApiError` show a readable `st.error` and return None."""
    try:
        return fn(*args, **kwargs)
    except ApiError as e:
        show_error(what, e)
        return None


def show_error(what: str, error: ApiError) -> None:
    if error.status is None:
        st.error(f"**{what}**: {error.message}", icon=":material/cloud_off:")
    elif error.status < 500:
        st.error(f"**{what}** — {error.message}", icon=":material/error:")
    else:
        st.error(
            f"**{what}** — the server failed ({error.status}): {error.message}",
            icon=":material/error:",
        )


# -- cached reads (tables and media); keyed by the API URL so two servers never mix ---------
@st.cache_data(ttl=10, show_spinner=False)
def health(base: str) -> dict[str, Any]:
    return get_client(base).health()


@st.cache_data(ttl=60, show_spinner=False)
def stats(base: str) -> dict[str, Any]:
    return get_client(base).stats()


@st.cache_data(ttl=60, show_spinner=False)
def cases(
    base: str, offset: int, limit: int, diagnosis: str | None, eye: str | None, split: str | None
) -> CasePage:
    return get_client(base).cases(
        offset=offset, limit=limit, diagnosis=diagnosis, eye=eye, split=split
    )


@st.cache_data(ttl=60, show_spinner=False, max_entries=512)
def case(base: str, case_id: str) -> dict[str, Any]:
    return get_client(base).case(case_id)


@st.cache_data(ttl=600, show_spinner=False, max_entries=512)
def media(base: str, url: str) -> bytes:
    return get_client(base).media(url)


@st.cache_data(ttl=600, show_spinner=False, max_entries=256)
def case_cf(base: str, case_id: str) -> bytes:
    return get_client(base).case_cf(case_id)


@st.cache_data(ttl=600, show_spinner=False, max_entries=256)
def case_ffa(base: str, case_id: str) -> Video:
    return get_client(base).case_ffa(case_id)


@st.cache_data(ttl=300, show_spinner=False)
def embedding_map(base: str, similarity: str | None = None) -> dict[str, Any]:
    return get_client(base).embedding_map(similarity)  # cached per similarity too


@st.cache_data(ttl=60, show_spinner=False)
def model(base: str) -> dict[str, Any]:
    return get_client(base).model()


@st.cache_data(ttl=60, show_spinner=False)
def reliability_png(base: str, url: str) -> bytes:
    return get_client(base).reliability_png(url)


def remember_search(query: dict[str, Any], response: SearchResponse) -> None:
    st.session_state[QUERY] = query
    st.session_state[RESULTS] = response
    st.session_state.pop(COMPARE, None)
