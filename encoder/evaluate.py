"""Generation evaluation of several generators and two baselines on the same test frames:
per-video metrics (PSNR, SSIM, temporal gap, lesion PSNR, venous-frame vessel AUC and
Dice, brightness-curve error), a set-level Fréchet distance, and each row's mean
brightness curve for plotting."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import PairedVideos
from .errors import ConfigError, DataError
from .fov import fov_square, square_circle
from .losses import knowledge_mask
from .metrics import (
    VESSEL_PERCENTILE,
    brightness_curve,
    curve_mae,
    frechet_distance,
    i3d_features,
    lesion_psnr,
    load_i3d,
    proxy_features,
    psnr,
    ssim,
    temporal_consistency_gap,
    venous_vessel_agreement,
)
from .networks import Generator
from .synthesis import synthesize_batch

log = logging.getLogger(__name__)

VIDEO_METRICS = (
    "psnr",
    "ssim",
    "temporal_gap",
    "lesion_psnr",
    "vessel_auc",
    "vessel_dice",
    "curve_mae",
)  # the per-video metrics of `video_metrics`, averaged over the test videos


def train_mean_videos(train: PairedVideos, times_s: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Baseline (a): for each requested time, the mean over training videos of each video's
    frame at that time (linear interpolation between its two nearest frames, clamped at
    the ends). With identical time grids this is the mean at matching positions.

    times_s (N, T) → uint8 (N, T, S, S) at the training size.
    """
    tr = train.times_s.astype(np.float64)  # (M, T')
    m, tp = tr.shape
    out = np.empty((*times_s.shape, train.size, train.size), dtype=np.uint8)
    rows = np.arange(m)
    for i, j in np.ndindex(*times_s.shape):
        tau = float(times_s[i, j])
        i1 = np.clip((tr < tau).sum(1), 1, max(tp - 1, 1)) if tp > 1 else np.zeros(m, int)
        i0 = np.maximum(i1 - 1, 0)
        span = tr[rows, i1] - tr[rows, i0]
        w = np.where(span > 0, np.clip((tau - tr[rows, i0]) / np.where(span > 0, span, 1), 0, 1), 0)
        acc = torch.zeros(train.size, train.size)  # float32 sum of <= thousands of uint8 frames
        for a in range(0, m, chunk):
            sl = slice(a, a + chunk)
            f0 = torch.from_numpy(train.ffa[rows[sl], i0[sl]]).float()  # (c, S, S)
            f1 = torch.from_numpy(train.ffa[rows[sl], i1[sl]]).float()
            ww = torch.from_numpy(w[sl]).float()[:, None, None]
            acc += ((1 - ww) * f0 + ww * f1).sum(0)
        out[i, j] = (acc / m).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def cf_green_videos(test: PairedVideos) -> np.ndarray:
    """Baseline (b): the CF's green channel repeated at every frame time → uint8 (N, T, S, S)."""
    return np.repeat(test.cf[:, None, :, :, 1], test.frames, axis=1)


def _resize_stack(videos: np.ndarray, size: int) -> np.ndarray:
    if videos.shape[-1] == size:
        return videos
    n, t = videos.shape[:2]
    circle = square_circle(videos.shape[-1])  # already FOV squares: a resize
    flat = [fov_square(f, size, circle) for f in videos.reshape(n * t, *videos.shape[2:])]
    return np.stack(flat).reshape(n, t, size, size)


def video_metrics(
    fake: np.ndarray, test: PairedVideos, knowledge_centred: bool = True
) -> dict[str, float]:
    """Mean over test videos of PSNR, SSIM (FOV), temporal-consistency gap, PSNR inside
    the knowledge mask of the real video (∩ FOV; videos with an empty mask are skipped),
    vessel AUC and Dice on the venous frames (`venous_vessel_agreement`) and the error
    of the FOV brightness curve (`curve_mae`, [0, 1] units)."""
    rows: dict[str, list[float]] = {k: [] for k in VIDEO_METRICS}
    for i in range(len(test)):
        p = torch.from_numpy(fake[i]).double() / 255  # (T, S, S)
        r = torch.from_numpy(test.ffa[i]).double() / 255
        fov = torch.from_numpy(test.fov[i])  # (S, S)
        lesion = knowledge_mask(r[0], r[-1], fov=fov if knowledge_centred else None) & fov
        rows["psnr"].append(psnr(p, r, fov))
        rows["ssim"].append(ssim(p, r, fov))
        rows["temporal_gap"].append(temporal_consistency_gap(p, r, fov))
        rows["lesion_psnr"].append(lesion_psnr(p, r, lesion))
        for k, v in venous_vessel_agreement(p, r, fov, test.times_s[i]).items():
            rows[k].append(v)
        rows["curve_mae"].append(curve_mae(p, r, fov))
    out = {
        k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")
        for k, v in rows.items()
    }
    out["lesion_cases"] = int(np.sum(~np.isnan(rows["lesion_psnr"])))
    return out


def mean_brightness_curve(videos: np.ndarray, test: PairedVideos) -> list[float]:
    """The FOV's mean brightness per frame index ([0, 1]), averaged over the test videos:
    uint8 videos (N, T, S, S) → T values (the Model page's curve)."""
    curves = [
        brightness_curve(torch.from_numpy(v).double() / 255, torch.from_numpy(fov))
        for v, fov in zip(videos, test.fov, strict=True)
    ]
    return [float(c) for c in np.nanmean(np.stack(curves), axis=0)]


def brightness_curves(test: PairedVideos, groups: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """The report's `brightness_curves`: each frame index's mean time over the test videos
    (`times_s`), the real videos' `mean_brightness_curve` (`real`) and, for each group
    (models, baselines), each row's."""
    return {
        "times_s": [float(t) for t in test.times_s.mean(axis=0)],
        "real": mean_brightness_curve(test.ffa, test),
        **{
            group: {name: mean_brightness_curve(v, test) for name, v in videos.items()}
            for group, videos in groups.items()
        },
    }


def evaluate_generation(
    models: Mapping[str, Generator],
    test: PairedVideos,
    train: PairedVideos,
    i3d_path: str | Path | None = None,
    proxy_generator: str | None = None,
    batch_size: int = 8,
    knowledge_centred: bool = True,
) -> dict[str, Any]:
    """Per-model metrics and the two baselines, all on the same test frames at test.size,
    and their mean brightness per frame beside the real videos' (`brightness_curves`).

    Generators run at their own size on the test CF (fov_square) and their frames are
    resized to test.size. The distribution metric is `fvd` over I3D features when
    `i3d_path` is given, else `fvd_proxy` over the encoder of `models[proxy_generator]`
    (default: the first model) — one extractor for every row, so rows are comparable.
    """
    if not models:
        raise ConfigError("evaluate_generation needs at least one generator in `models`")
    if len(test) < 2:
        raise DataError(f"evaluate_generation needs >= 2 test videos for FVD, got {len(test)}")
    fakes: dict[str, np.ndarray] = {}
    for name, gen in models.items():
        circle = square_circle(test.size)  # test.cf are FOV squares already: a resize
        cf = np.stack([fov_square(c, gen.config.image_size, circle) for c in test.cf])
        fakes[name] = synthesize_batch(
            gen, cf, test.times_s, out_size=test.size, batch_size=batch_size
        )
    baselines = {
        "train_mean": _resize_stack(train_mean_videos(train, test.times_s), test.size),
        "cf_green": cf_green_videos(test),
    }
    metric, extractor, features = _distribution_features(
        models, test, i3d_path, proxy_generator, batch_size
    )
    real_feats = features(test.ffa)
    report: dict[str, Any] = {
        "n_test": len(test),
        "n_train": len(train),
        "frames": test.frames,
        "size": test.size,
        "distribution_metric": metric,
        "feature_extractor": extractor,
        "lesion_mask": "knowledge mask" + (", FOV-median centred" if knowledge_centred else ""),
        "vessel_mask": f"Sato vesselness above its {VESSEL_PERCENTILE:g}th percentile in the "
        "FOV (rim left out), on the mean of the real video's venous frames",
        "models": {},
        "baselines": {},
    }
    groups = {"models": fakes, "baselines": baselines}
    for group, videos in groups.items():
        for name, v in videos.items():
            row = video_metrics(v, test, knowledge_centred)
            row[metric] = frechet_distance(real_feats, features(v))
            report[group][name] = row
            log.info("%s %s: %s", group, name, row)
    report["brightness_curves"] = brightness_curves(test, groups)
    return report


def _distribution_features(
    models: Mapping[str, Generator],
    test: PairedVideos,
    i3d_path: str | Path | None,
    proxy_generator: str | None,
    batch_size: int,
) -> tuple[str, str, Callable[[np.ndarray], np.ndarray]]:
    """The distribution metric's name, its feature extractor's name and the extractor
    (uint8 videos (N, T, S, S) → features (N, F)): I3D when `i3d_path` is given, else
    the encoder of `models[proxy_generator]` (default: the first model)."""
    if i3d_path is not None:
        i3d = load_i3d(i3d_path)
        return (
            "fvd",
            f"i3d:{Path(i3d_path).name}",
            lambda v: i3d_features(i3d, v, batch_size=batch_size),
        )
    pname = proxy_generator if proxy_generator is not None else next(iter(models))
    if pname not in models:
        raise ConfigError(f"proxy_generator {pname!r} is not one of {list(models)}")
    return (
        "fvd_proxy",
        f"generator-encoder:{pname}",
        lambda v: proxy_features(models[pname], v, test.times_s, batch_size=batch_size),
    )
