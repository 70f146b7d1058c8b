"""Retrieval metrics on held-out patients: paired CF↔FFA recall and mAP, CF→CF by diagnosis.

The gallery is the evaluated split itself (each test CF against every test FFA video,
and the reverse); the true pair is the one relevant item, so mAP is the mean
reciprocal rank of the pair. CF→CF precision@10 counts neighbours (the query itself
excluded) that share the query's diagnosis. For a run with a generator, CF→FFA is also
measured through synthesis (CF → synthesized FFA → FFA index) and fused (reciprocal-rank
fusion of direct and synthesis), on the same queries and gallery.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from encoder.embedder import embed_ffa_array

from .cohort import Cohort
from .embedding import QueryEncoder
from .engine import reciprocal_rank_fusion
from .generation import check_no_leak
from .training_data import load_paired

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)
PRECISION_AT = 10


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
    """Retrieval metrics for each named (run, embedder folder) on `split`.

    `synthesis_for` names the entry whose run's generator is used for the via-synthesis
    and fused rows (None: no such rows).
    """
    opened = Cohort.open(cohort)
    encoders = {name: QueryEncoder.open(run, folder) for name, (run, folder) in embedders.items()}
    sizes = {e.image_size for e in encoders.values()}
    if len(sizes) != 1:
        raise ValueError(f"embedders disagree on the image size: {sizes}")
    test = load_paired(opened, size=sizes.pop(), split=split, progress=progress)
    held_out = set(test.patient_ids)
    generators = {Path(run) for run, _ in embedders.values()}  # usually one run for all
    for folder in sorted(generators) + [enc.embedder_dir for enc in encoders.values()]:
        check_no_leak(folder, held_out, split)  # generator runs, then each embedder's heads
    diagnoses = [opened.case(c).diagnosis for c in test.case_ids]
    report: dict[str, Any] = {
        "split": split,
        "cohort": str(opened.root),
        "cases": len(test),
        "gallery": f"the {split} split ({len(test)} cases)",
        "backbones": {},
    }
    for name, enc in tqdm(encoders.items(), desc="retrieval", disable=not progress):
        cf = enc.embed_cf(list(test.cf))  # (N, D)
        ffa = embed_ffa_array(enc.embedder, test.ffa, test.times_s)  # (N, D)
        sim = cf @ ffa.T  # (N, N) CF queries × FFA gallery
        row = {
            "backbone": enc.embedder.config.backbone,
            "embedder": str(enc.embedder_dir),
            "encoder_id": enc.encoder_id,
            "cf2ffa": pair_metrics(pair_ranks(sim)),
            "ffa2cf": pair_metrics(pair_ranks(sim.T)),
            "cf2cf": precision_by_diagnosis(cf, diagnoses),
        }
        if name == synthesis_for:
            row["cf2ffa_via"] = via_synthesis(enc, test, cf, ffa, progress)
        report["backbones"][name] = row
    return report


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


def retrieval_table(report: dict[str, Any]) -> str:
    """The report's backbones as a text table."""
    cols = [("cf2ffa", m) for m in ("R@1", "R@5", "R@10", "mAP")]
    cols += [("ffa2cf", m) for m in ("R@1", "R@5", "R@10", "mAP")]
    head = "".join(f"{d.replace('2', '→')} {m:>5}".rjust(14) for d, m in cols)
    lines = [f"{'backbone':<22}{head}{'CF→CF P@10':>14}"]
    for name, row in report["backbones"].items():
        cells = "".join(f"{row[d][m]:>14.3f}" for d, m in cols)
        p = next(v for k, v in row["cf2cf"].items() if k.startswith("P@"))
        lines.append(f"{name:<22}{cells}{p:>14.3f}")
        for via, metrics in row.get("cf2ffa_via", {}).items():
            if isinstance(metrics, dict):
                cells = "".join(f"{metrics[m]:>14.3f}" for m in ("R@1", "R@5", "R@10", "mAP"))
                lines.append(f"  {name} CF→FFA {via:<10}"[:22].ljust(22) + cells)
    return "\n".join(lines)
