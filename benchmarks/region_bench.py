"""Region-of-interest queries on phantom cases whose lesions lie where the phantom drew them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/region_bench.py INDEX COHORT \
        [--seed 1] [--queries test] [--k 10] [--out benchmarks/results/region.json]

The phantom renders each case from (seed, case index) alone, so each query case's lesion
masks are drawn again (`phantom_case`; its photo is checked to be the cohort's). For
every query case of the split and each lesion type it shows, a box goes around that
type's largest lesion (padded by 0.02, at least 0.125 wide and high); the query is the
case's CF photo with that box, the gallery the archive (test queries: train + val; val
queries: train, for choosing without looking at test). Relevant: a hit whose catalog
lists that lesion type. Precision@k per strategy:

- `whole`: the whole photo (clinical similarity, the engine's default) — the baseline;
- `same_place` (a): only the pair-part entries of the box's regions compared;
- `anywhere` (b): the clinical part of the box's regions alone against each case's
  clinical part (what the engine serves);
- `anywhere_windows` (b, region level): each archive case scored by its best window
  of the box's size (clinical part of that window), exhaustively;
- `anchored@s` (b, in context): the clinical part s x the box's + (1 - s) x the whole
  photo's (`retrieval.search.region.anchored`; s chosen on val: `REGION_SHARE`);
- `engine`: `Engine.search(case_id, region=box)` itself (the served path: anchored at
  `REGION_SHARE`), with the share of relevant hits whose returned `region` overlaps a
  lesion of that type.

Target: precision@10 ≥ 0.8 on the test queries. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.data.media import read_cf  # noqa: E402
from retrieval.data.phantom.case import phantom_case  # noqa: E402
from retrieval.search.engine import Engine  # noqa: E402
from retrieval.search.region import REGION_SHARE, anchored, box_cells, pair_mask  # noqa: E402

GALLERY = {"test": ("train", "val"), "val": ("train",)}
PAD, MIN_SIDE = 0.02, 0.125


def lesion_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The padded box (normalised) of the largest connected part of a lesion mask."""
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    h, w = mask.shape
    box = [
        xs.min() / w - PAD,
        ys.min() / h - PAD,
        (xs.max() + 1) / w + PAD,
        (ys.max() + 1) / h + PAD,
    ]
    for lo, hi in ((0, 2), (1, 3)):
        grow = max(0.0, MIN_SIDE - (box[hi] - box[lo])) / 2
        box[lo], box[hi] = box[lo] - grow, box[hi] + grow
        shift = max(0.0, -box[lo]) - max(0.0, box[hi] - 1)
        box[lo], box[hi] = box[lo] + shift, box[hi] + shift
    return tuple(float(np.clip(v, 0, 1)) for v in box)


def query_set(engine: Engine, seed: int, split: str) -> list[dict]:
    """(case, lesion type, box, mask) for each lesion type of each query case of `split`."""
    out = []
    _, cases = engine.cases(0, 100_000, {"split": split})
    for case in cases:
        ph = phantom_case(seed, int(case.case_id.rsplit("-", 1)[1]))
        image = read_cf(case.cf_path)
        if ph.case_id != case.case_id or not np.array_equal(ph.cf, image):
            raise SystemExit(f"{case.case_id}: the phantom (seed {seed}) does not redraw it")
        for lesion, mask in ph.masks.items():
            out.append(dict(case=case, lesion=lesion, box=lesion_box(mask), mask=mask, image=image))
    return out


class Gallery:
    """The archive's stored CF vectors and per-region detections, for the strategies."""

    def __init__(self, engine: Engine, splits: tuple[str, ...]):
        self.engine, enc = engine, engine.encoder
        _, self.cases = engine.cases(0, 100_000, {"split": list(splits)})
        self.ids = np.asarray([c.row_id for c in self.cases])
        self.vectors = engine.vectors("cf", self.ids)  # (N, D)
        self.lesions = [set(c.lesions) for c in self.cases]
        e = enc.embedder
        self.dim, self.g = e.config.dim, enc.region_grid
        self.clinical = self.vectors[:, self.dim :]
        self.clinical /= np.linalg.norm(self.clinical, axis=1, keepdims=True)
        with torch.no_grad():
            batches = [
                enc._cf_features([read_cf(c.cf_path) for c in self.cases[i : i + 64]])
                for i in range(0, len(self.cases), 64)
            ]
        # (N, C, g, g) each: the photos' grids and their mirror images'
        self.feats = tuple(torch.cat(part) for part in zip(*batches, strict=True))

    def top(self, scores: np.ndarray, k: int) -> list[int]:
        return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]

    def windows(self, qclin: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        e = self.engine.encoder.embedder
        with torch.no_grad():
            win = e.cf_window_clinical_embed(*self.feats, *shape)  # (N, a, b, c)
            s = win @ torch.from_numpy(qclin)
        return s.flatten(1).amax(1).numpy()


def run_queries(
    engine: Engine, gallery: Gallery, queries: list[dict], k: int, shares: list[float]
) -> dict:
    enc, splits = engine.encoder, sorted({c.split for c in gallery.cases})
    per: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    per.update({f"anchored@{a:g}": [] for a in shares})
    per["engine"] = per.pop("engine")  # last in the table
    clinical = np.arange(len(gallery.vectors[0])) >= gallery.dim
    located, t_engine = [], []
    for q in queries:
        cells = box_cells(q["box"], gallery.g)
        region = enc.embed_cf_region([q["image"]], cells)[0]
        qclin = region[gallery.dim :] / np.linalg.norm(region[gallery.dim :])
        whole = engine.vectors("cf", [q["case"].row_id])[0]
        scores = {
            "whole": gallery.clinical
            @ (whole[gallery.dim :] / np.linalg.norm(whole[gallery.dim :])),
            "same_place": gallery.vectors
            @ (region * pair_mask(cells, gallery.g, gallery.dim, len(region))),
            "anywhere": gallery.clinical @ qclin,
            "anywhere_windows": gallery.windows(qclin, (cells[1] - cells[0], cells[3] - cells[2])),
        }
        for a in shares:
            mixed = anchored(region[None], whole[None], clinical, a)[0, gallery.dim :]
            scores[f"anchored@{a:g}"] = gallery.clinical @ mixed
        for name, s in scores.items():
            per[name].append(
                np.mean([q["lesion"] in gallery.lesions[i] for i in gallery.top(s, k)])
            )
        t = time.perf_counter()
        res = engine.search(q["case"].case_id, k=k, region=q["box"], filters={"split": splits})
        t_engine.append(time.perf_counter() - t)
        per["engine"].append(np.mean([q["lesion"] in h.case.lesions for h in res.hits]))
        located += [
            region_on_lesion(h, q["lesion"]) for h in res.hits if q["lesion"] in h.case.lesions
        ]
    return {"per_query": per, "located": located, "engine_ms": 1000 * float(np.median(t_engine))}


STRATEGIES = ("whole", "same_place", "anywhere", "anywhere_windows", "engine")


def region_on_lesion(hit, lesion: str) -> bool:
    """Whether the hit's returned region overlaps its lesion of that type (phantom masks)."""
    ph = phantom_case(ARGS.seed, int(hit.case.case_id.rsplit("-", 1)[1]))
    mask = ph.masks.get(lesion)
    if mask is None or hit.region is None:
        return False
    h, w = mask.shape
    x0, y0, x1, y1 = hit.region
    return bool(mask[int(y0 * h) : int(np.ceil(y1 * h)), int(x0 * w) : int(np.ceil(x1 * w))].any())


def summarise(queries: list[dict], result: dict) -> dict:
    lesions = sorted({q["lesion"] for q in queries})
    per = result["per_query"]
    table = {
        s: {
            "all": float(np.mean(v)),
            **{
                les: float(
                    np.mean([p for p, q in zip(v, queries, strict=True) if q["lesion"] == les])
                )
                for les in lesions
            },
        }
        for s, v in per.items()
    }
    counts = {les: sum(q["lesion"] == les for q in queries) for les in lesions}
    return {"precision": table, "queries_per_lesion": counts, "lesions": lesions}


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("index", type=Path)
    ap.add_argument("cohort", type=Path)
    ap.add_argument("--seed", type=int, default=1, help="the phantom cohort's --seed")
    ap.add_argument("--queries", choices=tuple(GALLERY), default="test")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--limit", type=int, default=0, help="first N query boxes only (0: all)")
    ap.add_argument(
        "--shares",
        default=f"0.2,0.3,{REGION_SHARE:g},0.5",
        help="the box's shares of the clinical part to measure (anchored@s)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ARGS = args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.time()
    engine = Engine.open(args.index)
    queries = query_set(engine, args.seed, args.queries)
    if args.limit:
        queries = queries[: args.limit]
    gallery = Gallery(engine, GALLERY[args.queries])
    shares = sorted({float(v) for v in args.shares.split(",")})
    result = run_queries(engine, gallery, queries, args.k, shares)
    report = {
        "index": str(args.index),
        "cohort": str(args.cohort),
        "queries": args.queries,
        "gallery": list(GALLERY[args.queries]),
        "query_cases": len({q["case"].case_id for q in queries}),
        "query_boxes": len(queries),
        "k": args.k,
        **summarise(queries, result),
        "engine_region_overlaps_lesion": float(np.mean(result["located"]))
        if result["located"]
        else None,
        "engine_median_ms": result["engine_ms"],
        "served": f"engine = anchored@{REGION_SHARE:g}",
        "target": {"precision_at_k": 0.8},
        "seconds": round(time.time() - t0, 1),
        "machine": platform.platform(),
    }
    print_table(report)
    out = args.out or Path(f"benchmarks/results/region_{args.queries}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def print_table(report: dict) -> None:
    cols = ["all", *report["lesions"]]
    print(
        f"region queries: {report['query_boxes']} boxes on {report['query_cases']} "
        f"{report['queries']} cases, gallery {'+'.join(report['gallery'])}, "
        f"precision@{report['k']} of the lesion type ({report['served']})"
    )
    print(f"{'strategy':<18}" + "".join(f"{c[:9]:>10}" for c in cols))
    print(
        f"{'(boxes)':<18}"
        + "".join(
            f"{report['query_boxes'] if c == 'all' else report['queries_per_lesion'][c]:>10}"
            for c in cols
        )
    )
    for s, row in report["precision"].items():
        print(f"{s:<18}" + "".join(f"{row[c]:>10.3f}" for c in cols))
    print(
        f"engine: returned region overlaps a lesion of the type in "
        f"{report['engine_region_overlaps_lesion']} of relevant hits; "
        f"median {report['engine_median_ms']:.1f} ms"
    )


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
