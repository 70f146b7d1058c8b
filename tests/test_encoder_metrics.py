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
from encoder.evaluate import video_metrics
from encoder.metrics import (
    brightness_curve,
    curve_mae,
    venous_frames,
    venous_vessel_agreement,
    vessel_agreement,
    vessel_field,
    vesselness,
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


def _venous_frame(size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy eye's venous-phase frame (H, W) in [0, 1] and its field of view (H, W)."""
    data = toy_paired_videos(1, size, 6, seed=seed)
    idx = venous_frames(data.ffa[0], data.times_s[0])
    frame = torch.from_numpy(data.ffa[0][idx].mean(0)).double() / 255
    return frame, torch.from_numpy(data.fov[0])


def test_vesselness_finds_bright_vessels_inside_the_fov() -> None:
    frame = torch.zeros(48, 48, dtype=torch.float64)
    frame[:, 23:25] = 0.8  # a bright vertical vessel
    fov = torch.ones(48, 48, dtype=torch.bool)
    fov[:, 40:] = False
    v = vesselness(frame, fov)
    assert v[24, 24] > 10 * v[24, 10] and v[24, 10] >= 0
    assert np.all(v[:, 40:] == 0)  # outside the FOV
    assert vessel_field(fov).sum() < fov.sum() and not vessel_field(fov)[:, 38:].any()
    dark = vesselness(1 - frame, fov)  # a dark line is no bright vessel
    assert dark[24, 24] < v[24, 24] / 10


def test_vessel_auc_and_dice_against_itself_and_noise() -> None:
    frame, fov = _venous_frame()
    same = vessel_agreement(frame, frame, fov)
    assert same == {"vessel_auc": 1.0, "vessel_dice": 1.0}
    rng = np.random.default_rng(0)
    aucs, dices = [], []
    for _ in range(5):
        noise = torch.from_numpy(rng.uniform(0, 1, frame.shape))
        got = vessel_agreement(noise, frame, fov)
        aucs.append(got["vessel_auc"])
        dices.append(got["vessel_dice"])
    assert np.mean(aucs) == pytest.approx(0.5, abs=0.07)
    assert np.mean(dices) < 0.3  # chance: the masks' share, 15 %
    noisy = (frame + 0.05 * torch.from_numpy(rng.standard_normal(frame.shape))).clamp(0, 1)
    close = vessel_agreement(noisy, frame, fov)
    assert close["vessel_auc"] > 0.85 and close["vessel_dice"] > 0.5  # the same vessels
    other, _ = _venous_frame(seed=3)  # another eye: other vessels
    assert vessel_agreement(other, frame, fov)["vessel_auc"] < close["vessel_auc"]
    flat = vessel_agreement(torch.full_like(frame, 0.4), frame, fov)
    assert flat == {"vessel_auc": 0.5, "vessel_dice": 0.0}
    for target, field in ((torch.zeros_like(frame), fov), (frame, fov & False)):
        got = vessel_agreement(frame, target, field)  # a flat real frame; an empty FOV
        assert math.isnan(got["vessel_auc"]) and math.isnan(got["vessel_dice"])


def test_venous_vessel_agreement_uses_the_real_videos_venous_frames() -> None:
    data = toy_paired_videos(1, 64, 6, seed=1)
    real = torch.from_numpy(data.ffa[0]).double() / 255
    fov = torch.from_numpy(data.fov[0])
    times = data.times_s[0]
    assert venous_vessel_agreement(real, real, fov, times)["vessel_auc"] == 1.0
    idx = venous_frames(data.ffa[0], times)
    spoiled = real.clone()
    others = [j for j in range(len(real)) if j not in set(idx.tolist())]
    spoiled[others] = 0.5  # the frames that are not venous do not count
    assert venous_vessel_agreement(spoiled, real, fov, times)["vessel_dice"] == 1.0
    spoiled[idx] = 0.5
    assert venous_vessel_agreement(spoiled, real, fov, times)["vessel_dice"] == 0.0


def test_brightness_curve_error() -> None:
    real = torch.rand(5, 16, 16, dtype=torch.float64) * 0.5
    fov = torch.zeros(16, 16, dtype=torch.bool)
    fov[2:14, 2:14] = True
    curve = brightness_curve(real, fov)
    assert curve.shape == (5,) and curve[2] == pytest.approx(float(real[2][fov].mean()))
    assert curve_mae(real, real, fov) == 0.0
    assert curve_mae(real + 0.1, real, fov) == pytest.approx(0.1)
    assert curve_mae(real * 1.5, real, fov) > curve_mae(real * 1.2, real, fov) > 0
    brighter_outside = real.clone()
    brighter_outside[:, 0, 0] = 1.0  # outside the FOV: ignored
    assert curve_mae(brighter_outside, real, fov) == 0.0
    later = real.clone()
    later[3:] += 0.2  # two of five frames 0.2 brighter
    assert curve_mae(later, real, fov) == pytest.approx(0.4 * 0.2)


def test_video_metrics_of_the_real_videos() -> None:
    test = toy_paired_videos(3, 48, 6, seed=4)
    row = video_metrics(test.ffa, test)
    assert row["vessel_auc"] == 1.0 and row["vessel_dice"] == 1.0 and row["curve_mae"] == 0.0
    dimmer = video_metrics((test.ffa * 0.5).astype(np.uint8), test)
    assert dimmer["curve_mae"] > 0.02 and dimmer["vessel_dice"] > 0.9  # same vessels, dimmer


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
    for r in [*report["models"].values(), *report["baselines"].values()]:
        assert 0 <= r["vessel_auc"] <= 1 and 0 <= r["vessel_dice"] <= 1 and r["curve_mae"] >= 0
    assert "percentile" in report["vessel_mask"]
    curves = report["brightness_curves"]
    assert len(curves["times_s"]) == test.frames and curves["times_s"] == sorted(curves["times_s"])
    assert set(curves["models"]) == set(models) and set(curves["baselines"]) == {
        "train_mean",
        "cf_green",
    }
    assert all(len(c) == test.frames for c in [curves["real"], *curves["baselines"].values()])
    real = [
        np.mean([test.ffa[i, j][test.fov[i]].mean() / 255 for i in range(len(test))])
        for j in range(test.frames)
    ]
    assert curves["real"] == pytest.approx(real)  # the mean over cases of each FOV's mean
    green = curves["baselines"]["cf_green"]
    gap = np.mean(np.abs(np.array(green) - np.array(curves["real"])))
    assert report["baselines"]["cf_green"]["curve_mae"] >= gap - 1e-9  # |mean| <= mean |.|
    path = tmp_path / "i3d.pt"
    torch.jit.script(_TinyI3D()).save(str(path))
    report = evaluate_generation({"micro": models["micro"]}, test, train, i3d_path=path)
    assert report["distribution_metric"] == "fvd"
    assert all("fvd" in r and "fvd_proxy" not in r for r in report["baselines"].values())
