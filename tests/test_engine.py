"""The search engine over a phantom index embedded by `PixelEncoder` (`pixel_index`: no model).

Search by case, photo and video against brute force; synthesis and fusion; filters;
similarities (default per query type, reweighted queries); the diagnosis suggestion
against a brute-force vote; updates that are visible at once, persisted atomically,
and survive a restart; a failed save that leaves nothing changed; concurrent searches
during updates.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import index.folder as folder_mod
from index import load_index_folder, read_manifest
from index.atomic import atomic_dir, recover_dir
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mp4_bytes, write_mp4
from retrieval.errors import (
    DuplicateCase,
    IndexChanged,
    PersistError,
    QueryError,
    UnknownCase,
)
from retrieval.models.suggestion import suggest
from retrieval.search.engine import (
    MEDIA_DIR,
    CaseQuery,
    CFQuery,
    Engine,
    FFAQuery,
    NewCase,
    default_similarity,
    normalize_filters,
    reciprocal_rank_fusion,
)
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
    result = engine.search(CaseQuery(case.case_id, modality), target, k=5, vessel_check=False)
    assert ranked(result) == [c for c, _ in truth[:5]]
    assert [h.score for h in result.hits] == pytest.approx([s for _, s in truth[:5]], abs=1e-5)
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
    assert result.score_kind == "cosine" and result.candidates == engine.case_count
    kept = engine.search(
        CaseQuery(case.case_id, modality), target, k=3, exclude_self=False, vessel_check=False
    )
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
    result = engine.search(case.case_id, "both", k=6, vessel_check=False)
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
    direct = engine.search(CFQuery(image), "ffa", k=50, via="direct", vessel_check=False)
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


# --------------------------------------------------------------------------- similarity


class SplitPixelEncoder(PixelEncoder):
    """PixelEncoder whose vectors pretend to be [pair half, clinical half] (w = 0.5), so
    every similarity is served: pair and clinical weights keep one half, scaled by sqrt 2."""

    similarities = ("combined", "pair", "clinical")

    def similarity_weights(self, similarity: str) -> np.ndarray:
        half = self.dim // 2
        out = np.ones(self.dim, np.float32)
        if similarity == "pair":
            out[:half], out[half:] = np.sqrt(2), 0
        elif similarity == "clinical":
            out[:half], out[half:] = 0, np.sqrt(2)
        return out


@pytest.fixture
def split_engine(pixel_index, tmp_path) -> Engine:
    path = tmp_path / "split-index"
    shutil.copytree(pixel_index, path)
    return Engine.open(path, encoder=SplitPixelEncoder())


def test_default_similarity():
    assert default_similarity(("combined", "pair", "clinical")) == "clinical"
    assert default_similarity(("pair",)) == "pair"  # an encoder without a clinical part


@pytest.mark.parametrize(
    "modality,target,similarity,expected",
    [
        ("cf", "cf", None, "clinical"),
        ("ffa", "ffa", None, "clinical"),
        ("cf", "ffa", None, "clinical"),
        ("ffa", "cf", None, "clinical"),
        ("cf", "ffa", "combined", "combined"),
        ("cf", "cf", "pair", "pair"),
        ("cf", "ffa", "clinical", "clinical"),
    ],
)
def test_similarity_reweights_the_query(split_engine, modality, target, similarity, expected):
    engine = split_engine
    case = engine.cases(0, 1)[1][0]
    weights = engine.encoder.similarity_weights(expected)
    query = engine.vectors(modality, [case.row_id]) * weights
    truth = [c for c in brute_force(engine, query, target) if c[0] != case.case_id]
    query = CaseQuery(case.case_id, modality)
    result = engine.search(query, target, k=5, similarity=similarity, vessel_check=False)
    assert result.similarity == result.query["similarity"] == expected
    assert ranked(result) == [c for c, _ in truth[:5]]
    assert [h.score for h in result.hits] == pytest.approx([s for _, s in truth[:5]], abs=1e-5)
    slow = engine.search(
        CaseQuery(case.case_id, modality),
        target,
        k=5,
        similarity=similarity,
        blocking=True,
        filters={"split": ["train", "val", "test"]},
        vessel_check=False,
    )  # the general path, with a filter that allows everything
    assert ranked(slow) == ranked(result)


def test_similarity_of_uploads_and_synthesis(split_engine):
    engine = split_engine
    case = engine.cases(0, 1)[1][0]
    image = read_cf(case.cf_path)
    by_photo = engine.search(CFQuery(image), "cf", k=4)
    truth = brute_force(
        engine,
        engine.encoder.embed_cf([image]) * engine.encoder.similarity_weights("clinical"),
        "cf",
    )
    assert by_photo.similarity == "clinical" and ranked(by_photo) == [c for c, _ in truth[:4]]
    frames, times = engine.encoder.synthesize_unmarked(image)
    synth = engine.encoder.embed_ffa([frames], [times])
    for similarity in ("pair", "clinical", "combined"):
        weighted = synth * engine.encoder.similarity_weights(similarity)
        expected = [c for c, _ in brute_force(engine, weighted, "ffa")[:4]]
        result = engine.search(CFQuery(image), "ffa", k=4, via="synthesis", similarity=similarity)
        assert ranked(result) == expected and result.similarity == similarity
    assert engine.search(CFQuery(image), "ffa", k=4, via="fused").similarity == "clinical"


def test_unsupported_similarity_is_a_query_error(engine):
    case = engine.cases(0, 1)[1][0]
    assert engine.search(case.case_id, "ffa", k=1).similarity == "pair"  # no clinical part
    for similarity in ("clinical", "combined", "colour"):
        with pytest.raises(QueryError, match=r"similarity must be one of pair.*" + similarity):
            engine.search(case.case_id, "cf", k=1, similarity=similarity)
    with pytest.raises(QueryError, match="similarity must be one of"):
        engine.search(CFQuery(read_cf(case.cf_path)), "cf", similarity="clinical")


# --------------------------------------------------------------------------- suggestion


def brute_force_vote(engine: Engine, model, modality: str, query: np.ndarray, exclude=None):
    """The suggestion by hand: the model.k nearest cases with a diagnosis, by inner product."""
    weighted = query * engine.encoder.similarity_weights(model.similarity)
    ranking = [
        (cid, s)
        for cid, s in brute_force(engine, weighted, modality)
        if cid != exclude and engine.case(cid).diagnosis in model.classes
    ][: model.k]
    labels = [engine.case(cid).diagnosis for cid, _ in ranking]
    return suggest(model, np.array([s for _, s in ranking]), labels, [c for c, _ in ranking])


def assert_same_suggestion(got, expected) -> None:
    """The same vote; probabilities to float rounding (FAISS and numpy sum differently)."""
    assert got is not None
    exact = ("diagnosis", "abstained", "supporting_case_ids", "neighbours")
    assert [getattr(got, f) for f in exact] == [getattr(expected, f) for f in exact]
    assert got.probability == pytest.approx(expected.probability, abs=1e-9)
    assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-9)


@pytest.mark.parametrize("modality", ["cf", "ffa"])
def test_suggestion_is_the_vote_of_the_nearest_labelled_cases(engine, modality):
    model = engine.suggestion_model(modality)
    assert model is not None and model.similarity == "pair"  # fitted by build_pixel_index
    case = engine.cases(0, 1)[1][0]
    query = engine.vectors(modality, [case.row_id])
    expected = brute_force_vote(engine, model, modality, query, exclude=case.case_id)
    result = engine.search(CaseQuery(case.case_id, modality), "cf", k=3)
    got = result.suggestion
    assert got is not None and result.suggestion_model == model
    assert got.neighbours == model.k and case.case_id not in got.supporting_case_ids
    assert got.diagnosis == expected.diagnosis
    assert got.supporting_case_ids == expected.supporting_case_ids
    assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-3)  # T ~ 1e-3
    assert sum(got.probabilities.values()) == pytest.approx(1.0)
    assert got.abstained == (got.probability < model.abstain_below)
    # filters, the target and exclude_self change the hits, not the suggestion
    filtered = engine.search(
        CaseQuery(case.case_id, modality),
        "both",
        k=2,
        filters={"split": "test"},
        exclude_self=False,
    )
    assert filtered.suggestion == got
    assert engine.suggest(CaseQuery(case.case_id, modality)) == got


def test_suggestion_for_uploads_and_synthesis(engine):
    case = engine.cases(0, 1)[1][0]
    image = read_cf(case.cf_path)
    model = engine.suggestion_model("cf")
    expected = brute_force_vote(engine, model, "cf", engine.encoder.embed_cf([image]))
    assert case.case_id in expected.supporting_case_ids or expected.diagnosis != case.diagnosis
    for via in ("direct", "synthesis", "fused"):
        result = engine.search(CFQuery(image), "ffa", k=3, via=via)
        assert_same_suggestion(result.suggestion, expected)  # by the photo, in the CF index
    assert_same_suggestion(engine.suggest(CFQuery(image)), expected)
    video = read_ffa(case.ffa_path)
    by_video = engine.search(FFAQuery(video, case.ffa_times_s), "cf", k=1)
    assert by_video.suggestion_model == engine.suggestion_model("ffa")
    assert by_video.suggestion is not None and by_video.suggestion.neighbours == model.k


def test_suggestion_abstains_below_the_threshold_and_can_be_skipped(engine):
    case = engine.cases(0, 1)[1][0]
    model = engine.suggestion_model("cf")
    engine._suggesters["cf"] = dataclasses.replace(model, abstain_below=1.0)
    sure = engine.search(case.case_id, "cf", k=1).suggestion
    assert sure.abstained and sure.probability < 1.0
    engine._suggesters["cf"] = dataclasses.replace(model, abstain_below=0.0)
    assert not engine.search(case.case_id, "cf", k=1).suggestion.abstained
    skipped = engine.search(case.case_id, "cf", k=1, suggestion=False)
    assert skipped.suggestion is None and skipped.suggestion_model is None and skipped.hits


def test_added_cases_vote_and_an_index_without_models_suggests_nothing(engine):
    model = engine.suggestion_model("cf")
    engine._suggesters["cf"] = dataclasses.replace(model, temperature=1e-3, smoothing=0.0)
    new, image, video = a_new_case(engine)  # diagnosis CSC
    engine.add_case(new, image, video)
    found = engine.search(CFQuery(image), "cf", k=1).suggestion
    assert found.diagnosis == "CSC" and found.supporting_case_ids[0] == "added-1"
    assert engine.suggest("added-1").supporting_case_ids[:1] != ("added-1",)  # not itself
    manifest = json.loads((engine.path / "manifest.json").read_text())
    del manifest["extra"]["suggestion"]
    (engine.path / "manifest.json").write_text(json.dumps(manifest))
    bare = Engine.open(engine.path, encoder=PixelEncoder())
    assert bare.search(CFQuery(image), "cf", k=1).suggestion is None
    assert bare.suggest(CFQuery(image)) is None and bare.stats()["suggestion"] == {}


def test_unlabelled_cases_and_unknown_diagnoses_never_vote(engine):
    source = engine.cases(0, 1)[1][0]
    image, video = read_cf(source.cf_path), read_ffa(source.ffa_path)
    for i, diagnosis in enumerate([None, "", "retinoblastoma", None]):
        near = np.clip(image.astype(int) + i + 1, 0, 255).astype(np.uint8)  # ~ the source
        new = NewCase(f"near-{i}", diagnosis=diagnosis)
        engine.add_case(new, near, video, allow_duplicate=True)  # near-copies on purpose
    by_photo = engine.search(CFQuery(image), "cf", k=5)
    assert {h.case.case_id for h in by_photo.hits} & {f"near-{i}" for i in range(4)}
    model = engine.suggestion_model("cf")
    expected = brute_force_vote(engine, model, "cf", engine.encoder.embed_cf([image]))
    got = by_photo.suggestion
    assert got.neighbours == model.k and not any(
        c.startswith("near-") for c in got.supporting_case_ids
    )
    assert got.supporting_case_ids == expected.supporting_case_ids
    assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-3)
    by_case = engine.suggest(source.case_id)
    expected = brute_force_vote(
        engine, model, "cf", engine.vectors("cf", [source.row_id]), exclude=source.case_id
    )
    assert by_case.supporting_case_ids == expected.supporting_case_ids


def test_suggestion_falls_back_to_a_filtered_search(engine, monkeypatch):
    """When the unfiltered search finds too few labelled cases (an approximate index, a
    rare diagnosis), a search filtered to the labelled cases finishes the vote."""
    model = dataclasses.replace(engine.suggestion_model("cf"), classes=("CSC", "PDR"), k=3)
    engine._suggesters["cf"] = model
    index = engine._folder.indexes["cf"]
    real, calls = index.search, []

    def shallow(queries, k, *, allowed=None):  # an unfiltered search that finds 2 rows only
        calls.append(allowed is None)
        D, I = real(queries, k, allowed=allowed)  # noqa: E741
        return (D[:, :2], I[:, :2]) if allowed is None else (D, I)

    monkeypatch.setattr(index, "search", shallow)
    case = engine.cases(0, 1)[1][0]
    got = engine.suggest(case.case_id)
    monkeypatch.undo()
    expected = brute_force_vote(
        engine, model, "cf", engine.vectors("cf", [case.row_id]), exclude=case.case_id
    )
    assert calls == [True, False] and got.neighbours == 3
    assert got.supporting_case_ids == expected.supporting_case_ids
    assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-3)
    assert set(got.probabilities) == {"CSC", "PDR"}


def test_stats_name_similarities_and_suggestion_models(engine, split_engine):
    stats = engine.stats()
    assert stats["similarities"] == ["pair"]
    assert stats["default_similarity"] == {"same_modality": "pair", "cross_modal": "pair"}
    cf = stats["suggestion"]["cf"]
    model = engine.suggestion_model("cf")
    assert set(stats["suggestion"]) == {"cf", "ffa"}
    assert (cf["k"], cf["temperature"], cf["abstain_below"], cf["calibrated"]) == (
        model.k,
        model.temperature,
        model.abstain_below,
        model.calibrated,
    )
    split = split_engine.stats()
    assert split["similarities"] == ["combined", "pair", "clinical"]
    assert split["default_similarity"] == {"same_modality": "clinical", "cross_modal": "clinical"}


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


def test_an_added_case_is_measured_as_ingest_measures_it(engine):
    """Its fields of view always; its registration unless register=False; both kept
    across a restart."""
    new, image, video = a_new_case(engine)
    info = engine.add_case(new, image, video)
    h, w = image.shape[:2]
    assert len(info.cf_fov) == 3 and abs(info.cf_fov[0] - (w - 1) / 2) < 2  # centred circle
    assert len(info.ffa_fov) == 3
    assert info.registration_status in ("ok", "failed")
    assert info.registration_quality is not None
    assert (info.registration is not None) == (info.registration_status == "ok")
    again = Engine.open(engine.path, encoder=PixelEncoder()).case("added-1")
    assert again.cf_fov == info.cf_fov and again.registration_status == info.registration_status
    other, image, video = a_new_case(engine, "added-2")
    plain = engine.add_case(other, image, video, register=False, allow_duplicate=True)
    assert plain.cf_fov == info.cf_fov and plain.registration_status is None
    assert plain.registration is None and plain.registration_quality is None


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
    """Searches from 8 threads while another adds and removes a case: each matches its
    serial run (the added case aside), and at least 50 of them began during an update."""
    cases = [c.case_id for c in engine.cases(0, 24)[1]]
    queries = [(cid, target) for cid in cases for target in ("cf", "ffa")]
    serial = {
        q: [(h.case.case_id, h.score) for h in engine.search(*q, k=5, vessel_check=False).hits]
        for q in queries
    }
    new, image, video = a_new_case(engine, "churn")
    stop, updating = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    cycles: list[int] = []
    began_during_update: list[bool] = []  # one per search

    def update(change, *args):
        updating.set()  # from before the update takes the index until after it let go
        try:
            change(*args)
        finally:
            updating.clear()

    def churn():
        try:
            while not stop.is_set():
                update(engine.add_case, new, image, video)
                update(engine.remove_case, "churn")
                cycles.append(1)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def search(i: int):
        q = queries[i % len(queries)]
        during = updating.is_set()
        got = [(h.case.case_id, h.score) for h in engine.search(*q, k=5, vessel_check=False).hits]
        others = [g for g in got if g[0] != "churn"]
        assert others == serial[q][: len(others)] and len(others) >= 4
        began_during_update.append(during)

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            i = 0
            done = began_during_update
            while (len(done) < 400 or sum(done) < 50) and i < 20_000:
                list(pool.map(search, range(i, i + 100)))
                i += 100
    finally:
        stop.set()
        writer.join()
    assert not errors and cycles
    overlapped = sum(began_during_update)
    assert overlapped >= 50, f"{overlapped} of {i} searches began during an update"


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
    assert engine.similarities == ("combined", "pair", "clinical")  # trained with labels
    assert by_photo.similarity == "clinical"
    assert engine.search(CFQuery(photo), "ffa", k=1).similarity == "clinical"
    for similarity in engine.similarities:  # its own photo again, whatever the similarity
        found = engine.search(CFQuery(photo), "cf", k=1, similarity=similarity)
        assert ranked(found) == [case.case_id] and found.hits[0].score > 0.99
    suggestion = by_photo.suggestion  # the manifest's model (fitted by build_index)
    assert suggestion is not None and by_photo.suggestion_model.similarity == "clinical"
    assert sum(suggestion.probabilities.values()) == pytest.approx(1.0)
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
