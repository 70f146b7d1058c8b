"""Robustness to what real cameras do to a photo: retrieval with perturbed CF queries.

    .venv/bin/python benchmarks/robustness_bench.py RUN COHORT [--embedder NAME=FOLDER ...]
        [--split test] [--out benchmarks/results/robustness.json]

The held-out split's CF photos are perturbed (exposure, colour balance, JPEG, focus,
rotation, a narrower field of view, a 4:3 frame, a lower and a higher resolution) and
go through the query path a user's upload takes (`QueryEncoder.embed_cf`: any size,
made square, resized). The galleries stay clean. For each perturbation: pair R@1
(CF→FFA inside the held-out split, pair similarity), the same with the vessel check
that pair searches use (`retrieval.data.vessel_check`: the 40 best re-ranked by how
well the photo's vessels lie on each angiogram's), and CF→CF precision@10 by diagnosis
against the archive (train + val, clinical similarity), next to the clean queries.
Target: no perturbation costs more than 0.05 of pair R@1. Prints a table and writes a
JSON report.
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import finish_report, report_header  # noqa: E402
from encoder.embedder import embed_ffa_array  # noqa: E402
from encoder.ranking import clinical_metrics, pair_metrics, pair_ranks  # noqa: E402
from retrieval.data.cohort import Cohort  # noqa: E402
from retrieval.data.media import read_cf  # noqa: E402
from retrieval.data.training_data import load_paired  # noqa: E402
from retrieval.data.vessel_check import (  # noqa: E402
    VESSEL_WEIGHT,
    VesselPrint,
    cf_print,
    checked_scores,
    top_agreements,
)
from retrieval.evaluation.retrieval import label_arrays  # noqa: E402
from retrieval.models.embedding import QueryEncoder  # noqa: E402
from retrieval.models.similarity import default_similarity  # noqa: E402
from retrieval.search.vessels import case_print  # noqa: E402

MAX_R1_DROP = 0.05


def _pil(f: Callable[[Image.Image], Image.Image]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda im: np.array(f(Image.fromarray(im)).convert("RGB"))


def _gain(gains: tuple[float, float, float]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda im: np.clip(im * np.asarray(gains, np.float32), 0, 255).astype(np.uint8)


def _gamma(g: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda im: (255 * (im / 255.0) ** g).round().astype(np.uint8)


def _jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    def f(im: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        return np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))

    return f


def _aperture(radius: float) -> Callable[[np.ndarray], np.ndarray]:
    """A narrower field of view: black outside a centred circle of `radius` x half side."""

    def f(im: np.ndarray) -> np.ndarray:
        h, w = im.shape[:2]
        y, x = np.mgrid[:h, :w]
        d = np.hypot((x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1)
        return np.where((d <= radius)[..., None], im, 0).astype(np.uint8)

    return f


def _crop_height(fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    """A wider-than-tall frame (e.g. 4:3): the top and bottom of the fundus cut off."""

    def f(im: np.ndarray) -> np.ndarray:
        h = im.shape[0]
        cut = round(h * (1 - fraction) / 2)
        return im[cut : h - cut]

    return f


def _resize(side: int) -> Callable[[np.ndarray], np.ndarray]:
    resample = Image.Resampling.BICUBIC
    return _pil(lambda p: p.resize((side, round(side * p.height / p.width)), resample))


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "clean": lambda im: im,
    "under-exposed (x0.6)": _gain((0.6, 0.6, 0.6)),
    "over-exposed (x1.35)": _gain((1.35, 1.35, 1.35)),
    "gamma 1.5": _gamma(1.5),
    "colour cast (R+15%, B-15%)": _gain((1.15, 1.0, 0.85)),
    "JPEG quality 20": _jpeg(20),
    "defocus (blur r=1.5 px)": _pil(lambda p: p.filter(ImageFilter.GaussianBlur(1.5))),
    "rotation +5 deg": _pil(lambda p: p.rotate(5, resample=Image.Resampling.BILINEAR)),
    "rotation -5 deg": _pil(lambda p: p.rotate(-5, resample=Image.Resampling.BILINEAR)),
    "field of view 80%": _aperture(0.8),
    "frame 4:3 (height cut)": _crop_height(0.75),
    "resolution 48 px": _resize(48),
    "resolution 512 px": _resize(512),
}


@dataclass
class Arm:
    """One embedder's fixed parts: its query encoder, the held-out FFA vectors, the
    archive's CF vectors, the similarities' query factors."""

    enc: QueryEncoder
    ffa: np.ndarray
    archive_cf: np.ndarray
    w_cross: np.ndarray
    w_same: np.ndarray


@dataclass
class Split:
    """The held-out queries and the archive: labels, decoded photos, the FFA prints."""

    test: np.ndarray
    archive: np.ndarray
    q: dict
    a: dict
    photos: list
    prints: list[VesselPrint]


def split_of(cohort: Cohort, everything, split: str, progress: bool) -> Split:
    cases = [cohort.case(c) for c in everything.case_ids]
    splits = np.asarray([c.split for c in cases], dtype=object)
    test, archive = np.nonzero(splits == split)[0], np.nonzero(splits != split)[0]
    labels = label_arrays(cases)
    held = tqdm([cases[i] for i in test], desc="vessel prints", disable=not progress)
    return Split(
        test=test,
        archive=archive,
        q={k: v[test] for k, v in labels.items()},
        a={k: v[archive] for k, v in labels.items()},
        photos=[read_cf(cases[i].cf_path) for i in test],  # as decoded, any size
        prints=[case_print(c, "ffa") for c in held],  # as the engine prints a candidate
    )


def arm_of(enc: QueryEncoder, everything, sp: Split) -> Arm:
    return Arm(
        enc=enc,
        ffa=embed_ffa_array(enc.embedder, everything.ffa[sp.test], everything.times_s[sp.test]),
        archive_cf=enc.embed_cf(list(everything.cf[sp.archive])),
        w_cross=enc.similarity_weights("pair"),
        w_same=enc.similarity_weights(default_similarity(enc.similarities)),
    )


def perturbation_rows(
    arms: dict[str, Arm], sp: Split, pert: str, weights: list[float], progress: bool
) -> dict:
    t0 = time.perf_counter()
    images = [PERTURBATIONS[pert](im) for im in sp.photos]
    cf = {name: arm.enc.embed_cf(images) for name, arm in arms.items()}  # (Q, D)
    pair = {name: (cf[name] * arm.w_cross) @ arm.ffa.T for name, arm in arms.items()}
    query_print = functools.cache(lambda q: cf_print(images[q]))
    found: dict = {}  # each query-candidate pair compared once for all arms
    agreements = {
        name: top_agreements(scores, query_print, sp.prints, found) for name, scores in pair.items()
    }
    rows = {}
    for name, arm in arms.items():
        plain = pair_metrics(pair_ranks(pair[name]))
        by_weight = {
            w: pair_metrics(pair_ranks(checked_scores(pair[name], agreements[name], w)))["R@1"]
            for w in weights
        }
        verified = pair_metrics(pair_ranks(checked_scores(pair[name], agreements[name])))
        clin = clinical_metrics((cf[name] * arm.w_same) @ arm.archive_cf.T, sp.q, sp.a)
        rows[name] = {
            "perturbation": pert,
            "pair_R@1": plain["R@1"],
            "pair_R@10": plain["R@10"],
            "checked_R@1": verified["R@1"],
            "checked_R@10": verified["R@10"],
            "checked_R@1_by_weight": by_weight,
            "cf2cf_P@10": clin["P@10"],
            "cf2cf_hit@5": clin["hit@5"],
        }
        if progress:
            print(
                f"  {name}: {pert}: R@1 {plain['R@1']:.3f}  vessel-checked {verified['R@1']:.3f}"
                f"  P@10 {clin['P@10']:.3f}",
                flush=True,
            )
    for r in rows.values():
        r["seconds"] = round(time.perf_counter() - t0, 2)  # every arm's, together
    return rows


def summary(arm: Arm, sp: Split, rows: list[dict]) -> dict:
    clean = rows[0]
    for r in rows:
        r["R@1_drop"] = clean["pair_R@1"] - r["pair_R@1"]
        r["checked_R@1_drop"] = clean["checked_R@1"] - r["checked_R@1"]
        r["P@10_drop"] = clean["cf2cf_P@10"] - r["cf2cf_P@10"]
    worst = max(rows, key=lambda r: r["R@1_drop"])
    worst_checked = max(rows, key=lambda r: r["checked_R@1_drop"])
    return {
        "embedder": str(arm.enc.embedder_dir),
        "encoder_id": arm.enc.encoder_id,
        "queries": int(len(sp.test)),
        "archive": int(len(sp.archive)),
        "rows": rows,
        "worst": {"perturbation": worst["perturbation"], "R@1_drop": worst["R@1_drop"]},
        "worst_checked": {
            "perturbation": worst_checked["perturbation"],
            "R@1_drop": worst_checked["checked_R@1_drop"],
        },
        "meets_target": worst["R@1_drop"] <= MAX_R1_DROP,
        "meets_target_checked": worst_checked["checked_R@1_drop"] <= MAX_R1_DROP,
    }


def table(report: dict) -> str:
    lines = []
    for name, b in report["embedders"].items():
        lines.append(
            f"{name}: {b['queries']} {report['split']} queries, archive {b['archive']}"
            f" cases; worst R@1 drop {b['worst']['R@1_drop']:+.3f} "
            f"({b['worst']['perturbation']}), vessel-checked "
            f"{b['worst_checked']['R@1_drop']:+.3f} ({b['worst_checked']['perturbation']}),"
            f" target <= {MAX_R1_DROP}"
        )
        lines.append(
            f"{'perturbation':<28}{'pair R@1':>10}{'drop':>8}{'checked':>9}{'drop':>8}"
            f"{'CF→CF P@10':>12}{'drop':>8}"
        )
        for r in b["rows"]:
            lines.append(
                f"{r['perturbation']:<28}{r['pair_R@1']:>10.3f}{r['R@1_drop']:>+8.3f}"
                f"{r['checked_R@1']:>9.3f}{r['checked_R@1_drop']:>+8.3f}"
                f"{r['cf2cf_P@10']:>12.3f}{r['P@10_drop']:>+8.3f}"
            )
        lines.append(weight_line(b["rows"]))
        lines.append("")
    return "\n".join(lines)


def weight_line(rows: list[dict]) -> str:
    """Per vessel weight: the clean and the worst pair R@1 over the perturbations."""
    parts = []
    for w in rows[0]["checked_R@1_by_weight"]:
        r1 = [r["checked_R@1_by_weight"][w] for r in rows]
        parts.append(f"{w:g}: clean {r1[0]:.3f}, worst {min(r1):.3f}")
    return "vessel weight " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("cohort", type=Path)
    ap.add_argument(
        "--embedder",
        action="append",
        default=[],
        help="NAME=FOLDER of an embedder of RUN (default: RUN/embedder as 'model')",
    )
    ap.add_argument("--split", default="test")
    ap.add_argument(
        "--vessel-weights",
        type=lambda v: [float(w) for w in v.split(",")],
        default=[],
        help="comma-separated weights of the vessel agreement to compare beside the default "
        "(e.g. --split val --vessel-weights 0.75,1.0,2.0)",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness.json"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    named = dict(e.split("=", 1) for e in args.embedder) or {"model": None}
    cohort = Cohort.open(args.cohort)
    started = time.time()
    report = {
        **report_header("robustness", started),
        "split": args.split,
        "max_R@1_drop": MAX_R1_DROP,
        "embedders": {},
    }
    encoders = {name: QueryEncoder.open(args.run, folder) for name, folder in named.items()}
    sizes = {enc.image_size for enc in encoders.values()}
    if len(sizes) != 1:
        raise SystemExit(f"--embedder: the embedders' image sizes differ ({sorted(sizes)})")
    everything = load_paired(cohort, size=sizes.pop(), progress=not args.quiet)
    sp = split_of(cohort, everything, args.split, not args.quiet)
    arms = {name: arm_of(enc, everything, sp) for name, enc in encoders.items()}
    rows: dict[str, list[dict]] = {name: [] for name in arms}
    weights = sorted({VESSEL_WEIGHT, *args.vessel_weights})
    for pert in PERTURBATIONS:
        for name, row in perturbation_rows(arms, sp, pert, weights, not args.quiet).items():
            rows[name].append(row)
    for name, arm in arms.items():
        report["embedders"][name] = summary(arm, sp, rows[name])
    finish_report(report, started, table(report), args.out)


if __name__ == "__main__":
    main()
