"""Histogram matching of CF photos: a camera's exposure, gamma and colour balance undone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from encoder import EmbedderConfig, create_embedder, fit_training_statistics
from encoder.colour import field_mask, histogram_reference, match_histograms
from encoder.data import cf_tensor
from encoder.fov import fov_square
from encoder.testing import toy_paired_videos

pytestmark = pytest.mark.usefixtures("deterministic_torch")


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    """The scikit-image retina (a real photo) as the model sees it, uint8 (1, 128, 128, 3)."""
    return fov_square(skdata.retina(), 128)[None]


def _camera(photo: np.ndarray, gains, gamma: float) -> np.ndarray:
    """uint8 photo → another camera's: per-channel gains, then an exposure curve."""
    u = np.clip(photo / 255.0 * np.asarray(gains), 0, 1) ** gamma
    return (255 * u).round().astype(np.uint8)


def _inside(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute difference of (1, 3, S, S) tensors over the mask (1, S, S)."""
    return float((a - b).abs().permute(1, 0, 2, 3)[:, mask].mean())


@pytest.mark.parametrize(
    ("gains", "gamma"),
    [((0.6, 0.6, 0.6), 1.0), ((1.0, 1.0, 1.0), 1.5), ((0.85, 1.0, 0.7), 0.7)],
    ids=["under-exposed", "gamma 1.5", "colour cast"],
)
def test_matching_undoes_a_cameras_exposure_gamma_and_colour_balance(retina, gains, gamma) -> None:
    ref = histogram_reference(cf_tensor(toy_paired_videos(6, 128, 2, seed=0).cf))
    x, y = cf_tensor(retina), cf_tensor(_camera(retina, gains, gamma))
    mask = field_mask(x) & field_mask(y)  # the darkest rim may fall into the surround
    assert float((field_mask(x) ^ field_mask(y)).float().mean()) < 0.01
    assert 0.6 < float(mask.float().mean()) < 0.8
    before = _inside(x, y, mask)
    after = _inside(match_histograms(x, ref), match_histograms(y, ref), mask)
    assert before > 0.05 and after < 0.01, (before, after)


def test_a_photo_matched_to_its_own_histogram_is_left_as_it_is(retina) -> None:
    x = cf_tensor(retina)
    ref = histogram_reference(x)
    assert ref.shape == (3, 256) and bool((ref.diff(dim=1) >= 0).all())
    y = match_histograms(x, ref)
    mask = field_mask(x)
    assert _inside(x, y, mask) < 1 / 127.5  # within one 8-bit level on average
    assert torch.equal(y.permute(1, 0, 2, 3)[:, ~mask], x.permute(1, 0, 2, 3)[:, ~mask])


def test_the_embedder_sees_a_re_exposed_photo_as_the_same_photo(retina, micro_run_dir) -> None:
    """With matching, the backbone features of a photo under another colour balance are
    (nearly) the clean one's; without it, they move. The reference is fitted on training
    photos. (At 32 px a gamma also moves the dark rim across the field's edge.)"""
    small = EmbedderConfig(image_size=32, dim=16, grid=2, attn_hidden=8, clinical_dim=8)
    train = toy_paired_videos(6, 32, 2, seed=1)
    clean = fov_square(skdata.retina(), 32)[None]
    shifted = _camera(clean, (0.85, 1.0, 0.7), 1.0)
    moved = {}
    for match in (False, True):
        e = create_embedder(small, run_dir=micro_run_dir, cf_histogram_match=match)
        fit_training_statistics(e, train.cf, train.ffa)
        with torch.no_grad():
            a, b = e.cf_features(cf_tensor(clean)), e.cf_features(cf_tensor(shifted))
        moved[match] = float((a - b).norm() / a.norm())
        if match:  # the matching is the backbone's first step
            matched = match_histograms(cf_tensor(clean), e.cf_reference)
            assert torch.allclose(a, e.backbone.cf_features(matched))
    assert moved[True] < 0.01 and moved[True] < moved[False] / 5, moved
