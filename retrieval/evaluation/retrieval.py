"""Retrieval metrics on held-out patients: the true pair, similar disease, the suggestion.

Pair metrics: the gallery is the evaluated split itself (each test CF against every
test FFA video, and the reverse); the true pair is the one relevant item, so mAP is the
mean reciprocal rank of the pair. For a run with a generator, CF→FFA is also measured
through synthesis (CF → synthesized FFA → FFA index) and fused (reciprocal-rank fusion
of direct and synthesis), on the same queries and gallery. "pair+vessels" is the pair
similarity as a pair search serves it: its `CHECK_DEPTH` (40) best re-ranked by the vessel check
(`retrieval.data.vessel_check`, the stored photos' and videos' vessel prints).

Clinical metrics, as a clinic searches: the held-out split's cases are the queries and
the archive (every other split: train + val, both modalities) is the gallery. For
CF→CF, CF→FFA, FFA→FFA and FFA→CF: same-diagnosis hit@5 (a top-5 case shares the
query's diagnosis), precision@10, mAP@R (R = the archive's cases of the query's
diagnosis), the mean lesion-set Jaccard of the top 10 (two lesion-free cases: 1), the
share of the top 10 with the query's eye side (chance ~0.5), and precision@10 per
diagnosis. Each similarity the embedder supports (combined / pair / clinical) is
measured. The diagnosis suggestion is fitted on val queries against the train cases
(`retrieval.models.suggestion.fit_for_archive`) and scored on the held-out queries against the
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
from encoder.ranking import clinical_metrics, pair_metrics, pair_ranks, ranks_from_order
from retrieval.data.cohort import Cohort
from retrieval.data.training_data import load_paired
from retrieval.data.vessel_check import VesselPrint, checked_scores, top_agreements
from retrieval.errors import Fundus2VideoError
from retrieval.evaluation.held_out import check_no_leak, check_split
from retrieval.evaluation.suggestion import reliability_png, suggestion_metrics
from retrieval.models.embedding import QueryEncoder
from retrieval.models.similarity import default_similarity
from retrieval.models.suggestion import fit_for_archive, neighbours, vote
from retrieval.search.queries import reciprocal_rank_fusion
from retrieval.search.vessels import case_print

log = logging.getLogger(__name__)

DIRECTIONS = ("cf2cf", "cf2ffa", "ffa2ffa", "ffa2cf")


def fuse_orders(orders: list[np.ndarray]) -> np.ndarray:
    """Row-wise reciprocal-rank fusion of (N, M) ranked gallery indices → fused (N, M).

    A ranker, not a metric: it is the served search's own fusion
    (`retrieval.search.queries.reciprocal_rank_fusion`), so the fused rows measure what
    `--via fused` returns."""
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
        raise Fundus2VideoError(f"the embedders disagree on the image size: {sizes}")
    check_split(opened, split)
    everything = load_paired(opened, size=sizes.pop(), progress=progress)  # every split
    cases = [opened.case(c) for c in everything.case_ids]
    splits = np.asarray([c.split for c in cases], dtype=object)
    test, archive = np.nonzero(splits == split)[0], np.nonzero(splits != split)[0]
    held_out = {everything.patient_ids[i] for i in test}
    generators = {Path(run) for run, _ in embedders.values()}  # usually one run for all
    for folder in sorted(generators) + [enc.embedder_dir for enc in encoders.values()]:
        check_no_leak(folder, held_out, split)  # generator runs, then each embedder's heads
    labels = label_arrays(cases)
    prints = held_out_prints([cases[i] for i in test], progress)
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
            "precision": enc.precision,  # of the backbone pass (as `index` would build it)
            "similarities": list(enc.similarities),
            **_pair_rows(enc, vectors, test, prints),
            "clinical": _clinical_rows(enc, vectors, labels, test, archive),
            "suggestion": _suggestion_rows(enc, vectors, labels, splits, test, archive),
        }
        row["cf2cf"] = row["clinical"][default_similarity(enc.similarities)]["cf2cf"]
        if name == synthesis_for:  # the pair similarity: finding the photo's own angiogram
            cf = vectors["cf"][test] * enc.similarity_weights("pair")
            synth = everything.subset(test)
            row["cf2ffa_via"] = via_synthesis(enc, synth, cf, vectors["ffa"][test], progress)
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


def held_out_prints(cases: list[Any], progress: bool) -> dict[str, list[VesselPrint]]:
    """The held-out cases' vessel prints of each modality, from their stored media."""
    out: dict[str, list[VesselPrint]] = {"cf": [], "ffa": []}
    for case in tqdm(cases, desc="vessel prints", disable=not progress):
        for modality, prints in out.items():
            prints.append(case_print(case, modality))
    return out


def _pair_rows(enc: QueryEncoder, vectors: dict[str, np.ndarray], test: np.ndarray, prints):
    """CF↔FFA pair metrics inside the held-out split, per similarity, and the pair
    similarity re-ranked by the vessel check ("pair+vessels"); the top-level cf2ffa /
    ffa2cf are the pair similarity's (the one that looks for the true pair)."""
    cf, ffa = vectors["cf"][test], vectors["ffa"][test]
    per = {}
    for kind in enc.similarities:
        w = enc.similarity_weights(kind)
        per[kind] = {
            "cf2ffa": pair_metrics(pair_ranks((cf * w) @ ffa.T)),
            "ffa2cf": pair_metrics(pair_ranks((ffa * w) @ cf.T)),
        }
    w = enc.similarity_weights("pair")
    checked = {}
    for name, q, g in (("cf2ffa", "cf", "ffa"), ("ffa2cf", "ffa", "cf")):
        scores = (vectors[q][test] * w) @ vectors[g][test].T
        found = top_agreements(scores, prints[q].__getitem__, prints[g])
        checked[name] = pair_metrics(pair_ranks(checked_scores(scores, found)))
    return {"pair": {**per, "pair+vessels": checked}, **per["pair"]}


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
    """CF→FFA direct vs through the synthesized video vs fused, on the same queries, all
    by the pair similarity (`cf`: the queries' vectors already weighted for it)."""
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
    synth_emb *= enc.similarity_weights("pair")  # as the engine's synthesis search by pair
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
