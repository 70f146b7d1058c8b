"""Every ranking metric of the project, in one place (pure numpy: arrays in, numbers out).

- Paired retrieval (query i's one relevant item is gallery i): `pair_ranks` (from a
  similarity matrix) or `ranks_from_order` (from ranked index lists) give the rank of the
  true pair, ties counted against the query; `pair_metrics` turns ranks into R@k, mAP
  (the mean reciprocal rank: one relevant item) and the median rank; `recall_at_k`
  is R@k straight from query and gallery embeddings (the embedder's validation).
- Label retrieval (relevant = same diagnosis): `precision_by_diagnosis` (a set searched
  against itself, the query excluded) and `clinical_metrics` (queries against an archive
  that holds none of them: hit@k, P@k, mAP@R, lesion Jaccard, same eye side).

The recall of an approximate index against exact search is the index's own
(`index.neighbour_recall`). Generation metrics (PSNR, SSIM, FVD) live in
`encoder.metrics`; the diagnosis suggestion's calibration in
`retrieval.evaluation.suggestion`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RECALL_AT = (1, 5, 10)
PRECISION_AT = 10
HIT_AT = 5


def _array(x: Any) -> np.ndarray:
    """A numpy float32 array from an array or a (CPU or GPU, grad or not) torch tensor."""
    if hasattr(x, "detach"):  # torch, without importing it
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


def pair_ranks(similarity: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of the true pair, query i ↔ gallery i, in a (N, N) similarity matrix.

    Ties count against the query (the pair ranks after every item scoring the same).
    """
    similarity = np.asarray(similarity)
    true = np.diag(similarity)[:, None]  # (N, 1)
    return (similarity >= true).sum(axis=1)  # the pair itself counts once


def ranks_from_order(order: np.ndarray) -> np.ndarray:
    """Rank of item i in row i of a (N, N) ranked index list (each row a permutation)."""
    order = np.asarray(order)
    return np.argmax(order == np.arange(len(order))[:, None], axis=1) + 1


def pair_metrics(ranks: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """R@k for each k, mAP (mean reciprocal rank) and the median rank of the true pairs."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["mAP"] = float(np.mean(1.0 / ranks))
    out["median_rank"] = float(np.median(ranks))
    return out


def recall_at_k(queries: Any, gallery: Any, ks: Sequence[int] = RECALL_AT) -> dict[int, float]:
    """Paired retrieval by inner product (cosine on unit vectors): query i's true hit is
    gallery i; ties count against the query. → {k: fraction of queries whose hit is in
    the top k}. Takes numpy arrays or torch tensors."""
    ranks = pair_ranks(_array(queries) @ _array(gallery).T)
    return {k: float(np.mean(ranks <= k)) for k in ks}


def precision_by_diagnosis(
    embeddings: np.ndarray, diagnoses: list[str], k: int = PRECISION_AT
) -> dict[str, Any]:
    """CF→CF precision@k (query excluded) overall and per diagnosis."""
    sim = embeddings @ embeddings.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(diagnoses) - 1)
    labels = np.asarray(diagnoses)
    if k < 1:  # a single case has no neighbours
        return {f"P@{k}": float("nan"), "by_diagnosis": {d: float("nan") for d in set(labels)}}
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # (N, k)
    hits = (labels[top] == labels[:, None]).mean(axis=1)  # (N,)
    per = {d: float(hits[labels == d].mean()) for d in sorted(set(diagnoses))}
    return {f"P@{k}": float(hits.mean()), "by_diagnosis": per}


def lesion_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard of lesion sets, rows of two boolean (n, L) / (m, L) matrices → (n, m);
    two empty sets → 1."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def clinical_metrics(
    similarity: np.ndarray,  # (Q, N) queries × archive
    query: dict[str, np.ndarray],  # diagnosis (Q,), lesions bool (Q, L), eye (Q,)
    archive: dict[str, np.ndarray],  # the same for the archive (N, ...)
    k: int = PRECISION_AT,
    hit_at: int = HIT_AT,
) -> dict[str, Any]:
    """Same-diagnosis hit@5, P@10, mAP@R, lesion Jaccard@10, same eye side@10, P@10 by
    diagnosis, for queries against an archive that holds none of them."""
    order = np.argsort(-similarity, axis=1, kind="stable")  # (Q, N)
    rel = archive["diagnosis"][order] == query["diagnosis"][:, None]  # (Q, N)
    top = order[:, :k]
    precision = rel[:, :k].mean(1)
    r = rel.sum(1)  # (Q,) archive cases of the query's diagnosis
    ap = np.zeros(len(order))
    for i in np.nonzero(r)[0]:
        hits = rel[i, : r[i]]
        ap[i] = float((np.cumsum(hits) / np.arange(1, r[i] + 1))[hits].sum() / r[i])
    jac = lesion_jaccard(query["lesions"], archive["lesions"])  # (Q, N)
    eye = archive["eye"][top] == query["eye"][:, None]
    labels = query["diagnosis"]
    return {
        f"hit@{hit_at}": float(rel[:, :hit_at].any(1).mean()),
        f"P@{k}": float(precision.mean()),
        "mAP@R": float(ap.mean()),
        f"lesion_jaccard@{k}": float(np.take_along_axis(jac, top, 1).mean()),
        f"same_eye@{k}": float(eye.mean()),
        "by_diagnosis": {d: float(precision[labels == d].mean()) for d in sorted(set(labels))},
    }
