"""The generator library: configs, networks, losses, checkpoints, synthesis, data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from encoder import (
    CheckpointError,
    ConfigError,
    DataError,
    Generator,
    PairedVideos,
    PatchSampleMLP,
    UnknownModel,
    VGGLoss,
    count_parameters,
    create_generator,
    estimate_fov,
    fit_square,
    get_scale,
    gradient_variance_loss,
    knowledge_mask,
    list_scales,
    load_generator,
    masked_l1,
    patch_nce_loss,
    save_generator,
    synthesize,
    synthesize_tensor,
)
from encoder.discriminator import MultiscaleDiscriminator
from encoder.testing import micro_scale, toy_paired_videos

pytestmark = pytest.mark.usefixtures("deterministic_torch")


def _inputs(b: int, k: int, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cf = torch.rand(b, 3, s, s) * 2 - 1  # (B, 3, S, S)
    prev = torch.rand(b, k, s, s) * 2 - 1  # (B, K, S, S)
    times = torch.tensor([[10.0, 20.0, 30.0]]).expand(b, -1)[:, :k]  # (B, K)
    return cf, prev, times


# ---------------------------------------------------------------- configs and shapes


def test_bundled_scales() -> None:
    assert {"tiny", "paper"} <= set(list_scales())
    paper = get_scale("paper").generator
    assert (paper.image_size, paper.ngf, paper.n_downsampling, paper.n_blocks, paper.k) == (
        512,
        64,
        4,
        9,
        3,
    )
    tiny = get_scale("tiny").generator
    assert tiny.image_size == 128 and tiny.n_downsampling == 3
    assert get_scale("paper").nce.num_patches == 256
    assert get_scale("paper").nce.temperature == pytest.approx(0.07)


def test_micro_shapes() -> None:
    sc = micro_scale()
    g = Generator(sc.generator)
    cf, prev, times = _inputs(2, 3, 32)
    feats = g.encoder_features(g.inputs(cf, prev))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8)]
    z = g.encode(cf, prev, times)
    assert z.shape == (2, 32, 8, 8)
    out = g.decode(z)
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    d = MultiscaleDiscriminator(9, sc.discriminator)
    scales = d(torch.cat([cf, prev, out], 1))
    assert len(scales) == 2 and scales[0][-1].shape[1] == 1
    assert all(len(feats) == sc.discriminator.n_layers + 2 for feats in scales)


def test_tiny_shapes() -> None:
    g = create_generator("tiny")
    cf, prev, times = _inputs(1, 3, 128)
    with torch.no_grad():
        assert g(cf, prev, times).shape == (1, 3, 128, 128)
        assert g.encode(cf, prev, times).shape == (1, 192, 16, 16)
    assert 2e6 < count_parameters(g) < 6e6


def test_paper_shapes_at_reduced_size() -> None:
    """The paper's channels, blocks and downsamplings, run at 64 px to stay fast on CPU."""
    g = create_generator("paper", image_size=64)
    assert g.config.ngf == 64 and g.config.n_blocks == 9 and g.config.bottleneck_channels == 1024
    assert 180e6 < count_parameters(g) < 200e6
    cf, prev, times = _inputs(1, 3, 64)
    with torch.no_grad():
        z = g.encode(cf, prev, times)
        assert z.shape == (1, 1024, 4, 4)
        assert g.decode(z).shape == (1, 3, 64, 64)


def test_time_conditioning_changes_output() -> None:
    g = Generator(micro_scale().generator)
    for block in g.blocks:  # FiLM starts at identity; give it weights as training would
        torch.nn.init.normal_(block.film.weight, 0, 0.5)
    cf, prev, times = _inputs(1, 3, 32)
    with torch.no_grad():
        a = g(cf, prev, times)
        b = g(cf, prev, times * 10)
    assert not torch.allclose(a, b)


def test_bad_inputs_name_the_value() -> None:
    g = Generator(micro_scale().generator)
    cf, prev, times = _inputs(1, 3, 32)
    with pytest.raises(ValueError, match="prev must be"):
        g(cf, prev[:, :2], times)
    with pytest.raises(ValueError, match="times_s must be"):
        g(cf, prev, times[:, :2])
    with pytest.raises(UnknownModel, match="huge"):
        create_generator("huge")
    with pytest.raises(ConfigError, match="divisible"):
        get_scale("tiny").replace(image_size=100)
    with pytest.raises(ConfigError, match="unknown config field"):
        get_scale("tiny").replace(colour="blue")


# ---------------------------------------------------------------- losses


def test_knowledge_mask_threshold() -> None:
    first = torch.tensor([[0, 0], [100, 200]], dtype=torch.uint8)
    last = torch.tensor([[45, 46], [100, 100]], dtype=torch.uint8)
    assert knowledge_mask(first, last).tolist() == [[False, True], [False, True]]


def test_centred_knowledge_mask_ignores_global_brightening() -> None:
    first = torch.zeros(8, 8)  # pre-dye: dark
    last = torch.full((8, 8), 0.4)  # late background glow everywhere ...
    last[2:4, 2:4] = 0.9  # ... and a leak
    fov = torch.ones(8, 8, dtype=torch.bool)
    fov[:, 7] = False
    assert knowledge_mask(first, last).all()  # the paper's form: the whole frame
    centred = knowledge_mask(first, last, fov=fov)
    assert centred.sum() == 4 and centred[2:4, 2:4].all()
    batch = knowledge_mask(torch.stack([first, first]), torch.stack([last, first]), fov=fov)
    assert batch.shape == (2, 8, 8) and batch[0].sum() == 4 and batch[1].sum() == 0


def test_masked_l1_weights_the_mask() -> None:
    fake, real = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert float(masked_l1(fake, real)) == pytest.approx(0.25)
    assert float(masked_l1(fake, real, mask, alpha=2.0)) == pytest.approx(3 / 6)


def test_gradient_variance_loss() -> None:
    x = torch.rand(2, 3, 16, 16)
    assert float(gradient_variance_loss(x, x, patch=8)) == 0.0
    assert float(gradient_variance_loss(x, torch.zeros_like(x), patch=8)) > 0.0
    with pytest.raises(ValueError, match="patch 5"):
        gradient_variance_loss(x, x, patch=5)


def test_patch_nce_matches_hand_computation() -> None:
    q = torch.nn.functional.normalize(torch.randn(1, 4, 8), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(1, 4, 8), dim=-1)
    loss = patch_nce_loss(q, k, temperature=0.07)
    sims = (q[0] @ k[0].T) / 0.07  # (P, P): diagonal positives, off-diagonal negatives
    manual = 0.0
    for i in range(4):
        neg = [sims[i, j] for j in range(4) if j != i] + [torch.tensor(-10.0 / 0.07)]
        logits = torch.stack([sims[i, i], *neg])
        manual += float(-torch.log_softmax(logits, 0)[0])
    assert float(loss) == pytest.approx(manual / 4, rel=1e-5)
    assert float(patch_nce_loss(q, q)) < float(loss)


def test_patch_sampler_prefers_the_mask() -> None:
    head = PatchSampleMLP([4], dim=8)
    feats = [torch.randn(1, 4, 16, 16)]
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :4, :4] = 1  # 16 of 256 locations
    ids = head.sample_ids(feats, 8, mask, background=0.001)[0]
    rows, cols = ids // 16, ids % 16
    assert ((rows < 4) & (cols < 4)).float().mean() > 0.7
    out = head(feats, [ids])[0]
    assert out.shape == (1, 8, 8) and torch.allclose(out.norm(dim=-1), torch.ones(1, 8))


def test_vgg_loss_from_a_local_file(tmp_path) -> None:
    from torchvision.models import vgg19

    state = {k: v for k, v in vgg19(weights=None).state_dict().items() if k.startswith("features.")}
    path = tmp_path / "vgg19-random.pth"
    torch.save(state, path)
    loss = VGGLoss(path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == 0.0
    assert float(loss(x, -x)) > 0.0
    del state["features.0.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="vgg19"):
        VGGLoss(path)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path) -> None:
    sc = micro_scale()
    g = Generator(sc.generator)
    save_generator(tmp_path / "ckpt", g, sc, training={"knowledge_mask": False}, iteration=7)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model"]["generator"]["ngf"] == 8 and cfg["iteration"] == 7
    assert cfg["preprocessing"]["size"] == 32 and cfg["code_version"]
    for name in (tmp_path / "ckpt", f"local-dir:{tmp_path / 'ckpt'}"):
        g2 = create_generator(name)
        cf, prev, times = _inputs(2, 3, 32)
        g.eval()
        with torch.no_grad():
            assert torch.equal(g(cf, prev, times), g2(cf, prev, times))
    _, cfg2 = load_generator(tmp_path / "ckpt")
    assert cfg2["training"] == {"knowledge_mask": False}


def test_checkpoint_mismatch_is_an_error(tmp_path) -> None:
    sc = micro_scale()
    save_generator(tmp_path, Generator(sc.generator), sc)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["generator"]["ngf"] = 12
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        create_generator(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_generator(tmp_path)


# ---------------------------------------------------------------- synthesis


def test_synthesize_is_deterministic_and_sized() -> None:
    g = Generator(micro_scale().generator)
    data = toy_paired_videos(2, 32, 6)
    a = synthesize(g, data.cf[0], data.times_s[0])
    b = synthesize(g, data.cf[0], data.times_s[0])
    assert a.dtype == np.uint8 and a.shape == (6, 32, 32)
    assert np.array_equal(a, b)
    assert synthesize(g, data.cf[0], data.times_s[0], out_size=48).shape == (6, 48, 48)
    wide = np.zeros((40, 60, 3), np.uint8)  # padded to a square, then resized
    assert synthesize(g, wide, [5.0, 10.0, 20.0, 40.0]).shape == (4, 32, 32)
    assert g.training  # synthesis restores the mode it found
    with pytest.raises(DataError, match="at least K=3"):
        synthesize(g, data.cf[0], [1.0, 2.0])


def test_sliding_window_averages_overlaps() -> None:
    g = Generator(micro_scale().generator).eval()
    cf = torch.rand(1, 3, 32, 32) * 2 - 1
    times = torch.tensor([[5.0, 10.0, 15.0, 20.0]])
    out = synthesize_tensor(g, cf, times)  # (1, 4, 32, 32)
    with torch.no_grad():
        w0 = g(cf, torch.full((1, 3, 32, 32), -1.0), times[:, :3])  # frames 0..2
        prev = torch.cat([torch.full((1, 2, 32, 32), -1.0), w0[:, :1]], 1)  # black, black, f0
        w1 = g(cf, prev, times[:, 1:])  # frames 1..3
    assert torch.allclose(out[:, 0], w0[:, 0], atol=1e-6)
    assert torch.allclose(out[:, 1:3], (w0[:, 1:] + w1[:, :2]) / 2, atol=1e-6)
    assert torch.allclose(out[:, 3], w1[:, 2], atol=1e-6)


# ---------------------------------------------------------------- data


def test_paired_videos_validation_and_fov() -> None:
    data = toy_paired_videos(3, 32, 5)
    yy, xx = np.mgrid[0:32, 0:32] / 31 * 2 - 1
    circle = xx**2 + yy**2 < 0.92**2
    iou = (data.fov[0] & circle).sum() / (data.fov[0] | circle).sum()
    assert iou > 0.85
    assert estimate_fov(data.cf).shape == (3, 32, 32)
    assert len(data.subset([2, 0])) == 2 and data.subset([2]).case_ids == (data.case_ids[2],)
    with pytest.raises(DataError, match="ffa must be uint8"):
        PairedVideos.from_arrays(data.cf, data.ffa.astype(np.float32), data.times_s, data.case_ids)
    with pytest.raises(DataError, match="non-decreasing"):
        PairedVideos.from_arrays(data.cf, data.ffa, data.times_s[:, ::-1], data.case_ids)


def test_fit_square_pads_then_resizes() -> None:
    img = np.full((20, 40, 3), 200, np.uint8)
    out = fit_square(img, 16)
    assert out.shape == (16, 16, 3)
    assert out[0, 8, 0] == 0 and out[8, 8, 0] == 200  # black bands above and below
    assert fit_square(np.zeros((8, 8), np.uint8), 8).shape == (8, 8)
