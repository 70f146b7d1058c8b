"""Named errors of the vector store; each message names the bad value.

`index` never imports `retrieval`, so these have their own base class,
`IndexStoreError`; the API layer turns them into 4xx responses.
"""

from __future__ import annotations

from pathlib import Path


class IndexStoreError(Exception):
    """Base class of the index layer's errors."""


class UnsupportedIndexKey(IndexStoreError, ValueError):
    """A factory string outside the families this layer knows how to manage."""

    def __init__(self, key: str, reason: str):
        self.key = key
        super().__init__(f"unsupported index key {key!r}: {reason}")


class MemoryBudgetError(IndexStoreError):
    """Not even the most compact index type fits the memory budget."""

    def __init__(self, n: int, d: int, mem_bytes: int, smallest: int):
        self.n, self.d, self.mem_bytes, self.smallest = n, d, mem_bytes, smallest
        super().__init__(
            f"{n:,} vectors of dimension {d} need at least {smallest:,} bytes "
            f"(the most compact index), but the budget is {mem_bytes:,} bytes"
        )


class DimensionMismatch(IndexStoreError, ValueError):
    """Vectors whose width differs from the index's dimension."""

    def __init__(self, what: str, got: int, expected: int):
        self.got, self.expected = got, expected
        super().__init__(f"{what} have dimension {got}, the index has dimension {expected}")


class DuplicateIds(IndexStoreError, ValueError):
    """Adding ids that are already in the index (or repeated in the batch)."""

    def __init__(self, ids: list[int]):
        self.ids = ids
        shown = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
        super().__init__(f"{len(ids)} id(s) already present or repeated: {shown}")


class FilterError(IndexStoreError, ValueError):
    """A catalog filter that names an unknown column or a bad value."""


class IndexFormatError(IndexStoreError):
    """An index folder that is missing, incomplete, or of another format."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"index folder {self.path}: {reason}")


class EncoderMismatch(IndexFormatError):
    """The index was built by another encoder than the one loaded."""

    def __init__(self, path: str | Path, found: str, expected: str):
        self.found, self.expected = found, expected
        super().__init__(
            path,
            f"built by encoder {found!r}, but the loaded encoder is {expected!r}; "
            "re-index the cohort with this encoder (`fundus2video index`)",
        )
