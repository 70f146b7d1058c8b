"""CF↔FFA registration: phantom pairs with a known misregistration, wrong pairs, the
resampling, a cohort registered in place and the training data's registered pairs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from encoder.fov import detect_video_fov, fov_square
from retrieval import Cohort
from retrieval.apps.cli import app
from retrieval.data.cohort import CATALOG_NAME, write_catalog
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.phantom import phantom_case, write_phantom_cohort
from retrieval.data.registration import (
    MIN_QUALITY,
    corner_error,
    register_cohort,
    register_pair,
    similarity_matrix,
    tile_quality,
    venous_frames,
    warp_cf,
)
from retrieval.data.training_data import case_squares


def true_matrix(case) -> np.ndarray:
    dx, dy, deg = case.registration  # about the field of view's centre
    return similarity_matrix(dx, dy, deg, case.fov_circle[:2])


def _corner_errors(seed: int, indices: range, size: int) -> tuple[list[float], list[float]]:
    """Corner errors (px) of phantom pairs before and after registration; the pairs marked
    ok must be right (a pair with a low quality may be left unregistered)."""
    before, after = [], []
    for i in indices:
        case = phantom_case(seed, i, size=size)
        reg = register_pair(case.cf, case.ffa, case.times_s)
        assert reg.status == ("ok" if reg.ok else "failed") and len(reg.as_list()) == 6
        shape = case.ffa.shape[1:]
        before.append(corner_error(np.eye(3)[:2], true_matrix(case), shape))
        after.append(corner_error(reg.matrix, true_matrix(case), shape))
        assert after[-1] < 2 * size / 128 or not reg.ok, (i, after[-1], reg.quality)
    return before, after


def test_phantom_pairs_register_within_a_pixel_at_128():
    before, after = _corner_errors(0, range(5), 128)
    assert np.median(after) <= 1.0, after
    assert np.median(after) < np.median(before) / 2


@pytest.mark.slow
def test_phantom_pairs_register_within_three_pixels_at_512():
    before, after = _corner_errors(1, range(4), 512)
    assert np.median(after) <= 3.0, after
    assert np.median(after) < np.median(before) / 3


def test_another_eyes_cf_fails():
    ffa_case, other = phantom_case(2, 0, size=128), phantom_case(2, 3, size=128)
    assert ffa_case.patient_id != other.patient_id
    reg = register_pair(other.cf, ffa_case.ffa, ffa_case.times_s)
    assert not reg.ok and reg.status == "failed"
    assert 0.0 <= reg.quality < MIN_QUALITY


def test_flat_pictures_fail_without_error():
    reg = register_pair(np.zeros((64, 64, 3), np.uint8), np.zeros((3, 64, 64), np.uint8))
    assert not reg.ok and reg.quality == 0.0


def test_tiles_without_vessels_agree_on_nothing():
    """A vessel map is a constant level away from its vessels; two such tiles share no
    vessel, whatever rounding the level leaves (float32 means once scored them 1.0)."""
    yy, xx = np.mgrid[:128, :128]
    field = (yy - 63.5) ** 2 + (xx - 63.5) ** 2 < 60**2
    flat = np.full((128, 128), 0.0035131292, np.float32)  # a real map's level
    for tiles in (4, 8):
        assert tile_quality(flat, field, flat.copy(), tiles) == 0.0
    vessels = flat.copy()
    vessels[::9] += 0.05  # lines: the same structure on both sides agrees fully
    assert tile_quality(vessels, field, vessels.copy(), 4) == pytest.approx(1.0)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="cf must be"):
        register_pair(np.zeros((64, 64), np.uint8), np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="ffa must be"):
        register_pair(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="6 finite numbers"):
        warp_cf(np.zeros((8, 8, 3), np.uint8), [1, 0, 0, 0, 1], (8, 8))


def test_venous_frames_follow_the_brightest():
    ffa = np.zeros((6, 4, 4), np.uint8)
    ffa[2] = 200  # the peak (laminar flow), veins full a few seconds later
    times = [0.0, 10.0, 15.0, 22.0, 45.0, 300.0]
    assert venous_frames(ffa, times).tolist() == [3]
    assert venous_frames(ffa, None).tolist() == [3, 4, 5]


def test_warp_cf_moves_the_photo_by_the_matrix():
    rng = np.random.default_rng(0)
    cf = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    shifted = warp_cf(cf, [1, 0, 3, 0, 1, -2], (40, 50))  # CF (x, y) → FFA (x + 3, y - 2)
    np.testing.assert_array_equal(shifted[0:38, 3:50], cf[2:40, 0:47])
    assert (shifted[:, :3] == 0).all() and (shifted[38:] == 0).all()
    bigger = warp_cf(cf, similarity_matrix(0, 0, 0, (0, 0), scale=2.0), (80, 100))
    assert bigger.shape == (80, 100, 3)


def test_warp_cf_undoes_the_phantom_misregistration():
    case = phantom_case(0, 1, size=128)
    warped = warp_cf(case.cf, true_matrix(case), case.ffa.shape[1:])
    vessels = case.anatomy["vein"] | case.anatomy["artery"]
    inside = case.fov & ~vessels
    # vessels are dark in the CF's green channel where the FFA's masks put them
    before = case.cf[..., 1][vessels].mean() / case.cf[..., 1][inside].mean()
    after = warped[..., 1][vessels].mean() / warped[..., 1][inside].mean()
    assert after < before


@pytest.fixture
def phantom_cohort(tmp_path):
    return write_phantom_cohort(tmp_path / "c", cases=3, size=96, frames=8, seed=4, progress=False)


def test_register_cohort_in_place(phantom_cohort):
    assert Cohort.open(phantom_cohort).catalog["registration_status"].null_count() == 3
    result = register_cohort(phantom_cohort, progress=False)
    assert result.registered + len(result.failed) == 3 and result.kept == 0
    cat = Cohort.open(phantom_cohort).catalog
    assert cat["registration_status"].null_count() == 0
    assert cat["cf_fov"].null_count() == 0 and cat["ffa_fov"].null_count() == 0
    for row in cat.filter(pl.col("registration_status") == "ok").iter_rows(named=True):
        case = phantom_case(4, int(row["case_id"].split("-")[-1]), size=96, frames=8)
        matrix = np.asarray(row["registration"]).reshape(2, 3)
        assert corner_error(matrix, true_matrix(case), (96, 96)) < 1.5
    again = register_cohort(phantom_cohort, progress=False)
    assert again.kept == 3 and again.registered == 0
    assert register_cohort(phantom_cohort, force=True, progress=False).kept == 0


def test_register_cli(phantom_cohort):
    result = CliRunner().invoke(app, ["register", str(phantom_cohort)])
    assert result.exit_code == 0, result.output
    assert "registered" in result.output
    bad = CliRunner().invoke(app, ["register", str(phantom_cohort / "nope")])
    assert bad.exit_code == 2 and "nope" in bad.output


def _set_registration(root, matrix: list[float] | None, status: str | None) -> None:
    cohort = Cohort.open(root)
    cat = cohort.catalog.with_columns(
        pl.Series("registration", [matrix] * len(cohort), pl.List(pl.Float64())),
        pl.Series("registration_status", [status] * len(cohort), pl.String()),
        pl.Series("registration_quality", [0.9 if status else None] * len(cohort), pl.Float64()),
    )
    write_catalog(cat, root / CATALOG_NAME)


def test_training_data_warps_a_registered_cf(phantom_cohort):
    shift = [1.0, 0.0, 6.0, 0.0, 1.0, -4.0]
    _set_registration(phantom_cohort, shift, "ok")
    case = Cohort.open(phantom_cohort).cases()[0]
    cf, video = case_squares(case, 64)
    ffa = read_ffa(case.ffa_path)
    circle = detect_video_fov(ffa)
    expected = fov_square(warp_cf(read_cf(case.cf_path), shift, ffa.shape[1:]), 64, circle)
    np.testing.assert_array_equal(cf, expected)
    assert video.shape == (len(ffa), 64, 64)
    _set_registration(phantom_cohort, shift, "failed")  # a failed one is not used
    unregistered, _ = case_squares(Cohort.open(phantom_cohort).cases()[0], 64)
    assert not np.array_equal(unregistered, expected)
