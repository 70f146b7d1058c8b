"""Search: a CF photo or FFA video (uploaded, or a catalog case) → similar cases."""

from __future__ import annotations

import streamlit as st

from ui import components as ui
from ui import state
from ui.client import VIAS, content_type, modality_of

VIA_HELP = (
    "For angiograms of a fundus photo. **direct**: compare embeddings in the shared space. "
    "**synthesis**: first synthesize the photo's angiogram, then search with it. "
    "**fused**: combine both rankings."
)
UPLOAD_TYPES = ["png", "jpg", "jpeg", "tif", "tiff", "mp4", "avi", "mov", "mkv"]

st.title("Search similar cases")
base = state.api_url()
api = state.client()

with st.container(border=True):
    source = st.segmented_control(
        "Query", ["Upload", "Catalog case"], default="Upload", key="search_source"
    )
    upload, case_id, case_modality = None, None, "cf"
    if source == "Catalog case":
        left, right = st.columns([2, 1])
        case_id = left.text_input("Case id", key="search_case_id", placeholder="e.g. ph0-00017")
        case_modality = right.radio(
            "Query with its",
            ["cf", "ffa"],
            format_func=ui.MODALITY_NAMES.get,
            horizontal=True,
            key="search_case_modality",
        )
    else:
        upload = st.file_uploader(
            "A colour fundus photo (PNG, JPEG, TIFF) or an FFA video (MP4, AVI, MOV, MKV)",
            type=UPLOAD_TYPES,
            key="search_upload",
        )
    left, mid, right = st.columns([2, 1, 2])
    target = left.radio(
        "Find",
        list(ui.TARGET_NAMES),
        format_func=ui.TARGET_NAMES.get,
        horizontal=True,
        key="search_target",
    )
    k = mid.number_input("k", min_value=1, max_value=100, value=9, key="search_k")
    via = right.radio(
        "Via",
        list(VIAS),
        horizontal=True,
        help=VIA_HELP,
        key="search_via",
        disabled=target != "ffa",  # synthesis and fused: a CF photo → angiograms
    )
    via = via if target == "ffa" else "direct"
    similarity = ui.similarity_control("search")
    vessel_check = ui.vessel_check_control("search", similarity)
    with st.expander("Filters"):
        filters = ui.filter_controls("search")
    region = ui.region_control("search", ui.query_photo(upload, case_id, case_modality))
    ready = upload is not None or bool(case_id)
    go = st.button("Search", type="primary", icon=":material/search:", disabled=not ready)

params = {"target": target, "k": int(k), "via": via, "similarity": similarity, **filters}
params.update(region=region, vessel_check=vessel_check)
if go:
    ui.clear_marks()  # a new search: the marks were for the last one
if go and upload is not None:
    data, name = upload.getvalue(), upload.name
    kind = modality_of(name)
    query = {"kind": kind, "name": name, "data": data, "content_type": content_type(name)}
    with st.spinner(f"Searching {ui.TARGET_NAMES[target].lower()} for {name}…"):
        response = state.fetch(
            "Search",
            api.search,
            data,
            name,
            target=target,
            k=int(k),
            via=via,
            similarity=similarity,
            region=region,
            vessel_check=vessel_check,
            content_type=query["content_type"],
            **filters,
        )
    if response is not None:
        if kind == "cf":
            with st.spinner("Synthesizing the angiogram of this photo…"):
                query["synthetic"] = ui.synthesized_for(api, response, data, name)
        query["params"] = params
        state.remember_search(query, response)
elif go and case_id:
    with st.spinner(f"Searching with case {case_id}…"):
        response = state.fetch(
            "Search",
            api.similar,
            case_id.strip(),
            target=target,
            k=int(k),
            via=via,
            query_modality=case_modality,
            similarity=similarity,
            region=region,
            vessel_check=vessel_check,
            **filters,
        )
    if response is not None:
        query = {"kind": case_modality, "name": case_id.strip(), "case_id": case_id.strip()}
        query["params"] = params
        state.remember_search(query, response)

if st.session_state.pop(ui.REFINE_NOW, False):  # "Refine": the last search with the marks
    with st.spinner("Refining the search with your marks…"):
        refined = ui.refine_search(api)
    if refined is not None:
        state.remember_search(st.session_state[state.QUERY], refined)

query, response = st.session_state.get(state.QUERY), st.session_state.get(state.RESULTS)
if query is None or response is None:
    st.info(
        "Upload a fundus photo or an angiogram, or pick a catalog case, then press **Search**.",
        icon=":material/info:",
    )
    st.stop()

left, right = st.columns([1, 3], gap="large")
with left:
    st.subheader("Query")
    ui.query_media(query)
    ui.suggestion_box(response)
with right:
    st.subheader(f"{len(response.results)} similar cases")
    if response.similarity:
        ranked = ui.SIMILARITY_NAMES.get(response.similarity, response.similarity)
        checked = ", re-ranked by the vessel check" if response.vessel_checked else ""
        st.caption(f"Ranked by {ranked}{checked}")
    ui.feedback_bar(response)
    ui.result_gallery(response)
    with st.expander("As a table"):
        st.dataframe(ui.results_table(response), hide_index=True)
