"""The vector store: key choice, exactness, recall, filters, mutation, folders, GPU."""

# ruff: noqa: E741  (D, I are FAISS's names for scores and ids)
from __future__ import annotations

import json
import threading

import faiss
import numpy as np
import polars as pl
import pytest

import index.folder as folder_mod
from index import (
    FORMAT_VERSION,
    DimensionMismatch,
    DuplicateIds,
    EncoderMismatch,
    FilterError,
    IndexFormatError,
    MemoryBudgetError,
    UnsupportedIndexKey,
    VectorIndex,
    catalog_allowed_ids,
    choose_index_key,
    choose_nlist,
    estimate_index_bytes,
    gpu_count,
    load_index_folder,
    parse_index_key,
    save_index_folder,
)
from index.keys import FLAT_MAX, HNSW_MAX

D_SMALL = 32
N_ANN = 20_000
ANN_KEYS = ["HNSW32", "IVF256,Flat", "IVF256,SQ8", "IVF256,PQ8x8"]
RECALL_KEYS = ANN_KEYS[:3]  # PQ's recall is capped by its codes (see index/keys.py)
ALL_KEYS = ["Flat", *ANN_KEYS]
GiB = 2**30


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """One OpenMP thread: FAISS's spinning threads crawl on a shared, busy CI machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int = D_SMALL, *, seed: int = 0, rank: int = 8, clusters: int = 50):
    """Embedding-like vectors: a Gaussian mixture on a low-rank subspace, plus noise."""
    basis = np.random.default_rng(1234)  # the same mixture for every call
    centers = basis.standard_normal((clusters, rank)).astype(np.float32)
    proj = basis.standard_normal((rank, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    z = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, rank))
    x = (z @ proj + 0.05 * rng.standard_normal((n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at(I: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(I, truth, strict=True)]))


def exact(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int):
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    D, I = flat.search(q, k)
    return D, ids[I]


@pytest.fixture(scope="module")
def data():
    x = clustered(N_ANN, seed=0)
    ids = np.arange(N_ANN, dtype=np.int64) * 3 + 7  # ids are not positions
    q = clustered(200, seed=1)
    return x, ids, q


@pytest.fixture(scope="module")
def built(data):
    x, ids, _ = data
    return {key: VectorIndex.build(x, ids, key=key, use_gpu=False) for key in ALL_KEYS}


def fresh(data, key: str, **kw) -> VectorIndex:
    x, ids, _ = data
    return VectorIndex.build(x[:5000], ids[:5000], key=key.replace("256", "64"), **kw)


# ------------------------------------------------------------- choose_index_key
def test_choose_index_key_decisions():
    assert choose_index_key(0, 256, GiB) == "Flat"
    assert choose_index_key(FLAT_MAX - 1, 256, GiB) == "Flat"
    assert choose_index_key(FLAT_MAX, 256, GiB) == "HNSW32"
    assert choose_index_key(100_000, 256, 8 * GiB) == "HNSW32"
    assert choose_index_key(100_000, 256, 8 * GiB, use_gpu=True) == "IVF1024,Flat"
    assert choose_index_key(HNSW_MAX, 256, 8 * GiB) == "IVF4096,Flat"
    # memory short at 1M x 256: raw floats need ~1 GB
    assert choose_index_key(10**6, 256, 400 * 2**20) == "IVF4096,SQ8"
    assert choose_index_key(10**6, 256, 100 * 2**20) == "IVF4096,PQ64x8"
    assert choose_index_key(10**6, 256, 40 * 2**20) == "IVF4096,PQ16x8"
    with pytest.raises(MemoryBudgetError, match="budget"):
        choose_index_key(10**6, 256, 10 * 2**20)
    # HNSW is skipped when its graph does not fit, IVF-Flat taken instead
    n = 200_000
    budget = estimate_index_bytes(f"IVF{choose_nlist(n)},Flat", n, 256)
    assert choose_index_key(n, 256, budget) == f"IVF{choose_nlist(n)},Flat"
    # too few points to train PQ codebooks: SQ8 is the floor
    assert choose_index_key(5000, 256, 2 * 2**20) == "IVF128,SQ8"


def test_choose_index_key_is_pure_and_monotone_in_memory():
    n, d = 500_000, 128
    budgets = [2**b for b in range(22, 34)]
    keys = [choose_index_key(n, d, m) for m in budgets if m >= 16 * 2**20]
    assert keys == [choose_index_key(n, d, m) for m in budgets if m >= 16 * 2**20]
    sizes = [estimate_index_bytes(k, n, d) for k in keys]
    assert sizes == sorted(sizes)  # more memory never picks a more compact index
    for m in budgets[-6:]:
        key = choose_index_key(n, d, m)
        assert estimate_index_bytes(key, n, d) <= m


def test_nlist_and_key_parsing():
    assert choose_nlist(100_000) == 1024
    assert choose_nlist(10**6) == 4096
    assert choose_nlist(10_000) == 256  # at least 39 points per list
    assert parse_index_key("IVF64,PQ8").key == "IVF64,PQ8x8"
    assert parse_index_key("HNSW16,Flat").key == "HNSW16"
    for bad in ["OPQ16,IVF64,PQ16", "IVF0,Flat", "LSH", "HNSW1"]:
        with pytest.raises(UnsupportedIndexKey, match="unsupported index key"):
            parse_index_key(bad)


# ------------------------------------------------------------------ exactness
def test_flat_equals_brute_force_exactly(data, built):
    x, ids, q = data
    D, I = built["Flat"].search(q, 10)
    De, Ie = exact(x, ids, q, 10)
    np.testing.assert_array_equal(I, Ie)
    np.testing.assert_array_equal(D, De)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.flags.c_contiguous
    scores = q @ x.T  # numpy brute force, independent of FAISS
    np.testing.assert_array_equal(I, ids[np.argsort(-scores, axis=1)[:, :10]])
    np.testing.assert_allclose(D, np.sort(scores, axis=1)[:, ::-1][:, :10], atol=1e-5)


@pytest.mark.parametrize("key", RECALL_KEYS)
def test_ann_recall_at_10(data, built, key):
    x, ids, q = data
    _, I = built[key].search(q, 10)
    assert recall_at(I, exact(x, ids, q, 10)[1]) >= 0.95
    assert built[key].recall_estimate >= 0.95


def test_pq_recall_is_reported_and_tuning_stops_when_saturated(data, built):
    x, ids, q = data
    vi = built["IVF256,PQ8x8"]
    _, I = vi.search(q, 10)
    measured = recall_at(I, exact(x, ids, q, 10)[1])
    assert 0.3 < measured < 0.95 and abs(measured - vi.recall_estimate) < 0.1
    assert vi.search_params["nprobe"] < 256  # not every list, once recall stops growing


# -------------------------------------------------------------------- filters
@pytest.mark.parametrize("key", ALL_KEYS)
@pytest.mark.parametrize("overfetch", [False, True], ids=["selector", "overfetch"])
@pytest.mark.parametrize("n_allowed", [3, 12, 200, 6000])
def test_filtered_search_only_allowed_and_k_rows(data, built, key, overfetch, n_allowed):
    x, ids, q = data
    vi = built[key]
    allowed = np.random.default_rng(n_allowed).choice(ids, n_allowed, replace=False)
    vi.overfetch = overfetch
    try:
        D, I = vi.search(q[:40], 10, allowed=allowed)
    finally:
        vi.overfetch = False
    found = I[I >= 0]
    assert np.isin(found, allowed).all()
    assert ((I >= 0).sum(1) == min(10, n_allowed)).all()
    assert (D[I < 0] == np.float32(-np.finfo(np.float32).max)).all()
    if key in ("Flat", "HNSW32") or n_allowed <= 12:  # exact over the subset
        mask = np.isin(ids, allowed)
        truth = exact(x[mask], ids[mask], q[:40], min(10, n_allowed))[1]
        assert recall_at(I[:, : truth.shape[1]], truth) >= (1.0 if key == "Flat" else 0.9)


def test_a_filtered_hnsw_search_widens_its_walk_to_keep_recall(data, built):
    """A filter keeping a quarter of the rows: efSearch / 0.25, recall@10 at the target."""
    x, ids, q = data
    vi = built["HNSW32"]
    allowed = np.random.default_rng(5).choice(ids, 5000, replace=False)  # > the exact cut
    ef = vi.search_params["efSearch"]
    assert vi._filtered_ef(5000) == {"efSearch": min(max(ef, 1024), -(-ef * N_ANN // 5000))}
    _, I = vi.search(q, 10, allowed=allowed)
    mask = np.isin(ids, allowed)
    truth = exact(x[mask], ids[mask], q, 10)[1]
    assert recall_at(I, truth) >= 0.95


def test_overfetch_path_matches_selector_path(data, built):
    _, ids, q = data
    vi = built["Flat"]
    allowed = ids[::50]
    expected = vi.search(q, 10, allowed=allowed)[1]
    vi.overfetch = True
    try:
        assert vi.stats()["filter"] == "overfetch"
        np.testing.assert_array_equal(vi.search(q, 10, allowed=allowed)[1], expected)
    finally:
        vi.overfetch = False


def test_filter_with_unknown_ids_and_empty_set(built, data):
    _, ids, q = data
    vi = built["HNSW32"]
    D, I = vi.search(q[:3], 5, allowed=np.array([10**12, 10**12 + 1]))
    assert (I == -1).all()
    D, I = vi.search(q[:3], 5, allowed={int(ids[0]), 10**12})  # any iterable of ids
    assert (I[:, 0] == ids[0]).all() and (I[:, 1:] == -1).all()


@pytest.mark.parametrize("key", ["Flat", "IVF64,Flat"])
def test_a_repeated_read_only_filter_is_kept_until_the_ids_change(data, key):
    """A read-only allowed array (as catalog_allowed_ids returns) keeps its live subset and
    its FAISS selector for the next search; an add or a remove makes them stale, and a
    writable array is never kept (its caller may change it in place)."""
    x, ids, q = data
    vi = fresh(data, key, use_gpu=False)
    allowed = ids[:5000:2].copy()  # every other stored id
    allowed.flags.writeable = False
    _, first = vi.search(q[:10], 5, allowed=allowed.copy())  # writable: nothing kept
    assert np.isin(first, allowed).all() and vi._subset_cache is None
    best = np.unique(first[:, 0])
    vi.remove(best)
    _, without = vi.search(q[:10], 5, allowed=allowed)
    _, again = vi.search(q[:10], 5, allowed=allowed)
    assert np.array_equal(without, again) and not np.isin(without, best).any()
    kept = vi._subset_cache[2]
    assert vi._live_subset(allowed) is kept  # the intersection is not done again
    assert vi._selector(kept) is vi._selector_cache[1]
    vi.add(x[np.searchsorted(ids, best)], best)  # the same ids, live again
    _, back = vi.search(q[:10], 5, allowed=allowed)
    assert np.array_equal(back[:, 0], first[:, 0])  # not the subset kept without them
    writable = allowed.copy()
    vi.search(q[:1], 5, allowed=writable)
    assert vi._subset_cache[0] is allowed  # not replaced by the writable array
    writable[:] = ids[1:5000:2][: writable.size]  # changed in place: the odd ids now
    _, odd = vi.search(q[:10], 5, allowed=writable)
    assert np.isin(odd, writable).all() and not np.isin(odd, allowed).any()


# -------------------------------------------------------------------- mutation
@pytest.mark.parametrize("key", ALL_KEYS)
def test_remove_is_exact_and_keeps_other_results(data, key):
    x, ids, q = data
    vi = fresh(data, key, use_gpu=False)
    _, before = vi.search(q[:50], 30)
    gone = np.unique(before[:, :3])  # ids that matter to these queries
    assert vi.remove(np.concatenate([gone, [10**12]])) == gone.size
    assert vi.ntotal == 5000 - gone.size and not np.isin(vi.ids(), gone).any()
    _, after = vi.search(q[:50], 10)
    assert not np.isin(after, gone).any() and (after >= 0).all()
    if key.startswith("HNSW"):
        assert vi.stats()["tombstones"] == gone.size  # below compact_fraction: no rebuild
    kept = np.array([[i for i in row if i not in set(gone)][:10] for row in before])
    same = np.mean(kept == after)  # the other ids keep their ranks
    assert same == 1.0 if key.startswith(("Flat", "IVF")) else same >= 0.99
    vi.overfetch = True  # tombstones are honoured by the over-fetch path too
    assert not np.isin(vi.search(q[:50], 10)[1], gone).any()


@pytest.mark.parametrize("key", ALL_KEYS)
def test_add_keeps_ids_and_finds_new_vectors(data, key):
    x, ids, q = data
    vi = fresh(data, key, use_gpu=False)
    _, before = vi.search(q[:20], 10)
    new_ids = np.arange(100, dtype=np.int64) + 10**9
    # isotropic vectors, off the data's subspace: far from the queries' neighbours
    far = np.random.default_rng(5).standard_normal((100, D_SMALL)).astype(np.float32)
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    vi.add(far, new_ids)
    assert vi.ntotal == 5100
    after = vi.search(q[:20], 10)[1]
    assert np.mean(after == before) >= (1.0 if key == "Flat" else 0.95)
    _, I = vi.search(far, 1)
    lossy = {"IVF256,SQ8": 0.95, "IVF256,PQ8x8": 0.8}
    assert np.mean(I[:, 0] == new_ids) >= lossy.get(key, 1.0)
    with pytest.raises(DuplicateIds, match=str(new_ids[0])):
        vi.add(far[:1], new_ids[:1])
    with pytest.raises(DimensionMismatch):
        vi.add(np.zeros((1, D_SMALL + 1), np.float32), [1])


def test_hnsw_tombstones_readd_and_compaction(data):
    x, ids, q = data
    vi = fresh(data, "HNSW32", use_gpu=False, compact_fraction=0.5)
    vi.remove(ids[:10])
    assert vi.stats()["tombstones"] == 10 and vi.ntotal == 4990
    vi.add(x[:1], ids[:1])  # a tombstoned id comes back: compacts, then adds
    assert vi.stats()["tombstones"] == 0 and vi.ntotal == 4991
    assert vi.search(x[:1], 1)[1][0, 0] == ids[0]
    vi.remove(ids[1000:3600])  # past compact_fraction of the stored vectors
    assert vi.stats()["tombstones"] == 0 and vi.ntotal == 4991 - 2600


def test_concurrent_searches_never_see_partial_updates(data):
    x, ids, q = data
    vi = fresh(data, "Flat", use_gpu=False)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                _, I = vi.search(q[:8], 5)
                assert (I >= 0).all()
        except BaseException as err:  # collected and re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    extra = np.arange(50, dtype=np.int64) + 10**9
    for _ in range(20):
        vi.add(x[6000:6050], extra)
        assert vi.remove(extra) == 50
    stop.set()
    for t in threads:
        t.join()
    assert not errors and vi.ntotal == 5000


def test_bad_queries(built):
    with pytest.raises(DimensionMismatch, match="dimension 5"):
        built["Flat"].search(np.zeros((2, 5)), 3)
    with pytest.raises(ValueError, match="k must be"):
        built["Flat"].search(np.zeros((2, D_SMALL)), 0)


# --------------------------------------------------------------------- folders
def catalog_for(ids: np.ndarray) -> pl.DataFrame:
    n = ids.size
    return pl.DataFrame(
        {
            "row_id": ids,
            "case_id": [f"c{i}" for i in ids],
            "diagnosis": np.array(["normal", "PDR", "BRVO"])[np.arange(n) % 3],
            "eye": np.array(["OD", "OS"])[np.arange(n) % 2],
            "split": np.array(["train", "val", "test"])[(np.arange(n) // 7) % 3],
            "lesions": [["leakage"] if i % 5 == 0 else [] for i in range(n)],
        }
    )


@pytest.fixture
def folder(tmp_path, data):
    x, ids, _ = data
    indexes = {
        "cf": VectorIndex.build(x[:3000], ids[:3000], key="Flat", use_gpu=False),
        "ffa": VectorIndex.build(x[:3000], ids[:3000], key="HNSW32", use_gpu=False),
    }
    indexes["ffa"].remove(ids[:5])  # tombstones are saved too
    path = tmp_path / "INDEX"
    save_index_folder(path, indexes, catalog_for(ids[:3000]), "enc-aaa", {"run": "r1"})
    return path, indexes


def test_folder_roundtrip(folder, data):
    path, indexes = folder
    _, ids, q = data
    assert sorted(p.name for p in path.iterdir()) == [
        "catalog.parquet",
        "cf.faiss",
        "ffa.faiss",
        "ffa.tombstones.npy",
        "manifest.json",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["dim"] == D_SMALL
    assert manifest["counts"] == {"cf": 3000, "ffa": 2995}
    assert manifest["index_keys"] == {"cf": "Flat", "ffa": "HNSW32"}
    loaded = load_index_folder(path, "enc-aaa", use_gpu=False)
    assert loaded.encoder_id == "enc-aaa" and loaded.extra == {"run": "r1"}
    for m in ("cf", "ffa"):
        np.testing.assert_array_equal(
            loaded.indexes[m].search(q, 10)[1], indexes[m].search(q, 10)[1]
        )
    assert loaded.indexes["ffa"].search_params == indexes["ffa"].search_params
    D, I = loaded.search("ffa", q[:20], 10, filters={"diagnosis": "PDR", "eye": "OS"})
    assert (I >= 0).all() and np.isin(I, ids[:3000][np.arange(3000) % 6 == 1]).all()


def test_folder_update_in_place(folder, data):
    path, _ = folder
    x, ids, q = data
    loaded = load_index_folder(path)
    loaded.indexes["cf"].remove(ids[:100])
    loaded.save()
    again = load_index_folder(path)
    assert again.indexes["cf"].ntotal == 2900 and again.manifest["counts"]["cf"] == 2900
    assert not np.isin(again.search("cf", q, 10)[1], ids[:100]).any()


@pytest.mark.parametrize("where", ["faiss", "catalog", "manifest"])
def test_interrupted_write_keeps_previous_folder(folder, data, monkeypatch, where):
    path, indexes = folder
    _, ids, q = data
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    target = {
        "faiss": (VectorIndex, "write"),
        "catalog": (pl.DataFrame, "write_parquet"),
        "manifest": (folder_mod, "_write_manifest"),
    }[where]
    monkeypatch.setattr(*target, boom)
    indexes["cf"].remove(ids[:10])
    with pytest.raises(OSError, match="simulated"):
        save_index_folder(path, indexes, catalog_for(ids[:3000]), "enc-bbb")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == ["INDEX"]  # no temp left behind
    loaded = load_index_folder(path, "enc-aaa")
    assert loaded.indexes["cf"].ntotal == 3000


def test_mismatched_encoder_refused(folder):
    path, _ = folder
    with pytest.raises(EncoderMismatch, match="'enc-aaa'.*'enc-zzz'") as info:
        load_index_folder(path, expected_encoder_id="enc-zzz")
    assert info.value.found == "enc-aaa" and info.value.expected == "enc-zzz"


def test_damaged_folders_refused(folder, tmp_path):
    path, _ = folder
    with pytest.raises(IndexFormatError, match="no such folder"):
        load_index_folder(tmp_path / "nope")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format version 99"):
        load_index_folder(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "counts": {"cf": 1, "ffa": 2995}}))
    with pytest.raises(IndexFormatError, match="cf holds 3000 vectors"):
        load_index_folder(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    data = (path / "cf.faiss").read_bytes()
    (path / "cf.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match="cf.faiss"):
        load_index_folder(path)
    (path / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        load_index_folder(path)


def test_save_refuses_ids_missing_from_catalog(tmp_path, data):
    x, ids, _ = data
    vi = VectorIndex.build(x[:100], ids[:100], key="Flat")
    with pytest.raises(Exception, match="absent from the catalog"):
        save_index_folder(tmp_path / "I", {"cf": vi}, catalog_for(ids[:50]), "enc")
    assert not (tmp_path / "I").exists()


def test_catalog_filters():
    cat = catalog_for(np.arange(30, dtype=np.int64) + 100)
    assert catalog_allowed_ids(cat, None) is None
    assert catalog_allowed_ids(cat, {"eye": None}) is None
    got = catalog_allowed_ids(cat, {"diagnosis": "PDR", "eye": "OS"})
    np.testing.assert_array_equal(got, [101, 107, 113, 119, 125])
    got = catalog_allowed_ids(cat, {"diagnosis": ["PDR", "BRVO"], "split": "train"})
    np.testing.assert_array_equal(got, [101, 102, 104, 105, 122, 123, 125, 126])
    np.testing.assert_array_equal(
        catalog_allowed_ids(cat, {"lesions": "leakage"}), [100, 105, 110, 115, 120, 125]
    )
    assert catalog_allowed_ids(cat, {"diagnosis": "CSC"}).size == 0
    with pytest.raises(FilterError, match="unknown filter 'laterality'"):
        catalog_allowed_ids(cat, {"laterality": "OD"})


# ------------------------------------------------------------------------- GPU
def test_hnsw_stays_on_cpu_with_a_note(data):
    x, ids, _ = data
    vi = VectorIndex.build(x[:2000], ids[:2000], key="HNSW32", use_gpu=True)
    assert vi.device == "cpu" and "HNSW" in vi.stats()["device_note"]


@pytest.mark.skipif(gpu_count() == 0, reason="needs faiss-gpu and a GPU")
@pytest.mark.parametrize("key", ["Flat", "IVF256,Flat", "IVF256,SQ8"])
def test_gpu_search_matches_cpu_and_filters(data, key):
    x, ids, q = data
    cpu = VectorIndex.build(x, ids, key=key, use_gpu=False)
    gpu = VectorIndex(
        faiss.deserialize_index(cpu.serialize()), key, use_gpu=True, search_params=cpu.search_params
    )
    assert gpu.device == "gpu"
    _, Ic = cpu.search(q, 10)
    _, Ig = gpu.search(q, 10)
    assert recall_at(Ig, Ic) >= 0.99
    allowed = ids[::101]
    _, I = gpu.search(q, 10, allowed=allowed)
    assert np.isin(I, allowed).all() and (I >= 0).all()
    gpu.remove(ids[:100])
    assert not np.isin(gpu.search(q, 10)[1], ids[:100]).any()


@pytest.mark.parametrize("key", ALL_KEYS)
def test_stored_vectors_by_id_after_updates(data, key):
    """`reconstruct` / `vector` give what was added, before and after removals and adds
    (IVF builds its id map on first use; removing from it then needs IDSelectorArray)."""
    x, ids, _ = data
    vi = fresh(data, key, target_recall=None)
    lossy = "PQ" in key or "SQ" in key
    tol = 0.2 if "PQ" in key else 0.01 if lossy else 0
    assert np.abs(vi.reconstruct(ids[[3, 40]]) - x[[3, 40]]).max() <= tol
    vi.remove(ids[:5])
    vi.add(x[:2], [10**9, 10**9 + 1])
    assert np.abs(vi.vector(10**9 + 1) - x[1]).max() <= tol
    assert vi.vector(ids[40]).shape == (1, x.shape[1])
    for gone in (ids[0], 12345678):
        with pytest.raises(KeyError):
            vi.vector(gone)
        with pytest.raises(KeyError):
            vi.reconstruct([ids[40], gone])
    assert vi.search(x[1:2], 1)[1][0, 0] == 10**9 + 1


def test_read_lock_can_refuse_instead_of_waiting():
    from index.sync import RWLock

    lock = RWLock()
    with lock.read(blocking=False) as ok:
        assert ok
    refused = threading.Event()

    def try_read():
        with lock.read(blocking=False) as ok:
            if not ok:
                refused.set()

    with lock.write():
        with lock.read(blocking=False) as ok:  # the writer itself may read
            assert ok
        t = threading.Thread(target=try_read)
        t.start()
        t.join()
    assert refused.is_set()  # another thread was refused at once, not blocked
    assert lock._readers == 0


def test_neighbour_recall_against_exact_search():
    from index import neighbour_recall

    truth = np.array([[0, 1], [2, 3]])
    assert neighbour_recall(np.array([[1, 0], [2, 9]]), truth) == 0.75
    assert neighbour_recall(np.array([[1, 0]]), [np.array([1])]) == 1.0  # ragged truth
