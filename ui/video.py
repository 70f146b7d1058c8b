"""Frames of an MP4 for the Compare page's time slider (display only)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import av
import numpy as np
import streamlit as st


@st.cache_data(show_spinner=False, max_entries=64)
def decode_frames(data: bytes) -> list[np.ndarray]:
    """MP4 bytes → its frames as uint8 RGB arrays (H, W, 3); [] when undecodable."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError):
        return []


def frame_times(times_s: Sequence[float] | None, n: int, span: float) -> tuple[list[float], bool]:
    """Seconds after injection of n frames, and whether they are known.

    Unknown times (a user's upload, a server that did not send them) are spread evenly
    over `span`, so the shared slider still walks both videos from start to end.
    """
    if times_s is not None and len(times_s) == n:
        return [float(t) for t in times_s], True
    if n <= 1:
        return [0.0] * n, False
    return [span * i / (n - 1) for i in range(n)], False


def nearest(times: Sequence[float], t: float) -> int:
    """Index of the frame whose time is closest to t (the earlier one on a tie)."""
    return int(np.argmin(np.abs(np.asarray(times, dtype=float) - t)))
