"""Generation metrics and evaluate_generation, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from encoder import (
    DataError,
    Generator,
    PairedVideos,
    cf_green_videos,
    evaluate_generation,
    frechet_distance,
    fvd,
    fvd_proxy,
    lesion_psnr,
    load_i3d,
    psnr,
    ssim,
    temporal_consistency_gap,
    train_mean_videos,
)
from encoder.testing import micro_scale, toy_paired_videos


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_psnr_inside_the_mask() -> None:
    target = torch.zeros(2, 8, 8)
    pred = torch.full((2, 8, 8), 0.1)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    pred[:, 0, 0] = 1.0  # outside the mask: ignored
    assert psnr(pred, target, mask) == pytest.approx(20.0)  # mse 0.01, range 1
    assert math.isnan(lesion_psnr(pred, target, torch.zeros(8, 8, dtype=torch.bool)))


def test_ssim_over_the_mask() -> None:
    target = torch.rand(3, 32, 32)
    pred = (target + 0.1 * torch.randn(3, 32, 32)).clamp(0, 1)
    full = torch.ones(32, 32, dtype=torch.bool)
    assert ssim(target, target, full) == pytest.approx(1.0)
    ref = structural_similarity_index_measure(pred[:, None], target[:, None], data_range=1.0)
    assert ssim(pred, target, full) == pytest.approx(float(ref), abs=1e-5)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:16] = True
    changed = pred.clone()
    changed[:, 28:] = 0.0  # far (> 5 px SSIM window) from the mask: no effect
    assert ssim(changed, target, mask) == pytest.approx(ssim(pred, target, mask), abs=1e-9)


def test_temporal_consistency_gap() -> None:
    target = torch.zeros(3, 4, 4)
    target[1] = 0.5  # |Δ| = 0.5 then 0.5
    pred = torch.full((3, 4, 4), 0.2)  # static: |Δ| = 0
    mask = torch.ones(4, 4, dtype=torch.bool)
    assert temporal_consistency_gap(pred, target, mask) == pytest.approx(0.5)
    assert temporal_consistency_gap(target, target, mask) == 0.0


def _with_exact_moments(n: int, d: int, seed: int) -> np.ndarray:
    """n samples whose sample mean is 0 and sample covariance is exactly I."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    x -= x.mean(0)
    chol = np.linalg.cholesky(np.cov(x, rowvar=False))
    return x @ np.linalg.inv(chol).T


def test_frechet_distance_closed_forms() -> None:
    a = np.random.default_rng(0).standard_normal((50, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # diagonal Gaussians: ‖μ1 − μ2‖² + Σ (σ1 − σ2)²
    z1, z2 = _with_exact_moments(200, 3, 1), _with_exact_moments(300, 3, 2)
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert frechet_distance(z1 * s1 + mu1, z2 * s2 + mu2) == pytest.approx(expected, rel=1e-8)
    # full covariances: tr(S1 + S2 − 2 (S1 S2)^½) with the root from eigenvalues
    m1, m2 = (
        np.array([[1.0, 0.5, 0], [0, 1, 0.3], [0, 0, 1]]),
        np.array([[2.0, 0, 0], [0.4, 1, 0], [0, 0.2, 0.5]]),
    )
    x1, x2 = z1 @ m1.T + mu1, z2 @ m2.T + mu2
    c1, c2 = m1 @ m1.T, m2 @ m2.T
    root_trace = np.sum(np.sqrt(np.linalg.eigvals(c1 @ c2).real))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2) - 2 * root_trace
    assert frechet_distance(x1, x2) == pytest.approx(expected, rel=1e-8)
    assert np.trace(scipy.linalg.sqrtm(c1 @ c2)).real == pytest.approx(root_trace)
    with pytest.raises(DataError, match=">= 2 samples"):
        frechet_distance(a[:1], a)
    with pytest.raises(DataError, match=r"\(N, D\)"):
        frechet_distance(a, a[:, :2])


def test_frechet_distance_singular_covariances() -> None:
    a = np.random.default_rng(0).standard_normal((5, 20))  # rank 4 < 20
    b = a + 1.0
    assert frechet_distance(a, b) == pytest.approx(20.0, rel=1e-3)


class _TinyI3D(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 6, 3, stride=(1, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))  # (B, 6)


class _StyleGanVI3D(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _TinyI3D()

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = False,
        resize: bool = False,
        return_features: bool = False,
    ) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1
        return self.inner(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_fvd_with_a_local_torchscript_i3d(tmp_path) -> None:
    real = toy_paired_videos(6, 32, 4, seed=0).ffa
    other = toy_paired_videos(6, 32, 4, seed=5).ffa // 2
    for cls in (_TinyI3D, _StyleGanVI3D):
        path = tmp_path / f"{cls.__name__}.pt"
        torch.jit.script(cls()).save(str(path))
        i3d = load_i3d(path)
        assert fvd(real, real, i3d) == pytest.approx(0.0, abs=1e-6)
        assert fvd(real, other, i3d) > 0.0


def test_fvd_proxy_uses_our_encoder() -> None:
    g = Generator(micro_scale().generator)
    data = toy_paired_videos(6, 32, 4)
    assert fvd_proxy(g, data.ffa, data.ffa, data.times_s) == pytest.approx(0.0, abs=1e-6)
    assert fvd_proxy(g, data.ffa, data.ffa // 3, data.times_s) > 0.0


def _constant_videos(levels: list[list[int]], times: list[list[float]]) -> PairedVideos:
    n, t = len(levels), len(levels[0])
    ffa = np.broadcast_to(np.array(levels, np.uint8)[:, :, None, None], (n, t, 4, 4)).copy()
    cf = np.full((n, 4, 4, 3), 100, np.uint8)
    return PairedVideos.from_arrays(cf, ffa, np.array(times), [f"c{i}" for i in range(n)])


def test_train_mean_baseline_by_frame_time() -> None:
    train = _constant_videos([[0, 100, 200], [20, 60, 100]], [[1, 2, 3], [1, 2, 3]])
    mean = train_mean_videos(train, np.array([[1.0, 2.0, 3.0], [1.5, 0.0, 9.0]]))
    assert mean.shape == (2, 3, 4, 4)
    assert mean[0, :, 0, 0].tolist() == [10, 80, 150]  # matching times: mean at each position
    assert mean[1, :, 0, 0].tolist() == [45, 10, 150]  # halfway; clamped before and after
    shifted = _constant_videos([[0, 100, 200], [20, 60, 100]], [[1, 2, 3], [2, 3, 4]])
    assert train_mean_videos(shifted, np.array([[2.0, 2.0, 2.0]]))[0, 0, 0, 0] == 60  # (100+20)/2


def test_cf_green_baseline() -> None:
    data = toy_paired_videos(3, 16, 4)
    green = cf_green_videos(data)
    assert green.shape == data.ffa.shape and np.array_equal(green[1, 2], data.cf[1, ..., 1])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_evaluate_generation_report(tmp_path) -> None:
    sc = micro_scale()
    models = {"micro": Generator(sc.generator), "micro_per_frame": Generator(sc.generator)}
    test, train = toy_paired_videos(4, 32, 5, seed=1), toy_paired_videos(6, 32, 5, seed=2)
    report = evaluate_generation(models, test, train)
    assert report["distribution_metric"] == "fvd_proxy"
    assert report["feature_extractor"] == "generator-encoder:micro"
    assert set(report["models"]) == set(models)
    assert set(report["baselines"]) == {"train_mean", "cf_green"}
    row = report["baselines"]["train_mean"]
    assert {"psnr", "ssim", "temporal_gap", "lesion_psnr", "lesion_cases", "fvd_proxy"} <= set(row)
    assert "fvd" not in row and row["lesion_cases"] >= 1
    path = tmp_path / "i3d.pt"
    torch.jit.script(_TinyI3D()).save(str(path))
    report = evaluate_generation({"micro": models["micro"]}, test, train, i3d_path=path)
    assert report["distribution_metric"] == "fvd"
    assert all("fvd" in r and "fvd_proxy" not in r for r in report["baselines"].values())
