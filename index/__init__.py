"""Vector store: FAISS indexes (GPU/CPU) or Milvus collections, the case catalog, persistence.

Knows nothing about images or models: numpy vectors in, `(D, I)` out. The Milvus
backend (`index.milvus`) imports pymilvus only when used.
"""

from .atomic import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text
from .backend import (
    BACKENDS,
    TOKEN_ENV,
    BackendError,
    FilteredIds,
    MilvusTarget,
    VectorStore,
    build_store,
)
from .errors import (
    DimensionMismatch,
    DuplicateIds,
    EncoderMismatch,
    FilterError,
    IndexFormatError,
    IndexStoreError,
    MemoryBudgetError,
    UnsupportedIndexKey,
)
from .folder import (
    FORMAT_VERSION,
    ROW_ID,
    IndexFolder,
    catalog_allowed_ids,
    load_index_folder,
    read_manifest,
    save_index_folder,
    with_row_ids,
)
from .gpu import gpu_count
from .keys import (
    IndexSpec,
    choose_index_key,
    choose_nlist,
    default_memory_budget,
    estimate_index_bytes,
    parse_index_key,
)
from .snapshot import Snapshot, SnapshotError, snapshot_index_folder
from .vector_index import VectorIndex, neighbour_recall

__all__ = [
    "BACKENDS",
    "TOKEN_ENV",
    "BackendError",
    "FilteredIds",
    "MilvusTarget",
    "VectorStore",
    "build_store",
    "neighbour_recall",
    "FORMAT_VERSION",
    "ROW_ID",
    "DimensionMismatch",
    "DuplicateIds",
    "EncoderMismatch",
    "FilterError",
    "IndexFolder",
    "IndexFormatError",
    "IndexSpec",
    "IndexStoreError",
    "MemoryBudgetError",
    "UnsupportedIndexKey",
    "VectorIndex",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "catalog_allowed_ids",
    "choose_index_key",
    "choose_nlist",
    "default_memory_budget",
    "estimate_index_bytes",
    "gpu_count",
    "load_index_folder",
    "parse_index_key",
    "read_manifest",
    "save_index_folder",
    "Snapshot",
    "SnapshotError",
    "snapshot_index_folder",
    "with_row_ids",
]
