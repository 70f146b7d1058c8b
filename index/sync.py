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

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        if self._writer == threading.get_ident():
            yield  # the writer already excludes everyone else
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
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
