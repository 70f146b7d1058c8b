"""Time courses of fluorescein in the eye: functions of time (s) that broadcast.

`t` is usually (T, 1) and the arrival times (N,) or scalars, giving (T, N).
"""

from __future__ import annotations

import numpy as np


def bolus(t: np.ndarray, arrival: np.ndarray | float, rise: float = 0.8) -> np.ndarray:
    """Dye in a vessel: 0 before `arrival`, fills in ~1-2 s, first pass then slow recirculation.

    Peak ~0.9 a few seconds after arrival, ~0.55 at 30 s, ~0.04 at 10 min.
    """
    tau = np.maximum(t - arrival, 0.0)
    filled = np.square(-np.expm1(-tau / rise))
    return filled * (0.55 * np.exp(-tau / 25.0) + 0.45 * np.exp(-tau / 190.0))


def rise(t: np.ndarray, start: np.ndarray | float, tau: float) -> np.ndarray:
    """0 before `start`, then 1 - exp(-(t - start)/tau): staining and leakage build-up."""
    return -np.expm1(-np.maximum(t - start, 0.0) / tau)


def step(t: np.ndarray, start: np.ndarray | float, width: float = 0.8) -> np.ndarray:
    """Smooth 0 -> 1 switch around `start` (logistic, `width` seconds)."""
    return 1.0 / (1.0 + np.exp(-(t - start) / (0.25 * width)))


def camera_gain(t: np.ndarray) -> np.ndarray:
    """Photographers raise flash/gain in late frames: x1 early, ~x1.9 at 10 min."""
    return 1.0 + 1.0 * rise(t, 40.0, 220.0)
