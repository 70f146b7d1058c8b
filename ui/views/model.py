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


def brightness_chart(report: dict) -> None:
    """The generation report's mean brightness curves, real and generated, when it has them."""
    brightness = ui.brightness_curves(report)
    if brightness is None:
        return
    st.markdown("**Generation: mean FFA brightness inside the field of view**")
    series = [c for c in brightness.columns if c != "seconds"]
    st.line_chart(brightness, x="seconds", y=series, height=280)
    st.caption(
        "Each frame's mean brightness ([0, 1]) averaged over the held-out cases, real and "
        "generated (models and baselines): `curve_mae` is the mean absolute gap of a case's "
        "curves; `vessel_auc` and `vessel_dice` compare the vessels of its venous frames."
    )


tables = ui.report_tables(card)
if not tables:
    st.info(
        "No evaluation report yet (`fundus2video evaluate RUN COHORT --out REPORT.json`).",
        icon=":material/info:",
    )
for title, rows in tables.items():
    st.markdown(f"**{title}**")
    st.dataframe(rows, hide_index=True)
    if title.startswith("Generation"):
        brightness_chart(card.get("report") or {})
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
