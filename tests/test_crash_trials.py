"""The crash trials (benchmarks/crash_trials.py): the checkers catch a mixed, empty or
lost state; the trials themselves (slow) find no failure."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from benchmarks.crash_trials import (
    EMBED_ITERS,
    WRITERS,
    Inconsistent,
    WriteStream,
    check_cohort_state,
    check_embedder_state,
    check_index_state,
    check_run_state,
    check_serve_state,
    checkpoint_iteration,
    index_problems,
    kill_moments,
    leftovers,
    run_trials,
    state_iteration,
)
from index import load_index_folder, save_index_folder


@pytest.fixture
def index_copy(pixel_index, tmp_path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(pixel_index, copy)
    return copy


def _ids(path: Path) -> set[str]:
    return set(load_index_folder(path).catalog["case_id"].to_list())


def _rewrite(path: Path, change) -> None:
    """Save the folder at `path` again after `change(folder)` (by hand, no engine)."""
    folder = load_index_folder(path)
    change(folder)
    save_index_folder(path, folder.indexes, folder.catalog, folder.encoder_id, folder.extra)


def test_a_consistent_index_is_old_or_new_by_its_case_ids(index_copy):
    ids = _ids(index_copy)
    assert index_problems(index_copy) == []
    assert check_index_state(index_copy, ids, ids | {"x"}) == "old"
    assert check_index_state(index_copy, set(), ids) == "new"
    with pytest.raises(Inconsistent, match="neither"):
        check_index_state(index_copy, ids - {next(iter(ids))}, set())


def test_an_index_whose_vectors_and_catalog_disagree_is_a_mix(index_copy):
    """A catalog row without its cf vector: the folder still loads, but it is a mix."""
    _rewrite(index_copy, lambda f: f.indexes["cf"].remove([int(f.catalog["row_id"][0])]))
    assert load_index_folder(index_copy).catalog.height == 24
    problems = index_problems(index_copy)
    assert problems and "cf holds 23 ids" in problems[0]
    with pytest.raises(Inconsistent, match="cf holds 23 ids"):
        check_index_state(index_copy, _ids(index_copy), set())


def test_an_empty_index_fails(index_copy):
    def empty(folder):
        folder.catalog = folder.catalog.clear()
        for vi in folder.indexes.values():
            vi.remove(vi.ids())

    _rewrite(index_copy, empty)
    assert "the catalog is empty" in index_problems(index_copy)
    with pytest.raises(Inconsistent, match="empty"):
        check_index_state(index_copy, set(), set())


def test_missing_media_and_unloadable_folders_fail(index_copy):
    def media_row(folder):
        folder.catalog = folder.catalog.with_columns(
            cf_path=pl.when(pl.col("row_id") == 0)
            .then(pl.lit("media/0/cf.png"))
            .otherwise(pl.col("cf_path"))
        )

    _rewrite(index_copy, media_row)
    assert index_problems(index_copy) == ["cf_path media/0/cf.png is missing"]
    (index_copy / "ffa.faiss").write_bytes(b"torn")
    assert "does not load" in index_problems(index_copy)[0]
    shutil.rmtree(index_copy)
    assert "does not load" in index_problems(index_copy)[0]


def test_cohort_checker(pixel_index, tmp_path):
    cohort = Path(load_index_folder(pixel_index).extra["cohort_dir"])
    assert check_cohort_state(tmp_path / "absent", 24) == "old"
    copy = tmp_path / "cohort"
    shutil.copytree(cohort, copy)
    assert check_cohort_state(copy, 24) == "new"
    with pytest.raises(Inconsistent, match="23"):
        check_cohort_state(copy, 23)
    next((copy / "cf").iterdir()).unlink()
    with pytest.raises(Inconsistent):
        check_cohort_state(copy, 24)


@pytest.fixture(scope="module")
def micro_run(pixel_index, tmp_path_factory) -> Path:
    """A micro generator run of 2 iterations with a checkpoint after each (state + export)."""
    import torch

    from encoder.testing import micro_scale
    from encoder.train import training_loop
    from retrieval.data.cohort import Cohort
    from retrieval.data.training_data import load_paired

    cohort = Cohort.open(load_index_folder(pixel_index).extra["cohort_dir"])
    train = load_paired(cohort, size=32, split="train", progress=False)
    run = tmp_path_factory.mktemp("micro-train") / "run"
    torch.manual_seed(0)
    training_loop(
        run_dir=run,
        data=train,
        scale=micro_scale(32),
        iters=2,
        batch_size=2,
        progress=False,
        preview_every=0,
        snapshot_every=1,
    )
    return run


@pytest.fixture
def run_copy(micro_run, tmp_path) -> Path:
    shutil.copytree(micro_run, tmp_path / "run")
    return tmp_path / "run"


def _drop_export(run: Path) -> None:
    (run / "config.json").unlink()
    (run / "generator.safetensors").unlink()


def test_run_checker_accepts_old_and_new_checkpoints(run_copy, tmp_path):
    assert check_run_state(tmp_path / "nothing-yet", 2) == "old"
    assert check_run_state(run_copy, 2) == "new"
    assert check_run_state(run_copy, 3) == "old"
    _drop_export(run_copy)  # killed between the state and the first export
    assert check_run_state(run_copy, 2) == "old"


def test_run_checker_catches_a_torn_or_mixed_checkpoint(run_copy):
    from encoder.checkpoint import load_generator, save_generator
    from encoder.testing import micro_scale
    from encoder.train.state import STATE_NAME

    generator, _ = load_generator(run_copy)
    save_generator(run_copy, generator, micro_scale(32), iteration=5)  # ahead of the state
    with pytest.raises(Inconsistent, match="generator iteration 5, training state 2"):
        check_run_state(run_copy, 5)
    weights = run_copy / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(Inconsistent, match="does not load"):
        check_run_state(run_copy, 2)
    (run_copy / STATE_NAME).write_bytes(b"x" * 100)
    with pytest.raises(Inconsistent, match=STATE_NAME):
        state_iteration(run_copy)


def test_load_generator_takes_the_config_saved_with_the_weights(run_copy, caplog):
    """A save killed between the weights and config.json leaves the previous config.json:
    the loader uses the config written inside the weights file."""
    from encoder.checkpoint import load_generator, read_checkpoint_config

    config = read_checkpoint_config(run_copy)
    (run_copy / "config.json").write_text(json.dumps(config | {"iteration": 1}))
    _, loaded = load_generator(run_copy)
    assert loaded["iteration"] == 2 and loaded == config
    assert "a save was interrupted" in caplog.text
    assert check_run_state(run_copy, 2) == "new"


def test_embedder_checker_tells_old_from_new_and_catches_a_torn_one(micro_run_dir, tmp_path):
    from encoder import EmbedderConfig, create_embedder, save_embedder

    def saved(folder: Path, seed: int, iters: int, log: str = "") -> Path:
        torch.manual_seed(seed)
        config = EmbedderConfig(image_size=32, dim=8, grid=2, attn_hidden=8, clinical_dim=0)
        e = create_embedder(config, run_dir=micro_run_dir)
        save_embedder(folder, e, training={"iters": iters}, iteration=iters)
        (folder / "log.txt").write_text(log)
        return folder

    old = saved(tmp_path / "old", 0, 6, "stopped (iters) at iteration 6 after 1 s")
    assert check_embedder_state(old, old) == "old"
    midway = saved(tmp_path / "mid", 1, EMBED_ITERS)  # saved at a validation, not finished
    assert check_embedder_state(midway, old) == "old"
    done = saved(tmp_path / "done", 1, EMBED_ITERS, f"stopped (iters) at iteration {EMBED_ITERS} ")
    assert check_embedder_state(done, old) == "new"
    with pytest.raises(Inconsistent, match="neither"):
        check_embedder_state(saved(tmp_path / "other", 2, 99), old)
    weights = done / "embedder.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(Inconsistent, match="does not load"):
        check_embedder_state(done, old)


def test_resume_exports_the_generator_from_the_restored_state(run_copy, pixel_index):
    """A run killed after its state but before its export resumes with the export brought
    level with the state."""
    from encoder.testing import micro_scale
    from encoder.train import training_loop
    from retrieval.data.cohort import Cohort
    from retrieval.data.training_data import load_paired

    _drop_export(run_copy)
    cohort = Cohort.open(load_index_folder(pixel_index).extra["cohort_dir"])
    train = load_paired(cohort, size=32, split="train", progress=False)
    seen = []

    def stop_at_once() -> bool:  # asked before the first resumed iteration
        seen.append(checkpoint_iteration(run_copy))
        return True

    summary = training_loop(
        run_dir=run_copy,
        data=train,
        scale=micro_scale(32),
        iters=3,
        batch_size=2,
        progress=False,
        preview_every=0,
        resume=True,
        abort_fn=stop_at_once,
    )
    assert seen == [2] and summary.stop_reason == "abort"
    assert check_run_state(run_copy, 2) == "new"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A SIGKILLed writer leaves `.NAME.tmp-PID_HOST_*`; the next atomic write of NAME
    removes it, never a running writer's."""
    from encoder.checkpoint import atomic_write_text as checkpoint_write_text
    from index.atomic import atomic_dir, atomic_write_text

    host, dead, live = socket.gethostname(), _dead_pid(), os.getpid()
    stale_dir = tmp_path / f".out.tmp-{dead}_{host}_abc"
    running_dir = tmp_path / f".out.tmp-{live}_{host}_def"
    stale_file = tmp_path / f".a.json.tmp-{dead}_{host}_x.json"
    stale_ckpt = tmp_path / f".config.json.tmp-{dead}_{host}_y"
    for path in (stale_dir, running_dir):
        path.mkdir()
    for path in (stale_file, stale_ckpt):
        path.write_text("half")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    atomic_write_text(tmp_path / "a.json", "{}")
    checkpoint_write_text(tmp_path / "config.json", "{}")
    assert not stale_dir.exists() and not stale_file.exists() and not stale_ckpt.exists()
    assert running_dir.exists()
    assert (tmp_path / "out/f").read_text() == "x"
    assert leftovers(tmp_path / "out") == 1  # the running writer's


def test_serve_checker_catches_lost_acknowledged_writes(index_copy):
    base = _ids(index_copy)
    stream = WriteStream("http://unused", [], "t")
    assert check_serve_state(index_copy, stream, base) == "new"  # nothing in flight
    stream.in_flight = ("add", "in-flight")
    assert check_serve_state(index_copy, stream, base) == "old"
    stream.in_flight = None
    stream.added = ["acknowledged"]
    with pytest.raises(Inconsistent, match="adds lost"):
        check_serve_state(index_copy, stream, base)
    stream.added, stream.deleted = [], [next(iter(base))]
    with pytest.raises(Inconsistent, match="deletes back"):
        check_serve_state(index_copy, stream, base)


def test_kill_moments_are_seeded_and_spread_over_the_duration():
    a = kill_moments(10.0, 20, np.random.default_rng(3))
    assert a == kill_moments(10.0, 20, np.random.default_rng(3))
    assert all(i * 0.5 <= t < (i + 1) * 0.5 for i, t in enumerate(a))


def test_leftovers_counts_temporary_siblings(tmp_path):
    (tmp_path / "out").mkdir()
    assert leftovers(tmp_path / "out") == 0
    (tmp_path / ".out.tmp-abc").mkdir()
    (tmp_path / "out" / ".cf.tmp-1.png").write_bytes(b"")
    assert leftovers(tmp_path / "out") == 2


@pytest.mark.slow
def test_crash_trials_find_no_failure(tmp_path):
    """One SIGKILL per writer (ingest, index, train, embed, serve): every output loads as the
    old or the new state, no acknowledged write is lost, the next write succeeds."""
    report = run_trials(WRITERS, kills=1, seed=1, work=tmp_path)
    failures = [t for t in report["trials"] if t["state"] == "failure"]
    assert failures == []
    assert [r["kills"] for r in report["summary"]] == [1] * len(WRITERS)
    serve = [t for t in report["trials"] if t["writer"] == "serve"]
    assert sum(t["acknowledged"]["adds"] for t in serve) > 0
