"""Diagnosis suggestion from similar cases: decision support, never a diagnosis.

The k most similar archive cases (clinical similarity) vote for their diagnoses, each
with weight exp((score - best score) / temperature); `smoothing` pseudo-votes are
spread over every known diagnosis, so a unanimous vote is never certainty:

    p(d) = (sum of weights of neighbours with diagnosis d + smoothing)
           / (sum of all weights + smoothing * number of diagnoses)

`fit_suggestion` chooses the temperature and smoothing that minimise the negative
log-likelihood of the true diagnoses of *validation* queries (searched against the
training cases only); test labels never reach it. A suggestion abstains when its
top probability is below `abstain_below`. How well it is calibrated on held-out
queries is measured by `retrieval.evaluation.suggestion`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .similarity import default_similarity

TEMPERATURES = tuple(float(t) for t in np.geomspace(1e-3, 1.0, 31))
SMOOTHINGS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class SuggestionModel:
    """How neighbours' diagnoses become probabilities (stored in the index manifest)."""

    classes: tuple[str, ...]  # every diagnosis the archive knows, sorted
    k: int = 10  # neighbours that vote
    temperature: float = 0.05  # of the score-weighted vote
    smoothing: float = 0.1  # pseudo-votes per diagnosis
    abstain_below: float = 0.5  # top probability under which the suggestion abstains
    calibrated: bool = False  # temperature and smoothing fitted on a validation split
    fitted_on: dict[str, Any] = field(default_factory=dict)  # split, queries, nll
    similarity: str = "clinical"  # the similarity the neighbours are searched by

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0 or self.smoothing < 0:
            raise ValueError(
                f"suggestion needs k >= 1, temperature > 0, smoothing >= 0, got "
                f"{self.k}, {self.temperature}, {self.smoothing}"
            )
        if not 0 <= self.abstain_below <= 1:
            raise ValueError(f"abstain_below must be in [0, 1], got {self.abstain_below}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SuggestionModel:
        return cls(**{**d, "classes": tuple(d["classes"])})


@dataclass(frozen=True)
class Suggestion:
    """The vote's outcome for one query."""

    diagnosis: str  # the most probable diagnosis (shown only as a suggestion)
    probability: float
    abstained: bool  # probability < the model's abstain_below
    probabilities: dict[str, float]  # every class, summing to 1
    supporting_case_ids: tuple[str, ...]  # neighbours that voted for `diagnosis`
    neighbours: int  # how many voted

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"supporting_case_ids": list(self.supporting_case_ids)}


def vote(
    scores: np.ndarray,  # (Q, k) similarity of each query's neighbours, best first
    labels: np.ndarray,  # (Q, k) their diagnoses (str)
    classes: Sequence[str],
    temperature: float,
    smoothing: float,
) -> np.ndarray:
    """→ (Q, C) probabilities over `classes`, each row summing to 1."""
    scores, labels = np.atleast_2d(np.asarray(scores, np.float64)), np.atleast_2d(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ")
    c = len(classes)
    weights = np.exp((scores - scores.max(axis=1, keepdims=True)) / temperature)  # (Q, k)
    onehot = labels[..., None] == np.asarray(classes, dtype=object)[None, None]  # (Q, k, C)
    votes = (weights[..., None] * onehot).sum(axis=1) + smoothing  # (Q, C)
    total = votes.sum(axis=1, keepdims=True)
    if c == 0 or np.any(total <= 0):
        raise ValueError("nothing to vote for: no neighbour has a known diagnosis")
    return votes / total


def suggest(
    model: SuggestionModel, scores: np.ndarray, labels: Sequence[str], case_ids: Sequence[str]
) -> Suggestion:
    """One query's neighbours (best first, each with a diagnosis) → its suggestion."""
    scores = np.asarray(scores, np.float64)[: model.k]
    labels = np.asarray(list(labels)[: model.k], dtype=object)
    p = vote(scores[None], labels[None], model.classes, model.temperature, model.smoothing)[0]
    best = int(np.argmax(p))
    diagnosis = model.classes[best]
    return Suggestion(
        diagnosis=diagnosis,
        probability=float(p[best]),
        abstained=bool(p[best] < model.abstain_below),
        probabilities={d: float(v) for d, v in zip(model.classes, p, strict=True)},
        supporting_case_ids=tuple(
            str(c) for c, d in zip(case_ids, labels, strict=False) if d == diagnosis
        ),
        neighbours=len(labels),
    )


def neighbours(
    query: np.ndarray,  # (Q, D) query vectors
    gallery: np.ndarray,  # (N, D) archive vectors
    gallery_labels: Sequence[str],
    k: int,
    exclude: np.ndarray | None = None,  # (Q, N) bool: pairs that may not vote (same patient)
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product → scores (Q, k), labels (Q, k)."""
    sim = np.asarray(query, np.float32) @ np.asarray(gallery, np.float32).T  # (Q, N)
    if exclude is not None:
        sim = np.where(exclude, -np.inf, sim)
    k = min(k, sim.shape[1])
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, top, 1), np.asarray(gallery_labels, dtype=object)[top]


def fit_suggestion(
    scores: np.ndarray,  # (Q, k) validation queries' neighbours among the training cases
    labels: np.ndarray,  # (Q, k)
    truth: Sequence[str],  # (Q,) the validation queries' diagnoses
    classes: Sequence[str],
    *,
    k: int,
    abstain_below: float = 0.5,
    split: str = "val",
) -> SuggestionModel:
    """Temperature and smoothing by minimum negative log-likelihood on a grid."""
    truth = np.asarray(list(truth), dtype=object)
    if len(truth) == 0:
        raise ValueError("calibration needs at least one labelled validation query")
    classes = tuple(sorted(classes))
    target = np.asarray([classes.index(t) if t in classes else -1 for t in truth])
    known = target >= 0  # a diagnosis the archive never saw cannot be suggested; skip it
    best: tuple[float, float, float] | None = None
    for temperature in TEMPERATURES:
        for smoothing in SMOOTHINGS:
            if smoothing == 0 and len(classes) > 1:
                continue  # zero smoothing gives log(0) for any miss
            p = vote(scores[known], labels[known], classes, temperature, smoothing)
            nll = float(-np.log(np.clip(p[np.arange(known.sum()), target[known]], 1e-12, 1)).mean())
            if best is None or nll < best[0]:
                best = (nll, temperature, smoothing)
    assert best is not None
    nll, temperature, smoothing = best
    return SuggestionModel(
        classes=classes,
        k=k,
        temperature=temperature,
        smoothing=smoothing,
        abstain_below=abstain_below,
        calibrated=True,
        fitted_on={"split": split, "queries": int(known.sum()), "nll": round(nll, 4)},
    )


def fit_for_archive(
    vectors: np.ndarray,  # (N, D) one modality's stored embeddings of an archive
    query_weights: np.ndarray,  # (D,) turns a stored vector into a clinical query
    splits: Sequence[str | None],
    diagnoses: Sequence[str | None],
    *,
    k: int = 10,
    abstain_below: float = 0.5,
) -> SuggestionModel | None:
    """The suggestion model of an index: validation cases' neighbours among the training
    cases fit the temperature and smoothing. Only rows of the train and val splits are
    read (never a test row's diagnosis). None when no train or val case has a diagnosis;
    uncalibrated defaults when one of the two splits has none."""
    splits = np.asarray([s or "" for s in splits], dtype=object)
    diag = np.asarray([d or "" for d in diagnoses], dtype=object)
    train, val = (splits == "train") & (diag != ""), (splits == "val") & (diag != "")
    classes = tuple(sorted(set(diag[train | val])))
    if not classes:
        return None
    if not train.any() or not val.any():
        return SuggestionModel(classes=classes, k=k, abstain_below=abstain_below)
    q = np.asarray(vectors)[val] * np.asarray(query_weights, np.float32)
    scores, labels = neighbours(q, np.asarray(vectors)[train], diag[train], k)
    return fit_suggestion(scores, labels, diag[val], classes, k=k, abstain_below=abstain_below)


def suggestion_models(encoder: Any, catalog: Any, vectors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per modality, the diagnosis-suggestion model fitted on the catalog's val split
    against its train split (`retrieval.models.suggestion.fit_for_archive`), as dicts."""
    kind = default_similarity(encoder.similarities)
    weights = encoder.similarity_weights(kind)
    out = {}
    for modality, vecs in vectors.items():
        model = fit_for_archive(
            vecs, weights, catalog["split"].to_list(), catalog["diagnosis"].to_list()
        )
        if model is not None:
            out[modality] = dataclasses.replace(model, similarity=kind).to_dict()
    return out
