"""The vector-store backends side by side: FAISS (`VectorIndex`) and Milvus (`MilvusIndex`
on a Milvus Lite file) over the same vectors and catalog: the same top-10 lists
(filtered and not), add / remove / reload alike, another encoder refused; and the engine
over a Milvus-backed index folder. Skips the Milvus half without pymilvus."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import polars as pl
import pytest

from index import (
    BackendError,
    EncoderMismatch,
    IndexFormatError,
    MilvusTarget,
    VectorIndex,
    build_store,
    load_index_folder,
    read_manifest,
    save_index_folder,
)
from index.backend import FilteredIds, filtered_ids

N, DIM, K = 600, 32, 10
ENCODER = "test-encoder"
DIAGNOSES = ("normal", "NPDR", "PDR", "CSC", None)
LESIONS = (["leakage"], [], None, ["haemorrhage", "leakage"], ["drusen"])
FILTERS = (
    {"diagnosis": "PDR"},
    {"lesions": ["leakage"]},
    {"eye": "OD", "split": ["val", "test"]},
    {"diagnosis": ["NPDR", "CSC"], "lesions": ["drusen", "haemorrhage"]},
)


def vectors(n: int, seed: int = 0) -> np.ndarray:
    """Clustered, L2-normalised vectors (neighbours are not trivially the nearest centre)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, DIM))
    x = centres[rng.integers(0, 12, n)] + 0.8 * rng.standard_normal((n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def catalog(ids: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "row_id": ids,
            "case_id": [f"case-{i}" for i in ids],
            "eye": [("OD", "OS")[i % 2] for i in ids],
            "diagnosis": [DIAGNOSES[i % 5] for i in ids],
            "split": [("train", "val", "test")[i % 3] for i in ids],
            "lesions": [LESIONS[(i // 2) % 5] for i in ids],
            "age": [int(i % 90) for i in ids],
        },
        schema_overrides={"row_id": pl.Int64, "lesions": pl.List(pl.String)},
    )


def _has_pymilvus() -> bool:
    try:
        return importlib.util.find_spec("pymilvus") is not None
    except ValueError:  # imported as None (hidden)
        return False


# checked before any fixture is set up (the model fixture takes seconds)
needs_milvus = pytest.mark.skipif(not _has_pymilvus(), reason="pymilvus is not installed")

X, QUERIES = np.split(vectors(N + 40), [N])  # queries: fresh draws, not indexed
IDS = np.arange(N, dtype=np.int64) * 3 + 7  # stable ids that are not positions
CATALOG = catalog(IDS)


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    pytest.importorskip("pymilvus")
    from index.milvus import close_clients

    yield str(tmp_path_factory.mktemp("milvus") / "lite.db")
    close_clients()


def build(backend: str, uri: str | None, key: str | None = None, **options):
    """Both modalities' stores over X (the same vectors, so each test may use either)."""
    target = MilvusTarget(uri, prefix="t") if backend == "milvus" else None
    return {
        m: build_store(
            X,
            IDS,
            modality=m,
            backend=backend,
            milvus=target,
            encoder_id=ENCODER,
            catalog=CATALOG,
            key=key,
            **options,
        )
        for m in ("cf", "ffa")
    }


@pytest.fixture(params=["faiss", "milvus"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def folder(backend, request, tmp_path):
    """An index folder of the backend over X (written, then opened again)."""
    uri = request.getfixturevalue("milvus_uri") if backend == "milvus" else None
    save_index_folder(tmp_path / "index", build(backend, uri), CATALOG, ENCODER, {"a": 1})
    return load_index_folder(tmp_path / "index", ENCODER)


def top(store, queries, allowed=None) -> np.ndarray:
    return store.search(queries, K, allowed=allowed)[1]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The share of `b`'s results (padding left out) that `a` holds in the same row."""
    pairs = zip(a.tolist(), b.tolist(), strict=True)
    hits = sum(len((set(r) & set(s)) - {-1}) for r, s in pairs)
    return hits / max(sum(len(set(r) - {-1}) for r in b.tolist()), 1)


def exact(allowed: np.ndarray | None = None) -> np.ndarray:
    keep = np.ones(N, bool) if allowed is None else np.isin(IDS, allowed)
    scores = QUERIES @ X[keep].T
    return IDS[keep][np.argsort(-scores, axis=1, kind="stable")[:, :K]]


# --------------------------------------------------------------------------- both backends


def test_search_matches_exact_search_filtered_and_not(folder):
    store = folder.indexes["cf"]
    assert agreement(top(store, QUERIES), exact()) >= 0.95
    for flt in FILTERS:
        allowed = folder.allowed_ids(flt)
        found = top(store, QUERIES, allowed)
        assert np.isin(found[found >= 0], allowed).all(), flt
        assert agreement(found, exact(allowed)) >= 0.95, flt
        assert (found >= 0).sum(1).min() == min(K, allowed.size)


def test_allowed_ids_carry_the_filter_only_for_a_store_that_filters_itself(folder, backend):
    allowed = folder.allowed_ids({"diagnosis": "PDR"})
    assert isinstance(allowed, FilteredIds) == (backend == "milvus")
    assert np.array_equal(np.asarray(allowed), allowed.view(np.ndarray))
    assert folder.backend == backend and read_manifest(folder.path)["backend"] == backend


def test_add_remove_reload_behave_the_same(folder):
    new_ids = np.asarray([5000, 5001], np.int64)
    new_x = vectors(2, seed=9)
    rows = catalog(new_ids).with_columns(pl.lit("PDR").alias("diagnosis"))
    folder.add_rows({"cf": new_x, "ffa": new_x}, rows)
    cf = folder.indexes["cf"]
    assert cf.ntotal == N + 2 and top(cf, new_x[:1])[0, 0] == 5000
    pdr = folder.allowed_ids({"diagnosis": "PDR"})
    assert 5001 in top(cf, new_x[1:], pdr)[0]
    with pytest.raises(ValueError, match="already present"):
        cf.add(new_x[:1], [5000])
    assert cf.remove([5000, IDS[0], 999_999]) == 2
    assert cf.remove([5000]) == 0
    assert 5000 not in top(cf, new_x[:1]) and IDS[0] not in cf.ids()
    assert np.allclose(cf.vector(5001), new_x[1:], atol=1e-6)
    assert np.allclose(cf.reconstruct(IDS[[3, 1]]), X[[3, 1]], atol=1e-6)
    with pytest.raises(KeyError):
        cf.vector(5000)
    folder.save()
    again = load_index_folder(folder.path, ENCODER)
    assert again.indexes["cf"].ntotal == N and again.indexes["ffa"].ntotal == N + 2
    assert np.array_equal(top(again.indexes["cf"], QUERIES), top(cf, QUERIES))
    assert again.catalog.height == N + 2 and again.extra == {"a": 1}


def test_another_encoder_is_refused(folder):
    with pytest.raises(EncoderMismatch, match="other-encoder"):
        load_index_folder(folder.path, "other-encoder")


# --------------------------------------------------------------------------- FAISS vs Milvus


@pytest.mark.parametrize("key", [None, "HNSW16"])  # None: the rules' choice (Flat here)
def test_faiss_and_milvus_top10_agree(milvus_uri, key):
    """Two approximate indexes at recall r agree on about r² of their lists: HNSW is tuned
    to 0.99 here, so that each being right 97.5 % of the time makes them agree 95 %."""
    faiss_cf = build("faiss", None, key, target_recall=0.99)["cf"]
    milvus_cf = build("milvus", milvus_uri, key, target_recall=0.99)["cf"]
    assert milvus_cf.key == faiss_cf.key == (key or "Flat")
    assert agreement(top(milvus_cf, QUERIES), exact()) >= 0.95
    assert agreement(top(milvus_cf, QUERIES), top(faiss_cf, QUERIES)) >= 0.95
    for flt in FILTERS:
        ids = CATALOG.filter(
            pl.all_horizontal(
                pl.col(c).list.eval(pl.element().is_in(v)).list.any()
                if c == "lesions"
                else pl.col(c).is_in(v if isinstance(v, list) else [v])
                for c, v in flt.items()
            ).fill_null(False)
        )["row_id"].to_numpy()
        found = top(milvus_cf, QUERIES, filtered_ids(ids, flt))
        assert agreement(found, top(faiss_cf, QUERIES, ids)) >= 0.95, flt


def test_milvus_manifest_names_uri_and_collections_never_the_token(milvus_uri, tmp_path):
    stores = build("milvus", milvus_uri)
    target = MilvusTarget(milvus_uri, token="root:secret-token")
    assert "secret" not in repr(target)
    manifest = save_index_folder(tmp_path / "index", stores, CATALOG, ENCODER)
    text = (tmp_path / "index" / "manifest.json").read_text()
    assert "secret" not in text and not list((tmp_path / "index").glob("*.faiss"))
    cf = manifest["modalities"]["cf"]
    assert manifest["backend"] == "milvus" and cf["uri"] == milvus_uri
    assert cf["collection"].startswith("t_cf_") and cf["index_type"] == "FLAT"
    assert cf["fields"] == {
        "case_id": "string",
        "eye": "string",
        "diagnosis": "string",
        "split": "string",
        "lesions": "array",
    }


def test_milvus_filter_on_a_column_it_does_not_store_uses_the_ids(milvus_uri, tmp_path):
    save_index_folder(tmp_path / "index", build("milvus", milvus_uri), CATALOG, ENCODER)
    folder = load_index_folder(tmp_path / "index", ENCODER)
    cf = folder.indexes["cf"]
    allowed = folder.allowed_ids({"age": [3, 4]})
    assert cf._expression(allowed).startswith("row_id in [")
    assert cf._expression(folder.allowed_ids({"eye": "OD"})) == 'eye in ["OD"]'
    assert agreement(top(cf, QUERIES, allowed), exact(allowed)) >= 0.95


def test_milvus_filter_values_are_quoted(milvus_uri):
    from index.milvus import MilvusIndex

    odd = ['say "hi"', "back\\slash", "it's", "drüsen"]
    rows = pl.DataFrame(
        {"row_id": np.arange(8), "diagnosis": odd * 2, "lesions": [[o] for o in odd] * 2}
    )
    store = MilvusIndex.build(
        X[:8],
        np.arange(8),
        target=MilvusTarget(milvus_uri, prefix="q"),
        modality="cf",
        encoder_id=ENCODER,
        catalog=rows,
    )
    for n, value in enumerate(odd):
        for column in ("diagnosis", "lesions"):
            allowed = filtered_ids(np.asarray([n, n + 4]), {column: value})
            assert sorted(top(store, X[:1], allowed)[0, :2]) == [n, n + 4], (column, value)


def test_milvus_collection_of_another_encoder_or_missing_is_refused(milvus_uri, tmp_path):
    from index.milvus import MilvusIndex

    path = tmp_path / "index"
    save_index_folder(path, build("milvus", milvus_uri), CATALOG, ENCODER)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["encoder_id"] = "forged"  # the folder says forged, the collection says ENCODER
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EncoderMismatch, match="forged"):
        load_index_folder(path)
    meta = {**manifest["modalities"]["cf"], "collection": "t_cf_gone"}
    with pytest.raises(IndexFormatError, match="t_cf_gone"):
        MilvusIndex.open(meta, encoder_id=ENCODER, row_ids=IDS, path=path)


def test_milvus_add_that_was_never_saved_is_ignored_then_replaced(milvus_uri, tmp_path):
    path = tmp_path / "index"
    save_index_folder(path, build("milvus", milvus_uri), CATALOG, ENCODER)
    live = load_index_folder(path, ENCODER)
    lost = vectors(1, seed=3)
    live.indexes["cf"].add(lost, [9999])  # in Milvus, but no save follows
    again = load_index_folder(path, ENCODER).indexes["cf"]
    assert again.ntotal == N and 9999 not in again.ids()
    assert 9999 not in top(again, lost) and (top(again, lost) >= 0).all()
    again.add(X[:1], [9999])  # the id's next add replaces the leftover
    assert again.ntotal == N + 1 and np.allclose(again.vector(9999), X[:1], atol=1e-6)
    assert 9999 in top(again, X[:1])[0, :2] and 9999 not in top(again, lost)[0, :1]


def test_milvus_index_types_follow_the_faiss_rules():
    from index import parse_index_key
    from index.milvus import milvus_index

    def mapped(key: str, lite: bool = True):
        return milvus_index(parse_index_key(key), lite=lite)

    assert mapped("Flat") == ("FLAT", {}, None)
    assert mapped("HNSW32") == ("HNSW", {"M": 32, "efConstruction": 80}, None)
    assert mapped("IVF1024,Flat") == ("IVF_FLAT", {"nlist": 1024}, None)
    assert mapped("IVF1024,SQ8") == ("IVF_SQ8", {"nlist": 1024}, None)
    index_type, params, note = mapped("IVF1024,PQ32x8")
    assert (index_type, params) == ("IVF_SQ8", {"nlist": 1024}) and "no IVF_PQ" in note
    assert mapped("IVF1024,PQ32x8", lite=False) == (
        "IVF_PQ",
        {"nlist": 1024, "m": 32, "nbits": 8},
        None,
    )


def test_milvus_filtered_hnsw_search_widens_ef_by_the_filter_share():
    from index.milvus import MilvusIndex

    meta = {"uri": "x.db", "dim": 4, "key": "HNSW32", "index_type": "HNSW"}
    store = MilvusIndex(None, "c", {**meta, "search_params": {"ef": 32}}, np.arange(1000))
    assert store._params(10, None) == {"ef": 32}
    assert store._params(10, np.arange(100)) == {"ef": 320}  # a tenth of the ids
    assert store._params(10, np.arange(1)) == {"ef": 1024}  # capped
    assert store._params(2000, None) == {"ef": 2000}  # never below k


def test_without_pymilvus_the_milvus_backend_says_what_to_install(monkeypatch, tmp_path):
    from index import milvus

    monkeypatch.setitem(sys.modules, "pymilvus", None)
    monkeypatch.setattr(milvus, "_clients", {})
    with pytest.raises(BackendError, match=r"pip install 'fundus2video\[scale\]'"):
        milvus.client_for(str(tmp_path / "x.db"))
    with pytest.raises(BackendError, match="backend must be one of faiss, milvus"):
        build_store(X, IDS, modality="cf", backend="qdrant")
    with pytest.raises(BackendError, match="ending in .db"):
        MilvusTarget(str(tmp_path / "lite"))
    assert isinstance(build_store(X[:20], IDS[:20], modality="cf"), VectorIndex)


# --------------------------------------------------------------------------- the engine


@pytest.fixture
def milvus_engine(pixel_index, milvus_uri, tmp_path):
    from index.milvus import copy_to_milvus
    from retrieval.search.engine import Engine
    from retrieval.testing import PixelEncoder

    faiss_copy = tmp_path / "faiss"
    shutil.copytree(pixel_index, faiss_copy)
    copy_to_milvus(faiss_copy, tmp_path / "index", MilvusTarget(milvus_uri, prefix="engine"))
    return Engine.open(tmp_path / "index", encoder=PixelEncoder()), Engine.open(
        faiss_copy, encoder=PixelEncoder()
    )


@needs_milvus
def test_engine_over_milvus_searches_adds_and_deletes(milvus_engine):
    from retrieval.data.media import read_cf, read_ffa
    from retrieval.search.engine import CFQuery, Engine, NewCase
    from retrieval.testing import PixelEncoder

    engine, reference = milvus_engine
    case = engine.cases(0, 1)[1][0].case_id
    for flt in (None, {"diagnosis": "normal"}, {"eye": "OD", "split": "train"}):
        for target in ("cf", "ffa", "both"):
            got = engine.search(case, target, k=5, filters=flt)
            want = reference.search(case, target, k=5, filters=flt)
            assert [h.case.case_id for h in got.hits] == [h.case.case_id for h in want.hits]
    source = engine.cases(0, 1)[1][0]
    image = np.ascontiguousarray(read_cf(source.cf_path)[::-1])
    video = np.ascontiguousarray(read_ffa(source.ffa_path)[:, ::-1])
    engine.add_case(
        NewCase("added-1", eye="OS", diagnosis="CSC", lesions=("leakage",)), image, video
    )
    hits = engine.search(CFQuery(image), "cf", k=1, filters={"lesion": "leakage"}).hits
    assert [h.case.case_id for h in hits] == ["added-1"]
    again = Engine.open(engine.path, encoder=PixelEncoder())
    assert again.case_count == 25 and again.stats()["modalities"]["cf"]["device"] == "milvus"
    again.remove_case("added-1")
    assert "added-1" not in [h.case.case_id for h in again.search(CFQuery(image), "cf", k=3).hits]
    assert Engine.open(engine.path, encoder=PixelEncoder()).case_count == 24


# --------------------------------------------------------------------------- the CLI


@needs_milvus
def test_cli_index_with_milvus_backend_is_served_from_the_manifest(
    tiny_index, milvus_uri, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from retrieval.apps.cli import app
    from retrieval.search.engine import Engine

    out = tmp_path / "index"
    monkeypatch.setenv("FUNDUS2VIDEO_MILVUS_TOKEN", "never-written")
    args = ["index", str(tiny_index.run), str(tiny_index.cohort), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--backend", "milvus", "--uri", milvus_uri])
    assert result.exit_code == 0, result.output
    assert "milvus" in result.output
    manifest = read_manifest(out)
    assert manifest["backend"] == "milvus" and "never-written" not in json.dumps(manifest)
    assert {m["uri"] for m in manifest["modalities"].values()} == {milvus_uri}
    engine = Engine.open(out)  # the run's encoder, the backend from the manifest
    case = engine.cases(0, 1)[1][0].case_id
    reference = Engine.open(tiny_index.index)
    got = [h.case.case_id for h in engine.search(case, "ffa", k=5).hits]
    assert got == [h.case.case_id for h in reference.search(case, "ffa", k=5).hits]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--uri", "x.db"], "--uri is for --backend milvus"),
        (["--backend", "milvus"], "a Milvus URI is needed"),
        (["--backend", "milvus", "--uri", "folder"], "ending in .db"),
        (["--backend", "chroma"], "backend must be one of faiss, milvus"),
    ],
)
def test_cli_index_refuses_bad_backend_options(tmp_path, extra, message):
    from typer.testing import CliRunner

    from retrieval.apps.cli import app

    args = ["index", str(tmp_path / "run"), str(tmp_path / "cohort"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()
