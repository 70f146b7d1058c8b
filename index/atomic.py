"""Atomic writes: build in a temporary sibling, then rename into place.

Replacing a folder: on Linux the new folder and the old one trade places in one
`renameat2(RENAME_EXCHANGE)` call, so `final` never disappears, even for an
instant, and a concurrent reader (e.g. a server streaming a file from it) always
finds a complete folder. Elsewhere (or on a file system without the call) the old
folder is renamed aside (`.NAME.old-PID`) and the new one renamed in: a crash
between the two renames leaves only the backup, which `recover_dir` (called by
`index.load_index_folder`) renames back.

Durability: before the rename, every file and folder of the new state is flushed to
disk (fsync), and after it the parent folder, so after a power loss the target is the
old or the new state, never a renamed but unwritten one. `FUNDUS2VIDEO_FSYNC=0` turns
the flushes off (a scratch disk, where speed matters more than power loss).

Temporaries are named `.NAME.tmp-PID_HOST_XXXX` (hidden, beside their target). A writer
killed mid-write (SIGKILL, power loss) leaves its temporary behind; the next write of the
same target on the same host removes those whose process no longer runs
(`remove_stale_temporaries`), so crashes do not pile up half-written copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def durable() -> bool:
    """Whether writes are flushed to disk (FUNDUS2VIDEO_FSYNC, default on)."""
    return os.environ.get("FUNDUS2VIDEO_FSYNC", "1").strip().lower() not in ("0", "false", "no")


def fsync_path(path: str | Path) -> None:
    """Flush one file, or one folder's entries, to disk (when `durable()`)."""
    if not durable():
        return
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and folder under `root`, and `root`, to disk (when `durable()`)."""
    if not durable():
        return
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(folder)


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no symbol: glibc < 2.28, musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths atomically; False where the OS or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporaries for a target called `name`."""
    return f".{name}.tmp-{os.getpid()}_{socket.gethostname()}_"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, name: str) -> int:
    """Delete the temporaries of target `name` in `folder` whose writer (a process of this
    host) no longer runs; returns how many. Live writers' temporaries are left alone."""
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp-(\d+)_([^_/]*)_.*")
    host, removed = socket.gethostname(), 0
    for path in Path(folder).glob(f".{name}.tmp-*"):
        found = pattern.fullmatch(path.name)
        if found is None or found.group(2) != host or _pid_running(int(found.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.info("removed %s, left by a writer that was killed", path)
        removed += 1
    return removed


def _backups(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.old-*"))


def recover_dir(final: str | Path) -> bool:
    """Put back a folder that an interrupted replacement left only as its backup.

    Returns True when `final` was missing and its backup was renamed back.
    """
    final = Path(final)
    if final.exists():
        return False
    backups = [p for p in _backups(final) if p.is_dir()]
    if not backups:
        return False
    newest = max(backups, key=lambda p: p.stat().st_mtime)
    newest.rename(final)
    log.warning("%s was missing after an interrupted update; restored it from %s", final, newest)
    return True


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it becomes `final`.

    On any exception the temporary folder is removed and `final` is untouched.
    With `overwrite`, an existing `final` is replaced only after the new one is
    complete: exchanged atomically with it where the OS can, else moved aside; the
    old one is then deleted.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (choose another output folder)")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fsync_tree(tmp)
        if final.exists() and exchange_paths(tmp, final):
            fsync_path(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
            return
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
        tmp.rename(final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path`.

    On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
