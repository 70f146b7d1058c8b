"""Training: steps reduce the loss, the PatchNCE head trains, run folders, resume, ablations."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from encoder import ConfigError, create_generator, read_checkpoint_config, synthesize
from encoder.embedder import native_precision
from encoder.testing import micro_scale, toy_paired_videos
from encoder.train import (
    GeneratorTrainOptions,
    LossWeights,
    Nets,
    StepOptions,
    TrainingSession,
    TrainOptions,
    WindowSampler,
    make_optimizers,
    schedule,
    scheduled_sampling_prob,
    train_step,
    training_loop,
)
from encoder.train.step import (
    discriminate,
    discriminator_phase,
    generator_phase,
    previous_frames,
)

RUN = dict(scale=micro_scale(), batch_size=2, progress=False, stats_every=2, preview_every=0)


pytestmark = pytest.mark.usefixtures("deterministic_torch")


@pytest.fixture(scope="module")
def data():
    return toy_paired_videos(6, 32, 6)


def _fixed_batch(data, knowledge: bool = True):
    sampler = WindowSampler(data, 3, np.random.default_rng(0))
    return sampler.batch(
        np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3]), np.array([0, 1, 0, 1], bool)
    )


def test_steps_reduce_the_generator_loss(data) -> None:
    nets = Nets.build(micro_scale())
    opt_g, opt_d = make_optimizers(nets, lr=1e-3)
    batch = _fixed_batch(data)
    hist = [train_step(nets, opt_g, opt_d, batch, StepOptions()) for _ in range(25)]
    first = np.mean([h["Loss/G_l1"] for h in hist[:3]])
    last = np.mean([h["Loss/G_l1"] for h in hist[-3:]])
    assert last < 0.7 * first
    assert np.mean([h["Loss/G_total"] for h in hist[-3:]]) < np.mean(
        [h["Loss/G_total"] for h in hist[:3]]
    )


def test_patchnce_head_and_both_discriminators_train(data) -> None:
    nets = Nets.build(micro_scale())
    opt_g, opt_d = make_optimizers(nets)
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in nets.modules().items()}
    for _ in range(2):  # the FiLM projections start at zero: the time MLP trains from step 2
        stats = train_step(nets, opt_g, opt_d, _fixed_batch(data), StepOptions(), ss_prob=1.0)
    for name, module in nets.modules().items():
        changed = [
            not torch.equal(a, b) for a, b in zip(before[name], module.parameters(), strict=True)
        ]
        assert all(changed), f"{name}: {sum(changed)}/{len(changed)} parameter tensors changed"
    assert stats["Progress/ss_used"] == 1.0  # every window saw generated previous frames
    assert stats["Loss/G_nce"] > 0


def test_ablation_steps(data) -> None:
    nets = Nets.build(micro_scale(), knowledge=False)
    assert nets.D_knowledge is None
    opt_g, opt_d = make_optimizers(nets)
    stats = train_step(nets, opt_g, opt_d, _fixed_batch(data), StepOptions(False, False))
    assert "Loss/D_knowledge_real" not in stats and stats["Loss/G_gan_knowledge"] == 0.0


def test_mask_without_its_discriminator_still_weights_the_losses(tmp_path, data) -> None:
    """The no-knowledge-discriminator variant: no knowledge-aware D, but the mask still
    weights the L1 (and the PatchNCE sampling), unlike the no-knowledge-mask variant."""
    nets = Nets.build(micro_scale(), knowledge=False)
    twin = copy.deepcopy(nets)
    batch = _fixed_batch(data)
    assert batch.mask.sum() > 0
    torch.manual_seed(0)
    masked = train_step(
        nets, *make_optimizers(nets), batch, StepOptions(True, True, knowledge_discriminator=False)
    )
    torch.manual_seed(0)
    plain = train_step(twin, *make_optimizers(twin), batch, StepOptions(False, True))
    assert "Loss/D_knowledge_real" not in masked and masked["Loss/G_gan_knowledge"] == 0.0
    assert masked["Loss/G_l1"] != pytest.approx(plain["Loss/G_l1"], rel=1e-3)
    # a run records the flag, saves no knowledge-aware D and resumes only as it started
    run = tmp_path / "nkd"
    training_loop(run_dir=run, data=data, iters=2, knowledge_discriminator=False, **RUN)
    assert read_checkpoint_config(run)["training"]["knowledge_discriminator"] is False
    state = load_file(str(run / "training-state.safetensors"))
    assert any(k.startswith("D.") for k in state)
    assert not any(k.startswith("D_knowledge.") for k in state)
    with pytest.raises(ConfigError, match="uses_knowledge_discriminator"):
        training_loop(
            run_dir=run, data=data, iters=3, resume=True, knowledge_discriminator=True, **RUN
        )
    for change, flag in (({"lr": 2e-4}, "lr=0.0002"), ({"ss_rollout": 2}, "ss_rollout=2")):
        with pytest.raises(ConfigError, match=flag):
            training_loop(run_dir=run, data=data, iters=3, resume=True, **change, **RUN)


def test_schedules() -> None:
    assert schedule(0.2) == 1.0 and schedule(0.75) == pytest.approx(0.5) and schedule(1.0) == 0.0
    assert scheduled_sampling_prob(0.05, 0.5, 0.1, 0.6) == 0.0
    assert scheduled_sampling_prob(0.35, 0.5, 0.1, 0.6) == pytest.approx(0.25)
    assert scheduled_sampling_prob(0.9, 0.5, 0.1, 0.6) == 0.5


def test_run_folder(tmp_path, data) -> None:
    run = tmp_path / "run"
    ticks = []
    kw = dict(RUN, preview_every=2, preview_cases=2, progress_fn=ticks.append)
    summary = training_loop(run_dir=run, data=data, iters=4, **kw)
    assert summary.iterations == 4 and summary.stop_reason == "iters"
    opts = json.loads((run / "training_options.json").read_text())
    assert opts["knowledge_mask"] is True and opts["model"]["name"] == "micro"
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["Progress/iter"] for r in rows] == [2, 4] and len(ticks) == 2
    for key in ("Loss/G_gan", "Loss/G_nce", "Loss/D_real", "Loss/G_gv", "Timing/sec_per_iter"):
        assert key in rows[-1]
    previews = sorted(p.name for p in (run / "previews").iterdir())
    assert previews == ["preview-000000.png", "preview-000002.png", "preview-000004.png"]
    assert Image.open(run / "previews" / "preview-000004.png").size[1] > 2 * 96
    cfg = read_checkpoint_config(run)
    assert cfg["iteration"] == 4 and cfg["training"]["autoregressive"] is True
    assert cfg["training"]["knowledge_discriminator"] is False  # the default
    g = create_generator(run)
    state = load_file(str(run / "training-state.safetensors"))
    assert all(torch.equal(v, state[f"G.{k}"]) for k, v in g.state_dict().items())
    with pytest.raises(FileExistsError, match="resume=True"):
        training_loop(run_dir=run, data=data, iters=6, **RUN)


@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_training_precision_is_recorded_and_its_weights_load(tmp_path, data, precision) -> None:
    """auto: bfloat16 autocast and channels-last weights where the CPU has bfloat16
    natively; the exported generator and the training state hold plain tensors all the same."""
    run = tmp_path / "run"
    training_loop(run_dir=run, data=data, iters=2, precision=precision, **RUN)
    opts = json.loads((run / "training_options.json").read_text())
    assert opts["precision"] == precision
    assert opts["amp"] == (native_precision("cpu") if precision == "auto" else "float32")
    g = create_generator(run)
    state = load_file(str(run / "training-state.safetensors"))
    assert all(torch.equal(v, state[f"G.{k}"]) for k, v in g.state_dict().items())
    assert all(v.is_contiguous() for v in g.state_dict().values())


def test_resume_continues_exactly(tmp_path, data) -> None:
    """3 iterations + resume to 6 == 6 in one go (constant lr, no scheduled sampling ramp)."""
    kw = dict(RUN, lr_decay_start=1.0, ss_start=0.0, ss_end=0.0, ss_max=0.5)
    kw["knowledge_discriminator"] = True  # the paper's model: both discriminators resume
    training_loop(run_dir=tmp_path / "a", data=data, iters=6, **kw)
    training_loop(run_dir=tmp_path / "b", data=data, iters=3, **kw)
    summary = training_loop(run_dir=tmp_path / "b", data=data, iters=6, resume=True, **kw)
    assert summary.iterations == 6
    rows = [json.loads(line) for line in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert [r["Progress/iter"] for r in rows] == [2, 3, 4, 6]
    a = load_file(str(tmp_path / "a" / "training-state.safetensors"))
    b = load_file(str(tmp_path / "b" / "training-state.safetensors"))
    assert a.keys() == b.keys()
    assert float(b["opt_G.state.0.step"]) == 6.0  # Adam state carried over
    for key in a:
        if not key.startswith("rng."):
            assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_budget_and_abort(tmp_path, data) -> None:
    s = training_loop(run_dir=tmp_path / "m", data=data, minutes=0.01, **RUN)
    assert s.stop_reason == "minutes" and s.iterations >= 1
    calls = iter(range(100))
    s = training_loop(
        run_dir=tmp_path / "x", data=data, iters=50, abort_fn=lambda: next(calls) >= 2, **RUN
    )
    assert s.stop_reason == "abort" and s.iterations == 2
    assert read_checkpoint_config(tmp_path / "x")["iteration"] == 2


@pytest.mark.parametrize(
    "flag, value",
    [("knowledge_mask", False), ("autoregressive", False), ("knowledge_discriminator", True)],
)
def test_variant_runs_train_and_record_the_flag(tmp_path, data, flag, value) -> None:
    s = training_loop(run_dir=tmp_path / flag, data=data, iters=3, **{flag: value}, **RUN)
    assert s.iterations == 3 and np.isfinite(s.last_stats["Loss/G_total"])
    cfg = read_checkpoint_config(tmp_path / flag)
    assert cfg["training"][flag] is value
    g = create_generator(tmp_path / flag)
    assert g.config.autoregressive is (flag != "autoregressive")
    assert synthesize(g, data.cf[0], data.times_s[0]).shape == (6, 32, 32)


def test_window_sampler_frames() -> None:
    data = toy_paired_videos(2, 16, 8)
    sampler = WindowSampler(data, 3, np.random.default_rng(0), flip=False)
    b = sampler.batch(np.array([1, 1]), np.array([0, 4]))
    ffa = torch.from_numpy(data.ffa[1]).float() / 127.5 - 1  # (T, S, S)
    assert torch.equal(b.prev[0], torch.full((3, 16, 16), -1.0))  # before frame 0: black
    assert torch.equal(b.target[0], ffa[0:3]) and torch.equal(b.target[1], ffa[4:7])
    assert torch.equal(b.prev[1], ffa[1:4])
    assert b.earlier.shape == (2, 1, 3, 16, 16)
    assert torch.equal(b.earlier[1, 0, 2], ffa[0])
    assert torch.equal(b.earlier[1, 0, :2], -torch.ones(2, 16, 16))
    assert b.earlier_valid[0, 0].tolist() == [False] * 3
    assert b.earlier_valid[1, 0].tolist() == [True] * 3
    assert torch.allclose(b.times[1], torch.from_numpy(data.times_s[1, 4:7]))
    assert torch.allclose(b.earlier_times[1, 0], torch.from_numpy(data.times_s[1, 1:4]))
    assert b.mask.shape == (2, 1, 16, 16) and b.cf.shape == (2, 3, 16, 16)


def test_window_sampler_rollout_windows() -> None:
    """With rollout R, each item carries the R real windows before `prev`, latest first,
    with the times and validity of the windows G predicts from them."""
    data = toy_paired_videos(2, 16, 12)
    sampler = WindowSampler(data, 3, np.random.default_rng(0), flip=True, rollout=2)
    b = sampler.batch(np.array([1, 1]), np.array([9, 5]), np.array([False, True]))
    ffa = torch.from_numpy(data.ffa[1]).float() / 127.5 - 1  # (T, S, S)
    assert b.earlier.shape == (2, 2, 3, 16, 16)
    assert torch.equal(b.earlier[0, 0], ffa[3:6]) and torch.equal(b.earlier[0, 1], ffa[0:3])
    times = torch.from_numpy(data.times_s[1])
    assert torch.allclose(b.earlier_times[0, 0], times[6:9])
    assert torch.allclose(b.earlier_times[0, 1], times[3:6])
    assert b.earlier_valid[0].all()
    # start 5 (flipped): prev = frames 2..4, earlier[0] = -1..1, earlier[1] = -4..-2 (black);
    # G predicts prev (all valid) from earlier[0] (frame -1 not), which it predicts from black
    assert torch.equal(b.earlier[1, 0, 1:], ffa[0:2].flip(-1))
    assert torch.equal(b.earlier[1, 1], -torch.ones(3, 16, 16))
    assert b.earlier_valid[1].tolist() == [[True, True, True], [False, True, True]]


def test_options_round_trip_through_the_run_folder(tmp_path, data) -> None:
    options = GeneratorTrainOptions(
        scale=micro_scale(),
        iters=2,
        batch_size=2,
        betas=(0.4, 0.9),
        loss_weights=LossWeights(gan=0.5, vgg=3.0),
        knowledge_mask=False,
        preview_every=0,
    )
    training_loop(options, run_dir=tmp_path / "r", data=data, progress=False)
    recorded = json.loads((tmp_path / "r" / "training_options.json").read_text())
    assert recorded["scale"] == "micro" and recorded["loss_weights"]["gan"] == 0.5
    assert recorded["data"]["videos"] == len(data) and recorded["device"] == "cpu"
    expected = dataclasses.replace(options, scale="micro")
    assert GeneratorTrainOptions.from_dict(recorded) == expected
    saved = read_checkpoint_config(tmp_path / "r")["training"]
    assert GeneratorTrainOptions.from_dict(saved) == expected
    # keywords replace fields of the options; an unknown one is refused
    s = training_loop(options, run_dir=tmp_path / "k", data=data, progress=False, iters=1)
    assert s.iterations == 1
    with pytest.raises(TypeError, match="nonsense"):
        training_loop(options, run_dir=tmp_path / "n", data=data, nonsense=1)


def test_options_are_checked_when_made() -> None:
    with pytest.raises(ConfigError, match="iters or minutes"):
        GeneratorTrainOptions()
    with pytest.raises(ConfigError, match="ss_rollout must be >= 1"):
        GeneratorTrainOptions(iters=1, ss_rollout=0)
    with pytest.raises(ConfigError, match="precision must be auto or float32"):
        GeneratorTrainOptions(iters=1, precision="float16")
    with pytest.raises(ConfigError, match="iters must be >= 0"):
        GeneratorTrainOptions(minutes=0)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainOptions(iters=1, batch_size=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GeneratorTrainOptions(iters=1).iters = 2  # type: ignore[misc]


def test_session_stop_reasons_stats_and_log(tmp_path) -> None:
    rows = []
    folder = tmp_path / "s"
    with TrainingSession(
        folder, TrainOptions(iters=3), progress=False, progress_fn=rows.append
    ) as s:
        assert s.device.type in ("cpu", "cuda")
        while s.running():
            s.record({"Loss/a": float(s.iteration), "Loss/bad": float("nan")})
            s.advance()
            if s.due(2):
                s.tick({"Progress/lr": 0.1})
        assert s.stop_reason == "iters" and s.pending
        s.tick({})
        summary = s.finish("; done")
    assert summary.iterations == 3 and summary.stop_reason == "iters"
    lines = [json.loads(x) for x in (folder / "stats.jsonl").read_text().splitlines()]
    assert lines == rows and [r["Progress/iter"] for r in rows] == [2, 3]
    assert rows[0]["Loss/a"] == 0.5 and rows[0]["Loss/bad"] is None  # NaN is written as null
    assert rows[1]["Loss/a"] == 2.0 and rows[1]["Progress/fraction"] == 1.0
    assert summary.last_stats == rows[-1]
    assert "stopped (iters) at iteration 3" in (folder / "log.txt").read_text()

    calls = iter(range(100))
    abort = dict(progress=False, abort_fn=lambda: next(calls) >= 1)
    with TrainingSession(tmp_path / "a", TrainOptions(iters=9), **abort) as s:
        while s.running():
            s.advance()
    assert s.stop_reason == "abort" and s.iteration == 1
    with TrainingSession(tmp_path / "m", TrainOptions(minutes=1e-9), progress=False) as s:
        s.start(iteration=5, elapsed_s=30.0)  # a resumed run: its past time counts
        assert not s.running() and s.stop_reason == "minutes" and s.fraction() == 1.0
    assert not s.due(0) and s.due(5)


def test_scheduled_sampling_chains_the_rollout_windows() -> None:
    """With rollout R and ss_prob 1, the previous frames are G's own, predicted window by
    window from the real frames R windows earlier (black where a window is before frame 0)."""
    data = toy_paired_videos(2, 32, 12)
    nets = Nets.build(micro_scale())
    sampler = WindowSampler(data, 3, np.random.default_rng(0), flip=False, rollout=2)
    b = sampler.batch(np.array([0, 1]), np.array([9, 4]))
    prev, stats = previous_frames(nets, b, True, 1.0, contextlib.nullcontext())
    assert stats == {"Progress/ss_used": 1.0}
    with torch.no_grad():
        first = nets.G(b.cf, b.earlier[:, 1], b.earlier_times[:, 1])
        first = torch.where(b.earlier_valid[:, 1, :, None, None], first, -1.0)
        want = nets.G(b.cf, first, b.earlier_times[:, 0])
    assert torch.allclose(prev, want, atol=1e-6)
    assert torch.equal(first[1, 0], torch.full((32, 32), -1.0))  # frame -1 of the 2nd item
    one = WindowSampler(data, 3, np.random.default_rng(0), flip=False).batch(
        np.array([0, 1]), np.array([9, 4])
    )
    with torch.no_grad():
        single = nets.G(one.cf, one.earlier[:, 0], one.earlier_times[:, 0])
    assert not torch.allclose(prev, single)  # two windows chained, not one


def test_step_phases_update_their_own_networks(data) -> None:
    nets = Nets.build(micro_scale())
    opt_g, opt_d = make_optimizers(nets)
    batch, opts, ctx = _fixed_batch(data), StepOptions(), contextlib.nullcontext()
    black, stats = previous_frames(nets, batch, False, 1.0, ctx)
    assert torch.all(black == -1) and stats == {}
    prev, stats = previous_frames(nets, batch, True, 0.0, ctx)
    assert torch.equal(prev, batch.prev) and stats == {"Progress/ss_used": 0.0}
    cond = torch.cat([batch.cf, prev], 1)
    fake = nets.G(batch.cf, prev, batch.times)
    preds = discriminate(nets, batch, cond, fake, knowledge=True)

    def params(name):
        return [p.detach().clone() for p in nets.modules()[name].parameters()]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    g_before, d_before = params("G"), params("D")
    twin = copy.deepcopy(nets)  # D's update as if on the window detached from G
    twin_opt_d = make_optimizers(twin)[1]
    g_losses = generator_phase(nets, opt_g, batch, fake, preds, opts, ctx)
    assert g_losses["G_total"] > 0 and "G_nce" in g_losses
    assert same(d_before, params("D")) and not same(g_before, params("G"))
    discriminators = [p for d in nets.discriminators() for p in d.parameters()]
    assert all(p.grad is None for p in discriminators)  # G's loss computed no D gradient
    g_after = params("G")
    d_losses = discriminator_phase(opt_d, preds, opts.weights)
    assert set(d_losses) == {"D_real", "D_fake", "D_total", "D_knowledge_real", "D_knowledge_fake"}
    assert same(g_after, params("G")) and not same(d_before, params("D"))
    detached = discriminate(twin, batch, cond, fake.detach(), knowledge=True)
    reference = discriminator_phase(twin_opt_d, detached, opts.weights)
    torch.testing.assert_close(d_losses["D_total"], reference["D_total"])
    for mine, theirs in zip(nets.discriminators(), twin.discriminators(), strict=True):
        for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
            torch.testing.assert_close(p, q)
