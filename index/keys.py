"""Index types as FAISS factory strings, and the pure rules that pick one.

The rules follow autofaiss: exact search while it is cheap, a graph (HNSW) or an
inverted file (IVF) above that, and compressed codes when memory is short.

| n (vectors)          | memory fits       | key                         |
|----------------------|-------------------|-----------------------------|
| < 10k                | raw vectors       | `Flat` (exact)              |
| 10k .. < 1M, CPU     | raw vectors+graph | `HNSW32`                    |
| >= 10k (or on a GPU) | raw vectors       | `IVF{nlist},Flat`           |
| any                  | 1 byte / dim      | `IVF{nlist},SQ8`            |
| any                  | m bytes           | `IVF{nlist},PQ{m}x8`        |

`IVF,SQ8` sits between IVF-Flat and IVF-PQ because product quantisation at any
`m` that saves memory caps recall@10 well below 0.95 on embedding-like vectors
(measured: PQ64x8 on d=256 saturates near 0.75 whatever nprobe), while SQ8 keeps
recall above 0.95 at a quarter of the memory. IVF-PQ is therefore the last
resort, chosen only when SQ8 does not fit, and its recall is reported, not
promised. `nlist` ~ 4·sqrt(n) rounded to a power of two, with at least 39
training points per list.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from .errors import MemoryBudgetError, UnsupportedIndexKey

FLAT_MAX = 10_000  # below this, exact search is fast enough
HNSW_MAX = 1_000_000  # from here on, IVF: faster build, exact removal, GPU-capable
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per centroid
PQ_NBITS = 8
PQ_MIN_TRAIN = 39 * 2**PQ_NBITS  # training points a 256-centroid codebook needs
PQ_M_CHOICES = (64, 48, 32, 16, 8, 4)  # sub-quantizer counts FAISS GPU also supports

# Bytes per vector besides the codes: our sorted id mirror (8) plus FAISS's ids —
# IVF lists store one int64; IndexIDMap2 keeps id_map (8) and a hash map (~40).
ID_BYTES_IVF = 8 + 8
ID_BYTES_IDMAP2 = 8 + 48

_KEY_PATTERNS = {
    "flat": re.compile(r"Flat"),
    "hnsw": re.compile(r"HNSW(?P<M>\d+)(?:,Flat)?"),
    "ivf_flat": re.compile(r"IVF(?P<nlist>\d+),Flat"),
    "ivf_sq8": re.compile(r"IVF(?P<nlist>\d+),SQ8"),
    "ivf_pq": re.compile(r"IVF(?P<nlist>\d+),PQ(?P<m>\d+)(?:x(?P<nbits>\d+))?"),
}


@dataclass(frozen=True)
class IndexSpec:
    """A parsed factory string of one of the supported families."""

    kind: str  # flat | hnsw | ivf_flat | ivf_sq8 | ivf_pq
    nlist: int = 0
    hnsw_m: int = 0
    pq_m: int = 0
    pq_nbits: int = 0

    @property
    def key(self) -> str:
        """The canonical factory string."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m}"
        codes = {"ivf_flat": "Flat", "ivf_sq8": "SQ8"}.get(self.kind)
        return f"IVF{self.nlist},{codes or f'PQ{self.pq_m}x{self.pq_nbits}'}"

    @property
    def is_ivf(self) -> bool:
        return self.kind.startswith("ivf")

    @property
    def exact(self) -> bool:
        return self.kind == "flat"


def parse_index_key(key: str) -> IndexSpec:
    """Parse "Flat", "HNSW32", "IVF1024,Flat", "IVF1024,SQ8" or "IVF1024,PQ32x8"."""
    for kind, pattern in _KEY_PATTERNS.items():
        match = pattern.fullmatch(key.strip())
        if match is None:
            continue
        g = match.groupdict()
        spec = IndexSpec(
            kind=kind,
            nlist=int(g.get("nlist") or 0),
            hnsw_m=int(g.get("M") or 0),
            pq_m=int(g.get("m") or 0),
            pq_nbits=int(g.get("nbits") or PQ_NBITS) if kind == "ivf_pq" else 0,
        )
        if spec.is_ivf and spec.nlist < 1:
            raise UnsupportedIndexKey(key, "nlist must be at least 1")
        if kind == "hnsw" and spec.hnsw_m < 2:
            raise UnsupportedIndexKey(key, "HNSW needs M >= 2")
        if kind == "ivf_pq" and (spec.pq_m < 1 or not 1 <= spec.pq_nbits <= 16):
            raise UnsupportedIndexKey(key, "PQ needs m >= 1 and 1..16 bits")
        return spec
    families = "Flat, HNSW{M}, IVF{nlist},Flat, IVF{nlist},SQ8, IVF{nlist},PQ{m}x{bits}"
    raise UnsupportedIndexKey(key, f"expected one of {families}")


def choose_nlist(n: int) -> int:
    """Inverted lists for `n` vectors: ~4·sqrt(n) as a power of two, >= 39 points each."""
    if n <= 0:
        return 1
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return max(1, min(nlist, n // MIN_POINTS_PER_LIST))


def estimate_index_bytes(key: str, n: int, d: int) -> int:
    """Approximate resident memory of `key` holding `n` vectors of dimension `d`."""
    spec = parse_index_key(key)
    raw = 4 * d
    if spec.kind == "flat":
        return n * (raw + ID_BYTES_IDMAP2)
    if spec.kind == "hnsw":
        # level-0 links (2M int32) + ~5% upper levels + level/offset tables
        links = int(4 * 2 * spec.hnsw_m * 1.05) + 12
        return n * (raw + links + ID_BYTES_IDMAP2)
    centroids = spec.nlist * raw
    if spec.kind == "ivf_flat":
        return n * (raw + ID_BYTES_IVF) + centroids
    if spec.kind == "ivf_sq8":
        return n * (d + ID_BYTES_IVF) + centroids + 2 * raw
    code = math.ceil(spec.pq_m * spec.pq_nbits / 8)
    codebooks = 2**spec.pq_nbits * raw
    return n * (code + ID_BYTES_IVF) + centroids + codebooks


def pq_m_choices(d: int) -> list[int]:
    """Sub-quantizer counts for dimension `d`, largest (least lossy) first."""
    return [m for m in PQ_M_CHOICES if d % m == 0 and d // m >= 2]


def choose_index_key(n: int, d: int, mem_bytes: int, *, use_gpu: bool = False) -> str:
    """The factory string for `n` vectors of dimension `d` within `mem_bytes` of memory.

    Pure: the same arguments always give the same key. `use_gpu` rules out HNSW,
    which FAISS has no GPU version of. Raises `MemoryBudgetError` when nothing fits.
    """
    if n < 0 or d < 1:
        raise ValueError(f"need n >= 0 and d >= 1, got n={n}, d={d}")

    def fits(key: str) -> bool:
        return estimate_index_bytes(key, n, d) <= mem_bytes

    if n < FLAT_MAX and fits("Flat"):
        return "Flat"
    if not use_gpu and n < HNSW_MAX and fits(f"HNSW{HNSW_M}"):
        return f"HNSW{HNSW_M}"
    nlist = choose_nlist(n)
    for codes in ("Flat", "SQ8"):
        if fits(f"IVF{nlist},{codes}"):
            return f"IVF{nlist},{codes}"
    # PQ codebooks need ~10k training points; below that SQ8 is the most compact
    candidates = [f"IVF{nlist},SQ8"]
    if n >= PQ_MIN_TRAIN:
        candidates = [f"IVF{nlist},PQ{m}x{PQ_NBITS}" for m in pq_m_choices(d)] or candidates
    for key in candidates:
        if fits(key):
            return key
    smallest = min(estimate_index_bytes(k, n, d) for k in candidates)
    raise MemoryBudgetError(n, d, mem_bytes, smallest)


def default_memory_budget() -> int:
    """Half of the physical memory: what `build` assumes when given no budget."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 8 * 2**30
