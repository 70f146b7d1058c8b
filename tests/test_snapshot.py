"""`index.snapshot_index_folder` and `fundus2video snapshot`: consistent copies of a live
index folder."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import index.snapshot as snapshot_module
from index import SnapshotError, load_index_folder, snapshot_index_folder
from retrieval.apps.cli import app
from retrieval.data.cohort import Cohort
from retrieval.data.media import read_cf, read_ffa
from retrieval.search.engine import Engine, NewCase
from retrieval.testing import PixelEncoder


def consistency_problems(path: Path) -> list[str]:
    """Why `path` is not one consistent state of an engine's index folder ([]: it is)."""
    folder = load_index_folder(path)
    rows = set(folder.catalog["row_id"].to_list())
    problems = [] if rows else ["empty catalog"]
    for modality, vi in folder.indexes.items():
        if set(vi.ids().tolist()) != rows:
            problems.append(f"{modality} ids differ from the catalog's rows")
    for column in ("cf_path", "ffa_path"):
        for value in folder.catalog[column].to_list():
            if not Path(value).is_absolute() and not (path / value).is_file():
                problems.append(f"{value} missing")
    return problems


@pytest.fixture
def live_index(pixel_index, tmp_path) -> Path:
    copy = tmp_path / "live"
    shutil.copytree(pixel_index, copy)
    return copy


def _add(engine: Engine, cohort: Path, case_id: str, n: int) -> None:
    case = Cohort.open(cohort).cases()[n % 24]
    engine.add_case(
        NewCase(case_id=case_id, diagnosis="normal"),
        read_cf(case.cf_path),
        read_ffa(case.ffa_path),
        allow_duplicate=True,
    )


def test_snapshot_is_an_equal_independent_copy(live_index, tmp_path):
    taken = snapshot_index_folder(live_index, tmp_path / "snap")
    copy, original = load_index_folder(taken.path), load_index_folder(live_index)
    assert copy.catalog.equals(original.catalog)
    assert copy.manifest == original.manifest
    assert taken.attempts == 1 and taken.files == 4
    assert (tmp_path / "snap/cf.faiss").stat().st_ino != (live_index / "cf.faiss").stat().st_ino
    linked = snapshot_index_folder(live_index, tmp_path / "linked", link=True)
    assert (linked.path / "cf.faiss").stat().st_ino == (live_index / "cf.faiss").stat().st_ino


def test_snapshot_refuses_an_existing_output_unless_overwrite(live_index, tmp_path):
    out = tmp_path / "snap"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SnapshotError, match="already exists"):
        snapshot_index_folder(live_index, out)
    assert (out / "keep.txt").read_text() == "mine"
    snapshot_index_folder(live_index, out, overwrite=True)
    assert not (out / "keep.txt").exists() and load_index_folder(out).catalog.height == 24


def test_snapshot_refuses_bad_paths(live_index, tmp_path):
    with pytest.raises(SnapshotError, match="no such folder"):
        snapshot_index_folder(tmp_path / "absent", tmp_path / "a")
    with pytest.raises(SnapshotError, match="outside the index folder"):
        snapshot_index_folder(live_index, live_index / "snap")
    (tmp_path / "plain").mkdir()
    with pytest.raises(Exception, match="manifest.json"):
        snapshot_index_folder(tmp_path / "plain", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_snapshot_copies_again_when_the_folder_is_swapped_during_a_copy(
    live_index, tmp_path, monkeypatch
):
    """The first copy reads the old folder while an update swaps in a new one: that copy is
    discarded and the second one holds the new state."""
    engine = Engine.open(live_index, encoder=PixelEncoder())
    cohort = Path(load_index_folder(live_index).extra["cohort_dir"])
    real_copy, calls = snapshot_module._copy_tree, []

    def copy_then_update(fd, dst, link):
        result = real_copy(fd, dst, link)
        calls.append(dst)
        if len(calls) == 1:
            _add(engine, cohort, "added-during-copy", 3)
        return result

    monkeypatch.setattr(snapshot_module, "_copy_tree", copy_then_update)
    taken = snapshot_index_folder(live_index, tmp_path / "snap")
    assert taken.attempts == 2
    ids = load_index_folder(taken.path).catalog["case_id"].to_list()
    assert "added-during-copy" in ids and len(ids) == 25
    assert consistency_problems(taken.path) == []
    assert not list(tmp_path.glob(".snap.tmp-*"))


def test_snapshots_taken_during_a_stream_of_writes_are_each_one_consistent_state(
    live_index, tmp_path
):
    """Another thread adds and deletes cases (each saved at once) while snapshots are taken:
    every snapshot loads, is consistent, and holds one of the states the writer went
    through."""
    engine = Engine.open(live_index, encoder=PixelEncoder())
    cohort = Path(load_index_folder(live_index).extra["cohort_dir"])
    base = set(load_index_folder(live_index).catalog["case_id"].to_list())
    states, done = [frozenset(base)], threading.Event()

    def writer():
        current = set(base)
        for i in range(12):
            if i % 3 == 2:
                victim = f"stream-{i - 1:02d}"
                engine.remove_case(victim)
                current.discard(victim)
            else:
                _add(engine, cohort, f"stream-{i:02d}", i)
                current.add(f"stream-{i:02d}")
            states.append(frozenset(current))
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    snapshots = []
    while not done.is_set() or len(snapshots) < 3:
        out = tmp_path / f"snap-{len(snapshots):03d}"
        snapshots.append(snapshot_index_folder(live_index, out))
    thread.join()
    assert len(snapshots) >= 3
    for taken in snapshots:
        assert consistency_problems(taken.path) == [], taken.path
        ids = frozenset(load_index_folder(taken.path).catalog["case_id"].to_list())
        assert ids in states, taken.path
        for row in load_index_folder(taken.path).catalog.iter_rows(named=True):
            if row["cf_path"].startswith("media/"):
                assert read_cf(taken.path / row["cf_path"]).shape[2] == 3
    final = snapshot_index_folder(live_index, tmp_path / "final")
    assert frozenset(load_index_folder(final.path).catalog["case_id"].to_list()) == states[-1]


def test_a_snapshot_serves_and_takes_writes(tiny_index, tmp_path, monkeypatch):
    """`fundus2video snapshot` writes OUT; `fundus2video serve OUT` opens it (the app it
    would run answers) and an add to the snapshot leaves the original untouched."""
    from fastapi.testclient import TestClient

    out = tmp_path / "backup"
    result = CliRunner().invoke(app, ["snapshot", str(tiny_index.index), str(out)])
    assert result.exit_code == 0, result.output
    assert "snapshot of" in result.output and "24 cases" in result.output
    again = CliRunner().invoke(app, ["snapshot", str(tiny_index.index), str(out)])
    assert again.exit_code == 2 and "already exists" in again.output

    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.setdefault("app", app))
    result = CliRunner().invoke(app, ["serve", str(out), "--port", "0"])
    assert result.exit_code == 0, result.output
    with TestClient(served["app"]) as client:  # serve loads the index in the background
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.05)
        page = client.get("/cases", params={"limit": 100}).json()
    assert page["total"] == 24
    engine = Engine.open(out)
    _add(engine, tiny_index.cohort, "only-in-backup", 5)
    assert load_index_folder(out).catalog.height == 25
    assert load_index_folder(tiny_index.index).catalog.height == 24
    assert "only-in-backup" in load_index_folder(out).catalog["case_id"].to_list()
