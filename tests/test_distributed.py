"""Data-parallel training (encoder.train.distributed): two gloo processes on CPU train as
one process with the same global batch, resume exactly, and write one run folder.

One spawn of two processes runs every two-process scenario (`_worker`); the test then
runs the single-process references in-process and compares.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import load_file

from encoder import EmbedderConfig
from encoder.losses import label_affinity, label_contrastive_loss
from encoder.testing import micro_scale, toy_paired_videos
from encoder.train import CaseLabels, distributed, embed_training_loop, training_loop

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deterministic_torch")]

WORLD = 2
BATCH = 4  # the global batch: 2 per process
ITERS = 4
GENERATOR = dict(
    scale=micro_scale(32),
    batch_size=BATCH,
    iters=ITERS,
    stats_every=1,
    preview_every=0,
    snapshot_every=0,
    precision="float32",  # the parity below is float32's; bfloat16 rounds each split apart
    progress=False,
)
SMALL = EmbedderConfig(
    image_size=32,
    dim=16,
    grid=2,
    attn_hidden=8,
    pixel_size=8,
    pixel_components=8,
    time_freqs=4,
    clinical_dim=8,
    clinical_hidden=16,
)
EMBEDDER = dict(
    config=SMALL, dim=16, batch_size=BATCH, iters=ITERS, stats_every=1, replay=2, progress=False
)
LABELS = CaseLabels(
    diagnoses=("normal", "NPDR", "normal", "PDR", "NPDR", "normal"),
    lesions=((), ("haemorrhage",), (), ("leakage",), ("microaneurysm",), None),
)
# The two runs sum the same numbers in another order (per rank, then across ranks), so
# they agree to rounding: measured, the largest difference of any loss over the 4
# iterations is 5e-7 relative (3.8e-6 absolute: G_total, about 85, at the first).
FIRST_ATOL = 1e-5
CURVE_RTOL = 1e-5


def _data():
    return toy_paired_videos(6, 32, 6)


def _features(rows: slice = slice(None)) -> tuple[torch.Tensor, ...]:
    """A weight and the CF-like and FFA-like vectors of `rows` of a batch it maps."""
    g = torch.Generator().manual_seed(3)
    x_img, x_txt = torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 8, generator=g)
    weight = torch.nn.Parameter(torch.randn(8, 8, generator=g))
    img = F.normalize(x_img[rows] @ weight, dim=-1)
    return weight, img, F.normalize(x_txt[rows] @ weight.T, dim=-1)


def _batch_losses(img: torch.Tensor, txt: torch.Tensor, clip: ClipLoss) -> torch.Tensor:
    """The CLIP loss and the label loss of the whole batch's vectors."""
    both = torch.cat([distributed.gather_with_grad(img), distributed.gather_with_grad(txt)])
    affinity = label_affinity(LABELS.diagnoses[:BATCH], LABELS.lesions[:BATCH]).repeat(2, 2)
    return clip(img, txt, torch.tensor(10.0)) + label_contrastive_loss(both, affinity)


def _clip_gradient(out: Path) -> None:
    """The gathered CLIP + label loss over 2 x B and its averaged gradient, saved."""
    weight, img, txt = _features(distributed.part(BATCH))
    opt = torch.optim.SGD([weight], lr=0.0)
    loss_fn = ClipLoss(
        local_loss=True, gather_with_grad=True, rank=distributed.rank(), world_size=WORLD
    )
    loss = _batch_losses(img, txt, loss_fn)
    loss.backward()
    distributed.average_gradients(opt)
    mean = distributed.mean_stats({"loss": loss.item()})["loss"]
    if distributed.is_main():
        torch.save({"loss": mean, "grad": weight.grad}, out / "clip.pt")


def _worker(rank: int, out: Path, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    assert distributed.setup() and distributed.world_size() == WORLD
    data = _data()
    _clip_gradient(out)
    training_loop(run_dir=out / "g2", data=data, **GENERATOR)
    calls = iter(range(1000))  # rank 0's abort_fn alone decides: stop after 2 iterations
    training_loop(run_dir=out / "r2", data=data, abort_fn=lambda: next(calls) >= 2, **GENERATOR)
    training_loop(run_dir=out / "r2", data=data, resume=True, **GENERATOR)
    embed = dict(run_dir=out / "g2", out_dir=out / "e2", data=data, labels=LABELS)
    embed_training_loop(**embed, **EMBEDDER)
    distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The folder where two gloo processes ran every scenario of `_worker`."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(out, _free_port()), nprocs=WORLD, join=True)
    return out


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "stats.jsonl").read_text().splitlines()]


def _assert_same_curves(a: list[dict], b: list[dict], prefix: str, rtol: float) -> None:
    assert [r["Progress/iter"] for r in a] == [r["Progress/iter"] for r in b]
    keys = sorted(k for k in a[0] if k.startswith(prefix))
    assert keys
    for key in keys:
        np.testing.assert_allclose(a[0][key], b[0][key], atol=FIRST_ATOL, err_msg=key)
        curve_a, curve_b = [r[key] for r in a], [r[key] for r in b]
        np.testing.assert_allclose(curve_a, curve_b, rtol=rtol, atol=FIRST_ATOL, err_msg=key)


def test_gathered_losses_and_gradient_equal_one_process(two_processes) -> None:
    weight, img, txt = _features()
    loss = _batch_losses(img, txt, ClipLoss())
    loss.backward()
    saved = torch.load(two_processes / "clip.pt")
    assert abs(saved["loss"] - loss.item()) < 1e-6
    torch.testing.assert_close(saved["grad"], weight.grad, atol=1e-6, rtol=1e-5)


def test_generator_two_processes_follow_one_process(tmp_path, two_processes) -> None:
    training_loop(run_dir=tmp_path / "g1", data=_data(), **GENERATOR)
    _assert_same_curves(_rows(two_processes / "g2"), _rows(tmp_path / "g1"), "Loss/", CURVE_RTOL)


def test_generator_resumes_exactly_and_rank_zero_writes_once(two_processes) -> None:
    whole, resumed = two_processes / "g2", two_processes / "r2"
    a = load_file(str(whole / "training-state.safetensors"))
    b = load_file(str(resumed / "training-state.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["Progress/iter"] for r in _rows(resumed)] == [1, 2, 3, 4]
    for run in (whole, resumed):
        names = sorted(p.name for p in run.iterdir())
        assert names == [
            "config.json",
            "generator.safetensors",
            "log.txt",
            "previews",
            "stats.jsonl",
            "training-state.safetensors",
            "training_options.json",
        ]
    log = (resumed / "log.txt").read_text()
    assert log.count("stopped (abort) at iteration 2") == 1
    assert log.count("resumed") == 1 and log.count("stopped (iters) at iteration 4") == 1
    assert len(list((whole / "previews").iterdir())) == 2  # first and last, once


def test_embedder_two_processes_follow_one_process(tmp_path, two_processes) -> None:
    embed_training_loop(
        run_dir=two_processes / "g2", out_dir=tmp_path / "e1", data=_data(), labels=LABELS,
        **EMBEDDER,
    )  # fmt: skip
    two, one = _rows(two_processes / "e2"), _rows(tmp_path / "e1")
    assert {"Loss/clip", "Loss/label", "Loss/clip_replay"} <= set(two[-1])
    _assert_same_curves(two, one, "Loss/", CURVE_RTOL)
    names = sorted(p.name for p in (two_processes / "e2").iterdir())
    assert names == [
        "config.json",
        "embedder.safetensors",
        "log.txt",
        "stats.jsonl",
        "training_options.json",
    ]


def test_single_process_helpers_are_no_ops() -> None:
    assert not distributed.active() and distributed.is_main()
    assert distributed.part(5) == slice(0, 5) and distributed.world_size() == 1
    assert distributed.whole_parts(5) == 5
    x = torch.ones(3)
    assert distributed.gather(x) is x and distributed.gather_with_grad(x) is x
    assert distributed.agree("iters", 1.5) == ("iters", 1.5)
    assert distributed.mean_stats({"a": 1.0}) == {"a": 1.0}


def test_each_rank_builds_its_own_rows_of_the_same_draw() -> None:
    from encoder.train import WindowSampler

    data = _data()
    parts = [
        WindowSampler(data, 3, np.random.default_rng(7)).sample(BATCH, rows)
        for rows in (slice(0, 2), slice(2, 4), slice(None))
    ]
    for name, whole in vars(parts[2]).items():
        torch.testing.assert_close(torch.cat([vars(parts[0])[name], vars(parts[1])[name]]), whole)
