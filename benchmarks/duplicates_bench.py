"""Near-duplicate detection on phantom cohorts with planted duplicates.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/duplicates_bench.py \
        [--report-cohort /tmp/dups_base] [--tune-cohort /tmp/dups_tune] [--cases 520] \
        [--planted 60] [--out benchmarks/results/duplicates.json]

Two phantom cohorts (made if missing: `fundus2video phantom DIR --cases 520 --seed 7`
for the report, seed 8 for tuning) each get planted duplicates of some of their cases
(the CF recompressed as JPEG q 30-70, resized 0.5-0.8×, cropped to 90 % at a random
place, brightness ±10 %, and combinations; the FFA re-encoded as MP4 at another
quality, its frames resized, cropped and brightened likewise). The threshold per
modality is tuned on the tuning cohort (the midpoint between its farthest planted
pair and its nearest distinct pair) and then applied, unchanged, to the report
cohort: pair precision and recall per modality and for "CF or FFA", the margin, and
whether any two eyes of one phantom patient are flagged. Targets: precision and
recall ≥ 0.98, no fellow eyes flagged. Also the time to describe a case.
Prints a table and writes a JSON report.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.data import duplicates as dup  # noqa: E402
from retrieval.data.cohort import Cohort  # noqa: E402
from retrieval.data.media import read_cf, read_ffa  # noqa: E402
from retrieval.data.media_write import mp4_bytes  # noqa: E402
from retrieval.data.phantom import write_phantom_cohort  # noqa: E402

TARGET = 0.98
KINDS = ("jpeg", "resize", "crop", "brightness")


def _resize(im: np.ndarray, f: float) -> np.ndarray:
    pic = Image.fromarray(im)
    size = (max(8, round(pic.width * f)), max(8, round(pic.height * f)))
    return np.asarray(pic.resize(size, Image.Resampling.BILINEAR))


def _crop(im: np.ndarray, rng: np.random.Generator, share: float = 0.9) -> np.ndarray:
    h, w = im.shape[:2]
    ch, cw = round(h * share), round(w * share)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return im[y : y + ch, x : x + cw]


def _bright(im: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(im.astype(np.float32) * gain, 0, 255).round().astype(np.uint8)


def _jpeg(im: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG", quality=quality)
    return read_cf(buf.getvalue(), name="planted.jpg")


def _plan(rng: np.random.Generator) -> dict:
    """Which edits a planted copy gets (a non-empty set, each with its strength)."""
    kinds = [k for k in KINDS if rng.random() < 0.5] or [KINDS[int(rng.integers(len(KINDS)))]]
    return {
        "kinds": kinds,
        "quality": int(rng.integers(30, 71)),
        "scale": float(rng.uniform(0.5, 0.8)),
        "gain": float(rng.choice([-1, 1]) * rng.uniform(0.03, 0.10) + 1),
        "crf": int(rng.integers(28, 40)),
        "seed": int(rng.integers(2**31)),
    }


def plant_cf(cf: np.ndarray, plan: dict) -> np.ndarray:
    rng = np.random.default_rng(plan["seed"])
    out = cf
    if "crop" in plan["kinds"]:
        out = _crop(out, rng)
    if "resize" in plan["kinds"]:
        out = _resize(out, plan["scale"])
    if "brightness" in plan["kinds"]:
        out = _bright(out, plan["gain"])
    if "jpeg" in plan["kinds"]:
        out = _jpeg(out, plan["quality"])
    return np.ascontiguousarray(out)


def plant_ffa(ffa: np.ndarray, plan: dict) -> np.ndarray:
    """The same edits frame by frame; the video is always re-encoded (MP4 at `crf`)."""
    rng = np.random.default_rng(plan["seed"] + 1)
    frames = ffa
    if "crop" in plan["kinds"]:
        frames = _crop(frames.transpose(1, 2, 0), rng).transpose(2, 0, 1)
    if "resize" in plan["kinds"]:
        frames = np.stack([_resize(f, plan["scale"]) for f in frames])
    if "brightness" in plan["kinds"]:
        frames = _bright(frames, plan["gain"])
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    data = mp4_bytes(np.ascontiguousarray(frames), crf=plan["crf"])
    return read_ffa(data, name="planted.mp4")


def _cohort(path: Path, cases: int, seed: int) -> Cohort:
    if not (path / "catalog.parquet").exists():
        write_phantom_cohort(path, cases=cases, seed=seed, progress=False)
    return Cohort.open(path)


def describe_set(cohort: Cohort, planted: int, seed: int) -> dict:
    """Descriptors of every case and of `planted` edited copies of random cases."""
    cases = cohort.cases()
    ids, descs, patients = [], [], []
    t0 = time.perf_counter()
    media = {}
    for c in cases:
        cf, ffa = read_cf(cohort.root / c.cf_path), read_ffa(cohort.root / c.ffa_path)
        media[c.case_id] = (cf, ffa)
        ids.append(c.case_id)
        descs.append(dup.case_descriptor(cf, ffa))
        patients.append(c.patient_id)
    per_case_ms = 1000 * (time.perf_counter() - t0) / len(cases)
    rng = np.random.default_rng(seed)
    truth, plans = set(), []
    for k, i in enumerate(rng.choice(len(cases), planted, replace=False)):
        plan = _plan(rng)
        cf, ffa = media[ids[i]]
        new_id = f"planted-{k:03d}"
        descs.append(dup.case_descriptor(plant_cf(cf, plan), plant_ffa(ffa, plan)))
        truth.add((ids[i], new_id))
        plans.append({"source": ids[i], "copy": new_id, **plan})
        ids.append(new_id)
        patients.append(f"planted-patient-{k}")
    return {
        "ids": ids,
        "descs": descs,
        "patients": patients,
        "truth": truth,
        "plans": plans,
        "per_case_ms": per_case_ms,
    }


def pair_distances(data: dict) -> dict[str, np.ndarray]:
    """Per modality: the (N, N) distance matrix of the whole set."""
    return {
        m: dup.distances(
            np.stack([d[m] for d in data["descs"]]), np.stack([d[m] for d in data["descs"]])
        )
        for m in dup.MODALITIES
    }


def _split_pairs(data: dict, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Planted-pair distances, distinct-pair distances, fellow-eye distances."""
    index = {c: i for i, c in enumerate(data["ids"])}
    pos = np.asarray([dist[index[a], index[b]] for a, b in data["truth"]])
    mask = np.triu(np.ones_like(dist, bool), k=1)
    for a, b in data["truth"]:
        mask[min(index[a], index[b]), max(index[a], index[b])] = False
    pats = np.asarray(data["patients"])
    fellow = mask & (pats[:, None] == pats[None, :])
    return pos, dist[mask], dist[fellow]


def tune(data: dict, dists: dict[str, np.ndarray]) -> dict[str, float]:
    """Per modality: midway between the farthest planted pair and the nearest distinct one."""
    out = {}
    for m in dup.MODALITIES:
        pos, neg, _ = _split_pairs(data, dists[m])
        lo, hi = float(pos.max()), float(neg.min())
        out[m] = round((lo + hi) / 2, 4) if lo < hi else round(lo, 4)
    return out


def evaluate(data: dict, dists: dict[str, np.ndarray], thr: dict[str, float]) -> dict:
    index = {c: i for i, c in enumerate(data["ids"])}
    truth = {(index[a], index[b]) for a, b in data["truth"]}
    truth = {(min(p), max(p)) for p in truth}
    flagged_any: set = set()
    rows = {}
    pats = np.asarray(data["patients"])
    for m in dup.MODALITIES:
        a, b = np.nonzero(np.triu(dists[m] <= thr[m], k=1))
        flagged = set(zip(a.tolist(), b.tolist(), strict=True))
        flagged_any |= flagged
        pos, neg, fellow = _split_pairs(data, dists[m])
        rows[m] = {
            **_pr(flagged, truth),
            "threshold": thr[m],
            "planted_max": float(pos.max()),
            "distinct_min": float(neg.min()),
            "fellow_min": float(fellow.min()) if fellow.size else None,
            "fellow_flagged": int((fellow <= thr[m]).sum()),
        }
    rows["cf or ffa"] = {
        **_pr(flagged_any, truth),
        "threshold": None,
        "fellow_flagged": sum(
            int(pats[i] == pats[j]) for i, j in flagged_any if (i, j) not in truth
        ),
    }
    return rows


def _pr(flagged: set, truth: set) -> dict:
    tp = len(flagged & truth)
    return {
        "flagged": len(flagged),
        "true": tp,
        "precision": tp / len(flagged) if flagged else 1.0,
        "recall": tp / len(truth) if truth else 1.0,
    }


def _print_table(rows: dict) -> None:
    head = (
        f"{'modality':10} {'thr':>6} {'flagged':>7} {'true':>5} {'precision':>9} "
        f"{'recall':>6} {'planted max':>11} {'distinct min':>12} {'fellow min':>10} "
        f"{'fellow flagged':>14}"
    )
    print(head)
    for m, r in rows.items():
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(
            f"{m:10} {fmt(r['threshold']):>6} {r['flagged']:>7} {r['true']:>5} "
            f"{r['precision']:>9.3f} {r['recall']:>6.3f} {fmt(r.get('planted_max')):>11} "
            f"{fmt(r.get('distinct_min')):>12} {fmt(r.get('fellow_min')):>10} "
            f"{r['fellow_flagged']:>14}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report-cohort", type=Path, default=Path("/tmp/dups_base"))
    p.add_argument("--tune-cohort", type=Path, default=Path("/tmp/dups_tune"))
    p.add_argument("--cases", type=int, default=520)
    p.add_argument("--planted", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/duplicates.json"))
    args = p.parse_args()
    tune_set = describe_set(_cohort(args.tune_cohort, args.cases, 8), args.planted, seed=108)
    thr = tune(tune_set, pair_distances(tune_set))
    tuned = evaluate(tune_set, pair_distances(tune_set), thr)
    report_set = describe_set(_cohort(args.report_cohort, args.cases, 7), args.planted, seed=107)
    t0 = time.perf_counter()
    report_d = pair_distances(report_set)
    search_s = time.perf_counter() - t0
    report = evaluate(report_set, report_d, thr)
    print(
        f"thresholds tuned on {args.tune_cohort} (+{args.planted} planted): {thr}"
        f"  (module THRESHOLDS: {dup.THRESHOLDS})"
    )
    print(
        f"report cohort {args.report_cohort}: {len(report_set['ids'])} cases "
        f"({args.planted} planted)"
    )
    print("-- at the thresholds tuned above")
    _print_table(report)
    module = evaluate(report_set, report_d, dup.THRESHOLDS)
    print(
        f"-- at the module's THRESHOLDS {dup.THRESHOLDS} (what ingest, the engine and the CLI use)"
    )
    _print_table(module)
    ok = all(
        r["precision"] >= TARGET and r["recall"] >= TARGET and r["fellow_flagged"] == 0
        for rows in (report, module)
        for r in rows.values()
    )
    print(
        f"describe: {report_set['per_case_ms']:.1f} ms/case (decode + CF + FFA); all pairs of "
        f"{len(report_set['ids'])} cases: {search_s:.2f} s;  target "
        f"{'MET' if ok else 'MISSED'}"
    )
    out = {
        "bench": "duplicates",
        "python": platform.python_version(),
        "tuned_thresholds": thr,
        "module_thresholds": dup.THRESHOLDS,
        "tune": {"cohort": str(args.tune_cohort), "rows": tuned},
        "report": {
            "cohort": str(args.report_cohort),
            "rows": report,
            "rows_at_module_thresholds": module,
            "cases": len(report_set["ids"]),
            "planted": args.planted,
            "plans": report_set["plans"],
        },
        "describe_ms_per_case": report_set["per_case_ms"],
        "all_pairs_s": search_s,
        "target": TARGET,
        "met": ok,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
