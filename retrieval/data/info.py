"""`fundus2video info`: what a cohort holds — counts, frame counts, sizes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import polars as pl
from tqdm import tqdm

from .cohort import Cohort
from .media import probe_cf, probe_ffa


def cohort_summary(cohort: Cohort, *, progress: bool = True) -> dict:
    """Counts by diagnosis, eye and split; FFA frame counts; CF and FFA sizes (from headers)."""
    df = cohort.catalog

    def counts(column: str) -> dict[str, int]:
        values = df[column].fill_null("(unknown)").to_list()
        return dict(sorted(Counter(values).items()))

    cf_sizes: Counter[str] = Counter()
    ffa_sizes: Counter[str] = Counter()
    frames = []
    for case in tqdm(cohort.cases(), desc="probe", unit="case", disable=not progress):
        w, h = probe_cf(case.cf_path)
        cf_sizes[f"{w}x{h}"] += 1
        t, w, h = probe_ffa(case.ffa_path)
        ffa_sizes[f"{w}x{h}"] += 1
        frames.append(t)
    frames_arr = np.asarray(frames or [0])
    lesion_counts = Counter(x for row in df["lesions"].to_list() for x in (row or []))
    return {
        "root": str(cohort.root),
        "cases": df.height,
        "patients": df["patient_id"].n_unique(),
        "patients_with_both_eyes": int(
            df.group_by("patient_id")
            .agg(pl.col("eye").n_unique().alias("n"))
            .filter(pl.col("n") == 2)
            .height
        ),
        "by_diagnosis": counts("diagnosis"),
        "by_eye": counts("eye"),
        "by_split": counts("split"),
        "by_source": counts("source"),
        "lesions": dict(sorted(lesion_counts.items())),
        "ffa_frames": {
            "min": int(frames_arr.min()),
            "median": float(np.median(frames_arr)),
            "max": int(frames_arr.max()),
        },
        "cf_sizes": dict(cf_sizes.most_common()),
        "ffa_sizes": dict(ffa_sizes.most_common()),
    }


def format_summary(summary: dict) -> str:
    """The summary as aligned text for a terminal."""
    lines = [
        f"cohort   {summary['root']}",
        f"cases    {summary['cases']}  (patients {summary['patients']}, "
        f"{summary['patients_with_both_eyes']} with both eyes)",
    ]
    for key in ("by_diagnosis", "by_eye", "by_split", "by_source", "lesions"):
        items = "  ".join(f"{k}={v}" for k, v in summary[key].items()) or "-"
        lines.append(f"{key.removeprefix('by_'):<9}{items}")
    f = summary["ffa_frames"]
    lines.append(f"frames   min {f['min']}  median {f['median']:g}  max {f['max']}")
    lines.append("cf size  " + "  ".join(f"{k} ({v})" for k, v in summary["cf_sizes"].items()))
    lines.append("ffa size " + "  ".join(f"{k} ({v})" for k, v in summary["ffa_sizes"].items()))
    return "\n".join(lines)
