"""`MilvusIndex`: one modality's vectors in a Milvus collection, as a `VectorStore`.

Numpy in, `(D, I)` out, padded like `VectorIndex` (id -1, score -FLT_MAX). pymilvus
(the `scale` extra) is imported on first use, never at import time.

Collection. One per modality, named `{prefix}_{modality}_{build}` (a fresh one per
build, so rebuilding never disturbs a served index; the manifest names it): an int64
primary key `row_id` (= the catalog's row ids, stable), the float vector, and the
catalog's filter columns as scalar fields (`SCALAR_FIELDS` that the catalog has:
strings as nullable VARCHAR, string lists such as `lesions` as nullable
ARRAY<VARCHAR>). Its properties hold the encoder id, the index folder format version
and the modality; opening checks them as the FAISS loader checks the manifest.

Filters. A `FilteredIds` whose columns are all scalar fields becomes a Milvus boolean
expression (`diagnosis in ["PDR"] and ARRAY_CONTAINS_ANY(lesions, ["leakage"])`)
applied inside the search; any other allowed-id set becomes `row_id in [...]`.

Index type. The rules of `index.keys` (`choose_index_key`, never a GPU key): `Flat`
→ FLAT below `FLAT_MAX` vectors, `HNSW{M}` → HNSW (M, efConstruction; `ef` at
search), `IVF{nlist},Flat` → IVF_FLAT (nlist; `nprobe`), `IVF{nlist},SQ8` → IVF_SQ8.
IVF-PQ becomes IVF_PQ on a server; Milvus Lite has no IVF_PQ (it has FLAT, HNSW,
HNSW_SQ, IVF_FLAT, IVF_SQ8), so there it falls back to IVF_SQ8 and says so (a
warning, and `index_note` in the stats). `ef` / `nprobe` are tuned on a held-out
sample to the same recall target as `VectorIndex.build`.

Consistency with the index folder. Milvus applies an add or a delete at once; the
folder's manifest and catalog follow when it is saved. The catalog is the truth: ids
in the collection that it lacks (an add whose save never happened) are ignored by
searches and counts, and replaced when that id is added again (nothing is deleted on
open: a snapshot of the folder shares the collection). The row ids are mirrored in
memory (sorted int64), so counts, membership and duplicate checks cost no round trip;
one writer per index, as for FAISS.
"""

# ruff: noqa: E741  (D, I as in VectorIndex)
from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
from tqdm import tqdm

from .backend import (
    TOKEN_ENV,
    BackendError,
    FilteredIds,
    LiveIds,
    MilvusTarget,
    is_local_uri,
)
from .errors import (
    DimensionMismatch,
    DuplicateIds,
    EncoderMismatch,
    IndexFormatError,
    IndexStoreError,
)
from .keys import (
    HNSW_EF_CONSTRUCTION,
    IndexSpec,
    choose_index_key,
    default_memory_budget,
    parse_index_key,
)
from .vector_index import (
    EF_LADDER,
    PAD_SCORE,
    TUNE_MARGIN,
    TUNE_QUERIES,
    as_ids,
    as_matrix,
    neighbour_recall,
)

log = logging.getLogger(__name__)

PK = "row_id"
VECTOR = "vector"
SCALAR_FIELDS = ("case_id", "patient_id", "eye", "diagnosis", "split", "lesions", "source")
VARCHAR_MAX = 1024
ARRAY_CAPACITY = 256
INSERT_CHUNK = 4096
GET_CHUNK = 1024
MAX_TOPK = 16384  # Milvus's largest limit
FILTERED_EF_MAX = EF_LADDER[-1]
PROPERTY = "fundus2video."  # prefix of the collection properties this module writes
DEFAULT_SEARCH = {"HNSW": {"ef": 64}, "IVF_FLAT": {"nprobe": 16}, "IVF_SQ8": {"nprobe": 16}}

_clients: dict[tuple[str, str | None], Any] = {}
_clients_lock = threading.Lock()


def client_for(uri: str, token: str | None = None) -> Any:
    """A MilvusClient for `uri` (one per URI and token in this process, shared)."""
    try:
        from pymilvus import MilvusClient
    except ImportError as err:
        raise BackendError(
            "the milvus backend needs pymilvus: pip install 'fundus2video[scale]'"
        ) from err
    with _clients_lock:
        client = _clients.get((uri, token))
        if client is None:
            try:
                client = MilvusClient(uri=uri, token=token or "")
            except Exception as err:  # pymilvus raises MilvusException or connection errors
                raise BackendError(f"cannot connect to Milvus at {uri}: {err}") from err
            _clients[(uri, token)] = client
        return client


def close_clients() -> None:
    """Close every client this process opened and stop the Milvus Lite servers behind
    them (their files are then complete and free; otherwise that happens at exit)."""
    with _clients_lock:
        for client in _clients.values():
            client.close()
        lite = [uri for uri, _ in _clients if is_local_uri(uri)]
        _clients.clear()
    if lite:
        from milvus_lite import server_manager_instance

        for uri in lite:
            server_manager_instance.release_server(uri)


def milvus_index(spec: IndexSpec, *, lite: bool) -> tuple[str, dict[str, int], str | None]:
    """(Milvus index type, build params, a note when it differs from `spec`)."""
    if spec.kind == "flat":
        return "FLAT", {}, None
    if spec.kind == "hnsw":
        return "HNSW", {"M": spec.hnsw_m, "efConstruction": HNSW_EF_CONSTRUCTION}, None
    if spec.kind == "ivf_flat":
        return "IVF_FLAT", {"nlist": spec.nlist}, None
    if spec.kind == "ivf_sq8" or lite:
        note = (
            None if spec.kind == "ivf_sq8" else f"Milvus Lite has no IVF_PQ: IVF_SQ8 for {spec.key}"
        )
        return "IVF_SQ8", {"nlist": spec.nlist}, note
    return "IVF_PQ", {"nlist": spec.nlist, "m": spec.pq_m, "nbits": spec.pq_nbits}, None


def scalar_fields(catalog: pl.DataFrame | None) -> dict[str, str]:
    """The catalog's filter columns this collection stores: name → "string" or "array"."""
    fields: dict[str, str] = {}
    for name in SCALAR_FIELDS if catalog is not None else ():
        dtype = catalog.schema.get(name)
        if dtype == pl.String:
            fields[name] = "string"
        elif isinstance(dtype, pl.List) and dtype.inner == pl.String:
            fields[name] = "array"
    return fields


def filter_expression(filters: dict[str, list[Any]], fields: dict[str, str]) -> str | None:
    """The Milvus boolean expression of catalog `filters`; None when a column is not stored."""
    parts = []
    for column, values in filters.items():
        kind = fields.get(column)
        if kind is None:
            return None
        literal = "[" + ", ".join(json.dumps(str(v), ensure_ascii=False) for v in values) + "]"
        if kind == "array":
            parts.append(f"ARRAY_CONTAINS_ANY({column}, {literal})")
        else:
            parts.append(f"{column} in {literal}")
    return " and ".join(parts)


def _schema(dim: int, fields: dict[str, str]) -> Any:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(PK, DataType.INT64, is_primary=True)
    schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
    for name, kind in fields.items():
        if kind == "string":
            schema.add_field(name, DataType.VARCHAR, max_length=VARCHAR_MAX, nullable=True)
        else:
            schema.add_field(
                name,
                DataType.ARRAY,
                element_type=DataType.VARCHAR,
                max_capacity=ARRAY_CAPACITY,
                max_length=VARCHAR_MAX,
                nullable=True,
            )
    return schema


def _row_values(rows: pl.DataFrame | None, ids: np.ndarray, fields: dict[str, str]) -> list[dict]:
    """The scalar fields of `ids` in order, from `rows` (a catalog slice with `row_id`)."""
    if not fields:
        return [{} for _ in ids]
    if rows is None:
        return [dict.fromkeys(fields) for _ in ids]
    table = rows.select(PK, *fields).unique(PK)
    by_id = {r[PK]: r for r in table.iter_rows(named=True)}
    missing = [int(i) for i in ids if int(i) not in by_id]
    if missing:
        raise IndexStoreError(f"ids without a catalog row: {missing[:10]}")
    return [{f: by_id[int(i)][f] for f in fields} for i in ids]


class MilvusIndex(LiveIds):
    """One modality's vectors in a Milvus collection. See the module docstring."""

    filters_inside = True  # FilteredIds become Milvus expressions

    def __init__(self, client: Any, collection: str, meta: dict[str, Any], ids: np.ndarray):
        self._client = client
        self.collection = collection
        self.uri: str = meta["uri"]
        self.dim = int(meta["dim"])
        self.spec = parse_index_key(meta["key"])
        self.index_type: str = meta["index_type"]
        self.index_params: dict[str, int] = dict(meta.get("index_params") or {})
        self.index_note: str | None = meta.get("index_note")
        self.fields: dict[str, str] = dict(meta.get("fields") or {})
        self.fields_complete = bool(meta.get("fields_complete", True))
        self.search_params = dict(meta.get("search_params") or {})
        self.recall_estimate: float | None = meta.get("recall_estimate")
        self.build_timings: dict[str, float] = {}
        self._ids = np.unique(as_ids(ids))
        self._hidden = np.empty(0, np.int64)  # stored ids the catalog lacks: never returned
        self._mutex = threading.Lock()  # one mutation at a time

    # ----------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        vectors: Any,
        ids: Any,
        *,
        target: MilvusTarget,
        modality: str,
        encoder_id: str,
        catalog: pl.DataFrame | None = None,
        key: str | None = None,
        mem_bytes: int | None = None,
        target_recall: float | None = 0.95,
        seed: int = 0,
        progress: bool = False,
    ) -> MilvusIndex:
        """A new collection holding `vectors` (n, d) under `ids`, their catalog rows'
        filter columns, an index chosen as FAISS's is, tuned to `target_recall`. A build
        that fails drops its collection."""
        x = as_matrix(vectors, None, "vectors")
        ids = as_ids(ids, len(x))
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DuplicateIds(values[counts > 1].tolist())
        budget = mem_bytes if mem_bytes is not None else default_memory_budget()
        spec = parse_index_key(key or choose_index_key(len(x), x.shape[1], budget))
        store = cls._create(target, modality, encoder_id, spec, x.shape[1], scalar_fields(catalog))
        try:
            store._fill(x, ids, catalog, target_recall, seed, progress)
        except BaseException:
            store.drop()
            raise
        log.info("built Milvus %s %s over %d vectors", store.index_type, store.collection, len(x))
        return store

    def _fill(self, x, ids, catalog, target_recall: float | None, seed: int, progress: bool):
        """Insert, index, tune on a held-out sample (as `VectorIndex.build`), insert it."""
        rng = np.random.default_rng(seed)
        n_hold = 0 if target_recall is None or self.spec.exact else min(TUNE_QUERIES, len(x) // 10)
        held = np.zeros(len(x), bool)
        held[rng.choice(len(x), n_hold, replace=False)] = True
        t0 = time.perf_counter()
        self._insert(x[~held], ids[~held], catalog, progress)
        t1 = time.perf_counter()
        self._create_index()
        t2 = time.perf_counter()
        if n_hold:
            self._tune_on_held_out(x, ids, held, target_recall)
            self._insert(x[held], ids[held], catalog, False)
        self.build_timings = {
            "add_s": t1 - t0,
            "index_s": t2 - t1,
            "tune_s": time.perf_counter() - t2,
        }

    @classmethod
    def _create(
        cls,
        target: MilvusTarget,
        modality: str,
        encoder_id: str,
        spec: IndexSpec,
        dim: int,
        fields: dict[str, str],
    ) -> MilvusIndex:
        """An empty collection for `modality` (properties: encoder id, format, modality)."""
        from .folder import FORMAT_VERSION

        lite = is_local_uri(target.uri)
        uri = str(Path(target.uri).resolve()) if lite else target.uri
        client = client_for(uri, target.token)
        name = f"{target.prefix}_{modality}_{uuid.uuid4().hex[:8]}"
        index_type, params, note = milvus_index(spec, lite=lite)
        if note:
            log.warning("%s: %s", name, note)
        properties = {
            f"{PROPERTY}encoder_id": encoder_id,
            f"{PROPERTY}format_version": str(FORMAT_VERSION),
            f"{PROPERTY}modality": modality,
        }
        _call(client.create_collection, name, schema=_schema(dim, fields), properties=properties)
        meta = {
            "uri": uri,
            "dim": dim,
            "key": spec.key,
            "index_type": index_type,
            "index_params": params,
            "index_note": note,
            "fields": fields,
            "search_params": DEFAULT_SEARCH.get(index_type, {}),
        }
        return cls(client, name, meta, np.empty(0, np.int64))

    def _create_index(self) -> None:
        """Flush what was inserted, index it and load the collection for search."""
        params = self._client.prepare_index_params()
        params.add_index(
            VECTOR, index_type=self.index_type, metric_type="IP", params=self.index_params
        )
        _call(self._client.flush, self.collection)
        # Milvus Lite builds before answering (and has no AllocTimestamp to wait with)
        _call(self._client.create_index, self.collection, params, sync=not is_local_uri(self.uri))
        _call(self._client.load_collection, self.collection)

    def _tune_on_held_out(self, x, ids, held, target_recall: float) -> None:
        """The smallest ef / nprobe whose recall@10 on the held-out rows (exact neighbours
        among the indexed ones) reaches the target plus `TUNE_MARGIN`."""
        q = x[held]
        _, rows = faiss.knn(q, x, min(len(x), 10 + int(held.sum())), faiss.METRIC_INNER_PRODUCT)
        truth = [ids[r[~held[r]]][:10] for r in rows]
        if self.index_type in ("HNSW", "HNSW_SQ"):
            name, ladder = "ef", list(EF_LADDER)
        else:
            nlist = int(self.index_params["nlist"])
            name = "nprobe"
            ladder = sorted({min(2**i, nlist) for i in range(nlist.bit_length() + 1)})
        aim = min(1.0, target_recall + TUNE_MARGIN)
        trials: list[tuple[int, float]] = []
        for value in ladder:
            self.search_params = {name: value}
            trials.append((value, neighbour_recall(self.search(q, 10)[1], truth)))
            if trials[-1][1] >= aim:
                break
        best = max(r for _, r in trials)
        value, recall = next((v, r) for v, r in trials if r >= min(aim, best - 0.005))
        self.search_params, self.recall_estimate = {name: value}, recall
        level = logging.INFO if recall >= target_recall else logging.WARNING
        log.log(level, "%s: %s=%d gives recall@10 %.3f", self.collection, name, value, recall)

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        meta: dict[str, Any],
        *,
        encoder_id: str,
        row_ids: np.ndarray,
        path: str | Path,
        token: str | None = None,
    ) -> MilvusIndex:
        """The collection a manifest entry names, checked (encoder, format, dimension) and
        reconciled with the catalog's `row_ids`; the token from `FUNDUS2VIDEO_MILVUS_TOKEN`."""
        import os

        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        client = client_for(meta["uri"], token)
        name = meta["collection"]
        if not _call(client.has_collection, name):
            raise IndexFormatError(path, f"Milvus collection {name!r} at {meta['uri']} is missing")
        _check_collection(client.describe_collection(name), meta, encoder_id, path)
        _call(client.load_collection, name)
        ids = _all_ids(client, name, lite=is_local_uri(meta["uri"]))
        store = cls(client, name, meta, ids)
        store._hidden = store._ids[~np.isin(store._ids, row_ids)]
        if store._hidden.size:
            log.warning(
                "%s: %d id(s) the catalog lacks (unsaved adds): ignored", name, store._hidden.size
            )
            store._ids = np.setdiff1d(store._ids, store._hidden, assume_unique=True)
        if store.ntotal != meta.get("count"):
            log.warning("%s holds %d vectors, manifest %s", name, store.ntotal, meta.get("count"))
        return store

    # ----------------------------------------------------------------- mutation
    def add(self, vectors: Any, ids: Any, rows: pl.DataFrame | None = None) -> None:
        """Add `vectors` (n, d) under new, unused `ids`; `rows` (catalog rows with `row_id`)
        give their filter fields (without them, filters fall back to id lists)."""
        x = as_matrix(vectors, self.dim, "vectors")
        ids = as_ids(ids, len(x))
        with self._mutex:
            counts = np.unique(ids, return_counts=True)
            dup = np.union1d(ids[np.isin(ids, self._ids)], counts[0][counts[1] > 1])
            if dup.size:
                raise DuplicateIds(sorted(int(i) for i in dup))
            hidden = ids[np.isin(ids, self._hidden)]
            if hidden.size:  # an unsaved add's leftover under this id: replaced
                _call(self._client.delete, self.collection, ids=hidden.tolist())
                self._hidden = np.setdiff1d(self._hidden, hidden, assume_unique=True)
            self._insert(x, ids, rows, False)

    def _insert(self, x: np.ndarray, ids: np.ndarray, rows: Any, progress: bool) -> None:
        values = _row_values(rows, ids, self.fields)
        if rows is None and self.fields:
            self.fields_complete = False
        starts = range(0, len(x), INSERT_CHUNK)
        for start in tqdm(starts, desc=f"milvus {self.collection}", disable=not progress):
            stop = min(start + INSERT_CHUNK, len(x))
            data = [{PK: int(ids[i]), VECTOR: x[i], **values[i]} for i in range(start, stop)]
            _call(self._client.insert, self.collection, data)
            self._ids = np.union1d(self._ids, ids[start:stop])

    def remove(self, ids: Any) -> int:
        """Delete `ids` (unknown ones are ignored); returns how many were removed."""
        ids = np.unique(as_ids(ids))
        with self._mutex:
            present = ids[np.isin(ids, self._ids)]
            if present.size:
                _call(self._client.delete, self.collection, ids=present.tolist())
                self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
            return int(present.size)

    # ------------------------------------------------------------------- search
    def search(self, queries: Any, k: int, *, allowed: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` ids and scores per query row, only among `allowed` ids when given."""
        q = as_matrix(queries, self.dim, "queries")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = int(k)
        D = np.full((len(q), k), PAD_SCORE, np.float32)
        I = np.full((len(q), k), -1, np.int64)
        expr = self._expression(allowed)
        if expr is None or not len(q) or not self._ids.size:
            return D, I
        params = self._params(k, allowed)
        found = _call(
            self._client.search,
            self.collection,
            data=q,
            limit=min(k + self._hidden.size, MAX_TOPK),
            filter=expr,
            output_fields=[PK],
            search_params={"metric_type": "IP", "params": params},
        )
        hidden = set(self._hidden.tolist())
        for row, hits in enumerate(found):
            kept = [h for h in hits if h[PK] not in hidden][:k] if hidden else hits
            for col, hit in enumerate(kept):
                D[row, col], I[row, col] = hit["distance"], hit[PK]
        return D, I

    def _params(self, k: int, allowed: Any) -> dict[str, int]:
        """The search params: HNSW's `ef` divided by the share of ids a filter keeps (a
        filtered graph walk scores about that share of the nodes it visits), capped at
        `FILTERED_EF_MAX`, and never below k (Milvus needs ef >= limit)."""
        params = dict(self.search_params)
        if "ef" in params:
            ef = params["ef"]
            if allowed is not None and self._ids.size:
                share = min(max(np.asarray(allowed).size / self._ids.size, 1e-9), 1.0)
                ef = min(math.ceil(ef / share), max(FILTERED_EF_MAX, ef))
            params["ef"] = max(int(ef), k)
        return params

    def _expression(self, allowed: Any) -> str | None:
        """The search's `filter=`: "" for none, None when nothing is allowed."""
        if allowed is None:
            return ""
        filters = getattr(allowed, "filters", None) if isinstance(allowed, FilteredIds) else None
        if filters and self.fields_complete:
            expr = filter_expression(filters, self.fields)
            if expr is not None:
                return expr if np.asarray(allowed).size else None
        subset = np.unique(as_ids(allowed))
        subset = subset[np.isin(subset, self._ids)]
        if not subset.size:
            return None
        if subset.size == self._ids.size:
            return ""  # every live id: no filter
        return f"{PK} in [{', '.join(map(str, subset.tolist()))}]"

    def vector(self, id: int) -> np.ndarray:
        """The stored vector of one live id, as a (1, d) query."""
        return self.reconstruct([id])

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors (n, d) of live `ids`, in their order."""
        ids = as_ids(ids)
        missing = ids[~np.isin(ids, self._ids)]
        if missing.size:
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        out = np.zeros((ids.size, self.dim), np.float32)
        for start in range(0, ids.size, GET_CHUNK):
            chunk = ids[start : start + GET_CHUNK]
            got = _call(
                self._client.get, self.collection, ids=chunk.tolist(), output_fields=[VECTOR]
            )
            by_id = {int(r[PK]): r[VECTOR] for r in got}
            out[start : start + chunk.size] = [by_id[int(i)] for i in chunk]
        return out

    # ------------------------------------------------------------ introspection
    @property
    def tombstones(self) -> np.ndarray:
        return np.empty(0, np.int64)  # Milvus deletes exactly

    @property
    def device(self) -> str:
        return "milvus"

    def stats(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dim": self.dim,
            "count": self.ntotal,
            "tombstones": 0,
            "device": self.device,
            "device_note": self.index_note,
            "search_params": dict(self.search_params),
            "recall_estimate": self.recall_estimate,
            "build_timings": dict(self.build_timings),
            "filter": "expression" if self.fields_complete and self.fields else "ids",
            "backend": "milvus",
            "collection": self.collection,
            "index_type": self.index_type,
        }

    def manifest_entry(self) -> dict[str, Any]:
        """What the index folder's manifest records of this modality (never the token)."""
        return {
            "backend": "milvus",
            "uri": self.uri,
            "collection": self.collection,
            "key": self.key,
            "index_type": self.index_type,
            "index_params": dict(self.index_params),
            "index_note": self.index_note,
            "fields": dict(self.fields),
            "fields_complete": self.fields_complete,
            "dim": self.dim,
            "count": self.ntotal,
            "search_params": dict(self.search_params),
            "recall_estimate": self.recall_estimate,
        }

    def drop(self) -> None:
        """Drop the collection (its vectors are gone; the index folder no longer opens)."""
        _call(self._client.drop_collection, self.collection)
        self._ids = np.empty(0, np.int64)

    def __repr__(self) -> str:
        return f"MilvusIndex({self.collection!r}, {self.index_type}, n={self.ntotal}, d={self.dim})"


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, a Milvus error re-raised as BackendError naming the call."""
    from pymilvus.exceptions import MilvusException

    try:
        return fn(*args, **kwargs)
    except MilvusException as err:
        what = args[0] if args and isinstance(args[0], str) else ""
        raise BackendError(f"Milvus {fn.__name__} {what}: {err}".replace("  ", " ")) from err


def _check_collection(info: dict[str, Any], meta: dict[str, Any], encoder_id: str, path) -> None:
    """Refuse a collection of another format, encoder or dimension than the manifest's."""
    from .folder import FORMAT_VERSION

    props = info.get("properties") or {}
    version = props.get(f"{PROPERTY}format_version")
    if version != str(FORMAT_VERSION):
        raise IndexFormatError(
            path,
            f"Milvus collection {info['collection_name']!r}: format version {version!r}; "
            f"this code reads version {FORMAT_VERSION}",
        )
    found = props.get(f"{PROPERTY}encoder_id")
    if found != encoder_id:
        raise EncoderMismatch(path, str(found), encoder_id)
    dims = [f["params"].get("dim") for f in info["fields"] if f["name"] == VECTOR]
    if not dims or int(dims[0]) != int(meta["dim"]):
        raise DimensionMismatch(
            f"Milvus collection {info['collection_name']!r}",
            int(dims[0] if dims else 0),
            int(meta["dim"]),
        )


def _all_ids(client: Any, name: str, *, lite: bool) -> np.ndarray:
    """Every primary key of the collection, sorted (Milvus Lite answers one query whole;
    a server pages through a query iterator)."""
    if lite:
        rows = _call(client.query, name, filter=f"{PK} >= 0", output_fields=[PK])
        return np.unique(np.fromiter((r[PK] for r in rows), np.int64, len(rows)))
    iterator = _call(
        client.query_iterator, name, batch_size=INSERT_CHUNK, filter="", output_fields=[PK]
    )
    parts = []
    while batch := iterator.next():
        parts.append(np.fromiter((r[PK] for r in batch), np.int64, len(batch)))
    iterator.close()
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)


def copy_to_milvus(
    src: str | Path,
    out: str | Path,
    target: MilvusTarget,
    *,
    keep: Sequence[str] = (),
    **options: Any,
) -> dict[str, Any]:
    """The index folder `src` as a folder `out` (may be `src` itself) whose vectors live
    in Milvus at `target`: the same vectors (copied, not embedded again), catalog, encoder
    and extra; `keep` as for `save_index_folder`. `options` as for `MilvusIndex.build`;
    returns the new manifest."""
    from .folder import load_index_folder, save_index_folder

    folder = load_index_folder(src, use_gpu=False)
    stores = {}
    for modality, vi in folder.indexes.items():
        ids = vi.ids()
        stores[modality] = MilvusIndex.build(
            vi.reconstruct(ids),
            ids,
            target=target,
            modality=modality,
            encoder_id=folder.encoder_id,
            catalog=folder.catalog,
            **options,
        )
    return save_index_folder(
        out, stores, folder.catalog, folder.encoder_id, folder.extra, keep=keep
    )
