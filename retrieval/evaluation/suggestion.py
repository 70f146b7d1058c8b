"""How good the diagnosis suggestion is on held-out queries: accuracy, macro-F1, expected
calibration error (ECE: 15 equal-width bins of the top probability), the reliability table
and its diagram (`reliability_png`), coverage and accuracy when it answers.

Classification and calibration, not ranking (ranking metrics: `encoder.ranking`); the
suggestion itself (the vote, its fitted temperature) is `retrieval.models.suggestion`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15


def suggestion_metrics(
    probabilities: np.ndarray, truth: Sequence[str], classes: Sequence[str], abstain_below: float
) -> dict[str, Any]:
    """Accuracy, macro-F1, ECE, the reliability table, coverage and accuracy when answering."""
    p = np.asarray(probabilities, np.float64)
    classes = list(classes)
    truth = np.asarray(list(truth), dtype=object)
    pred = np.asarray(classes, dtype=object)[p.argmax(1)]
    conf = p.max(1)
    correct = pred == truth
    f1 = []
    for c in sorted(set(truth) | set(pred)):
        tp = np.sum((pred == c) & (truth == c))
        fp, fn = np.sum((pred == c) & (truth != c)), np.sum((pred != c) & (truth == c))
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    edges = np.linspace(0, 1, ECE_BINS + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, ECE_BINS - 1)
    bins, ece = [], 0.0
    for b in range(ECE_BINS):
        m = which == b
        if m.any():
            acc, mean_conf = float(correct[m].mean()), float(conf[m].mean())
            ece += m.mean() * abs(acc - mean_conf)
            bins.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "count": int(m.sum()),
                    "confidence": mean_conf,
                    "accuracy": acc,
                }
            )
    answered = conf >= abstain_below
    return {
        "queries": int(len(truth)),
        "accuracy": float(correct.mean()),
        "macro_f1": float(np.mean(f1)),
        "ece": float(ece),
        "abstain_below": abstain_below,
        "coverage": float(answered.mean()),
        "accuracy_answered": float(correct[answered].mean()) if answered.any() else float("nan"),
        "reliability": bins,
    }


def reliability_png(metrics: dict[str, Any], title: str = "diagnosis suggestion") -> bytes:
    """A reliability diagram (accuracy against confidence per bin, bar width = the bin) as PNG."""
    from PIL import Image, ImageDraw

    w, h, pad = 440, 470, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = pad, h - 80, w - 20, 44  # plot box: (x0, y0) bottom-left

    def xy(cx: float, cy: float) -> tuple[float, float]:
        return x0 + cx * (x1 - x0), y0 - cy * (y0 - y1)

    for b in metrics["reliability"]:
        d.rectangle(
            [xy(b["low"], b["accuracy"]), xy(b["high"], 0)],
            fill=(90, 140, 210),
            outline=(40, 70, 130),
        )
        d.line(
            [xy(b["low"], b["confidence"]), xy(b["high"], b["confidence"])],
            fill=(220, 80, 40),
            width=2,
        )
    d.line([xy(0, 0), xy(1, 1)], fill=(120, 120, 120), width=1)
    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for t in (0, 0.5, 1):
        d.text((xy(t, 0)[0] - 6, y0 + 6), f"{t:g}", fill="black")
        d.text((x0 - 24, xy(0, t)[1] - 6), f"{t:g}", fill="black")
    d.text((x0, y0 + 22), "confidence (top probability)", fill="black")
    d.text((6, y1 - 16), "accuracy", fill="black")
    d.text(
        (6, 6),
        f"{title}: accuracy {metrics['accuracy']:.3f}, ECE {metrics['ece']:.3f}, "
        f"n={metrics['queries']}",
        fill="black",
    )
    d.text((x0, y0 + 42), "bars: accuracy of the queries in each bin", fill=(40, 70, 130))
    d.text(
        (x0, y0 + 56),
        "lines: their mean confidence; diagonal: perfect calibration",
        fill=(220, 80, 40),
    )
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
