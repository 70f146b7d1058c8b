"""The cross-modal embedder: shapes, masking, time-awareness, training, checkpoints."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from encoder import create_generator
from encoder.embedder import (
    EmbedderConfig,
    create_embedder,
    embed_cf_array,
    embed_ffa_array,
    embedder_id,
    fit_pixels,
    load_embedder,
)
from encoder.testing import micro_scale, toy_paired_videos
from encoder.train import embed_training_loop

S = 32
SMALL = dict(image_size=S, dim=16, grid=2, head_channels=4, attn_hidden=8, pixel_components=8)


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return create_generator(micro_scale(S))


@pytest.fixture(scope="module")
def data():
    return toy_paired_videos(n=10, size=S, frames=5)


def make(backbone, generator, data, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = EmbedderConfig(backbone=backbone, **{**SMALL, **kw})
    gen = generator if cfg.spec.needs_generator else None
    emb = create_embedder(cfg, generator=gen)
    fit_pixels(emb, data.cf, data.ffa)
    return emb


@pytest.mark.parametrize("backbone", ["generator", "scratch", "pixels", "openclip:ViT-S-32"])
def test_shapes_and_unit_norm(backbone, generator, data):
    emb = make(backbone, generator, data)
    cf = embed_cf_array(emb, data.cf)
    ffa = embed_ffa_array(emb, data.ffa, data.times_s)
    assert cf.shape == ffa.shape == (len(data), 16)
    np.testing.assert_allclose(np.linalg.norm(cf, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ffa, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(cf, embed_cf_array(emb, data.cf))  # deterministic in eval


def test_generator_backbone_starts_from_the_generator(generator, data):
    emb = make("generator", generator, data)
    scratch = make("scratch", generator, data, seed=1)  # the generator fixture used seed 0
    theirs = dict(generator.named_parameters())
    copied = dict(emb.backbone.generator.named_parameters())
    assert all(torch.equal(copied[n], theirs[n]) for n in theirs)
    fresh = dict(scratch.backbone.generator.named_parameters())
    assert not all(torch.equal(fresh[n], theirs[n]) for n in theirs)


def test_mask_excludes_padded_frames_and_times_matter(generator, data):
    emb = make("generator", generator, data)
    ffa, t = data.ffa[:2].copy(), data.times_s[:2]
    mask = np.ones(ffa.shape[:2], bool)
    mask[:, -1] = False
    base = embed_ffa_array(emb, ffa, t, mask=mask)
    ffa[:, -1] = 255 - ffa[:, -1]
    np.testing.assert_allclose(embed_ffa_array(emb, ffa, t, mask=mask), base, atol=1e-6)
    assert not np.allclose(embed_ffa_array(emb, ffa, t * 3 + 40, mask=mask), base, atol=1e-4)


def test_training_lowers_the_clip_loss_and_round_trips(generator, data, tmp_path):
    from encoder import save_generator

    run = tmp_path / "run"
    save_generator(run, generator, micro_scale(S))
    cfg = EmbedderConfig(backbone="generator", **SMALL)
    summary = embed_training_loop(
        run_dir=run, data=data, config=cfg, dim=16, iters=12, batch_size=8, progress=False,
        stats_every=1, seed=0,
    )  # fmt: skip
    assert summary.iterations == 12
    lines = (run / "embedder" / "stats.jsonl").read_text().splitlines()
    losses = [json.loads(x)["Loss/clip"] for x in lines if "Loss/clip" in x]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    emb, config = load_embedder(run / "embedder")
    again, _ = load_embedder(run / "embedder")
    a = embed_cf_array(emb, data.cf)
    np.testing.assert_array_equal(a, embed_cf_array(again, data.cf))
    assert embedder_id(run / "embedder") == embedder_id(run / "embedder")
    untrained = make("generator", generator, data)
    assert not np.allclose(a, embed_cf_array(untrained, data.cf), atol=1e-4)
    assert config["embedder"]["backbone"] == "generator"
    assert dataclasses.asdict(emb.config)["dim"] == 16
