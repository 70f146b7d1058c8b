"""A pytest plugin that runs engine and API suites over Milvus Lite instead of FAISS:

    OMP_NUM_THREADS=1 .venv/bin/pytest -p tests.milvus_plugin tests/test_api.py

The first `Engine.open` of each index folder path turns that folder, in place, into a
Milvus-backed one (`index.milvus`: fresh collections in one Milvus Lite file per
session, the same vectors, catalog and media), so each copy a test makes (even of a
folder already turned) has its own collections; later opens of the same path (a
restart) take it as it is. Needs pymilvus (the `scale` extra); without it the plugin
does nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

WORKDIR = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    try:
        import pymilvus  # noqa: F401
    except ImportError:
        return
    from retrieval.search.engine import Engine

    opened = Engine.open.__func__
    workdir = Path(tempfile.mkdtemp(prefix="milvus-plugin-"))
    config.stash[WORKDIR] = workdir
    uri = str(workdir / "lite.db")

    converted: set[Path] = set()

    def open_over_milvus(cls, path, **kwargs):
        if Path(path).resolve() not in converted:
            to_milvus(Path(path), uri)
            converted.add(Path(path).resolve())
        return opened(cls, path, **kwargs)

    Engine.open = classmethod(open_over_milvus)


def to_milvus(path: Path, uri: str) -> None:
    """The index folder `path` rewritten with its vectors in new Milvus collections."""
    from index import MilvusTarget
    from index.milvus import copy_to_milvus

    keep = ("media",) if (path / "media").is_dir() else ()
    copy_to_milvus(path, path, MilvusTarget(uri, prefix="plugin"), keep=keep)


def pytest_unconfigure(config: pytest.Config) -> None:
    workdir = config.stash.get(WORKDIR, None)
    if workdir is None:
        return
    from index.milvus import close_clients

    close_clients()
    shutil.rmtree(workdir, ignore_errors=True)
