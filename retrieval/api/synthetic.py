"""Short-lived, in-memory store of synthesized query videos (never written to disk).

A search through synthesis keeps the SYNTHETIC-marked frames here under a random
token; `GET /synthetic/{token}` encodes them (once) as MP4. Entries expire after a
TTL and the oldest go first when the store is full.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from retrieval.data.media_write import mp4_bytes


@dataclass
class SyntheticEntry:
    frames: np.ndarray  # uint8 (T, S, S), marked SYNTHETIC
    times_s: np.ndarray  # (T,)
    created: float
    mp4: bytes | None = None


class SyntheticStore:
    def __init__(self, capacity: int = 64, ttl_s: float = 600.0):
        self.capacity, self.ttl_s = capacity, ttl_s
        self._entries: OrderedDict[str, SyntheticEntry] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, frames: np.ndarray, times_s: np.ndarray) -> str:
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._expire()
            self._entries[token] = SyntheticEntry(frames, times_s, time.monotonic())
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return token

    def get(self, token: str) -> SyntheticEntry | None:
        with self._lock:
            self._expire()
            return self._entries.get(token)

    def mp4(self, token: str) -> tuple[bytes, SyntheticEntry] | None:
        entry = self.get(token)
        if entry is None:
            return None
        if entry.mp4 is None:
            entry.mp4 = mp4_bytes(entry.frames)  # racing threads encode the same bytes
        return entry.mp4, entry

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            token, entry = next(iter(self._entries.items()))
            if now - entry.created < self.ttl_s:
                break
            del self._entries[token]

    def __len__(self) -> int:
        return len(self._entries)
