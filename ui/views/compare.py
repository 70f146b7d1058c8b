"""Compare: the query and one result side by side, CF by CF and FFA by FFA on one clock."""

from __future__ import annotations

import streamlit as st

from ui import components as ui
from ui import state
from ui.video import decode_frames, frame_times, nearest

st.title("Compare")
query, response = st.session_state.get(state.QUERY), st.session_state.get(state.RESULTS)

with st.container(border=True):
    if query is not None and response is not None and response.results:
        ids = [r.case_id for r in response.results]
        chosen = st.session_state.get(state.COMPARE)
        right_id = st.selectbox(
            "Compare the query with",
            ids,
            index=ids.index(chosen) if chosen in ids else 0,
            format_func=lambda c: next(
                f"#{r.rank} {c} · {r.diagnosis} · score {r.score:.3f}"
                for r in response.results
                if r.case_id == c
            ),
            key="compare_pick",
        )
        left_id = None
    else:
        st.caption("No search yet: compare any two catalog cases.")
        a, b = st.columns(2)
        left_id = a.text_input("Left case id", key="compare_left")
        right_id = b.text_input(
            "Right case id", value=st.session_state.get(state.COMPARE, ""), key="compare_right"
        )

if not right_id or (query is None and not left_id):
    st.info("Search first (or give two case ids) to compare.", icon=":material/info:")
    st.stop()

with st.spinner("Loading both cases…"):
    left = ui.query_side(query) if left_id is None else ui.case_side(left_id.strip())
    right = ui.case_side(right_id.strip())
if left is None or right is None:
    st.stop()

st.subheader("Colour fundus photos")
for col, side in zip(st.columns(2), (left, right), strict=True):
    with col:
        st.markdown(side["title"])
        if side["cf"] is not None:
            st.image(side["cf"], width=ui.COMPARE_WIDTH)
        else:
            st.caption("no CF photo (the query is an angiogram)")
        if side["meta"] is not None:
            st.markdown(ui.labels(side["meta"]))

st.subheader("Angiograms on one clock")
videos = [side["ffa"] for side in (left, right)]
frames = [decode_frames(v.data) if v is not None else [] for v in videos]
known = [v.times_s for v in videos if v is not None and v.times_s]
span = max((max(t) for t in known), default=600.0)
times = [
    frame_times(v.times_s if v is not None else None, len(f), span)
    for v, f in zip(videos, frames, strict=True)
]
stops = sorted({round(x, 1) for ts, _ in times for x in ts}) or [0.0]
t = st.select_slider(
    "Seconds after injection (each stop is a frame of one of the videos)",
    stops,
    value=stops[nearest(stops, ui.DEFAULT_COMPARE_S)],
    format_func=lambda x: f"{x:g} s",
    key="compare_t",
)
for col, side, fr, (ts, exact) in zip(st.columns(2), (left, right), frames, times, strict=True):
    with col:
        video = side["ffa"]
        if not fr:
            st.caption("no angiogram to show")
            continue
        i = nearest(ts, t)
        note = f"frame {i + 1}/{len(fr)} at {ts[i]:.1f} s" + (
            "" if exact else " (times unknown: spread evenly)"
        )
        if video.synthetic:
            with st.container(border=True):
                st.markdown(":orange-badge[:material/warning: SYNTHETIC]")
                st.image(fr[i], caption=note, width=ui.COMPARE_WIDTH)
                st.caption(ui.SYNTHETIC_NOTE)
        else:
            st.image(fr[i], caption=note, width=ui.COMPARE_WIDTH)
        with st.expander("Play the whole video"):
            st.video(video.data, loop=True, muted=True)

st.subheader("Why this match")
if left_id is None:
    asked = query
    matched = next((r.modality for r in response.results if r.case_id == right_id), "cf")
else:
    asked, matched = {"kind": "cf", "case_id": left_id.strip(), "name": left_id.strip()}, "cf"
with st.spinner("Explaining the match…"):
    explained = ui.explanation_for(
        asked, response if left_id is None else None, right_id.strip(), matched
    )
if explained is None:
    st.caption("No explanation for this result (an upload's explains its top 10 results only).")
else:
    ui.explanation_panel(explained, [left, right], frames)
