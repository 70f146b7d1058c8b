"""Model: the encoder's identity, training curves, and the evaluation report's tables."""

from __future__ import annotations

import streamlit as st

from ui import components as ui
from ui import state

st.title("Model")
with st.spinner("Loading the model card…"):
    card = state.fetch("Loading the model", state.model, state.api_url())
if card is None:
    st.stop()

identity = ui.model_identity(card)
if identity:
    for col, (name, value) in zip(st.columns(len(identity)), identity.items(), strict=True):
        col.metric(name, value)
st.caption(
    f"Encoder `{card.get('encoder_id', '?')}`"
    + (f" · evaluation report `{card['report_name']}`" if card.get("report_name") else "")
)

st.subheader("Training curves")
curves = ui.training_curves(card)
if not curves:
    st.info("The run has no `stats.jsonl` yet.", icon=":material/info:")
for name, frame in curves.items():
    metrics = [c for c in frame.columns if c != "iteration"]
    chosen = st.multiselect(
        f"{name}: series", metrics, default=ui.default_series(metrics), key=f"model_{name}"
    )
    if chosen:
        st.line_chart(frame, x="iteration", y=chosen, height=280)

st.subheader("Evaluation")
tables = ui.report_tables(card)
if not tables:
    st.info(
        "No evaluation report yet (`fundus2video evaluate RUN COHORT --out REPORT.json`).",
        icon=":material/info:",
    )
for title, rows in tables.items():
    st.markdown(f"**{title}**")
    st.dataframe(rows, hide_index=True)
if card.get("reliability_url"):
    png = state.fetch(
        "Loading the reliability diagram",
        state.reliability_png,
        state.api_url(),
        card["reliability_url"],
    )
    if png is not None:
        st.markdown(f"**{ui.SUGGESTION_TITLE}: reliability**")
        st.image(png, width=420)
        st.caption(
            "Accuracy against confidence of the suggested diagnosis on held-out cases "
            f"(a calibrated suggestion follows the diagonal). {ui.SUGGESTION_CAPTION}"
        )
