"""`VectorIndex`: one FAISS index with stable int64 ids, filtered search and a GPU mirror.

Numpy in, `(D, I)` out: `D` float32 scores (inner product = cosine on normalised
vectors), `I` int64 ids, both `(nq, k)`, missing results padded like FAISS (id -1,
score -FLT_MAX).

Ids. Flat and HNSW sit in an `IndexIDMap2`; IVF indexes store the ids natively
(an id map over IVF would break on removal: IVF does not renumber).

Removal. Flat and IVF remove exactly (`remove_ids`). FAISS HNSW cannot remove, so
removed ids become *tombstones*: every search excludes them (through the
IDSelector, or the over-fetch filter), so removal is exact at once; the graph is
untouched, so other ids' results stay as they were. When tombstones pass
`compact_fraction` (10%) of the stored vectors, or a tombstoned id is added again,
the graph is rebuilt from the live vectors (`compact()`); results may then shift
within the recall target, as after any HNSW build. Tombstones are saved with the
index (`write` returns them; the folder stores `<modality>.tombstones.npy`).

Filters (`allowed=` a set of ids) are applied inside the search: on CPU through an
`IDSelectorBatch` in the search parameters; on GPU (FAISS GPU has no selectors)
by over-fetching k·(n/allowed) results, doubling until each row has k allowed
ones. Rows still short (a selective filter defeats HNSW's or IVF's pruning) are
finished exhaustively — IVF with every list probed, HNSW by exact scoring of the
allowed vectors — so a filtered search returns min(k, #allowed) rows. On HNSW a filter
of at most 4096 ids is scored exactly; a wider one that keeps a share s of the rows
walks with efSearch / s (at most 1024), as the walk meets allowed rows at that rate.
A read-only allowed array (what `catalog_allowed_ids` returns, and the engine keeps per
filter) keeps its live subset and its selector for the next search until the stored ids
change: at 1M rows they cost more than the search itself.

Tuning: `build` holds out a seeded sample of up to 256 vectors, adds the rest,
raises efSearch / nprobe until recall@10 of the held-out queries against their
exact neighbours reaches the target (0.95), then adds the hold-out. IVF-PQ cannot
reach it on embedding-like vectors (its codes cap recall); it keeps the cheapest
setting near its best recall and says so (`recall_estimate`, a warning).

Concurrency: a readers-writer lock (`index.sync.RWLock`). Searches share it (FAISS
CPU search is thread-safe); add / remove / compact / tune take it exclusively, so a
search never sees a half-updated index. GPU searches are also serialised by a
mutex, since FAISS GPU indexes are not thread-safe.
"""

# ruff: noqa: E741  (D, I are FAISS's names for scores and ids)
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .backend import LiveIds
from .errors import DimensionMismatch, DuplicateIds, UnsupportedIndexKey
from .gpu import GPU_MAX_K, gpu_count, gpu_unsupported_reason, to_gpu
from .keys import (
    HNSW_EF_CONSTRUCTION,
    PQ_MIN_TRAIN,
    IndexSpec,
    choose_index_key,
    default_memory_budget,
    parse_index_key,
)
from .sync import RWLock

log = logging.getLogger(__name__)

PAD_SCORE = float(-np.finfo(np.float32).max)  # FAISS's score for a missing IP result
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
TUNE_QUERIES = 256  # held-out queries for tuning (recall standard error ~0.004)
TUNE_MARGIN = 0.01  # aim this far above the target, for that sampling error
ADD_CHUNK = 65536
DEFAULT_EF_SEARCH = 64  # untuned defaults
DEFAULT_NPROBE = 16
EXACT_SUBSET_MAX = 4096  # HNSW: score a filter this small exactly instead of walking
FILTERED_EF_MAX = 1024  # HNSW: the widest efSearch a filter may raise the tuned one to
RECONSTRUCT_CHUNK = 16384
TRAIN_POINTS_PER_LIST = 64


def as_matrix(x: Any, d: int | None, what: str) -> np.ndarray:
    """`x` as a C-contiguous float32 (n, d) matrix; a single vector becomes (1, d)."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, d), got shape {a.shape}")
    if d is not None and a.shape[1] != d:
        raise DimensionMismatch(what, a.shape[1], d)
    return a


def as_ids(ids: Any, n: int | None = None) -> np.ndarray:
    """`ids` as a C-contiguous int64 vector of non-negative ids (of length `n`)."""
    if isinstance(ids, set | frozenset):
        ids = sorted(ids)
    a = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
    if n is not None and a.size != n:
        raise ValueError(f"got {a.size} ids for {n} vectors")
    if a.size and a.min() < 0:
        raise ValueError(f"ids must be >= 0 (-1 marks a missing result), got {a.min()}")
    return a


def new_faiss_index(spec: IndexSpec, d: int) -> faiss.Index:
    """An empty inner-product index for `spec`, wrapped so that it takes int64 ids."""
    base = faiss.index_factory(d, spec.key, faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        base.hnsw.efSearch = DEFAULT_EF_SEARCH
    if spec.kind == "ivf_pq":
        base.do_polysemous_training = False  # 4x the training time, for a search we skip
    if spec.is_ivf:
        base.nprobe = min(DEFAULT_NPROBE, spec.nlist)
        return base
    wrapped = faiss.IndexIDMap2(base)
    wrapped.own_fields = True
    base.this.disown()  # the id map frees it
    return wrapped


def describe_faiss_index(index: faiss.Index) -> str:
    """The canonical key of a FAISS index built by `new_faiss_index`; raises otherwise."""
    index = faiss.downcast_index(index)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UnsupportedIndexKey(type(index).__name__, "metric is not inner product")
    if isinstance(index, faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSWFlat):
            return f"HNSW{inner.hnsw.nb_neighbors(1)}"
        if type(inner) in (faiss.IndexFlatIP, faiss.IndexFlat):
            return "Flat"
        raise UnsupportedIndexKey(type(inner).__name__, "unexpected index inside IndexIDMap2")
    if isinstance(index, faiss.IndexIVFFlat):
        return f"IVF{index.nlist},Flat"
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        if index.sq.qtype != faiss.ScalarQuantizer.QT_8bit:
            raise UnsupportedIndexKey("IVF,SQ", "only 8-bit scalar quantisation is supported")
        return f"IVF{index.nlist},SQ8"
    if isinstance(index, faiss.IndexIVFPQ) and type(index) is faiss.IndexIVFPQ:
        return f"IVF{index.nlist},PQ{index.pq.M}x{index.pq.nbits}"
    raise UnsupportedIndexKey(type(index).__name__, "not an index this layer builds")


def stored_ids(index: faiss.Index, spec: IndexSpec) -> np.ndarray:
    """Sorted ids stored in `index` (tombstoned HNSW entries included)."""
    if not spec.is_ivf:
        return np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))
    lists = index.invlists
    parts = []
    for lst in range(index.nlist):
        size = lists.list_size(lst)
        if size:
            ptr = lists.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            lists.release_ids(lst, ptr)
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)


def _padded(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), PAD_SCORE, np.float32), np.full((nq, k), -1, np.int64)


def _first_k(D: np.ndarray, I: np.ndarray, keep: np.ndarray, k: int):
    """Per row, the first `k` results where `keep` holds (order kept), padded; and counts."""
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    Dk, Ik = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    kk = np.take_along_axis(keep, order, 1)
    Dk[~kk], Ik[~kk] = PAD_SCORE, -1
    if Dk.shape[1] < k:
        pad_D, pad_I = _padded(len(D), k - Dk.shape[1])
        Dk, Ik = np.hstack([Dk, pad_D]), np.hstack([Ik, pad_I])
    return np.ascontiguousarray(Dk), np.ascontiguousarray(Ik), keep.sum(1)


def _plain_matrix(x: Any, d: int) -> bool:
    """Already what FAISS takes: a C-contiguous float32 (n, d) array."""
    return (
        type(x) is np.ndarray
        and x.dtype == np.float32
        and x.ndim == 2
        and x.shape[1] == d
        and x.flags.c_contiguous
    )


def _is_member(I: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    if sorted_ids.size == 0:
        return np.zeros(I.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_ids, I), sorted_ids.size - 1)
    return sorted_ids[pos] == I


def _trained_index(spec: IndexSpec, x: np.ndarray, rng: np.random.Generator) -> faiss.Index:
    """A new, empty FAISS index for `spec`; IVF quantizers trained on a seeded sample of `x`."""
    index = new_faiss_index(spec, x.shape[1])
    if spec.is_ivf:
        n = len(x)
        if n < spec.nlist:
            raise ValueError(f"{spec.key} needs >= {spec.nlist} vectors to train, got {n}")
        n_train = min(n, max(TRAIN_POINTS_PER_LIST * spec.nlist, PQ_MIN_TRAIN))
        index.train(x[np.sort(rng.choice(n, n_train, replace=False))])
    return index


class VectorIndex(LiveIds):
    """One modality's vectors in FAISS. See the module docstring for the guarantees."""

    def __init__(
        self,
        index: faiss.Index,
        key: str | None = None,
        *,
        search_params: dict[str, int] | None = None,
        tombstones: Any = None,
        use_gpu: bool | None = None,
        overfetch: bool = False,
        compact_fraction: float = 0.1,
        recall_estimate: float | None = None,
    ):
        actual = describe_faiss_index(index)
        self.spec = parse_index_key(key or actual)
        if self.spec.key != actual:
            raise UnsupportedIndexKey(self.spec.key, f"the FAISS index is {actual}")
        self._index = index  # the CPU master copy
        self.dim = int(index.d)
        self._tombstones = np.unique(as_ids(tombstones if tombstones is not None else []))
        stored = stored_ids(index, self.spec)
        self._ids = np.setdiff1d(stored, self._tombstones, assume_unique=True)
        if self._ids.size + self._tombstones.size != stored.size:
            raise ValueError("tombstones name ids that the index does not hold")
        self.search_params = dict(search_params or self._default_params())
        self._plain_params: tuple[dict, Any] | None = None  # (for which search_params, object)
        self._subset_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._selector_cache: tuple[np.ndarray, Any] | None = None
        self.recall_estimate = recall_estimate
        self.overfetch = overfetch  # force the GPU-style filter path on CPU (tests)
        self.compact_fraction = compact_fraction
        self.build_timings: dict[str, float] = {}
        self._lock = RWLock()
        self._gpu_mutex = threading.Lock()
        self._map_mutex = threading.Lock()
        self._gpu_index: faiss.Index | None = None
        want_gpu = gpu_count() > 0 if use_gpu is None else use_gpu
        self.device_note = gpu_unsupported_reason(self.spec) if want_gpu else None
        self._use_gpu = want_gpu and self.device_note is None
        if use_gpu and self.device_note:
            log.warning("%s: %s", self.spec.key, self.device_note)

    # ----------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        vectors: Any,
        ids: Any = None,
        *,
        key: str | None = None,
        mem_bytes: int | None = None,
        target_recall: float | None = 0.95,
        use_gpu: bool | None = None,
        seed: int = 0,
        **options: Any,
    ) -> VectorIndex:
        """Index `vectors` (n, d), L2-normalised, under `ids` (default 0..n-1).

        `key` defaults to `choose_index_key(n, d, mem_bytes)`. IVF quantizers train on
        a seeded sample. For ANN keys, a seeded hold-out of up to `TUNE_QUERIES`
        vectors is added last: before that, they serve as unseen queries whose exact
        neighbours are known, and efSearch / nprobe are tuned on them until recall@10
        reaches `target_recall` (None skips tuning). Timings go to `build_timings`.
        """
        x = as_matrix(vectors, None, "vectors")
        n, d = x.shape
        ids = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, n)
        if _repeated(ids).size:
            raise DuplicateIds(sorted({int(i) for i in _repeated(ids)}))
        gpu = gpu_count() > 0 if use_gpu is None else use_gpu
        if key is None:
            budget = mem_bytes if mem_bytes is not None else default_memory_budget()
            key = choose_index_key(n, d, budget, use_gpu=gpu)
        spec = parse_index_key(key)
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        index = _trained_index(spec, x, rng)
        t1 = time.perf_counter()
        n_hold = 0 if target_recall is None or spec.exact else min(TUNE_QUERIES, n // 10)
        held = np.zeros(n, bool)
        held[rng.choice(n, n_hold, replace=False)] = True
        for start in range(0, n, ADD_CHUNK):  # chunks: no copy of the whole matrix
            part = slice(start, start + ADD_CHUNK)
            keep = ~held[part]
            index.add_with_ids(x[part][keep], ids[part][keep])
        vi = cls(index, spec.key, use_gpu=gpu, **options)
        t2 = time.perf_counter()
        if n_hold:
            vi._tune_on_held_out(x, ids, held, target_recall)
        vi.build_timings = {
            "train_s": t1 - t0,
            "add_s": t2 - t1,
            "tune_s": time.perf_counter() - t2,  # with adding the held-out queries
        }
        log.info("built %s over %d vectors of dimension %d", spec.key, n, d)
        return vi

    def _tune_on_held_out(self, x, ids, held, target_recall: float) -> None:
        """Tune on the held-out rows (exact neighbours among the indexed ones), then add them."""
        q = x[held]
        # over-fetch, then drop held-out rows from the exact neighbours
        _, rows = faiss.knn(q, x, min(len(x), 10 + int(held.sum())), faiss.METRIC_INNER_PRODUCT)
        truth = [ids[r[~held[r]]][:10] for r in rows]
        self.tune(q, truth, target_recall=target_recall)
        self.add(q, ids[held])

    def tune(
        self,
        queries: Any,
        truth: Any,
        *,
        target_recall: float = 0.95,
    ) -> float:
        """Set the smallest efSearch / nprobe whose recall@k reaches `target_recall`.

        `truth[i]` are the exact top-k ids of `queries[i]` among the indexed vectors
        (queries should not be indexed themselves: an indexed query is an easy one).
        The tuning aims `TUNE_MARGIN` above the target for sampling error. When the
        target is out of reach (lossy PQ codes), the cheapest setting within 0.005
        of the best recall is kept and a warning logged. Returns the recall.
        """
        q = as_matrix(queries, self.dim, "queries")
        truth = [np.asarray(t, np.int64).reshape(-1) for t in truth]
        k = max((t.size for t in truth), default=0)
        if self.spec.exact or not len(q) or not k:
            self.recall_estimate = 1.0 if self.spec.exact else None
            return 1.0
        name = "efSearch" if self.spec.kind == "hnsw" else "nprobe"
        if name == "nprobe":  # 1, 2, 4, ... up to every list
            nlist = self.spec.nlist
            ladder = sorted({min(2**i, nlist) for i in range(nlist.bit_length() + 1)})
        else:
            ladder = list(EF_LADDER)
        aim = min(1.0, target_recall + TUNE_MARGIN)
        trials: list[tuple[int, float]] = []
        with self._lock.write():
            for value in ladder:
                _, I = self._search_selector(q, k, None, {name: value})
                trials.append((value, neighbour_recall(I, truth)))
                if trials[-1][1] >= aim:
                    break
            best = max(r for _, r in trials)
            value, recall = next((v, r) for v, r in trials if r >= min(aim, best - 0.005))
            self.search_params = {name: value}
            self.recall_estimate = recall
            self._gpu_index = None
        level = logging.INFO if recall >= target_recall else logging.WARNING
        log.log(
            level,
            "%s: %s=%d gives recall@%d %.3f on held-out queries (target %.2f)",
            self.spec.key,
            name,
            value,
            k,
            recall,
            target_recall,
        )
        return recall

    def _default_params(self) -> dict[str, int]:
        if self.spec.kind == "hnsw":
            return {"efSearch": int(faiss.downcast_index(self._index.index).hnsw.efSearch)}
        if self.spec.is_ivf:
            return {"nprobe": int(self._index.nprobe)}
        return {}

    # ----------------------------------------------------------------- mutation
    def add(self, vectors: Any, ids: Any) -> None:
        """Add `vectors` (n, d) under new, unused int64 `ids`."""
        x = as_matrix(vectors, self.dim, "vectors")
        ids = as_ids(ids, len(x))
        with self._lock.write():
            dup = np.concatenate([ids[_is_member(ids, self._ids)], _repeated(ids)])
            if dup.size:
                raise DuplicateIds(sorted({int(i) for i in dup}))
            if self._tombstones.size and _is_member(ids, self._tombstones).any():
                self._compact_locked()  # an HNSW id map cannot hold an id twice
            self._index.add_with_ids(x, ids)
            self._ids = np.union1d(self._ids, ids)
            self._gpu_index = None

    def remove(self, ids: Any) -> int:
        """Remove `ids` (unknown ones are ignored); returns how many were removed."""
        ids = np.unique(as_ids(ids))
        with self._lock.write():
            present = ids[_is_member(ids, self._ids)]
            if not present.size:
                return 0
            if self.spec.kind == "hnsw":
                self._tombstones = np.union1d(self._tombstones, present)
            else:
                hashed = (
                    self.spec.is_ivf and self._index.direct_map.type == faiss.DirectMap.Hashtable
                )
                selector = faiss.IDSelectorArray if hashed else faiss.IDSelectorBatch
                removed = self._index.remove_ids(selector(present))  # (an id map needs Array)
                if removed != present.size:
                    raise RuntimeError(f"FAISS removed {removed} of {present.size} ids")
            self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
            stored = self._ids.size + self._tombstones.size
            if self._tombstones.size > self.compact_fraction * stored:
                self._compact_locked()
            self._gpu_index = None
            return int(present.size)

    def compact(self) -> None:
        """Rebuild an HNSW graph without its tombstones (a no-op otherwise)."""
        with self._lock.write():
            self._compact_locked()

    def _compact_locked(self) -> None:
        if not self._tombstones.size:
            return
        fresh = new_faiss_index(self.spec, self.dim)
        for start in range(0, self._ids.size, RECONSTRUCT_CHUNK):
            chunk = self._ids[start : start + RECONSTRUCT_CHUNK]
            fresh.add_with_ids(self._index.reconstruct_batch(chunk), chunk)
        log.info("%s: rebuilt without %d tombstones", self.spec.key, self._tombstones.size)
        self._index, self._tombstones = fresh, np.empty(0, np.int64)
        self._gpu_index = None

    # ------------------------------------------------------------------- search
    def search(self, queries: Any, k: int, *, allowed: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` ids and scores per query row, only among `allowed` ids when given."""
        if allowed is None and type(k) is int and _plain_matrix(queries, self.dim):
            found = self._search_plain(queries, k)
            if found is not None:
                return found
        q = as_matrix(queries, self.dim, "queries")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = int(k)
        with self._lock.read():
            subset = None if allowed is None else self._live_subset(allowed)
            n_avail = self._ids.size if subset is None else subset.size
            if n_avail == 0 or len(q) == 0:
                return _padded(len(q), k)
            D, I = self._search_any(q, k, subset)
            if I[:, min(k, n_avail) - 1].min() >= 0:
                return D, I  # every row full (results are packed to the left)
            short = (I >= 0).sum(1) < min(k, n_avail)
            if short.any():
                D[short], I[short] = self._search_exhaustive(q[short], k, subset)
        return D, I

    def _search_plain(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The common case without the general path's checks; None when it does not apply."""
        with self._lock.read():
            if not 0 < k <= self._ids.size or self._tombstones.size or self._use_gpu:
                return None
            if self.overfetch:
                return None
            D, I = self._index.search(queries, k, params=self._params(None))
        return (D, I) if I[:, k - 1].min() >= 0 else None

    def _search_any(self, q, k, subset):
        """On the GPU mirror when there is one and `k` fits, else on the CPU index."""
        if self._use_gpu and k <= GPU_MAX_K:
            with self._gpu_mutex:
                gpu_index = self._gpu_mirror()
                if gpu_index is not None:
                    return self._search_overfetch(gpu_index.search, q, k, subset, GPU_MAX_K)
        return self._search_cpu(q, k, subset)

    def _search_cpu(self, q, k, subset):
        if self.overfetch:
            params = self._params(None)
            return self._search_overfetch(
                lambda x, kf: self._index.search(x, kf, params=params),
                q,
                k,
                subset,
                self._index.ntotal,
            )
        if self.spec.kind == "hnsw" and subset is not None:
            if subset.size <= EXACT_SUBSET_MAX:
                return self._search_exact_subset(q, k, subset)
            return self._search_selector(q, k, subset, self._filtered_ef(subset.size))
        return self._search_selector(q, k, subset)

    def _filtered_ef(self, allowed: int) -> dict[str, int]:
        """HNSW under a filter: efSearch divided by the share of rows the filter keeps (a
        walk through the graph meets that share of allowed rows), at most FILTERED_EF_MAX."""
        ef = int(self.search_params.get("efSearch", DEFAULT_EF_SEARCH))
        share = allowed / max(int(self._ids.size), 1)
        return {"efSearch": int(min(max(ef, math.ceil(ef / share)), max(ef, FILTERED_EF_MAX)))}

    def vector(self, id: int) -> np.ndarray:
        """The stored vector of one live id, as a (1, d) query (cheaper than `reconstruct`)."""
        id = int(id)
        with self._lock.read():
            pos = int(self._ids.searchsorted(id))
            if pos == self._ids.size or self._ids[pos] != id:
                raise KeyError(f"id not in the index: {id}")
            if self.spec.is_ivf:
                return self.reconstruct([id])
            return self._index.reconstruct(id)[None]

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors (n, d) of live `ids` (IVF-PQ: their decoded approximations)."""
        ids = as_ids(ids)
        with self._lock.read():
            missing = ids[~_is_member(ids, self._ids)]
            if missing.size:
                raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
            if not ids.size:
                return np.zeros((0, self.dim), np.float32)
            if self.spec.is_ivf and self._index.direct_map.type == faiss.DirectMap.NoMap:
                with self._map_mutex:  # one thread builds the id -> entry map (kept)
                    if self._index.direct_map.type == faiss.DirectMap.NoMap:
                        self._index.set_direct_map_type(faiss.DirectMap.Hashtable)
            return self._index.reconstruct_batch(ids)

    def _live_subset(self, allowed: Any) -> np.ndarray:
        """The allowed ids that are live, sorted. Kept for the next search when `allowed` is
        a read-only array (`catalog_allowed_ids` makes them so: a filter repeats, and at 1M
        rows this intersection costs more than the search) until the live ids change."""
        cached = self._subset_cache
        if cached is not None and cached[0] is allowed and cached[1] is self._ids:
            return cached[2]
        ids = np.unique(as_ids(allowed))
        subset = ids[_is_member(ids, self._ids)]
        if isinstance(allowed, np.ndarray) and not allowed.flags.writeable:
            subset.flags.writeable = False
            self._subset_cache = (allowed, self._ids, subset)  # one assignment: thread-safe
        return subset

    def _selector(self, subset: np.ndarray) -> faiss.IDSelector:
        """An IDSelectorBatch of `subset`, kept for the next search of the same subset."""
        cached = self._selector_cache
        if cached is not None and cached[0] is subset:
            return cached[1]
        sel = faiss.IDSelectorBatch(subset)
        if not subset.flags.writeable:
            self._selector_cache = (subset, sel)
        return sel

    def _params(self, sel: Any, overrides: dict[str, int] | None = None):
        if sel is None and not overrides:  # the common case: one object per setting, reused
            cached = self._plain_params
            if cached is None or cached[0] != self.search_params:
                cached = self._plain_params = (dict(self.search_params), self._new_params(None))
            return cached[1]
        return self._new_params(sel, overrides)

    def _new_params(self, sel: Any, overrides: dict[str, int] | None = None):
        p = {**self.search_params, **(overrides or {})}
        extra = {} if sel is None else {"sel": sel}
        if self.spec.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(p["efSearch"]), **extra)
        if self.spec.is_ivf:
            return faiss.SearchParametersIVF(nprobe=int(p["nprobe"]), **extra)
        return faiss.SearchParameters(**extra) if extra else None

    def _search_selector(self, q, k, subset, overrides=None):
        """CPU search with the filter (or the tombstones) as an IDSelector."""
        inner = None
        if subset is not None:
            sel = self._selector(subset)
        elif self._tombstones.size:
            inner = faiss.IDSelectorBatch(self._tombstones)
            sel = faiss.IDSelectorNot(inner)
        else:
            sel = None
        D, I = self._index.search(q, k, params=self._params(sel, overrides))
        del inner  # kept alive until the search is done
        return D, I

    def _search_overfetch(self, search_fn, q, k, subset, cap):
        """Search unfiltered for k·(stored/allowed) rows, filter, double until k are found."""
        stored = self._ids.size + self._tombstones.size
        n_avail = self._ids.size if subset is None else subset.size
        want, cap = min(k, n_avail), max(1, min(cap, stored))
        kf = min(cap, max(2 * k, math.ceil(1.5 * k * stored / n_avail)))
        if subset is None and not self._tombstones.size:
            kf = min(cap, k)  # nothing to filter out
        D_out, I_out = _padded(len(q), k)
        rows = np.arange(len(q))
        while rows.size:
            D, I = search_fn(q[rows], kf)
            keep = I >= 0
            if subset is not None:
                keep &= _is_member(I, subset)
            elif self._tombstones.size:
                keep &= ~_is_member(I, self._tombstones)
            Dk, Ik, count = _first_k(D, I, keep, k)
            done = (count >= want) | (kf >= cap)
            D_out[rows[done]], I_out[rows[done]] = Dk[done], Ik[done]
            rows, kf = rows[~done], min(cap, 2 * kf)
        return D_out, I_out

    def _search_exhaustive(self, q, k, subset):
        """Every allowed vector considered: the fallback for rows a filter left short."""
        if self.spec.kind == "hnsw":
            return self._search_exact_subset(q, k, self._ids if subset is None else subset)
        overrides = {"nprobe": self.spec.nlist} if self.spec.is_ivf else None
        return self._search_selector(q, k, subset, overrides)

    def _search_exact_subset(self, q, k, ids):
        """Exact scores against the stored vectors of `ids`, chunk by chunk (HNSW, Flat)."""
        D, I = _padded(len(q), k)
        for start in range(0, ids.size, RECONSTRUCT_CHUNK):
            chunk = ids[start : start + RECONSTRUCT_CHUNK]
            S = q @ self._index.reconstruct_batch(chunk).T  # (nq, chunk)
            D = np.hstack([D, S.astype(np.float32)])
            I = np.hstack([I, np.broadcast_to(chunk, S.shape)])
            top = np.argsort(-D, axis=1, kind="stable")[:, :k]
            D, I = np.take_along_axis(D, top, 1), np.take_along_axis(I, top, 1)
        return np.ascontiguousarray(D), np.ascontiguousarray(I)

    def _gpu_mirror(self) -> faiss.Index | None:
        """The GPU copy, rebuilt after a mutation; None (and CPU from now on) if it fails."""
        if self._gpu_index is None:
            try:
                self._gpu_index = to_gpu(self._index, self.spec, self.search_params)
            except RuntimeError as err:
                self._use_gpu = False
                self.device_note = f"GPU copy failed ({err}); searching on CPU"
                log.warning("%s: %s", self.spec.key, self.device_note)
        return self._gpu_index

    # ------------------------------------------------------------ introspection
    @property
    def tombstones(self) -> np.ndarray:
        return self._tombstones.copy()

    @property
    def device(self) -> str:
        return "gpu" if self._use_gpu else "cpu"

    def stats(self) -> dict[str, Any]:
        return {
            "key": self.spec.key,
            "dim": self.dim,
            "count": self.ntotal,
            "tombstones": int(self._tombstones.size),
            "device": self.device,
            "device_note": self.device_note,
            "search_params": dict(self.search_params),
            "recall_estimate": self.recall_estimate,
            "build_timings": dict(self.build_timings),
            "filter": "overfetch" if self._use_gpu or self.overfetch else "selector",
        }

    # -------------------------------------------------------------- persistence
    def write(self, path: str | Path) -> dict[str, Any]:
        """Write the CPU index to `path`; returns what was written, read under the same lock.

        The returned dict has key, dim, count, search_params, recall_estimate and
        tombstones (an int64 array the caller saves beside the file, if non-empty).
        """
        with self._lock.read():
            faiss.write_index(self._index, str(path))
            return {
                "key": self.spec.key,
                "dim": self.dim,
                "count": self.ntotal,
                "search_params": dict(self.search_params),
                "recall_estimate": self.recall_estimate,
                "tombstones": self._tombstones.copy(),
            }

    def serialize(self) -> np.ndarray:
        with self._lock.read():
            return faiss.serialize_index(self._index)

    @classmethod
    def read(cls, path: str | Path, key: str | None = None, **options: Any) -> VectorIndex:
        """Read a FAISS file written by `write`; `options` as for the constructor."""
        return cls(faiss.read_index(str(path)), key, **options)

    def __repr__(self) -> str:
        return f"VectorIndex({self.spec.key!r}, n={self.ntotal}, d={self.dim}, {self.device})"


def _repeated(ids: np.ndarray) -> np.ndarray:
    s = np.sort(ids)
    return s[1:][s[1:] == s[:-1]]


def neighbour_recall(found: np.ndarray, truth: Sequence[np.ndarray] | np.ndarray) -> float:
    """Recall of an approximate search against the exact one: the share of the exact
    neighbours (`truth`, one id array per query) that the result rows `found` hold."""
    pairs = zip(np.asarray(found).tolist(), truth, strict=True)
    hits = sum(len(set(row).intersection(np.asarray(t).tolist())) for row, t in pairs)
    return hits / max(sum(np.asarray(t).size for t in truth), 1)
