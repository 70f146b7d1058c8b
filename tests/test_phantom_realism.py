"""Realism of the phantom's colour photos: the measurements, and the phantom against a
real fundus photo at the same scale."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.data.phantom import case_meta, phantom_case
from retrieval.data.phantom.realism import (
    FOV_FILL,
    METRICS,
    SCALE_PX,
    at_scale,
    fov_circle,
    measure,
    measure_at_scale,
    metric_ranges,
    photo_variations,
)

skdata = pytest.importorskip("skimage.data")


def _flat_photo(size: int = SCALE_PX, colour=(200, 80, 58)) -> np.ndarray:
    """A uniform orange disc (r = FOV_FILL of the half width) on black, a little noise."""
    rng = np.random.default_rng(0)
    v = (np.arange(size) + 0.5) / (size / 2) - 1
    inside = np.hypot(v[None, :], v[:, None]) < FOV_FILL
    img = np.asarray(colour, float) * (1 + 0.01 * rng.standard_normal((size, size, 1)))
    return (np.clip(img, 0, 255) * inside[..., None]).astype(np.uint8)


@pytest.fixture(scope="module")
def real_range() -> dict[str, tuple[float, float]]:
    return metric_ranges(list(photo_variations(skdata.retina()).values()))


@pytest.fixture(scope="module")
def phantom_rows() -> dict[int, dict[str, float]]:
    """Three normal eyes and two diseased ones of cohort 0, at 512 px."""
    normal = [i for i in range(64) if case_meta(0, i).diagnosis == "normal"][:3]
    return {
        i: measure(phantom_case(0, i, size=SCALE_PX, frames=2).cf).as_dict()
        for i in normal + [0, 5]  # wet-AMD, PDR
    }


def test_thin_dark_line_raises_thin_density():
    flat = _flat_photo()
    lined = flat.copy()
    lined[250:253, 60:450] = (150, 40, 30)  # a 3 px dark vessel across the field
    lined[100:450, 300:302] = (170, 55, 40)  # and a 2 px fainter one
    before, after = measure_at_scale(flat), measure_at_scale(lined)
    assert before.thin_density < 0.002
    expected = (3 * 390 + 2 * 350) / (np.pi * (FOV_FILL * SCALE_PX / 2 - 8) ** 2)
    assert 0.7 * expected < after.thin_density - before.thin_density < 1.6 * expected
    assert after.pale_pattern < 0.002  # dark lines are no pale pattern


def test_pale_bands_raise_pale_pattern_not_thin_density():
    flat = _flat_photo()
    banded = flat.copy()
    for y in (150, 250, 350):
        banded[y : y + 8, 80:430] = (220, 92, 66)  # pale stripes 8 px wide
    before, after = measure_at_scale(flat), measure_at_scale(banded)
    assert after.pale_pattern > before.pale_pattern + 0.03
    assert after.thin_density < before.thin_density + 0.01


def test_colour_shift_moves_the_ratios():
    base = measure_at_scale(_flat_photo(colour=(200, 80, 58)))
    assert base.r_over_g == pytest.approx(200 / 80, rel=0.02)
    assert base.g_over_b == pytest.approx(80 / 58, rel=0.02)
    redder = measure_at_scale(_flat_photo(colour=(230, 80, 58)))
    bluer = measure_at_scale(_flat_photo(colour=(200, 80, 75)))
    assert redder.r_over_g == pytest.approx(base.r_over_g * 230 / 200, rel=0.02)
    assert redder.g_over_b == pytest.approx(base.g_over_b, rel=0.02)
    assert bluer.g_over_b == pytest.approx(base.g_over_b * 58 / 75, rel=0.02)


def test_at_scale_centres_the_field_whatever_the_framing():
    disc = _flat_photo(300)
    wide = np.zeros((360, 640, 3), np.uint8)
    wide[40:340, 250:550] = disc  # an off-centre circle in a 16:9 frame
    out = at_scale(wide)
    assert out.shape == (SCALE_PX, SCALE_PX, 3) and out.dtype == np.uint8
    c = fov_circle(out)
    centre = SCALE_PX / 2 - 0.5
    assert abs(c.cx - centre) < 2 and abs(c.cy - centre) < 2
    assert c.r == pytest.approx(FOV_FILL * SCALE_PX / 2, rel=0.02)


@pytest.mark.parametrize(
    ("photo", "match"),
    [
        (np.zeros((64, 64), np.uint8), "cf"),
        (np.zeros((64, 64, 3), np.float32), "cf"),
        (np.zeros((64, 64, 3), np.uint8), "field of view"),
    ],
)
def test_bad_photos_are_named(photo, match):
    with pytest.raises(ValueError, match=match):
        measure(photo)


def test_real_photo_and_its_variations(real_range):
    real = measure(skdata.retina()).as_dict()
    for k in METRICS:
        lo, hi = real_range[k]
        assert lo <= real[k] <= hi, k
    # the scale of the reference: vessels cover 11-17 % of the field, red about 2.5 x green
    assert 0.11 < real["thin_density"] < 0.17 and 2.3 < real["r_over_g"] < 2.7


def test_phantom_photos_fall_in_the_real_range(real_range, phantom_rows):
    """Colour inside the real range; thin structures: the median inside it, each photo
    within 0.75x-1.3x of it (eyes differ in how many vessels they show; the real range
    is that of one eye); the pale pattern no stronger than in the real photo."""
    lo, hi = real_range["thin_density"]
    for i, row in phantom_rows.items():
        for k in ("r_over_g", "g_over_b"):
            assert real_range[k][0] <= row[k] <= real_range[k][1], (i, k, row, real_range)
        assert row["pale_pattern"] <= real_range["pale_pattern"][1], (i, row, real_range)
        assert 0.75 * lo <= row["thin_density"] <= 1.3 * hi, (i, row, real_range)
    median = np.median([r["thin_density"] for r in phantom_rows.values()])
    assert lo <= median <= hi, (median, real_range)
