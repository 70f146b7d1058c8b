"""Field-of-view normalisation (`encoder.fov`) and the phantom's camera framing: circles
found on wide, shifted, cut, dark, notched and labelled photos and on angiograms, the FOV
square every model input is cropped to, and the boxes mapped through it."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from encoder.data import fit_square
from encoder.errors import DataError
from encoder.fov import (
    FOV_FILL,
    FovCircle,
    detect_fov,
    detect_video_fov,
    fov_box,
    fov_square,
    fov_square_video,
    inscribed_circle,
    square_circle,
    stored_circle,
)
from retrieval.data.phantom import phantom_case
from retrieval.data.phantom.anatomy import FOV_R, FrameOptions, framing_options
from retrieval.search.explain import SideMap
from retrieval.search.region import from_square, photo_circle, to_square

SIZE = 48  # frame height of the detection cohort
CASES = 200
REAL = {"aspect": 1.5, "fov_deg": (30.0, 55.0), "circle": (0.9, 1.12), "shift": 0.06}


def _error(found: FovCircle, truth: tuple[float, float, float], size: int) -> float:
    """The larger of the centre and radius errors, as a share of the frame height."""
    cx, cy, r = truth
    return max(np.hypot(found.cx - cx, found.cy - cy), abs(found.r - r)) / size


@pytest.fixture(scope="module")
def cohort():
    """CASES phantom cases framed like a real cohort: 3:2, 30-55 degrees, shifted, cut."""
    return [phantom_case(3, i, size=SIZE, frames=2, **REAL) for i in range(CASES)]


def _rate(errors: list[float]) -> float:
    return float(np.mean(np.asarray(errors) <= 0.02))


# -- detection -----------------------------------------------------------------------------
def test_detects_real_cohort_framings_within_two_percent(cohort):
    assert {c.cf.shape for c in cohort} == {(SIZE, 72, 3)}
    cut = sum(c.fov_circle[1] - c.fov_circle[2] < 0 for c in cohort)
    assert cut > CASES // 4  # many circles cut at the top
    cf = [_error(detect_fov(c.cf), c.fov_circle, SIZE) for c in cohort]
    ffa = [_error(detect_video_fov(c.ffa), c.fov_circle, SIZE) for c in cohort]
    assert _rate(cf) >= 0.99 and _rate(ffa) >= 0.99, (max(cf), max(ffa))


def test_dark_photos(cohort):
    errors = []
    for c in cohort[:40]:
        dark = (c.cf.astype(np.float32) * 0.2).astype(np.uint8)
        errors.append(_error(detect_fov(dark), c.fov_circle, SIZE))
    assert _rate(errors) >= 0.99, max(errors)


def test_notch_and_burned_in_corner_text(cohort):
    errors = []
    for i, c in enumerate(cohort[:40]):
        img = Image.fromarray(c.cf)
        draw = ImageDraw.Draw(img)
        cx, cy, r = c.fov_circle
        a = np.radians(20 + 37 * i)  # a black notch cut into the circle's edge
        nx, ny = cx + r * np.cos(a), cy + r * np.sin(a)
        draw.rectangle([nx - 2, ny - 2, nx + 2, ny + 2], fill=(0, 0, 0))
        draw.rectangle([0, 0, 15, 6], fill=(255, 255, 255))  # a white label box
        draw.text((60, SIZE - 10), "OD", fill=(255, 255, 255))  # text, bottom right
        errors.append(_error(detect_fov(np.asarray(img)), c.fov_circle, SIZE))
    assert _rate(errors) >= 0.99, max(errors)


def test_angiogram_with_early_dark_frames():
    case = phantom_case(5, 1, size=64, frames=6, **REAL)
    assert case.ffa[0].mean() < case.ffa[2].mean() / 2  # before the dye: dark
    assert _error(detect_video_fov(case.ffa), case.fov_circle, 64) <= 0.02


def test_no_circle_falls_back_to_the_inscribed_circle():
    assert detect_fov(np.zeros((30, 40), np.uint8)) == inscribed_circle(30, 40)
    assert detect_fov(np.full((30, 40, 3), 128, np.uint8)) == inscribed_circle(30, 40)
    assert inscribed_circle(30, 40) == FovCircle(19.5, 14.5, 15.0)
    retina = skimage.data.retina()[300:1100, 300:1100]  # the retina fills the frame: no edge
    assert detect_fov(retina) == inscribed_circle(800, 800)


def test_retina_photo_crop_is_tight():
    image = skimage.data.retina()  # 1411 x 1411 RGB
    circle = detect_fov(image)
    bright = image.max(axis=-1) > 40
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    inside = np.hypot(xx - circle.cx, yy - circle.cy) <= circle.r
    assert bright[inside].mean() >= 0.95  # the circle holds retina
    assert inside[bright].mean() >= 0.95  # and the retina is in the circle
    assert photo_circle(image) == circle


def test_retina_photo_cut_into_a_wide_frame():
    image = skimage.data.retina()
    whole = detect_fov(image)
    frame = np.zeros((1111, 1666, 3), np.uint8)  # rows 150:1261 of the photo, 167 px right
    frame[:, 167 : 167 + 1411] = image[150:1261]
    found = detect_fov(frame)
    assert _error(found, (whole.cx + 167, whole.cy - 150, whole.r), 1111) <= 0.005


def test_explained_regions_are_boxes_on_the_photo():
    circle = FovCircle(120.0, 45.0, 57.0)
    side = SideMap(None, "cf", np.arange(16.0).reshape(4, 4), hw=(100, 240), circle=circle)
    top = side.top_regions(1)[0]
    assert (top["row"], top["col"]) == (3, 3)
    assert top["box"] == pytest.approx(list(from_square((0.75, 0.75, 1.0, 1.0), 100, 240, circle)))
    assert SideMap(None, "cf", side.regions).top_regions(1)[0]["box"] == [0.75, 0.75, 1.0, 1.0]


def test_circle_lists_and_errors():
    c = FovCircle(10.5, 20.0, 8.0)
    assert FovCircle.from_list(c.as_list()) == c and stored_circle(c.as_list()) == c
    assert stored_circle(None) is None
    with pytest.raises(DataError, match="circle"):
        FovCircle.from_list([1.0, 2.0])
    with pytest.raises(DataError, match="image"):
        detect_fov(np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match="video"):
        detect_video_fov(np.zeros((8, 8), np.uint8))


# -- the FOV square --------------------------------------------------------------------------
def test_fov_square_of_the_default_phantom_is_the_old_square():
    case = phantom_case(0, 0, size=64, frames=3)
    assert case.fov_circle == (31.5, 31.5, FOV_R * 32) and FOV_R == FOV_FILL
    assert fov_box(detect_fov(case.cf)) == (0, 0, 64)  # the crop is the whole frame
    new, old = fov_square(case.cf, 32), fit_square(case.cf, 32)
    assert np.abs(new.astype(int) - old).mean() < 0.5  # the mask's one-pixel edge only
    video = fov_square_video(case.ffa, 32)
    assert video.shape == (3, 32, 32) and video.dtype == np.uint8


def test_fov_square_centres_a_wide_shifted_cut_photo():
    case = phantom_case(2, 3, size=64, frames=2, aspect=1.5, circle=1.1, shift=0.08)
    out = fov_square(case.cf, 64)
    assert out.shape == (64, 64, 3)
    found = detect_fov(out)
    assert _error(found, (31.5, 31.5, FOV_FILL * 32), 64) <= 0.02
    yy, xx = np.mgrid[:64, :64]
    assert not out[np.hypot(xx - 31.5, yy - 31.5) > FOV_FILL * 32 + 2].any()  # black outside
    same = fov_square(case.cf, 64, FovCircle(*case.fov_circle))
    assert np.abs(same.astype(int) - out).mean() < 2.0
    assert square_circle(64) == FovCircle(31.5, 31.5, FOV_FILL * 32)


def test_boxes_follow_the_fov_square():
    circle = FovCircle(120.0, 45.0, 57.0)  # a 100 x 240 photo, circle cut at the top
    left, top, side = fov_box(circle)
    box = (0.3, 0.2, 0.6, 0.9)
    sq = to_square(box, 100, 240, circle)
    edges = (0.3 * 240 - left, 0.2 * 100 - top, 0.6 * 240 - left, 0.9 * 100 - top)
    assert sq == pytest.approx(tuple(e / side for e in edges))
    assert from_square(sq, 100, 240, circle) == pytest.approx(box)
    x0 = (circle.cx + 0.5 - circle.r) / 240  # the circle's left edge on the photo
    assert to_square((x0, 0.5, 0.9, 0.6), 100, 240, circle)[0] == pytest.approx(
        (1 - FOV_FILL) / 2, abs=0.01
    )


def test_engine_maps_a_region_of_a_wide_upload_through_its_fov_square(pixel_index):
    from retrieval.search.engine import CFQuery, Engine
    from retrieval.testing import PixelEncoder

    engine = Engine.open(pixel_index, encoder=PixelEncoder())
    case = phantom_case(2, 3, size=64, frames=2, aspect=1.5, circle=0.95, shift=0.05)
    cx, cy, r = case.fov_circle
    h, w = case.cf.shape[:2]
    edges = ((cx + 0.5 - r) / w, (cy + 0.5 - r) / h, (cx + 0.5 + r) / w, (cy + 0.5 + r) / h)
    box = tuple(float(v) for v in np.clip(edges, 0, 1))
    result = engine.search(CFQuery(case.cf), k=2, region=box)
    assert result.query["region_cells"] == [0, 8, 0, 8]  # the circle's box: the whole grid
    for hit in result.hits:  # the phantom index's photos are square: their FOV squares
        assert hit.region is not None and 0 <= hit.region[0] < hit.region[2] <= 1


# -- the phantom's framing -------------------------------------------------------------------
def test_field_of_view_scales_the_anatomy():
    narrow = phantom_case(0, 0, size=96, frames=2, fov_deg=30)
    wide = phantom_case(0, 0, size=96, frames=2, fov_deg=55)
    ratio = narrow.anatomy["disc"].sum() / wide.anatomy["disc"].sum()
    assert ratio == pytest.approx((55 / 30) ** 2, rel=0.15)  # the disc's area
    assert narrow.cf.shape == wide.cf.shape == (96, 96, 3)


def test_framing_options_name_the_bad_one():
    assert FrameOptions.of().is_default
    assert framing_options("3:2", "30-55", "1.0", 0.05)["aspect"] == 1.5
    for args, name in (
        (("3:0", None, None, 0.0), "--aspect"),
        (("1", "10-20", None, 0.0), "--fov-deg"),
        (("1", "x", None, 0.0), "--fov-deg"),
        (("1", None, "2", 0.0), "--circle"),
        (("1", None, None, 0.5), "--shift"),
    ):
        with pytest.raises(ValueError, match=name):
            framing_options(*args)
    with pytest.raises(ValueError, match="fov_deg"):
        phantom_case(0, 0, size=32, frames=2, fov_deg=(50, 40))


def test_cli_writes_a_real_cohorts_framing(tmp_path):
    from retrieval.apps.cli import app

    out = tmp_path / "c"
    args = ["phantom", str(out), "--cases", "2", "--size", "32", "--frames", "2"]
    got = CliRunner().invoke(
        app, [*args, "--aspect", "3:2", "--fov-deg", "30-55", "--shift", "0.05"]
    )
    assert got.exit_code == 0, got.output
    assert np.asarray(Image.open(next((out / "cf").iterdir()))).shape == (32, 48, 3)
    bad = CliRunner().invoke(app, [*args, "--fov-deg", "5"])
    assert bad.exit_code == 2 and "--fov-deg" in bad.output
