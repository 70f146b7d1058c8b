"""Vector-store backends: what a search needs of one modality's vectors, and where they live.

`VectorStore` is the interface the engine uses of `IndexFolder.indexes[modality]`: add
vectors under int64 row ids, remove ids, search k with an optional set of allowed ids,
count, dimension, stored vectors, stats. Two backends implement it:

| backend  | class                       | the vectors live                          |
|----------|-----------------------------|-------------------------------------------|
| `faiss`  | `index.VectorIndex`         | in the process; `<modality>.faiss` files  |
| `milvus` | `index.milvus.MilvusIndex`  | one Milvus collection per modality        |

FAISS is the default and is used as it is (no wrapper, no per-query cost). The index
folder records each modality's backend in its manifest; `load_index_folder` opens
whichever it names. `milvus` needs the `scale` extra (pymilvus); nothing here imports it.

Filters. `IndexFolder.allowed_ids` gives the catalog rows a filter allows. For a store
that filters in its own query language (`filters_inside`), those ids come as
`FilteredIds`: the same int64 array, carrying the filter itself, so the store can
apply `diagnosis in [...]` inside its search instead of a list of ids.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import IndexStoreError

BACKENDS = ("faiss", "milvus")
DEFAULT_BACKEND = "faiss"
TOKEN_ENV = "FUNDUS2VIDEO_MILVUS_TOKEN"  # the Milvus token at serve time (never in a manifest)
DEFAULT_PREFIX = "fundus2video"
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")


class BackendError(IndexStoreError):
    """A vector-store backend that is unknown, not installed, or cannot be reached."""


class LiveIds:
    """The introspection every store shares: the key of its `spec` and its sorted live
    ids `_ids` (`VectorIndex`, `index.milvus.MilvusIndex`)."""

    spec: Any
    _ids: np.ndarray

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def ntotal(self) -> int:
        """Live vectors (tombstones excluded)."""
        return int(self._ids.size)

    def __len__(self) -> int:
        return self.ntotal

    def ids(self) -> np.ndarray:
        """Sorted live ids."""
        return self._ids.copy()


@runtime_checkable
class VectorStore(Protocol):
    """One modality's vectors under int64 row ids (see the module docstring)."""

    dim: int
    search_params: dict[str, int]
    recall_estimate: float | None

    @property
    def key(self) -> str: ...  # the index type as a FAISS factory string ("HNSW32")

    @property
    def ntotal(self) -> int: ...

    @property
    def tombstones(self) -> np.ndarray: ...

    @property
    def device(self) -> str: ...

    def __len__(self) -> int: ...

    def add(self, vectors: Any, ids: Any) -> None: ...

    def remove(self, ids: Any) -> int: ...

    def search(self, queries: Any, k: int, *, allowed: Any = None) -> tuple[Any, Any]: ...

    def ids(self) -> np.ndarray: ...

    def vector(self, id: int) -> np.ndarray: ...

    def reconstruct(self, ids: Any) -> np.ndarray: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class MilvusTarget:
    """Where a `milvus` index goes: a Milvus URI (`http://host:19530`, or a local Milvus
    Lite file `*.db`), its token (never written anywhere) and the collections' prefix."""

    uri: str
    token: str | None = field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.uri:
            raise BackendError("a Milvus URI is needed (--uri): http://host:19530 or FILE.db")
        if not _PREFIX.fullmatch(self.prefix):
            raise BackendError(
                f"Milvus collection prefix must be a letter or _ then letters, digits or _, "
                f"got {self.prefix!r}"
            )
        if is_local_uri(self.uri) and not self.uri.endswith(".db"):
            raise BackendError(
                f"a local Milvus Lite URI is a file ending in .db, got {self.uri!r} "
                "(a server is http://host:19530)"
            )

    @classmethod
    def from_env(cls, uri: str, prefix: str = DEFAULT_PREFIX) -> MilvusTarget:
        """The target with the token taken from `FUNDUS2VIDEO_MILVUS_TOKEN` (if set)."""
        return cls(uri, os.environ.get(TOKEN_ENV) or None, prefix)


def is_local_uri(uri: str) -> bool:
    """A Milvus Lite file rather than a server address."""
    return "://" not in uri


class FilteredIds(np.ndarray):
    """Allowed row ids (a plain int64 array to every reader) with the catalog filter that
    chose them: `filters` maps a catalog column to the values it may take."""

    filters: dict[str, list[Any]] | None

    def __array_finalize__(self, obj: Any) -> None:
        self.filters = getattr(obj, "filters", None)


def filtered_ids(ids: np.ndarray, filters: Mapping[str, Any]) -> FilteredIds:
    """`ids` as a FilteredIds carrying `filters` (scalars become one-value lists)."""
    out = np.asarray(ids, np.int64).view(FilteredIds)
    out.filters = {c: as_values(v) for c, v in filters.items() if v is not None}
    return out


def as_values(value: Any) -> list[Any]:
    """A filter's value as a list: a scalar means equality, a collection any of."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    return list(value) if isinstance(value, list | tuple) else [value]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def build_store(
    vectors: Any,
    ids: Any,
    *,
    modality: str,
    backend: str = DEFAULT_BACKEND,
    milvus: MilvusTarget | None = None,
    encoder_id: str = "",
    catalog: Any = None,
    **options: Any,
) -> VectorStore:
    """One modality's store of `vectors` under `ids` in `backend`: `VectorIndex.build`, or
    a new Milvus collection at `milvus` holding `catalog`'s filter columns too."""
    if check_backend(backend) == "faiss":
        from .vector_index import VectorIndex

        return VectorIndex.build(vectors, ids, **options)
    if milvus is None:
        raise BackendError("the milvus backend needs a Milvus URI (--uri)")
    from .milvus import MilvusIndex

    return MilvusIndex.build(
        vectors,
        ids,
        target=milvus,
        modality=modality,
        encoder_id=encoder_id,
        catalog=catalog,
        **options,
    )
