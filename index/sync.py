"""A readers-writer lock: many concurrent searches, one exclusive mutation.

FAISS CPU indexes may be searched from several threads at once (search is
const and releases the GIL), but add / remove must not overlap any search. The
lock prefers writers, so a stream of searches cannot starve an update. The
thread holding the write lock may re-enter read() or write().
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._waiting_writers = 0
        self._writer: int | None = None  # thread id of the writer
        self._depth = 0  # re-entries of the writer

    def read(self, blocking: bool = True) -> _ReadGuard:
        """Shared access, as a context manager that gives True. With `blocking=False` it
        gives False at once (holding nothing) when a writer holds or awaits the lock."""
        return _ReadGuard(self, blocking)

    def _acquire_read(self, blocking: bool) -> bool | None:
        """True: acquired; None: the calling thread is the writer (nothing to release)."""
        if self._writer == threading.get_ident():
            return None  # the writer already excludes everyone else
        with self._cond:
            if not blocking and (self._writer is not None or self._waiting_writers):
                return False
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
            return True

    def _release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                    self._cond.notify_all()


class _ReadGuard:
    """`with lock.read():` (a class, not a generator: this runs on every search)."""

    __slots__ = ("_lock", "_blocking", "_held")

    def __init__(self, lock: RWLock, blocking: bool):
        self._lock, self._blocking, self._held = lock, blocking, False

    def __enter__(self) -> bool:
        acquired = self._lock._acquire_read(self._blocking)
        self._held = acquired is True
        return acquired is not False

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._held = False
            self._lock._release_read()
