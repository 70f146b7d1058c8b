"""Retrieval metrics on held-out patients: the true pair, similar disease, the suggestion.

Pair metrics: the gallery is the evaluated split itself (each test CF against every
test FFA video, and the reverse); the true pair is the one relevant item, so mAP is the
mean reciprocal rank of the pair. For a run with a generator, CF→FFA is also measured
through synthesis (CF → synthesized FFA → FFA index) and fused (reciprocal-rank fusion
of direct and synthesis), on the same queries and gallery.

Clinical metrics, as a clinic searches: the held-out split's cases are the queries and
the archive (every other split: train + val, both modalities) is the gallery. For
CF→CF, CF→FFA, FFA→FFA and FFA→CF: same-diagnosis hit@5 (a top-5 case shares the
query's diagnosis), precision@10, mAP@R (R = the archive's cases of the query's
diagnosis), the mean lesion-set Jaccard of the top 10 (two lesion-free cases: 1), the
share of the top 10 with the query's eye side (chance ~0.5), and precision@10 per
diagnosis. Each similarity the embedder supports (combined / pair / clinical) is
measured. The diagnosis suggestion is fitted on val queries against the train cases
(`retrieval.search.suggestion.fit_for_archive`) and scored on the held-out queries against the
whole archive.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from encoder.embedder import embed_ffa_array
from retrieval.data.cohort import Cohort
from retrieval.data.training_data import load_paired
from retrieval.models.embedding import QueryEncoder
from retrieval.models.generation import check_no_leak
from retrieval.search.engine import reciprocal_rank_fusion
from retrieval.search.queries import default_similarity
from retrieval.search.suggestion import (
    fit_for_archive,
    neighbours,
    reliability_png,
    suggestion_metrics,
    vote,
)

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)
PRECISION_AT = 10
HIT_AT = 5
DIRECTIONS = ("cf2cf", "cf2ffa", "ffa2ffa", "ffa2cf")


def pair_ranks(similarity: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of the true pair, query i ↔ gallery i, in a (N, N) similarity matrix.

    Ties count against the query (the pair ranks after every item scoring the same).
    """
    true = np.diag(similarity)[:, None]  # (N, 1)
    others = similarity >= true
    return others.sum(axis=1)  # the pair itself counts once


def ranks_from_order(order: np.ndarray) -> np.ndarray:
    """Rank of item i in row i of a (N, N) ranked index list (each row a permutation)."""
    return np.argmax(order == np.arange(len(order))[:, None], axis=1) + 1


def pair_metrics(ranks: np.ndarray) -> dict[str, float]:
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in RECALL_AT}
    out["mAP"] = float(np.mean(1.0 / ranks))
    out["median_rank"] = float(np.median(ranks))
    return out


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


def fuse_orders(orders: list[np.ndarray]) -> np.ndarray:
    """Row-wise reciprocal-rank fusion of (N, M) ranked gallery indices → fused (N, M)."""
    return np.asarray(
        [[i for i, _ in reciprocal_rank_fusion(rows)] for rows in zip(*orders, strict=True)]
    )


def evaluate_retrieval(
    embedders: Mapping[str, tuple[str | Path, str | Path | None]],
    cohort: str | Path,
    *,
    split: str = "test",
    synthesis_for: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pair and clinical retrieval metrics and the diagnosis suggestion for each named
    (run, embedder folder), queries from `split` (see the module docstring).

    `synthesis_for` names the entry whose run's generator is used for the via-synthesis
    and fused rows (None: no such rows).
    """
    opened = Cohort.open(cohort)
    encoders = {name: QueryEncoder.open(run, folder) for name, (run, folder) in embedders.items()}
    sizes = {e.image_size for e in encoders.values()}
    if len(sizes) != 1:
        raise ValueError(f"embedders disagree on the image size: {sizes}")
    everything = load_paired(opened, size=sizes.pop(), progress=progress)  # every split
    cases = [opened.case(c) for c in everything.case_ids]
    splits = np.asarray([c.split for c in cases], dtype=object)
    if not (splits == split).any():
        raise ValueError(f"{opened.root}: no cases in split {split!r}")
    test, archive = np.nonzero(splits == split)[0], np.nonzero(splits != split)[0]
    held_out = {everything.patient_ids[i] for i in test}
    generators = {Path(run) for run, _ in embedders.values()}  # usually one run for all
    for folder in sorted(generators) + [enc.embedder_dir for enc in encoders.values()]:
        check_no_leak(folder, held_out, split)  # generator runs, then each embedder's heads
    labels = label_arrays(cases)
    report: dict[str, Any] = {
        "split": split,
        "cohort": str(opened.root),
        "cases": int(len(test)),
        "gallery": f"the {split} split ({len(test)} cases)",
        "archive": {"splits": sorted(set(splits[archive])), "cases": int(len(archive))},
        "backbones": {},
    }
    for name, enc in tqdm(encoders.items(), desc="retrieval", disable=not progress):
        vectors = {
            "cf": enc.embed_cf(list(everything.cf)),  # (N, D)
            "ffa": embed_ffa_array(enc.embedder, everything.ffa, everything.times_s),
        }
        row = {
            "backbone": enc.embedder.config.backbone,
            "embedder": str(enc.embedder_dir),
            "encoder_id": enc.encoder_id,
            "similarities": list(enc.similarities),
            **_pair_rows(enc, vectors, test),
            "clinical": _clinical_rows(enc, vectors, labels, test, archive),
            "suggestion": _suggestion_rows(enc, vectors, labels, splits, test, archive),
        }
        same = default_similarity(enc.similarities)
        row["cf2cf"] = row["clinical"][same]["cf2cf"]  # the default CF→CF search
        if name == synthesis_for:
            cross = enc.similarity_weights("pair")  # finding the photo's own angiogram
            cf, ffa = vectors["cf"][test], vectors["ffa"][test]
            row["cf2ffa_via"] = via_synthesis(
                enc, everything.subset(test), cf * cross, ffa, progress
            )
        report["backbones"][name] = row
    return report


def label_arrays(cases: list[Any]) -> dict[str, np.ndarray]:
    """Diagnosis, lesion sets (bool matrix over every lesion name) and eye side per case."""
    names = sorted({x for c in cases for x in c.lesions})
    lesions = np.zeros((len(cases), max(len(names), 1)), bool)
    for i, c in enumerate(cases):
        for x in c.lesions:
            lesions[i, names.index(x)] = True
    return {
        "diagnosis": np.asarray([c.diagnosis or "" for c in cases], dtype=object),
        "lesions": lesions,
        "eye": np.asarray([c.eye or "" for c in cases], dtype=object),
    }


def _pair_rows(enc: QueryEncoder, vectors: dict[str, np.ndarray], test: np.ndarray):
    """CF↔FFA pair metrics inside the held-out split, per similarity; the top-level
    cf2ffa / ffa2cf are the pair similarity's (the one that looks for the true pair)."""
    cf, ffa = vectors["cf"][test], vectors["ffa"][test]
    per = {}
    for kind in enc.similarities:
        w = enc.similarity_weights(kind)
        per[kind] = {
            "cf2ffa": pair_metrics(pair_ranks((cf * w) @ ffa.T)),
            "ffa2cf": pair_metrics(pair_ranks((ffa * w) @ cf.T)),
        }
    return {"pair": per, **per["pair"]}


def _clinical_rows(enc, vectors, labels, test, archive) -> dict[str, Any]:
    """Per similarity, per direction: held-out queries against the archive."""
    q = {k: v[test] for k, v in labels.items()}
    a = {k: v[archive] for k, v in labels.items()}
    out: dict[str, Any] = {}
    for kind in enc.similarities:
        w = enc.similarity_weights(kind)
        out[kind] = {}
        for direction in DIRECTIONS:
            src, dst = direction.split("2")
            sim = (vectors[src][test] * w) @ vectors[dst][archive].T
            out[kind][direction] = clinical_metrics(sim, q, a)
    return out


def _suggestion_rows(enc, vectors, labels, splits, test, archive) -> dict[str, Any]:
    """Per query modality: the suggestion fitted on val (against train), scored on the
    held-out queries against the whole archive."""
    kind = default_similarity(enc.similarities)
    w = enc.similarity_weights(kind)
    diag = labels["diagnosis"]
    out: dict[str, Any] = {}
    for modality in ("cf", "ffa"):
        x = vectors[modality]
        model = fit_for_archive(x[archive], w, list(splits[archive]), list(diag[archive]))
        known = test[diag[test] != ""]
        if model is None or not len(known):
            continue
        voters = archive[diag[archive] != ""]
        scores, votes = neighbours(x[known] * w, x[voters], diag[voters], model.k)
        p = vote(scores, votes, model.classes, model.temperature, model.smoothing)
        out[modality] = suggestion_metrics(p, diag[known], model.classes, model.abstain_below)
        out[modality]["model"] = dataclasses.replace(model, similarity=kind).to_dict()
    return out


def via_synthesis(
    enc: QueryEncoder, test: Any, cf: np.ndarray, ffa: np.ndarray, progress: bool
) -> dict[str, Any]:
    """CF→FFA direct vs through the synthesized video vs fused, on the same queries."""
    synth = np.stack(
        [
            enc.synthesize_unmarked(im, t)[0]
            for im, t in tqdm(
                zip(test.cf, test.times_s, strict=True),
                total=len(test),
                desc="synthesize",
                disable=not progress,
            )
        ]
    )  # (N, T, S, S) at the cases' own frame times
    synth_emb = embed_ffa_array(enc.embedder, synth, test.times_s)
    direct = np.argsort(-(cf @ ffa.T), axis=1, kind="stable")
    synthesis = np.argsort(-(synth_emb @ ffa.T), axis=1, kind="stable")
    fused = fuse_orders([direct, synthesis])
    rows = {
        "direct": pair_metrics(ranks_from_order(direct)),
        "synthesis": pair_metrics(ranks_from_order(synthesis)),
        "fused": pair_metrics(ranks_from_order(fused)),
    }
    best = max(rows, key=lambda v: (rows[v]["mAP"], v == "direct"))
    return {**rows, "best_by_mAP": best}


def write_reliability(report: dict[str, Any], report_path: str | Path) -> str | None:
    """Draw the CF-query suggestion's reliability diagram of the first backbone that has
    one (the run's own embedder first) beside the report, as `<report>.reliability.png`;
    → its file name (also stored as report["reliability_png"]), or None."""
    from index.atomic import atomic_write_bytes

    rows = report.get("retrieval", {}).get("backbones", {})
    for name in sorted(rows, key=lambda n: n != "model"):
        metrics = rows[name].get("suggestion", {}).get("cf")
        if metrics:
            path = Path(report_path)
            png = path.with_name(f"{path.stem}.reliability.png")
            atomic_write_bytes(png, reliability_png(metrics, f"{name}, CF queries"))
            report["reliability_png"] = png.name
            return png.name
    return None


def retrieval_table(report: dict[str, Any]) -> str:
    """The report's backbones as text tables: pair metrics, clinical metrics per
    similarity, the diagnosis suggestion."""
    cols = [("cf2ffa", m) for m in ("R@1", "R@5", "R@10", "mAP")]
    cols += [("ffa2cf", m) for m in ("R@1", "R@5", "R@10", "mAP")]
    head = "".join(f"{d.replace('2', '→')} {m:>5}".rjust(14) for d, m in cols)
    lines = [f"pair (inside the {report['split']} split)", f"{'backbone':<22}{head}"]
    for name, row in report["backbones"].items():
        for kind, per in row.get("pair", {"pair": row}).items():
            cells = "".join(f"{per[d][m]:>14.3f}" for d, m in cols)
            lines.append(f"{f'{name} {kind}':<22}{cells}")
        for via, metrics in row.get("cf2ffa_via", {}).items():
            if isinstance(metrics, dict):
                cells = "".join(f"{metrics[m]:>14.3f}" for m in ("R@1", "R@5", "R@10", "mAP"))
                lines.append(f"  {name} CF→FFA {via:<10}"[:22].ljust(22) + cells)
    archive = report.get("archive", {})
    where = f"{'+'.join(archive.get('splits', []))}, {archive.get('cases')} cases"
    lines += ["", f"clinical ({report['split']} queries against the archive: {where})"]
    metrics = ("hit@5", "P@10", "mAP@R", "lesion_jaccard@10", "same_eye@10")
    head = "".join(f"{m.replace('lesion_jaccard', 'jacc'):>12}" for m in metrics)
    lines.append(f"{'backbone':<16}{'similarity':<11}{'query':<9}{head}")
    for name, row in report["backbones"].items():
        for kind, per in row.get("clinical", {}).items():
            for direction, m in per.items():
                cells = "".join(f"{m[x]:>12.3f}" for x in metrics)
                lines.append(f"{name:<16}{kind:<11}{direction.replace('2', '→'):<9}{cells}")
    lines += ["", "diagnosis suggestion (fitted on val, scored on the held-out queries)"]
    cols_s = ("accuracy", "macro_f1", "ece", "coverage", "accuracy_answered")
    lines.append(f"{'backbone':<16}{'query':<7}" + "".join(f"{c:>19}" for c in cols_s))
    for name, row in report["backbones"].items():
        for modality, m in row.get("suggestion", {}).items():
            lines.append(f"{name:<16}{modality:<7}" + "".join(f"{m[c]:>19.3f}" for c in cols_s))
    return "\n".join(lines)
