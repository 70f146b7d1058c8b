"""Consistent copies of a live index folder (`snapshot_index_folder`), e.g. for backups.

A server writing the folder never changes its files in place: every update builds a
complete new folder and swaps it in (`index.atomic`), and the swapped-out folder is then
deleted. The only in-place changes are under entries carried by hard links (`media/`):
an add writes its new media there before the swap, a delete removes its media after it.

So a snapshot opens the folder once (one directory handle) and copies everything through
that handle: whatever it reads belongs to the one state that handle names. If the folder
is swapped while the copy runs (the path then names another directory: its inode
changed), or a file vanishes because the swapped-out folder is being deleted, the copy is
thrown away and taken again. A finished copy is loaded and checked (`load_index_folder`:
manifest, sizes, counts, ids) before it is renamed into place (`index.atomic.atomic_dir`),
so OUT is never half-written. Hidden entries (temporary files of a write in progress) are
left out.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_dir
from .errors import IndexFormatError, IndexStoreError
from .folder import load_index_folder, read_manifest

log = logging.getLogger(__name__)


class SnapshotError(IndexStoreError):
    """A snapshot that cannot be taken (bad paths, an existing output, a folder that never
    stays still long enough to copy)."""


@dataclass(frozen=True)
class Snapshot:
    path: Path  # the snapshot folder written
    manifest: dict[str, Any]  # its manifest
    attempts: int  # copies taken (more than 1: the folder changed during a copy)
    files: int  # files copied or linked
    bytes: int  # their total size


class _Changed(Exception):
    """The source folder was swapped or lost a file while it was being copied."""


def snapshot_index_folder(
    index: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    link: bool = False,
    attempts: int = 50,
) -> Snapshot:
    """Copy the index folder `index` (possibly being written by a server) to `out` as one
    consistent state; see the module docstring.

    `link` hard-links the files instead of copying them (same file system only; the
    folder's files are never modified in place, so a linked snapshot stays as taken).
    An existing `out` is refused unless `overwrite`.
    """
    src, out = Path(index), Path(out)
    _check_paths(src, out, overwrite)
    read_manifest(src)  # an index folder at all (names the problem when not)
    for attempt in range(1, attempts + 1):
        try:
            files, size = _copy_once(src, out, overwrite, link)
        except _Changed as why:
            log.info("%s changed during snapshot attempt %d (%s); copying again", src, attempt, why)
            time.sleep(min(0.01 * attempt, 0.2))
            continue
        manifest = read_manifest(out)
        log.info("snapshot of %s written to %s (%d files, attempt %d)", src, out, files, attempt)
        return Snapshot(out, manifest, attempt, files, size)
    raise SnapshotError(f"{src} changed during each of {attempts} snapshot attempts; try again")


def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise SnapshotError(f"index folder {src}: no such folder")
    if out.exists() and not overwrite:
        raise SnapshotError(f"{out} already exists (pass overwrite / --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise SnapshotError(f"{out} exists and is not a folder")
    a, b = src.resolve(), out.resolve()
    if a == b or b.is_relative_to(a) or a.is_relative_to(b):
        raise SnapshotError(f"the snapshot {out} must lie outside the index folder {src}")


def _copy_once(src: Path, out: Path, overwrite: bool, link: bool) -> tuple[int, int]:
    """One copy of `src` through one directory handle into `out` (atomically); raises
    _Changed when `src` was swapped or lost a file meanwhile."""
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        inode = os.fstat(fd).st_ino
        with atomic_dir(out, overwrite=overwrite) as tmp:
            try:
                files, size = _copy_tree(fd, tmp, link)
            except FileNotFoundError as err:
                raise _Changed(f"{err.filename} vanished") from err
            if _inode(src) != inode:
                raise _Changed("the folder was swapped")
            try:
                load_index_folder(tmp)
            except IndexFormatError as err:  # cannot happen to a folder that stayed put
                raise _Changed(str(err)) from err
        return files, size
    finally:
        os.close(fd)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _copy_tree(fd: int, dst: Path, link: bool) -> tuple[int, int]:
    """Every non-hidden file under the directory `fd` into `dst`, keeping the layout."""
    files = size = 0
    for root, dirs, names, root_fd in os.fwalk(".", dir_fd=fd):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        target = dst / root
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name.startswith("."):
                continue
            size += _copy_file(root_fd, name, target / name, link)
            files += 1
    return files, size


def _copy_file(dir_fd: int, name: str, dst: Path, link: bool) -> int:
    """Copy (or hard-link) `name` of directory `dir_fd` to `dst`; returns its size."""
    if link:
        try:
            os.link(name, dst, src_dir_fd=dir_fd, follow_symlinks=False)
            return dst.stat().st_size
        except OSError as err:
            if isinstance(err, FileNotFoundError):
                raise
    src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    with os.fdopen(src_fd, "rb") as fsrc, open(dst, "wb") as fdst:
        shutil.copyfileobj(fsrc, fdst, 1 << 20)
        return fdst.tell()
