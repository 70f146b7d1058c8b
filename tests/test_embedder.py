"""The cross-modal embedder: backbones, masking, time-aware pooling, training, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss

from encoder import (
    AugmentConfig,
    BackboneSpec,
    CheckpointError,
    ConfigError,
    DataError,
    EmbedderConfig,
    augment_cf,
    augment_video,
    create_embedder,
    embed_cf_array,
    embed_ffa_array,
    embedder_id,
    fit_training_statistics,
    load_embedder,
    recall_at_k,
    save_embedder,
    save_generator,
)
from encoder.checkpoint import atomic_save_safetensors
from encoder.data import cf_tensor, to_model
from encoder.testing import micro_scale, toy_paired_videos
from encoder.train import EmbedderTrainOptions, embed_training_loop

pytestmark = pytest.mark.usefixtures("deterministic_torch")

S = 32  # image size of every test
BACKBONES = ["generator", "scratch", "pixels", "openclip:ViT-S-32"]
SMALL = EmbedderConfig(
    image_size=S,
    dim=16,
    grid=2,
    attn_hidden=8,
    pixel_size=8,
    pixel_components=8,
    time_freqs=4,
    clinical_dim=8,
    clinical_hidden=16,
)


@pytest.fixture(scope="module")
def data():
    return toy_paired_videos(8, S, 6, seed=0)


@pytest.fixture(scope="module")
def run_dir(micro_run_dir):
    assert S == 32  # the size of conftest's micro run
    return micro_run_dir


def _embedder(backbone: str, run_dir, data, **overrides):
    e = create_embedder(SMALL, run_dir=run_dir, backbone=backbone, **overrides)
    fit_training_statistics(e, data.cf, data.ffa)
    return e


def _tensors(data, n: int = 4):
    cf = cf_tensor(data.cf[:n])  # (n, 3, S, S)
    frames = to_model(data.ffa[:n])  # (n, T, S, S)
    times = torch.from_numpy(data.times_s[:n])  # (n, T)
    return cf, frames, times


# ---------------------------------------------------------------- shapes and pooling


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_and_unit_norm(backbone, run_dir, data) -> None:
    e = _embedder(backbone, run_dir, data)
    z = embed_cf_array(e, data.cf, batch_size=3)
    v = embed_ffa_array(e, data.ffa, data.times_s, batch_size=3)
    assert z.shape == v.shape == (8, 24) and z.dtype == v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    cf, frames, times = _tensors(data)
    with torch.no_grad():
        assert e.embed_cf(cf).shape == e.embed_ffa(frames, times).shape == (4, 24)
    assert np.isfinite(z).all() and np.isfinite(v).all()


def test_spec_parsing_and_config_errors(run_dir) -> None:
    assert BackboneSpec.parse("openclip:RN50@/w/rn50.pt") == BackboneSpec(
        "openclip", "RN50", "/w/rn50.pt"
    )
    assert BackboneSpec.parse("openclip").model == "ViT-S-32"
    with pytest.raises(ConfigError, match="unknown backbone"):
        EmbedderConfig(backbone="resnet")
    with pytest.raises(ConfigError, match="not a local file"):
        create_embedder(SMALL, backbone="openclip:ViT-S-32@/no/such/weights.pt")
    with pytest.raises(ConfigError, match="needs run_dir"):
        create_embedder(SMALL, backbone="generator")
    with pytest.raises(ConfigError, match="image_size"):
        create_embedder(SMALL, run_dir=run_dir, image_size=64)
    with pytest.raises(ConfigError, match="layers"):
        create_embedder(SMALL, run_dir=run_dir, layers=(7,))
    with pytest.raises(ConfigError, match="dim 10 is not divisible by the 2x2 regions"):
        create_embedder(SMALL, run_dir=run_dir, dim=10)


def test_each_region_fills_only_its_own_slice_of_the_embedding(run_dir, data) -> None:
    e = _embedder("generator", run_dir, data)
    c, g, _ = e.backbone.feature_shape
    assert g == 2 and e.config.dim == 16  # 4 regions, 4 entries each
    torch.manual_seed(0)
    feats = torch.randn(3, c, g, g)
    moved = feats.clone()
    moved[:, :, 1, 0] += torch.randn(3, c)  # region 2 in row-major order
    with torch.no_grad():
        for head in (e.cf_head, e.ffa_head):
            changed = (head(moved) != head(feats)).any(0)  # (dim,)
            assert changed[8:12].all() and not changed[:8].any() and not changed[12:].any()


def test_openclip_local_checkpoint_is_loaded(tmp_path) -> None:
    import open_clip

    clip = open_clip.create_model("ViT-S-32", force_image_size=S, pretrained_text=False)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    e = create_embedder(SMALL, backbone=f"openclip:ViT-S-32@{tmp_path / 'clip.pt'}")
    for name, value in clip.visual.state_dict().items():
        assert torch.equal(e.backbone.visual.state_dict()[name], value), name


def test_mask_excludes_padded_frames(run_dir, data) -> None:
    e = _embedder("generator", run_dir, data)
    _, frames, times = _tensors(data, 2)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False  # the last two frames are padding
    changed = frames.clone()
    changed[:, 4:] = torch.rand(2, 2, S, S) * 2 - 1
    t2 = times.clone()
    t2[:, 4:] += 100.0
    with torch.no_grad():
        a = e.embed_ffa(frames, times, mask)
        b = e.embed_ffa(changed, t2, mask)
        c = e.embed_ffa(frames[:, :4], times[:, :4])  # the same video without padding
        d = e.embed_ffa(changed, t2)  # unmasked: the change shows
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-5)
    assert not torch.allclose(a, d, atol=1e-3)
    with pytest.raises(DataError, match="at least one valid"):
        e.embed_ffa(frames, times, torch.zeros(2, 6, dtype=torch.bool))


def test_attention_pooling_is_time_aware(run_dir, data) -> None:
    """Pixels backbone (time-blind features): the time enters only through the attention."""
    e = _embedder("pixels", run_dir, data)
    _, frames, times = _tensors(data, 2)
    with torch.no_grad():
        a = e.embed_ffa(frames, times)
        b = e.embed_ffa(frames, times * 3.0 + 5.0)
        c = e.embed_ffa(frames, times.clone())
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(a, c)


def test_eval_outputs_are_deterministic(run_dir, data) -> None:
    e = _embedder("generator", run_dir, data)
    a = embed_ffa_array(e, data.ffa, data.times_s, batch_size=8)
    b = embed_ffa_array(e, data.ffa, data.times_s, batch_size=3)  # batching does not matter
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(embed_cf_array(e, data.cf), embed_cf_array(e, data.cf))
    with pytest.raises(DataError, match="uint8"):
        embed_cf_array(e, data.cf.astype(np.float32))


# ---------------------------------------------------------------- backbone provenance


def test_generator_backbone_starts_from_the_run(run_dir, data) -> None:
    from encoder import load_generator

    g, _ = load_generator(run_dir)
    e = _embedder("generator", run_dir, data)
    for name, value in g.state_dict().items():
        assert torch.equal(e.backbone.generator.state_dict()[name], value), name
    assert not any(p.requires_grad for p in e.backbone.parameters())  # frozen by default
    scratch = _embedder("scratch", run_dir, data)
    assert scratch.backbone.generator.config == g.config
    assert not torch.equal(scratch.backbone.generator.stem[1].weight, g.stem[1].weight)


def test_pixels_pca_is_fitted_on_training_data_only(tmp_path, run_dir, data) -> None:
    other = toy_paired_videos(6, S, 6, seed=5)
    s = embed_training_loop(
        run_dir=run_dir,
        out_dir=tmp_path / "px",
        data=data,
        val_data=other,
        backbone="pixels",
        dim=16,
        config=SMALL,
        iters=1,
        batch_size=4,
        progress=False,
    )
    trained, _ = load_embedder(s.run_dir)
    ref = _embedder("pixels", run_dir, data)  # fitted on `data` alone
    for name in ("cf_mean", "cf_basis", "ffa_mean", "ffa_basis", "ffa_scale"):
        assert torch.allclose(getattr(trained.backbone, name), getattr(ref.backbone, name)), name
    small = cf_tensor(data.cf).mean(0, keepdim=True)  # (1, 3, S, S)
    expected = torch.nn.functional.adaptive_avg_pool2d(small, 8).flatten()
    assert torch.allclose(trained.backbone.cf_mean, expected, atol=1e-5)
    assert bool(trained.backbone.fitted)


# ---------------------------------------------------------------- training


def test_steps_reduce_the_clip_loss_and_train_the_heads(run_dir, data) -> None:
    e = _embedder("generator", run_dir, data)
    e.train()
    cf, frames, times = _tensors(data, 8)
    cf, frames = (
        augment_cf(cf, torch.Generator().manual_seed(0)),
        augment_video(frames, torch.Generator().manual_seed(1)),
    )
    before_heads = {n: p.detach().clone() for n, p in e.named_parameters() if p.requires_grad}
    before_backbone = [p.detach().clone() for p in e.backbone.parameters()]
    opt = torch.optim.AdamW(e.head_parameters(), lr=3e-3)
    loss_fn, losses = ClipLoss(), []
    for _ in range(12):
        loss = loss_fn(e.embed_cf(cf), e.embed_ffa(frames, times), e.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    for name, p in e.named_parameters():
        if name in before_heads and name.startswith(("cf_head", "ffa_head", "attn")):
            assert not torch.equal(p, before_heads[name]), name
    assert all(
        torch.equal(a, b) for a, b in zip(before_backbone, e.backbone.parameters(), strict=True)
    )


def test_training_loop_writes_a_loadable_run(tmp_path, run_dir, data) -> None:
    ticks = []
    kw = dict(
        data=data,
        val_data=data,
        dim=16,
        config=SMALL,
        iters=4,
        batch_size=4,
        stats_every=2,
        val_every=2,
        progress=False,
    )
    s = embed_training_loop(run_dir=run_dir, progress_fn=ticks.append, **kw)
    out = run_dir / "embedder"  # default folder
    assert s.run_dir == out and s.iterations == 4 and s.stop_reason == "iters"
    opts = json.loads((out / "training_options.json").read_text())
    assert opts["backbone"] == "generator" and opts["embedder"]["dim"] == 16
    assert opts["run_dir"] == str(run_dir) and opts["data"]["val_videos"] == len(data)
    expected = EmbedderTrainOptions(dim=16, iters=4, batch_size=4, stats_every=2, val_every=2)
    assert EmbedderTrainOptions.from_dict(opts) == expected  # the options round-trip
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["Progress/iter"] for r in rows] == [2, 4] and len(ticks) == 2
    for key in ("Loss/clip", "Embed/logit_scale", "Val/cf2ffa_R@1", "Val/ffa2cf_R@10"):
        assert key in rows[-1], key
    e, cfg = load_embedder(out)
    assert cfg["backbone"]["generator"]["ngf"] == micro_scale(S).generator.ngf
    # the CF histogram reference is fitted on the training photos and saved with the weights
    assert e.config.cf_histogram_match and "matched" in cfg["preprocessing"]["cf_colour"]
    assert not torch.equal(e.cf_reference, torch.linspace(-1, 1, 256).expand(3, -1))
    assert cfg["iteration"] in (2, 4) and cfg["training"]["batch_size"] == 4
    with pytest.raises(FileExistsError, match="overwrite=True"):
        embed_training_loop(run_dir=run_dir, **kw)
    # the same seed on CPU gives the same embedder
    embed_training_loop(run_dir=run_dir, out_dir=tmp_path / "again", **kw)
    again, _ = load_embedder(tmp_path / "again")
    for (name, a), b in zip(e.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_minutes_budget_and_abort(tmp_path, run_dir, data) -> None:
    kw = dict(run_dir=run_dir, data=data, dim=16, config=SMALL, batch_size=4, progress=False)
    s = embed_training_loop(out_dir=tmp_path / "m", minutes=0.001, **kw)
    assert s.stop_reason == "minutes"
    calls = iter(range(100))
    s = embed_training_loop(
        out_dir=tmp_path / "a", iters=50, abort_fn=lambda: next(calls) >= 2, **kw
    )
    assert s.stop_reason == "abort" and s.iterations == 2
    with pytest.raises(ConfigError, match="iters or minutes"):
        embed_training_loop(out_dir=tmp_path / "x", **kw)
    with pytest.raises(ConfigError, match=">= 2 for a contrastive loss"):
        EmbedderTrainOptions(iters=1, batch_size=1)
    with pytest.raises(ConfigError, match="replay >= 0"):
        EmbedderTrainOptions(iters=1, replay=-1)
    augment = AugmentConfig(rotate_deg=0.0)
    options = EmbedderTrainOptions(iters=1, augment=augment)
    assert EmbedderTrainOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("backbone", ["generator", "pixels", "openclip:ViT-S-32"])
def test_checkpoint_round_trip(tmp_path, run_dir, data, backbone) -> None:
    e = _embedder(backbone, run_dir, data)
    with torch.no_grad():
        for p in e.head_parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not just the init
    folder = save_embedder(tmp_path / "emb", e, training={"note": "test"}, iteration=3)
    loaded, cfg = load_embedder(folder)
    assert cfg["iteration"] == 3 and cfg["embedder"]["backbone"] == backbone
    assert loaded.config == e.config
    np.testing.assert_array_equal(embed_cf_array(loaded, data.cf), embed_cf_array(e, data.cf))
    np.testing.assert_array_equal(
        embed_ffa_array(loaded, data.ffa, data.times_s), embed_ffa_array(e, data.ffa, data.times_s)
    )
    ident = embedder_id(folder)  # the hash of the file: weights and the config it embeds
    again = save_embedder(tmp_path / "b", loaded, training={"note": "test"}, iteration=3)
    assert len(ident) == 16 and ident == embedder_id(again)
    with torch.no_grad():
        next(iter(loaded.head_parameters())).add_(1.0)
    assert (
        embedder_id(save_embedder(tmp_path / "c", loaded, training={"note": "test"}, iteration=3))
        != ident
    )


def test_generator_embedder_loads_without_the_run(tmp_path, data) -> None:
    from encoder import create_generator

    run = tmp_path / "run"
    save_generator(run, create_generator(micro_scale(S)), micro_scale(S))
    e = _embedder("generator", run, data)
    save_embedder(tmp_path / "emb", e)
    for f in run.iterdir():
        f.unlink()
    run.rmdir()
    loaded, _ = load_embedder(tmp_path / "emb")
    np.testing.assert_array_equal(embed_cf_array(loaded, data.cf), embed_cf_array(e, data.cf))


def test_bad_checkpoints(tmp_path, run_dir, data) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_embedder(tmp_path)
    e = _embedder("pixels", run_dir, data)
    folder = save_embedder(tmp_path / "emb", e)

    def rewrite_config(cfg: dict) -> None:  # config.json and the copy inside the weights
        (folder / "config.json").write_text(json.dumps(cfg))
        meta = {"config": json.dumps(cfg)}
        atomic_save_safetensors(folder / "embedder.safetensors", e.state_dict(), meta)

    cfg = json.loads((folder / "config.json").read_text())
    cfg["embedder"]["dim"] = 32
    rewrite_config(cfg)
    with pytest.raises(CheckpointError, match="do not match"):
        load_embedder(folder)
    with pytest.raises(CheckpointError, match="no embedder.safetensors"):
        embedder_id(tmp_path)
    cfg["format_version"] = 1  # written before the region-aligned heads
    rewrite_config(cfg)
    with pytest.raises(CheckpointError, match="format_version 1 .* retrain"):
        load_embedder(folder)


def test_recall_at_k() -> None:
    q = np.eye(4, dtype=np.float32)
    g = np.eye(4, dtype=np.float32)[[0, 2, 1, 3]]  # queries 1 and 2 swapped
    r = recall_at_k(q, g, ks=(1, 2))
    assert r == {1: 0.5, 2: 0.5}  # the hits of 1 and 2 score 0: tied with the rest
    assert recall_at_k(q, q, ks=(1,)) == {1: 1.0}
    grad = torch.from_numpy(g).requires_grad_()  # as the validation hands it tensors
    assert recall_at_k(torch.from_numpy(q), grad, ks=(1, 2)) == r


def test_feature_bank_keeps_the_newest_views_within_its_memory_cap() -> None:
    from encoder.train.embed import _FeatureBank

    view_bytes = 2 * (4 + 2 * 4) + 4 * 2  # fp16 cf (4,) + ffa (2, 4); float32 times (2,)
    bank = _FeatureBank(cases=6, views=2, max_bytes=5 * view_bytes)
    for step in range(4):  # cases 0..5, then 0..5 again, ...: 24 views offered
        idx = np.arange(6)
        feats = torch.full((6, 4), float(step)), torch.full((6, 2, 4), float(step))
        bank.add(idx, *feats, torch.zeros(6, 2))
        assert bank.bytes <= 5 * view_bytes
        held = [v for views in bank.items for _, v in views]
        assert len(held) == 5 and bank.bytes == 5 * view_bytes
        assert all(len(views) <= 2 for views in bank.items)
        assert sorted(bank.filled) == [i for i, views in enumerate(bank.items) if views]
    # the five newest views: cases 1..5 of the last step (case 0's went first)
    assert [float(v[0][0]) for v in held] == [3.0] * 5 and bank.filled == [1, 2, 3, 4, 5]
    _, (cf, ffa, t) = bank.sample(8, torch.Generator().manual_seed(0))
    assert cf.shape == (5, 4) and ffa.shape == (5, 2, 4) and t.shape == (5, 2)
    roomy = _FeatureBank(cases=6, views=2, max_bytes=10**6)
    for step in range(3):
        roomy.add(
            np.arange(6), torch.full((6, 4), float(step)), torch.zeros(6, 2, 4), torch.zeros(6, 2)
        )
    assert [[float(v[0][0]) for _, v in views] for views in roomy.items] == [[1.0, 2.0]] * 6
