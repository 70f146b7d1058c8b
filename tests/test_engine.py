"""The search engine over a phantom index embedded by `PixelEncoder` (`pixel_index`: no model).

Search by case, photo and video against brute force; synthesis and fusion; filters;
updates that are visible at once, persisted atomically, and survive a restart; a
failed save that leaves nothing changed; concurrent searches during updates.
"""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import index.folder as folder_mod
from index import load_index_folder, read_manifest
from index.atomic import atomic_dir, recover_dir
from retrieval.engine import (
    MEDIA_DIR,
    CaseQuery,
    CFQuery,
    Engine,
    FFAQuery,
    NewCase,
    normalize_filters,
    reciprocal_rank_fusion,
)
from retrieval.errors import (
    DuplicateCase,
    IndexChanged,
    PersistError,
    QueryError,
    UnknownCase,
)
from retrieval.media import read_cf, read_ffa
from retrieval.media_write import mp4_bytes, write_mp4
from retrieval.testing import PixelEncoder


@pytest.fixture
def engine(pixel_index, tmp_path) -> Engine:
    """A fresh copy of the index per test (updates write to it)."""
    path = tmp_path / "index"
    shutil.copytree(pixel_index, path)
    return Engine.open(path, encoder=PixelEncoder())


def brute_force(engine: Engine, query: np.ndarray, modality: str) -> list[tuple[str, float]]:
    ids = engine._folder.indexes[modality].ids()
    scores = engine.vectors(modality, ids) @ query.reshape(-1)
    order = np.argsort(-scores, kind="stable")
    return [(engine._rows[int(ids[i])].case_id, float(scores[i])) for i in order]


def ranked(result) -> list[str]:
    return [h.case.case_id for h in result.hits]


# --------------------------------------------------------------------------- fusion


def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["b", "c", "d"]], k=60)
    assert [i for i, _ in fused] == ["b", "c", "a", "d"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert dict(fused)["d"] == pytest.approx(1 / 63)
    # ties keep first appearance; repeats within one ranking count once; k changes weights
    assert [i for i, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]])] == ["x", "y"]
    assert dict(reciprocal_rank_fusion([["a", "a", "b"]]))["b"] == pytest.approx(1 / 63)
    assert reciprocal_rank_fusion([[1, 2], [2]], k=0)[0] == (2, 1.5)
    assert reciprocal_rank_fusion([]) == []
    with pytest.raises(ValueError, match="k must be"):
        reciprocal_rank_fusion([[1]], k=-1)


def test_filters_are_normalised_and_checked():
    assert normalize_filters({"eye": "OD", "diagnosis": ["PDR", "NPDR", None], "split": None}) == {
        "eye": ("OD",),
        "diagnosis": ("NPDR", "PDR"),
    }
    with pytest.raises(QueryError, match="filter eye='left'"):
        normalize_filters({"eye": ["left"]})
    with pytest.raises(QueryError, match="unknown filter 'colour'"):
        normalize_filters({"colour": "red"})


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("modality,target", [("cf", "cf"), ("cf", "ffa"), ("ffa", "cf")])
def test_case_search_matches_brute_force(engine, modality, target):
    case = engine.cases(0, 1)[1][0]
    query = engine.vectors(modality, [case.row_id])
    truth = [c for c in brute_force(engine, query, target) if c[0] != case.case_id]
    result = engine.search(CaseQuery(case.case_id, modality), target, k=5)
    assert ranked(result) == [c for c, _ in truth[:5]]
    assert [h.score for h in result.hits] == pytest.approx([s for _, s in truth[:5]], abs=1e-5)
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
    assert result.score_kind == "cosine" and result.candidates == engine.case_count
    kept = engine.search(CaseQuery(case.case_id, modality), target, k=3, exclude_self=False)
    assert ranked(kept) == [c for c, _ in brute_force(engine, query, target)[:3]]


def test_uploaded_photo_and_video_embed_like_their_case(engine):
    case = engine.cases(0, 1)[1][0]
    by_photo = engine.search(CFQuery(read_cf(case.cf_path)), "cf", k=3)
    by_case = engine.search(case.case_id, "cf", k=3, exclude_self=False)
    assert ranked(by_photo) == ranked(by_case) and ranked(by_photo)[0] == case.case_id
    video = read_ffa(case.ffa_path)
    by_video = engine.search(FFAQuery(video, case.ffa_times_s), "ffa", k=1)
    assert ranked(by_video) == [case.case_id] and by_video.query["kind"] == "upload"
    with pytest.raises(QueryError, match="times has 2 values for 6 frames"):
        engine.search(FFAQuery(video, [0.0, 1.0]), "ffa")
    # bare arrays: (H, W, 3) is a photo, (T, H, W) a video
    assert ranked(engine.search(read_cf(case.cf_path), "cf", k=3)) == ranked(by_photo)
    assert engine.search(video, "ffa", k=1).query["modality"] == "ffa"
    with pytest.raises(TypeError, match="a query is"):
        engine.search(3.14)


def test_target_both_merges_by_score(engine):
    case = engine.cases(0, 1)[1][0]
    result = engine.search(case.case_id, "both", k=6)
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True) and len(result.hits) == 6
    assert {h.modality for h in result.hits} <= {"cf", "ffa"}
    assert result.candidates == 2 * engine.case_count


def test_filters_apply_inside_the_search(engine):
    case = engine.cases(0, 1)[1][0]
    for filters in ({"split": "train"}, {"eye": ["OS"]}, {"lesion": ["leakage", "drusen"]}):
        result = engine.search(case.case_id, "ffa", k=50, filters=filters)
        total, allowed = engine.cases(0, 100, filters)
        allowed_ids = {c.case_id for c in allowed} - {case.case_id}
        assert set(ranked(result)) == allowed_ids and result.candidates == total
    none = engine.search(case.case_id, "cf", k=5, filters={"diagnosis": "no-such-diagnosis"})
    assert none.hits == [] and none.candidates == 0


def test_synthesis_and_fusion(engine):
    case = engine.cases(0, 1)[1][0]
    image = read_cf(case.cf_path)
    frames, times = engine.encoder.synthesize_unmarked(image)
    truth = brute_force(engine, engine.encoder.embed_ffa([frames], [times]), "ffa")
    synth = engine.search(CFQuery(image), "ffa", k=4, via="synthesis")
    assert ranked(synth) == [c for c, _ in truth[:4]]
    assert synth.synthetic is not None and synth.synthetic.synthetic
    marked = synth.synthetic.frames
    assert marked.shape == frames.shape and not np.array_equal(marked, frames)
    changed = np.any(marked != frames, axis=0)  # (H, W): only the label band at the top
    assert changed[: frames.shape[1] // 2].sum() == changed.sum() > 0
    direct = engine.search(CFQuery(image), "ffa", k=50, via="direct")
    deep = engine.search(CFQuery(image), "ffa", k=50, via="synthesis")
    expected = reciprocal_rank_fusion([ranked(direct), ranked(deep)])[:5]
    fused = engine.search(CFQuery(image), "ffa", k=5, via="fused")
    assert [(h.case.case_id, h.score) for h in fused.hits] == [
        (c, pytest.approx(s)) for c, s in expected
    ]
    assert fused.score_kind == "rrf" and fused.synthetic is not None
    by_case = engine.search(case.case_id, "ffa", k=4, via="synthesis", exclude_self=False)
    assert ranked(by_case) == ranked(synth)


@pytest.mark.parametrize(
    "query,target,via,k,message",
    [
        ("ffa-video", "ffa", "synthesis", 5, "via=synthesis synthesizes an FFA video"),
        ("photo", "cf", "fused", 5, "use target=ffa"),
        ("photo", "cf", "sideways", 5, "via must be one of"),
        ("photo", "iris", "direct", 5, "target must be one of"),
        ("photo", "cf", "direct", 0, "k must be an integer"),
        ("photo", "cf", "direct", True, "k must be an integer"),
    ],
)
def test_bad_searches_name_the_parameter(engine, query, target, via, k, message):
    case = engine.cases(0, 1)[1][0]
    q = CFQuery(read_cf(case.cf_path)) if query == "photo" else FFAQuery(read_ffa(case.ffa_path))
    with pytest.raises(QueryError, match=message):
        engine.search(q, target, k, via)


def test_unknown_case(engine):
    with pytest.raises(UnknownCase, match="unknown case_id 'nope'"):
        engine.search("nope")
    with pytest.raises(UnknownCase):
        engine.remove_case("nope")
    with pytest.raises(QueryError, match="modality is cf or ffa"):
        engine.search(CaseQuery(engine.cases(0, 1)[1][0].case_id, "oct"))


def test_paging_in_catalog_order(engine):
    total, first = engine.cases(0, 10)
    _, second = engine.cases(10, 10)
    _, everything = engine.cases(0, 1000)
    assert total == engine.case_count == len(everything)
    assert [c.case_id for c in first + second] == [c.case_id for c in everything[:20]]
    assert engine.cases(total, 5) == (total, [])


# --------------------------------------------------------------------------- updates


def a_new_case(engine: Engine, case_id: str = "added-1", **meta):
    source = engine.cases(0, 1)[1][0]
    image = np.ascontiguousarray(read_cf(source.cf_path)[::-1])  # upside down: a new photo
    video = np.ascontiguousarray(read_ffa(source.ffa_path)[:, ::-1])
    return NewCase(case_id, eye="OS", diagnosis="CSC", lesions=("leakage",), **meta), image, video


def test_added_case_is_searchable_persisted_and_survives_restart(engine):
    new, image, video = a_new_case(engine, split="val")
    info = engine.add_case(new, image, video)
    assert info.added and info.cf_path == engine.path / MEDIA_DIR / str(info.row_id) / "cf.png"
    assert np.array_equal(read_cf(info.cf_path), image)
    assert read_ffa(info.ffa_path).shape == video.shape
    assert ranked(engine.search(CFQuery(image), "cf", k=1)) == ["added-1"]
    assert read_manifest(engine.path)["catalog_rows"] == engine.case_count == 25
    again = Engine.open(engine.path, encoder=PixelEncoder())  # a restart
    case = again.case("added-1")
    assert (case.patient_id, case.eye, case.split, case.lesions) == (
        "added-1",
        "OS",
        "val",
        ("leakage",),
    )
    assert ranked(again.search(CFQuery(image), "cf", k=1)) == ["added-1"]
    assert case.cf_path.is_file() and case.ffa_path.is_file()
    again.remove_case("added-1")
    assert not (again.path / MEDIA_DIR / str(case.row_id)).exists()
    third = Engine.open(engine.path, encoder=PixelEncoder())
    assert "added-1" not in {c.case_id for c in third.cases(0, 100)[1]}
    assert third.case_count == 24


def test_row_ids_are_never_reused(engine):
    new, image, video = a_new_case(engine)
    first = engine.add_case(new, image, video).row_id
    engine.remove_case("added-1")
    second = engine.add_case(new, image, video).row_id
    assert second == first + 1
    reopened = Engine.open(engine.path, encoder=PixelEncoder())
    assert reopened._next_row_id == second + 1


def test_media_of_added_cases_are_carried_by_hard_links(engine):
    info = engine.add_case(*a_new_case(engine))
    inode = info.cf_path.stat().st_ino
    engine.remove_case(engine.cases(0, 1)[1][0].case_id)  # another rewrite of the folder
    assert info.cf_path.stat().st_ino == inode and info.cf_path.stat().st_nlink == 1


def test_bad_new_cases_are_refused_before_anything_changes(engine):
    before = read_manifest(engine.path)
    new, image, video = a_new_case(engine)
    existing = engine.cases(0, 1)[1][0].case_id
    with pytest.raises(DuplicateCase, match=existing):
        engine.add_case(NewCase(existing), image, video)
    for bad, message in [
        (NewCase("a/b"), "case_id must be"),
        (NewCase(""), "case_id must be"),
        (NewCase("x", eye="left"), "eye must be"),
        (NewCase("x", split="holdout"), "split must be"),
        (NewCase("x", age=200), "age must be"),
        (NewCase("x", ffa_times_s=(0.0, 1.0)), "ffa_times_s has 2 values"),
        (NewCase("x", ffa_times_s=(5.0,) * 5 + (1.0,)), "increasing"),
    ]:
        with pytest.raises(QueryError, match=message):
            engine.add_case(bad, image, video)
    with pytest.raises(QueryError, match="at least 2 frames"):
        engine.add_case(NewCase("x"), image, video[:1])
    assert read_manifest(engine.path) == before and engine.case_count == 24


def test_a_failed_save_changes_nothing(engine, monkeypatch):
    new, image, video = a_new_case(engine)
    before = read_manifest(engine.path)

    def disk_full(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(folder_mod, "_write_manifest", disk_full)
    with pytest.raises(PersistError, match="disk full"):
        engine.add_case(new, image, video)
    with pytest.raises(PersistError):
        engine.remove_case(engine.cases(0, 1)[1][0].case_id)
    monkeypatch.undo()
    assert engine.case_count == 24 and "added-1" not in engine._by_case
    assert read_manifest(engine.path) == before
    assert engine.search(CFQuery(image), "cf", k=30).hits[-1].case.case_id != "added-1"
    engine.add_case(new, image, video)  # works again afterwards
    assert engine.case_count == 25


def test_updates_refused_when_another_process_rewrote_the_folder(engine):
    other = Engine.open(engine.path, encoder=PixelEncoder())
    other.add_case(*a_new_case(other, "from-elsewhere"))
    with pytest.raises(IndexChanged, match="another process"):
        engine.add_case(*a_new_case(engine))
    assert engine.search(engine.cases(0, 1)[1][0].case_id).hits  # searching still works


def test_concurrent_searches_during_updates_match_serial_runs(engine):
    cases = [c.case_id for c in engine.cases(0, 24)[1]]
    queries = [(cid, target) for cid in cases for target in ("cf", "ffa")]
    serial = {
        q: [(h.case.case_id, h.score) for h in engine.search(q[0], q[1], k=5).hits] for q in queries
    }
    new, image, video = a_new_case(engine, "churn")
    stop = threading.Event()
    errors: list[BaseException] = []

    cycles = []

    def churn():
        try:
            while not stop.is_set():
                engine.add_case(new, image, video)
                engine.remove_case("churn")
                cycles.append(1)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def search(i: int):
        q = queries[i % len(queries)]
        got = [(h.case.case_id, h.score) for h in engine.search(q[0], q[1], k=5).hits]
        others = [g for g in got if g[0] != "churn"]
        assert others == serial[q][: len(others)] and len(others) >= 4
        return len(others) < len(got)

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(search, range(400)))
    finally:
        stop.set()
        writer.join()
    assert not errors and cycles


# --------------------------------------------------------------------------- persistence helpers


def test_folder_never_missing_while_replaced(tmp_path):
    final = tmp_path / "INDEX"
    final.mkdir()
    (final / "v").write_text("0")
    missing = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not (final / "v").exists():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for i in range(1, 60):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "v").write_text(str(i))
    stop.set()
    watcher.join()
    assert (final / "v").read_text() == "59" and not missing
    assert [p.name for p in tmp_path.iterdir()] == ["INDEX"]


def test_interrupted_swap_is_recovered_on_load(pixel_index, tmp_path):
    final = tmp_path / "index"
    shutil.copytree(pixel_index, tmp_path / ".index.old-12345")  # crash: only the backup left
    assert recover_dir(final) and final.is_dir()
    assert load_index_folder(final).catalog.height == 24
    assert not recover_dir(final)


def test_mp4_bytes_in_memory_equal_the_file_writer(tmp_path):
    frames = (np.random.default_rng(0).random((5, 33, 47)) * 255).astype(np.uint8)
    write_mp4(tmp_path / "v.mp4", frames)
    data = mp4_bytes(frames)
    assert data == (tmp_path / "v.mp4").read_bytes()
    assert data[4:8] == b"ftyp" and data.index(b"moov") < data.index(b"mdat")  # faststart
    assert read_ffa(data).shape == (5, 34, 48)


# --------------------------------------------------------------------------- the real model


def test_real_model_engine_end_to_end(tiny_index, tmp_path):
    """`tiny_index`: a trained micro generator + embedder and the index they built."""
    path = tmp_path / "index"
    shutil.copytree(tiny_index.index, path)
    engine = Engine.open(path)  # the encoder comes from the manifest (run, embedder)
    assert engine.encoder_id == read_manifest(path)["encoder_id"]
    case = engine.cases(0, 1, {"split": "test"})[1][0]
    photo, video = read_cf(case.cf_path), read_ffa(case.ffa_path)
    by_photo = engine.search(CFQuery(photo), "cf", k=1)
    assert ranked(by_photo) == [case.case_id]  # its own photo is its nearest neighbour
    assert engine.search(FFAQuery(video, case.ffa_times_s), "ffa", k=1).hits
    fused = engine.search(CFQuery(photo), "ffa", k=5, via="fused")
    assert len(fused.hits) == 5 and fused.synthetic.frames.ndim == 3
    frames, times = engine.generate(photo)
    assert len(frames) == len(times) == len(engine.default_times())
    plain, _ = engine.encoder.synthesize_unmarked(photo)
    assert not np.array_equal(frames, plain)  # the SYNTHETIC label is burned in
    info = engine.add_case(NewCase("real-added"), photo[::-1].copy(), video[:, ::-1].copy())
    again = Engine.open(path)
    assert again.case("real-added") == info
    assert ranked(again.search(CFQuery(photo[::-1].copy()), "cf", k=1)) == ["real-added"]
