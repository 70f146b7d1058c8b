"""Relevance feedback: "more like these, not like those".

A search may carry `positive` and `negative` examples: case ids of the index (each
stands for its stored vectors in every modality, CF photo and FFA video: one shared
space, and the angiogram shows the disease too) or raw vectors (unweighted, as stored).
Two strategies move the query:

- `rocchio`: q' = α·q + β·mean(positives) − γ·mean(negatives), taken in the search's
  similarity space (the stored vectors times that similarity's query factors) and
  normalised there, so a hit's score stays the cosine to the moved query;
- `best_score` (the strategy of Qdrant's recommend API): the query counts as one more
  positive; candidates are the union of FAISS searches from every positive; each is
  scored by its best similarity to a positive `p` and to a negative `n`: sigmoid(p) in
  (0, 1) when p > n, else −sigmoid(n) in (−1, 0) (sigmoid(x) = (x / (1 + |x|) + 1) / 2).

`DEFAULT_FEEDBACK` is the one that measured better on held-out phantom queries
(`benchmarks/feedback_bench.py`: one round of a simulated clinician; see the README).
Example cases are left out of the results. Pure numpy plus the two callables the engine
passes (`search`, `vectors`); the engine resolves case ids under its read lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import QueryError, UnknownCase

from .queries import MODALITIES

FEEDBACK_STRATEGIES = ("rocchio", "best_score")
DEFAULT_FEEDBACK = "rocchio"
# Rocchio's weights, tuned on the phantom cohort's val queries against its train cases
# (CF→CF, clinical similarity: benchmarks/feedback_bench.py)
ROCCHIO_ALPHA, ROCCHIO_BETA, ROCCHIO_GAMMA = 1.0, 2.0, 1.0
FEEDBACK_DEPTH = 50  # best_score: neighbours fetched per positive (at least k + examples)
MAX_EXAMPLES = 100  # per list

Example = str | np.ndarray
Ranked = list[tuple[float, int, str]]  # (score, row id, modality), best first


class UnknownExample(UnknownCase):
    """A feedback example naming a case the index does not hold (a 404, like any)."""

    def __init__(self, param: str, case_id: str):
        super().__init__(case_id)
        self.param = param
        self.args = (f"{param}: unknown case_id {case_id!r}: no such case in the index",)


@dataclass(frozen=True)
class FeedbackSpec:
    """Checked examples (ids or (D,) vectors) before they are resolved against an index."""

    positive: tuple[Example, ...]
    negative: tuple[Example, ...]
    strategy: str = DEFAULT_FEEDBACK
    alpha: float = ROCCHIO_ALPHA
    beta: float = ROCCHIO_BETA
    gamma: float = ROCCHIO_GAMMA

    def case_ids(self, which: str) -> list[str]:
        return [e for e in getattr(self, which) if isinstance(e, str)]


@dataclass(frozen=True)
class Feedback:
    """Resolved examples: raw vectors (n, D) and the rows to leave out of the results."""

    spec: FeedbackSpec
    positive: np.ndarray
    negative: np.ndarray
    exclude: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Rocchio:
    """The Rocchio strategy with its own weights (Python API: `feedback=Rocchio(...)`)."""

    alpha: float = ROCCHIO_ALPHA
    beta: float = ROCCHIO_BETA
    gamma: float = ROCCHIO_GAMMA

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not np.isfinite(value) or value < 0:
                raise QueryError(f"feedback: Rocchio {name} must be finite and >= 0, got {value!r}")


def check_feedback(
    positive: Sequence[Example] | Example | None,
    negative: Sequence[Example] | Example | None,
    strategy: str | Rocchio | None = None,
    dim: int | None = None,
) -> FeedbackSpec | None:
    """The checked examples (None: none given). QueryError names the bad parameter: an
    unknown strategy, a malformed example, or a case id in both lists."""
    strategy = DEFAULT_FEEDBACK if strategy is None else strategy
    weights = strategy if isinstance(strategy, Rocchio) else Rocchio()
    strategy = "rocchio" if isinstance(strategy, Rocchio) else strategy
    if strategy not in FEEDBACK_STRATEGIES:
        raise QueryError(
            f"feedback must be one of {', '.join(FEEDBACK_STRATEGIES)}, got {strategy!r}"
        )
    pos = _examples("positive", positive, dim)
    neg = _examples("negative", negative, dim)
    both = sorted({e for e in pos if isinstance(e, str)} & {e for e in neg if isinstance(e, str)})
    if both:
        raise QueryError(f"positive, negative: case {both[0]!r} is in both lists")
    if not pos and not neg:
        return None
    return FeedbackSpec(pos, neg, strategy, weights.alpha, weights.beta, weights.gamma)


def _examples(name: str, value: Sequence[Example] | Example | None, dim: int | None) -> tuple:
    """One list of examples: ids (str) and (D,) float32 vectors; a (n, D) array is n of them."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str | np.ndarray) else list(value)
    out: list[Example] = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            if not item:
                raise QueryError(f"{name}: a case id is empty")
            if item not in seen:
                seen.add(item)
                out.append(item)
            continue
        vecs = np.asarray(item, np.float32)
        vecs = vecs[None] if vecs.ndim == 1 else vecs
        bad = vecs.ndim != 2 or (dim is not None and vecs.shape[1] != dim)
        if bad or not np.all(np.isfinite(vecs)):
            raise QueryError(
                f"{name}: a vector example must be finite with {dim or 'D'} values, "
                f"got shape {np.shape(item)}"
            )
        out += list(vecs)
    if len(out) > MAX_EXAMPLES:
        raise QueryError(f"{name}: at most {MAX_EXAMPLES} examples, got {len(out)}")
    return tuple(out)


def resolve(
    spec: FeedbackSpec,
    rows: Callable[[str, str], int],
    vectors: Callable[[Sequence[int]], np.ndarray],
    dim: int,
) -> Feedback:
    """Ids → row ids (`rows(param, case_id)`, raising for an unknown one) → stored vectors
    (`vectors(row ids)`: (n·m, D), m vectors per row, m the searched modalities)."""
    parts, exclude = {}, set()
    for name in ("positive", "negative"):
        examples = getattr(spec, name)
        ids = [rows(name, e) for e in examples if isinstance(e, str)]
        raw = [e[None] for e in examples if not isinstance(e, str)]
        exclude.update(ids)
        found = [vectors(ids)] if ids else []
        parts[name] = np.concatenate([*found, *raw]) if found or raw else np.zeros((0, dim))
    pos, neg = (np.asarray(parts[n], np.float32) for n in ("positive", "negative"))
    return Feedback(spec, pos, neg, frozenset(exclude))


# --------------------------------------------------------------------------- the math


def sim_norm(weighted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Norms (n,) in the similarity space of query vectors `weighted` (= raw · weights):
    sqrt(Σ weighted² / weights) over the entries the similarity uses."""
    used = weights > 0
    return np.sqrt((weighted[:, used] ** 2 / weights[used]).sum(axis=1))


def rocchio(
    query: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
    weights: np.ndarray,
    alpha: float = ROCCHIO_ALPHA,
    beta: float = ROCCHIO_BETA,
    gamma: float = ROCCHIO_GAMMA,
) -> np.ndarray:
    """The moved query vector (1, D), weighted like `query` (raw · weights) and of unit
    norm in the similarity space; positives and negatives are raw (n, D)."""
    moved = alpha * np.asarray(query, np.float32).reshape(1, -1)
    if len(positive):
        moved = moved + beta * positive.mean(axis=0, keepdims=True) * weights
    if len(negative):
        moved = moved - gamma * negative.mean(axis=0, keepdims=True) * weights
    norm = float(sim_norm(moved, weights)[0])
    if not np.isfinite(norm) or norm < 1e-12:
        raise QueryError("positive, negative: the examples cancel the query out (nothing left)")
    return (moved / norm).astype(np.float32)


def squash(x: np.ndarray) -> np.ndarray:
    """Qdrant's scaled fast sigmoid: (x / (1 + |x|) + 1) / 2, increasing, in (0, 1)."""
    return (x / (1 + np.abs(x)) + 1) / 2


def best_scores(candidates: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Best-score (n,) of raw candidate vectors against weighted example vectors: squash of
    the best positive similarity when it beats every negative, else minus squash of the
    best negative similarity."""
    best_pos = (candidates @ positive.T).max(axis=1) if len(positive) else None
    if best_pos is None:
        best_pos = np.full(len(candidates), -np.inf, np.float32)
    if not len(negative):
        return squash(best_pos)
    best_neg = (candidates @ negative.T).max(axis=1)
    return np.where(best_pos > best_neg, squash(best_pos), -squash(best_neg))


# --------------------------------------------------------------------------- ranking


def feedback_rank(
    fb: Feedback,
    query: np.ndarray,
    weights: np.ndarray,
    k: int,
    search: Callable[[np.ndarray, int], Ranked],
    vectors: Callable[[str, Sequence[int]], np.ndarray],
    exclude: int | None = None,
) -> Ranked:
    """The top `k` (score, row, modality) for the weighted query vector `query` (1, D)
    refined by `fb`. `search(weighted vector, n)` is the engine's ranking (filters
    applied, nothing excluded); `vectors(modality, rows)` its stored vectors."""
    left_out = set(fb.exclude) | ({exclude} if exclude is not None else set())
    fetch = k + len(MODALITIES) * len(left_out)  # (target both: a row once per modality)
    if fb.spec.strategy == "rocchio":
        spec = fb.spec
        moved = rocchio(query, fb.positive, fb.negative, weights, spec.alpha, spec.beta, spec.gamma)
        return [h for h in search(moved, fetch) if h[1] not in left_out][:k]
    positive = np.concatenate([query, fb.positive * weights]).astype(np.float32)
    negative = (fb.negative * weights).astype(np.float32)
    found: dict[tuple[int, str], None] = {}
    for example in positive:
        for _, row, modality in search(example[None], max(fetch, FEEDBACK_DEPTH)):
            if row not in left_out:
                found.setdefault((row, modality), None)
    return _rescore(list(found), positive, negative, vectors, k)


def _rescore(found, positive, negative, vectors, k: int) -> Ranked:
    """The `found` (row, modality) pairs best-scored, best first (ties: row order)."""
    ranked: Ranked = []
    for modality in dict.fromkeys(m for _, m in found):
        rows = [r for r, m in found if m == modality]
        scores = best_scores(vectors(modality, rows), positive, negative)
        ranked += [(float(s), r, modality) for s, r in zip(scores, rows, strict=True)]
    ranked.sort(key=lambda h: (-h[0], h[1]))
    return ranked[:k]


def feedback_info(fb: FeedbackSpec | Feedback | None) -> dict:
    """What the search reports of its feedback (empty: none): the ids and the strategy."""
    spec = fb.spec if isinstance(fb, Feedback) else fb
    if spec is None:
        return {}
    return {
        "positive": spec.case_ids("positive"),
        "negative": spec.case_ids("negative"),
        "feedback": spec.strategy,
    }


def score_kind(fb: Feedback | None) -> str:
    """A direct search's `score_kind`: best_score when that strategy ranked it, else cosine."""
    return "best_score" if fb is not None and fb.spec.strategy == "best_score" else "cosine"
