"""The retinal phantom: determinism, anatomy, FFA phases, lesion dynamics, cohort files."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from scipy import ndimage

from retrieval.data.cohort import DIAGNOSES, LESIONS, Cohort, hash_split, validate_catalog
from retrieval.data.media_write import mp4_bytes
from retrieval.data.phantom import (
    PhantomCase,
    case_meta,
    catalog_row,
    contact_sheet,
    first_of_each,
    phantom_case,
    write_phantom_cohort,
    write_preview,
)
from retrieval.data.phantom.meta import frame_times

SEED = 3


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _same_case(a: PhantomCase, b: PhantomCase) -> None:
    for name in ("case_id", "patient_id", "eye", "age", "sex", "diagnosis", "lesions", "split"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("cf", "ffa", "times_s", "fov"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.masks.keys() == b.masks.keys()
    for k in a.masks:
        np.testing.assert_array_equal(a.masks[k], b.masks[k], err_msg=k)


def _frame(case: PhantomCase, t: float) -> np.ndarray:
    """(H, W) float FFA frame nearest time t."""
    return case.ffa[int(np.argmin(np.abs(case.times_s - t)))].astype(float)


def _ring(case: PhantomCase, mask: np.ndarray, inner: int = 1, outer: int = 4) -> np.ndarray:
    """Pixels around `mask` that belong to no lesion and no vessel."""
    ring = ndimage.binary_dilation(mask, iterations=outer)
    ring &= ~ndimage.binary_dilation(mask, iterations=inner)
    for m in case.masks.values():
        ring &= ~m
    return ring & case.fov & ~case.anatomy["artery"] & ~case.anatomy["vein"]


def _background(case: PhantomCase, frame: np.ndarray) -> float:
    """Median of the frame over lesion-free, vessel-free field of view."""
    free = case.fov & ~case.anatomy["artery"] & ~case.anatomy["vein"]
    for m in case.masks.values():
        free &= ~ndimage.binary_dilation(m, iterations=2)
    return float(np.median(frame[free]))


def _to_cf(case: PhantomCase, mask: np.ndarray) -> np.ndarray:
    """A mask in FFA coordinates moved into the photo's frame (undo the misregistration)."""
    dx, dy, deg = case.registration
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    m = np.array([[c, s], [-s, c]])
    centre = np.full(2, mask.shape[0] / 2 - 0.5)
    offset = centre + np.array([dy, dx]) - m @ centre
    return ndimage.affine_transform(mask.astype(float), m, offset, order=1) > 0.5


@pytest.fixture(scope="module")
def by_diagnosis() -> dict[str, PhantomCase]:
    return {
        case_meta(SEED, i).diagnosis: phantom_case(SEED, i, size=96, frames=16)
        for i in first_of_each(SEED)
    }


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"size": 16}, "size"),
        ({"frames": 1}, "frames"),
        ({"cases": 0}, "cases"),
        ({"seed": -1}, "seed"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_parameters_are_named(tmp_path, kwargs, name):
    args = {"cases": 1, "size": 64, "frames": 4} | kwargs
    with pytest.raises(ValueError, match=name):
        write_phantom_cohort(tmp_path / "c", progress=False, **args)
    assert not (tmp_path / "c").exists()
    if name in ("size", "frames"):
        with pytest.raises(ValueError, match=name):
            phantom_case(0, 0, **{k: v for k, v in kwargs.items()})


def test_cohort_is_deterministic_whatever_the_workers(tmp_path):
    args = {"cases": 6, "size": 64, "frames": 5, "seed": SEED, "progress": False}
    a = _files(write_phantom_cohort(tmp_path / "a", workers=1, **args))
    b = _files(write_phantom_cohort(tmp_path / "b", workers=1, **args))
    c = _files(write_phantom_cohort(tmp_path / "c", workers=2, **args))
    assert len(a) == 1 + 2 * 6
    assert a == b == c
    cohort = Cohort.open(tmp_path / "a")
    for i, row in enumerate(cohort.catalog.iter_rows(named=True)):
        case = phantom_case(SEED, i, size=64, frames=5)
        assert row == catalog_row(case) | {"age": case.age}
        assert row["source"] == "phantom" and row["cf_path"] == f"cf/{case.case_id}.png"
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "a" / row["cf_path"])), case.cf
        )
        assert a[row["ffa_path"]] == mp4_bytes(case.ffa)
    _same_case(phantom_case(SEED, 4, size=64, frames=5), phantom_case(SEED, 4, size=64, frames=5))


def test_shapes_scale_and_geometry_does_not_depend_on_size():
    small, big = phantom_case(1, 2, size=64, frames=3), phantom_case(1, 2, size=160, frames=3)
    assert small.cf.shape == (64, 64, 3) and small.cf.dtype == np.uint8
    assert big.ffa.shape == (3, 160, 160) and big.ffa.dtype == np.uint8
    assert small.fov.shape == (64, 64) and small.fov.dtype == bool
    assert small.lesions == big.lesions
    np.testing.assert_array_equal(small.times_s, big.times_s)
    assert not small.cf[0, 0].any() and small.cf[small.fov].mean() > 40  # dark surround


def test_laterality_disc_on_the_correct_side():
    for i in range(10):
        case = phantom_case(0, i, size=64, frames=2)
        disc_x = np.nonzero(case.anatomy["disc"])[1].mean()
        assert (disc_x > 32) == (case.eye == "OD"), case.case_id
        if case.diagnosis in ("normal", "BRVO", "NPDR"):  # the disc is the brightest thing
            lum = case.cf.astype(float).sum(-1)
            bright_x = np.nonzero(lum >= np.quantile(lum[case.fov], 0.995))[1].mean()
            assert (bright_x > 32) == (case.eye == "OD"), case.case_id


def test_each_diagnosis_has_its_lesions(by_diagnosis):
    expected = {
        "normal": set(),
        "NPDR": {"microaneurysm", "haemorrhage", "blocking"},
        "PDR": {"microaneurysm", "neovascularisation", "non-perfusion", "leakage"},
        "BRVO": {"haemorrhage", "tortuous-veins", "delayed-filling", "staining", "leakage"},
        "CRVO": {"haemorrhage", "tortuous-veins", "delayed-filling", "staining", "leakage"},
        "wet-AMD": {"cnv", "leakage"},
        "CSC": {"leakage", "serous-detachment"},
    }
    assert set(by_diagnosis) == set(DIAGNOSES)
    for d, case in by_diagnosis.items():
        assert expected[d] <= set(case.lesions), (d, case.lesions)
        assert set(case.lesions) <= set(LESIONS)
        assert list(case.masks) == case.lesions
        for name, m in case.masks.items():
            assert m.dtype == bool and m.shape == case.fov.shape and m.any(), (d, name)
            assert not (m & ~case.fov).any()
    normal = by_diagnosis["normal"]
    assert normal.lesions == [] and normal.masks == {}


def test_leakage_grows_from_early_to_late(by_diagnosis):
    checked = 0
    for d, case in by_diagnosis.items():
        for name in ("leakage", "neovascularisation", "cnv"):
            if name not in case.masks:
                continue
            grow = 2 if name == "leakage" else max(3, case.fov.shape[0] // 24)
            region = ndimage.binary_dilation(case.masks[name], iterations=grow) & case.fov
            areas = []
            for t in (case.phases_s["laminar"] + 2.0, case.times_s[-1]):
                f = _frame(case, t)
                areas.append(int((f[region] > _background(case, f) + 30).sum()))
            assert areas[1] > 1.3 * areas[0] + 2, (d, name, areas)
            checked += 1
        for name in ("neovascularisation", "cnv"):  # new vessels fill early
            if name in case.masks:
                f = _frame(case, case.phases_s["laminar"] + 2.0)
                assert f[case.masks[name]].mean() > _background(case, f) + 30, (d, name)
    assert checked >= 6


def test_blocking_is_dark_in_every_phase_after_the_dye(by_diagnosis):
    for d in ("NPDR", "BRVO", "CRVO"):
        case = by_diagnosis[d]
        m, ring = case.masks["blocking"], _ring(case, case.masks["blocking"])
        for t, f in zip(case.times_s, case.ffa, strict=True):
            if t > case.phases_s["arterial"] + 2:
                assert f[m].mean() < f[ring].mean() - 8, (d, t)
        green = case.cf[..., 1].astype(float)  # and dark red in the photo
        assert green[_to_cf(case, m)].mean() < green[_to_cf(case, ring)].mean() - 5, d


def test_non_perfusion_dark_in_venous_phase(by_diagnosis):
    case = by_diagnosis["PDR"]
    m = case.masks["non-perfusion"].copy()
    for name in ("neovascularisation", "leakage"):  # new vessels grow at its edge
        m &= ~ndimage.binary_dilation(case.masks.get(name, np.zeros_like(m)), iterations=2)
    m &= ~ndimage.binary_dilation(case.anatomy["artery"] | case.anatomy["vein"])  # big vessels
    f = _frame(case, case.phases_s["venous"] + 5)
    assert f[m].mean() < f[_ring(case, m, 2, 6)].mean() - 10


def test_microaneurysms_light_up_early(by_diagnosis):
    case = by_diagnosis["NPDR"]
    m = case.masks["microaneurysm"]
    for t in (case.phases_s["arterial"] + 2, case.phases_s["venous"]):
        f = _frame(case, t)
        assert f[m].mean() > f[_ring(case, m)].mean() + 20, t


def test_drusen_stain_late_with_stable_area():
    idx = [i for i in range(200) if case_meta(SEED, i).diagnosis == "wet-AMD"]
    cases = (phantom_case(SEED, i, size=96) for i in idx)
    case = next(c for c in cases if "drusen" in c.masks)
    m = case.masks["drusen"]
    region = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(
        case.masks.get("leakage", np.zeros_like(m)), iterations=6
    )
    late, mid = case.ffa[-1].astype(float), _frame(case, 300.0)
    assert late[m].mean() > late[_ring(case, m)].mean() + 25
    areas = [int((f[region] > _background(case, f) + 30).sum()) for f in (mid, late)]
    assert 0.6 < areas[1] / max(areas[0], 1) < 1.5, areas
    assert areas[1] < 1.6 * (m & region).sum(), areas


def test_phase_order_arteries_then_veins_then_fading():
    case = phantom_case(0, first_of_each(0, ["normal"])[0], size=256, frames=96)
    ph, a, v = case.phases_s, case.anatomy["artery"], case.anatomy["vein"]
    vessels = a | v

    def mean(mask: np.ndarray, t: float) -> float:
        return float(_frame(case, t)[mask].mean())

    pre, peak, late = mean(vessels, 0.0), mean(vessels, ph["venous"] + 5), mean(vessels, 600.0)
    assert pre < 25 and peak > pre + 100 and late < peak - 60
    early = case.times_s[(case.times_s > ph["arterial"] + 0.8) & (case.times_s < ph["laminar"])]
    assert len(early), case.times_s
    f = _frame(case, float(early[-1]))  # arteries full, veins still dark
    bg = _background(case, f)
    assert f[a].mean() - bg > 2 * (f[v].mean() - bg) + 20
    lam = case.times_s[(case.times_s > ph["laminar"] + 1.5) & (case.times_s < ph["laminar"] + 3)]
    assert len(lam), case.times_s
    wall, centre = case.anatomy["vein_wall"], case.anatomy["vein_centre"]
    assert wall.sum() > 20 and centre.sum() > 5
    f = _frame(case, float(lam[0]))
    assert f[wall].mean() > f[centre].mean() + 10  # laminar flow: bright walls, dark centre
    assert case.anatomy["faz"].any() and _frame(case, ph["venous"])[case.anatomy["faz"]].mean() < (
        _background(case, _frame(case, ph["venous"]))
    )


def test_frame_times_dense_early_sparse_late():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 16, 64, 300):
        t = frame_times(rng, n, 11.0)
        assert len(t) == n and np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] <= 600
        assert t[-1] > 540  # ends in the late phase
    t = frame_times(rng, 16, 11.0)
    assert ((t > 10) & (t < 40)).sum() >= 8 and (t > 40).sum() >= 4 and t[0] < 11


def test_patients_splits_and_catalog(tmp_path):
    metas = [case_meta(SEED, i) for i in range(120)]
    eyes = defaultdict(set)
    for m in metas:
        eyes[m.patient_id].add(m.eye)
        assert m.split == hash_split(m.patient_id, SEED)
    assert sum(e == {"OD", "OS"} for e in eyes.values()) >= 10
    assert sum(len(e) == 1 for e in eyes.values()) >= 10
    splits = defaultdict(set)
    for m in metas:
        splits[m.patient_id].add(m.split)
    assert all(len(s) == 1 for s in splits.values())
    counts = pl.Series("diagnosis", [m.diagnosis for m in metas]).value_counts()
    assert set(counts["diagnosis"]) == set(DIAGNOSES) and counts["count"].min() >= 8
    ages = defaultdict(list)
    for m in metas:
        ages[m.diagnosis].append(m.age)
    assert np.mean(ages["wet-AMD"]) > np.mean(ages["CSC"]) + 15
    out = write_phantom_cohort(
        tmp_path / "c", cases=8, size=48, frames=3, seed=SEED, progress=False
    )
    validate_catalog(pl.read_parquet(out / "catalog.parquet"))


def test_misregistration_small_but_real():
    case = phantom_case(0, first_of_each(0, ["normal"])[0], size=128, frames=16)
    dx, dy, deg = case.registration
    assert 1.0 < np.hypot(dx, dy) < 5.0 and 1.0 <= abs(deg) <= 3.0

    def edges(img: np.ndarray) -> np.ndarray:
        img = img.astype(float)
        return ndimage.gaussian_filter(img, 1) - ndimage.gaussian_filter(img, 4)

    cf = -edges(case.cf[..., 1])  # vessels dark in the photo's green channel
    ffa = edges(_frame(case, case.phases_s["venous"] + 5))
    core = np.zeros_like(case.fov)
    core[24:-24, 24:-24] = True
    scores = {
        (sx, sy): float((np.roll(cf, (sy, sx), axis=(0, 1)) * ffa)[core].mean())
        for sx in range(-7, 8)
        for sy in range(-7, 8)
    }
    best = max(scores, key=scores.get)
    assert best != (0, 0)
    assert abs(best[0] - dx) <= 1.5 and abs(best[1] - dy) <= 1.5, (best, case.registration)


def test_contact_sheet_rows_per_diagnosis(tmp_path):
    sheet = write_preview(tmp_path / "sheet.png", seed=SEED, size=48, frames=6)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    rows = len(DIAGNOSES)
    assert sheet.shape[0] == rows * (14 + 48) + (rows - 1) * 2
    assert sheet.shape[1] == 5 * 48 + 4 * 2
    assert np.asarray(Image.open(tmp_path / "sheet.png")).shape == sheet.shape
    one = contact_sheet([phantom_case(SEED, 0, size=48, frames=6)], phases_s=(20.0, 600.0))
    assert one.shape == (14 + 48, 3 * 48 + 2 * 2, 3)
    with pytest.raises(ValueError, match="cases"):
        contact_sheet([])


def test_splat_matches_brute_force():
    from retrieval.data.phantom.raster import Q_MAX, R_MIN_PX, splat

    rng = np.random.default_rng(0)
    x, y = rng.uniform(-4, 52, 120), rng.uniform(-4, 52, 120)
    r = rng.uniform(0.2, 3.5, 120)
    got = splat(x, y, r, (48, 40))
    yy, xx = np.mgrid[0:48, 0:40]
    d = np.hypot(xx[None] - x[:, None, None], yy[None] - y[:, None, None])
    q = d / np.maximum(r, R_MIN_PX)[:, None, None]  # (N, H, W)
    hit = q.min(0) < Q_MAX
    np.testing.assert_array_equal(got.hit, hit)
    np.testing.assert_allclose(got.q[hit], q.min(0)[hit], atol=1e-4)
    np.testing.assert_array_equal(got.idx[hit], q.argmin(0)[hit])
