"""Browse: the catalog with filters and paging, counts by diagnosis, one case in full."""

from __future__ import annotations

import streamlit as st

from ui import components as ui
from ui import state
from ui.client import VIAS

st.title("Browse the catalog")
base = state.api_url()

with st.container(border=True):
    filters = ui.filter_controls("browse")
    a, b = st.columns([1, 3])
    limit = a.selectbox("Rows per page", [10, 20, 50, 100], index=1, key="browse_limit")

first = state.fetch("Loading the catalog", state.cases, base, 0, limit, **filters)
if first is None:
    st.stop()
pages = max(1, -(-first.total // limit))
page = b.number_input(f"Page (of {pages})", 1, pages, 1, key="browse_page")
listing = (
    first
    if page == 1
    else state.fetch("Loading the catalog", state.cases, base, (page - 1) * limit, limit, **filters)
)
if listing is None:
    st.stop()

table_col, counts_col = st.columns([3, 1])
with counts_col:
    st.markdown("**Indexed cases by diagnosis**")
    counts = ui.diagnosis_counts()
    if counts:
        st.bar_chart(counts, horizontal=True, x_label="cases", y_label="")
    st.caption(f"{first.total} case(s) match the filters")
with table_col:
    rows = [{c: row.get(c) for c in ui.CASE_COLUMNS if c in row} for row in listing.items]
    for row in rows:
        if isinstance(row.get("lesions"), list):
            row["lesions"] = ", ".join(row["lesions"])
    picked = st.dataframe(
        rows, hide_index=True, on_select="rerun", selection_mode="single-row", key="browse_table"
    )
    selected = [rows[i]["case_id"] for i in (picked.selection.rows if picked else [])]
    if selected and selected != st.session_state.get("_browse_selected"):  # a new click
        st.session_state[state.CASE] = selected[0]
    st.session_state["_browse_selected"] = selected

st.divider()
# the shown case follows state.CASE (a row click here, a click on the map, "Case" on a
# result) and the text box; whichever changed last wins
wanted = st.session_state.get(state.CASE, "")
if st.session_state.get("_browse_shown") != wanted:
    st.session_state["browse_case_input"] = wanted
typed = st.text_input(
    "Case", key="browse_case_input", placeholder="select a row above, or type a case id"
).strip()
st.session_state[state.CASE] = st.session_state["_browse_shown"] = typed
if not typed:
    st.stop()
case_id = typed
meta = state.fetch(f"Loading case {case_id}", state.case, base, case_id)
if meta is None:
    st.stop()

st.subheader(f"Case `{case_id}`")
st.markdown(ui.labels(meta))
cf_col, ffa_col, meta_col = st.columns([2, 2, 1.4])
with cf_col:
    st.markdown("**Colour fundus photo**")
    cf = state.fetch(f"Loading {case_id}'s CF", state.case_cf, base, case_id)
    if cf is not None:
        st.image(cf, width="stretch")
with ffa_col:
    st.markdown("**Fluorescein angiogram** (real)")
    ffa = state.fetch(f"Loading {case_id}'s FFA", state.case_ffa, base, case_id)
    if ffa is not None:
        ui.real_video(ffa.data)
with meta_col:
    st.markdown("**Metadata**")
    st.dataframe(ui.metadata_rows(meta), hide_index=True)
    if st.button(
        "Possible duplicates",
        key="browse_duplicates",
        icon=":material/content_copy:",
        help="Indexed cases whose CF photo or FFA video is a near-duplicate of this case's "
        "(re-saved, recompressed, resized, cropped). The first check reads every case's media.",
    ):
        found = state.fetch("Checking for near-duplicates", state.client().case_duplicates, case_id)
        if found:
            st.dataframe(found, hide_index=True, key="browse_duplicates_table")
        elif found is not None:
            st.caption("No near-duplicate of this case in the index.")

with st.form("browse_similar", border=True):
    st.markdown("**Find similar cases**")
    a, b, c, d = st.columns(4)
    modality = a.radio("Query with its", ["cf", "ffa"], format_func=ui.MODALITY_NAMES.get)
    target = b.radio("Find", list(ui.TARGET_NAMES), format_func=ui.TARGET_NAMES.get)
    k = c.number_input("k", 1, 100, 9)
    via = d.radio("Via", list(VIAS))
    go = st.form_submit_button("Find similar", type="primary", icon=":material/search:")
if go:
    with st.spinner(f"Searching with case {case_id}…"):
        response = state.fetch(
            "Find similar",
            state.client().similar,
            case_id,
            target=target,
            k=int(k),
            via=via,
            query_modality=modality,
        )
    if response is not None:
        state.remember_search({"kind": modality, "name": case_id, "case_id": case_id}, response)
        st.switch_page(ui.PAGE_SEARCH)
