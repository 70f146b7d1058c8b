"""What the dashboard shows about the model and the index: a 2-D map of the embeddings,
the training curves of a run, the latest evaluation report."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_CURVE_POINTS = 400
REPORT_PATTERNS = ("report*.json", "*eval*.json")


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def project_2d(
    vectors: np.ndarray, method: str = "auto", seed: int = 0
) -> tuple[np.ndarray, str, list[float] | None]:
    """(n, D) → (n, 2), the method used (pca | umap), PCA's explained variance ratios.

    `auto` is UMAP when umap-learn is installed (and n is large enough), else PCA.
    PCA signs are fixed (largest loading positive), so the map is reproducible.
    """
    x = np.asarray(vectors, np.float64)
    n = len(x)
    if method not in ("auto", "pca", "umap"):
        raise ValueError(f"method must be auto, pca or umap, got {method!r}")
    if method == "umap" or (method == "auto" and umap_available() and n >= 16):
        import umap

        reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1))
        return reducer.fit_transform(x).astype(np.float32), "umap", None
    if n == 0:
        return np.zeros((0, 2), np.float32), "pca", [0.0, 0.0]
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], x.shape[1]))])
    signs = np.sign(comps[np.arange(2), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1, signs)[:, None]
    var = s**2
    ratio = (var[:2] / var.sum()).tolist() if var.sum() > 0 else [0.0, 0.0]
    ratio += [0.0] * (2 - len(ratio))
    return (centred @ comps.T).astype(np.float32), "pca", [float(r) for r in ratio]


def read_curves(path: str | Path, max_points: int = MAX_CURVE_POINTS) -> dict[str, Any] | None:
    """A `stats.jsonl` as {iters, series} (numeric columns, evenly thinned); None if absent."""
    path = Path(path)
    if not path.is_file():
        return None
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if isinstance(row, dict):
                rows.append(row)
    if not rows:
        return None
    if len(rows) > max_points:
        keep = np.unique(np.linspace(0, len(rows) - 1, max_points).round().astype(int))
        rows = [rows[i] for i in keep]
    iter_key = next((k for k in ("Progress/iter", "iter", "step") if k in rows[-1]), None)
    iters = [int(r.get(iter_key, i)) if iter_key else i for i, r in enumerate(rows)]
    names = sorted({k for r in rows for k, v in r.items() if _number(v) and k != iter_key})
    series = {
        name: [float(r[name]) if _number(r.get(name)) else None for r in rows] for name in names
    }
    return {"iters": iters, "series": series}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def find_report(*places: str | Path | None) -> Path | None:
    """The given report file, or the newest report-like JSON in the given folders."""
    found: list[Path] = []
    for place in places:
        if place is None:
            continue
        place = Path(place)
        if place.is_file():
            return place
        if place.is_dir():
            found += [p for pat in REPORT_PATTERNS for p in place.glob(pat) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("%s: unreadable JSON (%s)", path, err)
        return None
    return data if isinstance(data, dict) else None
