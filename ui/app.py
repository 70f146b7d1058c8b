"""The dashboard's entry point: `streamlit run ui/app.py -- --api URL`."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ui import state
from ui.client import ApiError

PAGES = Path(__file__).resolve().parent / "views"


@st.cache_data(ttl=10, show_spinner=False)
def readiness(base: str) -> dict | None:
    """The API's GET /ready body, or None when it cannot say (unreachable, or an older API:
    the health line then speaks for it)."""
    try:
        return state.get_client(base).ready()
    except ApiError:
        return None


def not_ready_line(ready: dict) -> str:
    """The sidebar's line for a 503 from /ready: still loading, the index failed to load
    or was not given, or the last save failed."""
    if "index_save" in (ready.get("missing") or ()):
        return ":red[●] connected, but the last save of the index failed: updates are not saved"
    detail = ready.get("detail") or ""
    if detail.startswith("loading"):
        return ":orange[●] connected — loading (the model and index are not loaded yet)"
    return f":red[●] connected, but {detail.removeprefix('not ready: ') or 'not ready'}"


def sidebar_status(base: str) -> None:
    """Which API the dashboard talks to, and what it has loaded (or is still loading)."""
    with st.sidebar:
        st.caption(f"API: `{base}`")
        ready = readiness(base)
        if ready is not None and not ready.get("ready", True):
            st.caption(not_ready_line(ready))
            return
        health = state.fetch("API", state.health, base)
        if health is not None and health.get("loaded", True):
            cases = health.get("cases")
            st.caption(f":green[●] connected — {cases if cases is not None else '?'} cases")
        elif health is not None:
            st.caption(":orange[●] connected, but no index is loaded")


def run(api_url: str | None = None) -> None:
    st.set_page_config(page_title="fundus2video", page_icon=":material/visibility:", layout="wide")
    base = state.api_url(api_url)
    nav = st.navigation(
        {
            "Retrieval": [
                st.Page(
                    PAGES / "search.py", title="Search", icon=":material/search:", default=True
                ),
                st.Page(PAGES / "compare.py", title="Compare", icon=":material/compare:"),
            ],
            "Catalog": [
                st.Page(PAGES / "browse.py", title="Browse", icon=":material/table_view:"),
                st.Page(PAGES / "map.py", title="Embedding map", icon=":material/scatter_plot:"),
            ],
            "Model": [st.Page(PAGES / "model.py", title="Model", icon=":material/model_training:")],
        }
    )
    sidebar_status(base)
    nav.run()


if __name__ == "__main__":
    run()
