"""Embedding map: CF and FFA embeddings in 2-D, coloured by diagnosis; a click opens the case.
The Space selector picks the similarity whose part of the embedding is projected."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from ui import components as ui
from ui import state

st.title("Embedding map")
base = state.api_url()
space = ui.similarity_control("map", "Space", with_default=False, help=ui.MAP_SPACE_HELP)

with st.spinner("Projecting the embeddings…"):
    projection = state.fetch("Loading the embedding map", state.embedding_map, base, space)
if projection is None:
    st.stop()
points = pd.DataFrame(projection["points"])
if points.empty:
    st.info("The index holds no embeddings yet.", icon=":material/info:")
    st.stop()
method = (projection.get("method") or "PCA").upper()
shown = projection.get("similarity") or space
where = f" in the {ui.SIMILARITY_NAMES.get(shown, shown)} space" if shown else ""
st.caption(
    f"{len(points)} embeddings{where} projected to 2-D with {method}. Shape = modality, "
    "colour = diagnosis; a grey line joins a case's CF photo to its angiogram. Click a point "
    "to open its case."
)

points["modality"] = points["modality"].map(ui.MODALITY_NAMES).fillna(points["modality"])
show = st.segmented_control(
    "Show",
    list(ui.MODALITY_NAMES.values()),
    default=list(ui.MODALITY_NAMES.values()),
    selection_mode="multi",
    key="map_modalities",
)
points = points[points["modality"].isin(show or [])]
x, y = alt.X("x:Q", axis=None), alt.Y("y:Q", axis=None)
pick = alt.selection_point(name="pick", fields=["case_id"], on="click")
pairs = alt.Chart(points).mark_line(color="#9e9e9e", strokeWidth=0.6, opacity=0.5)
pairs = pairs.encode(x=x, y=y, detail="case_id:N")
dots = (
    alt.Chart(points)
    .mark_point(filled=True, size=80, opacity=0.85)
    .encode(
        x=x,
        y=y,
        color=alt.Color("diagnosis:N", title="diagnosis"),
        shape=alt.Shape("modality:N", title="modality"),
        tooltip=["case_id", "diagnosis", "modality"],
    )
    .add_params(pick)
)
event = st.altair_chart(
    pairs + dots, height=560, on_select="rerun", selection_mode="pick", key="map_chart"
)
picked = [p.get("case_id") for p in (event.selection.get("pick") or []) if p.get("case_id")]
if picked and picked[0] != st.session_state.get("map_opened"):
    st.session_state["map_opened"] = picked[0]
    st.session_state[state.CASE] = picked[0]
    st.switch_page(ui.PAGE_BROWSE)
