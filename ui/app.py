"""The dashboard's entry point: `streamlit run ui/app.py -- --api URL`."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ui import state

PAGES = Path(__file__).resolve().parent / "views"


def sidebar_status(base: str) -> None:
    """Which API the dashboard talks to, and what it has loaded."""
    with st.sidebar:
        st.caption(f"API: `{base}`")
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
