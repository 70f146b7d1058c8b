"""Index folders: one FAISS file per modality, the catalog, and `manifest.json`.

```
INDEX/
  manifest.json          format_version, encoder_id, dim, counts, keys, files
  catalog.parquet        one row per case; `row_id` (int64) = the ids in the indexes
  cf.faiss, ffa.faiss    the CPU indexes (GPU copies are never saved)
  cf.tombstones.npy      HNSW only, when removed ids await a compaction
```

The manifest records each modality's backend (`index.backend`): `faiss` (the files
above; a manifest without one is FAISS) or `milvus`, whose vectors live in a Milvus
collection that the manifest names with its URI (never a token); such a folder holds
the manifest and the catalog alone.

A folder is always written whole into a temporary sibling and renamed into place
(`index.atomic.atomic_dir`), so an interrupted write leaves the previous folder
loadable. Entries the caller keeps inside the folder besides these (`keep=`, e.g. a
`media/` subfolder) are carried into each rewrite by hard links. Updating in place is
the same operation: mutate the loaded indexes, then `IndexFolder.save()`. Loading
checks the manifest, the format version, the encoder, file sizes, dimensions and
counts before anything is searched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl

from .atomic import atomic_dir, recover_dir
from .backend import DEFAULT_BACKEND, VectorStore, filtered_ids
from .errors import EncoderMismatch, FilterError, IndexFormatError, IndexStoreError
from .vector_index import VectorIndex

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CATALOG_NAME = "catalog.parquet"
ROW_ID = "row_id"
_MODALITY = re.compile(r"[a-z0-9_]+")


def with_row_ids(catalog: pl.DataFrame) -> pl.DataFrame:
    """The catalog with an int64 `row_id` column (0..n-1 added when missing)."""
    if ROW_ID in catalog.columns:
        return catalog.with_columns(pl.col(ROW_ID).cast(pl.Int64))
    return catalog.with_row_index(ROW_ID).with_columns(pl.col(ROW_ID).cast(pl.Int64))


def catalog_allowed_ids(
    catalog: pl.DataFrame, filters: Mapping[str, Any] | None
) -> np.ndarray | None:
    """Row ids of catalog rows matching every filter; None when nothing filters.

    `{"diagnosis": "PDR", "eye": "OD", "split": ["val", "test"]}`: a scalar means
    equality, a list/tuple/set means any of; on a list column (`lesions`) a row
    matches when it contains any of the values. `None` values are ignored.
    """
    active = {c: v for c, v in (filters or {}).items() if v is not None}
    if not active:
        return None
    catalog = with_row_ids(catalog)
    exprs = []
    for column, value in active.items():
        if column not in catalog.columns or column == ROW_ID:
            raise FilterError(
                f"unknown filter {column!r}; the catalog has {sorted(catalog.columns)}"
            )
        values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
        if isinstance(catalog.schema[column], pl.List):
            exprs.append(pl.col(column).list.eval(pl.element().is_in(values)).list.any())
        else:
            exprs.append(pl.col(column).is_in(values))
    try:
        rows = catalog.filter(pl.all_horizontal(exprs).fill_null(False))
    except pl.exceptions.PolarsError as err:
        raise FilterError(f"bad filter value in {active}: {err}") from err
    ids = np.unique(rows[ROW_ID].to_numpy().astype(np.int64))
    ids.flags.writeable = False  # a store may keep what it derives from it (VectorIndex)
    return ids


@dataclass
class IndexFolder:
    """A loaded index folder: indexes per modality, catalog, manifest."""

    path: Path
    indexes: dict[str, VectorStore]  # VectorIndex (faiss) or index.milvus.MilvusIndex
    catalog: pl.DataFrame
    encoder_id: str
    extra: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def allowed_ids(self, filters: Mapping[str, Any] | None) -> np.ndarray | None:
        """`catalog_allowed_ids`; as `FilteredIds` when a store filters in its own terms."""
        ids = catalog_allowed_ids(self.catalog, filters)
        if ids is None or not any(
            getattr(s, "filters_inside", False) for s in self.indexes.values()
        ):
            return ids
        return filtered_ids(ids, filters or {})

    @property
    def backend(self) -> str:
        """The backend of its stores: "faiss" or "milvus"."""
        return next(iter(self.indexes.values())).stats().get("backend", DEFAULT_BACKEND)

    def add_rows(self, vectors: Mapping[str, Any], rows: pl.DataFrame) -> None:
        """Add catalog `rows` (with `row_id`) and their vectors (one (n, d) array per
        modality, in the rows' order); a store that keeps catalog fields gets the rows."""
        ids = rows[ROW_ID].to_numpy().astype(np.int64)
        for modality, vecs in vectors.items():
            store = self.indexes[modality]
            if getattr(store, "filters_inside", False):
                store.add(vecs, ids, rows=rows)
            else:
                store.add(vecs, ids)
        self.catalog = pl.concat([self.catalog, rows])

    def search(
        self,
        modality: str,
        queries: Any,
        k: int,
        *,
        filters: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`(D, I)` from one modality's index; `I` are catalog row ids."""
        if modality not in self.indexes:
            raise KeyError(f"no {modality!r} index; this folder has {sorted(self.indexes)}")
        return self.indexes[modality].search(queries, k, allowed=self.allowed_ids(filters))

    def save(self, path: str | Path | None = None, *, keep: Sequence[str] = ()) -> Path:
        """Write the folder (in place by default), atomically; `keep` as for save_index_folder."""
        target = Path(path) if path is not None else self.path
        self.manifest = save_index_folder(
            target, self.indexes, self.catalog, self.encoder_id, self.extra, keep=keep
        )
        self.path = target
        return target

    def stats(self) -> dict[str, Any]:
        return {
            "encoder_id": self.encoder_id,
            "catalog_rows": self.catalog.height,
            "modalities": {m: vi.stats() for m, vi in self.indexes.items()},
        }


def save_index_folder(
    path: str | Path,
    indexes: Mapping[str, VectorStore],
    catalog: pl.DataFrame,
    encoder_id: str,
    extra: Mapping[str, Any] | None = None,
    *,
    keep: Sequence[str] = (),
) -> dict[str, Any]:
    """Write `path` (replacing any previous folder only once complete); returns the manifest.

    `keep` names entries (files or subfolders) of the folder now at `path` that the
    new one carries over unchanged: hard-linked (copied where links fail), so they
    stay the same files and a rewrite costs nothing for them.
    """
    if not isinstance(encoder_id, str) or not encoder_id:
        raise ValueError(f"encoder_id must be a non-empty string, got {encoder_id!r}")
    if not indexes:
        raise ValueError("an index folder needs at least one modality")
    for modality in indexes:
        if not _MODALITY.fullmatch(modality):
            raise ValueError(f"modality names are [a-z0-9_]+, got {modality!r}")
    dims = {m: vi.dim for m, vi in indexes.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"all modalities must share one dimension, got {dims}")
    catalog = with_row_ids(catalog)
    row_ids = _row_ids(catalog, path)
    reserved = {CATALOG_NAME, MANIFEST_NAME}
    for name in keep:
        if (
            not name
            or Path(name).name != name
            or name in reserved
            or name.endswith((".faiss", ".npy"))
        ):
            raise ValueError(f"keep names entries of the folder itself, got {name!r}")
    with atomic_dir(path, overwrite=True) as tmp:
        for name in keep:
            _carry(Path(path) / name, tmp / name)
        modalities: dict[str, Any] = {}
        for modality, vi in indexes.items():
            modalities[modality] = _write_modality(tmp, modality, vi, row_ids)
        catalog.write_parquet(tmp / CATALOG_NAME)
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder_id": encoder_id,
            "dim": next(iter(dims.values())),
            "metric": "inner_product",
            "backend": _backend(modalities),
            "counts": {m: meta["count"] for m, meta in modalities.items()},
            "index_keys": {m: meta["key"] for m, meta in modalities.items()},
            "catalog_rows": catalog.height,
            "modalities": modalities,
            "extra": dict(extra or {}),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_manifest(tmp / MANIFEST_NAME, manifest)
    log.info("wrote index folder %s (%s)", path, manifest["counts"])
    return manifest


def _carry(src: Path, dst: Path) -> None:
    """Hard-link `src` (a file, or a folder recursively) to `dst`; copy where links fail."""
    if not src.exists():
        return
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _backend(modalities: Mapping[str, dict[str, Any]]) -> str:
    backends = {meta.get("backend", DEFAULT_BACKEND) for meta in modalities.values()}
    if len(backends) != 1:
        raise ValueError(f"all modalities must share one backend, got {sorted(backends)}")
    return backends.pop()


def _write_modality(tmp: Path, modality: str, vi: VectorStore, row_ids: np.ndarray) -> dict:
    live = vi.ids()
    if not np.isin(live, row_ids).all():
        missing = live[~np.isin(live, row_ids)][:10].tolist()
        raise IndexStoreError(f"{modality} index holds ids absent from the catalog: {missing}")
    if not isinstance(vi, VectorIndex):
        return vi.manifest_entry()  # the vectors live elsewhere (index.milvus)
    file = tmp / f"{modality}.faiss"
    written = vi.write(file)
    tombstones = written.pop("tombstones")
    meta = {"file": file.name, "bytes": file.stat().st_size, **written}
    meta["tombstones_file"] = None
    if tombstones.size:
        meta["tombstones_file"] = f"{modality}.tombstones.npy"
        np.save(tmp / meta["tombstones_file"], tombstones)
    return meta


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _row_ids(catalog: pl.DataFrame, path: str | Path) -> np.ndarray:
    ids = catalog[ROW_ID].to_numpy()
    if catalog[ROW_ID].null_count() or np.unique(ids).size != ids.size:
        raise IndexFormatError(path, f"catalog column {ROW_ID!r} must be unique and non-null")
    return np.sort(ids.astype(np.int64))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an index folder, with its format version checked."""
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise IndexFormatError(path, f"no {MANIFEST_NAME} (not an index folder, or incomplete)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFormatError(path, f"unreadable {MANIFEST_NAME}: {err}") from err
    if not isinstance(manifest, dict):
        raise IndexFormatError(path, f"{MANIFEST_NAME} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            path, f"format version {version!r}; this code reads version {FORMAT_VERSION}"
        )
    for name in ("encoder_id", "dim", "counts", "catalog_rows", "modalities"):
        if name not in manifest:
            raise IndexFormatError(path, f"{MANIFEST_NAME} lacks {name!r}")
    return manifest


def load_index_folder(
    path: str | Path,
    expected_encoder_id: str | None = None,
    *,
    use_gpu: bool | None = None,
) -> IndexFolder:
    """Load and verify an index folder; refuse one built by another encoder."""
    path = Path(path)
    recover_dir(path)
    if not path.is_dir():
        raise IndexFormatError(path, "no such folder")
    manifest = read_manifest(path)
    encoder_id = manifest["encoder_id"]
    if expected_encoder_id is not None and encoder_id != expected_encoder_id:
        raise EncoderMismatch(path, encoder_id, expected_encoder_id)
    try:
        catalog = pl.read_parquet(path / CATALOG_NAME)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise IndexFormatError(path, f"unreadable {CATALOG_NAME}: {err}") from err
    if catalog.height != manifest["catalog_rows"] or ROW_ID not in catalog.columns:
        raise IndexFormatError(
            path,
            f"{CATALOG_NAME} has {catalog.height} rows (manifest: {manifest['catalog_rows']})"
            f" and {'a' if ROW_ID in catalog.columns else 'no'} {ROW_ID!r} column",
        )
    row_ids = _row_ids(catalog, path)
    indexes = {
        m: _open_modality(path, m, meta, manifest, row_ids, use_gpu)
        for m, meta in manifest["modalities"].items()
    }
    return IndexFolder(
        path, indexes, catalog, encoder_id, dict(manifest.get("extra") or {}), manifest
    )


def _open_modality(
    path: Path,
    modality: str,
    meta: dict[str, Any],
    manifest: dict[str, Any],
    row_ids: np.ndarray,
    use_gpu: bool | None,
) -> VectorStore:
    """One modality's store, of the backend its manifest entry names."""
    backend = meta.get("backend", DEFAULT_BACKEND) if isinstance(meta, dict) else None
    if backend == DEFAULT_BACKEND:
        return _load_modality(path, modality, meta, manifest, row_ids, use_gpu)
    if backend != "milvus":
        raise IndexFormatError(path, f"{modality}: unknown backend {backend!r}")
    from .milvus import MilvusIndex  # pymilvus only for Milvus folders

    if meta.get("dim") != manifest["dim"]:
        raise IndexFormatError(
            path, f"{modality} has dimension {meta.get('dim')}, manifest {manifest['dim']}"
        )
    try:
        return MilvusIndex.open(meta, encoder_id=manifest["encoder_id"], row_ids=row_ids, path=path)
    except (KeyError, TypeError) as err:
        raise IndexFormatError(path, f"malformed manifest entry {modality!r}: {err!r}") from err


def _load_modality(
    path: Path,
    modality: str,
    meta: dict[str, Any],
    manifest: dict[str, Any],
    row_ids: np.ndarray,
    use_gpu: bool | None,
) -> VectorIndex:
    try:
        file = path / meta["file"]
        if not file.is_file() or file.stat().st_size != meta["bytes"]:
            found = file.stat().st_size if file.is_file() else "missing"
            raise IndexFormatError(
                path, f"{meta['file']}: {found} bytes, manifest says {meta['bytes']}"
            )
        tombstones = None
        if meta.get("tombstones_file"):
            tombstones = np.load(path / meta["tombstones_file"], allow_pickle=False)
        vi = VectorIndex(
            faiss.read_index(str(file)),
            meta["key"],
            search_params=meta.get("search_params"),
            tombstones=tombstones,
            use_gpu=use_gpu,
            recall_estimate=meta.get("recall_estimate"),
        )
    except (KeyError, TypeError) as err:
        raise IndexFormatError(path, f"malformed manifest entry {modality!r}: {err!r}") from err
    except (OSError, RuntimeError, ValueError) as err:  # FAISS read errors are RuntimeError
        raise IndexFormatError(path, f"{modality}: {err}") from err
    if vi.dim != manifest["dim"]:
        raise IndexFormatError(
            path, f"{modality} has dimension {vi.dim}, manifest {manifest['dim']}"
        )
    if vi.ntotal != manifest["counts"].get(modality):
        raise IndexFormatError(
            path,
            f"{modality} holds {vi.ntotal} vectors, manifest {manifest['counts'].get(modality)}",
        )
    if not np.isin(vi.ids(), row_ids).all():
        raise IndexFormatError(path, f"{modality} holds ids absent from {CATALOG_NAME}")
    return vi
