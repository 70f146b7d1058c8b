"""The vessel check of pair searches, as the engine runs it (`retrieval.data.vessel_check`).

A pair search (similarity pair, via direct, without feedback or a region) ranks the
`CHECK_DEPTH` best cases by the pair cosine, then orders them by the cosine plus
`VESSEL_WEIGHT` × how well the query's vessels lie on each case's (its `vessel_match`),
and keeps the k best. The query's print comes from the uploaded photo or video, or from
a case query's stored media; each candidate's from its stored media, kept in a bounded
cache (`PrintCache`) so that a case is read and filtered once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from encoder.fov import stored_circle
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.vessel_check import (
    QueryPrint,
    VesselPrint,
    agreement,
    cf_print,
    ffa_print,
    rerank,
)
from retrieval.errors import UnreadableMedia

from .queries import CaseInfo, CFQuery, FFAQuery

log = logging.getLogger(__name__)

PRINT_CACHE = 4096  # candidate prints kept (about 80 KB each)


def case_print(case: CaseInfo, modality: str) -> VesselPrint:
    """A stored case's print of one modality (its stored FOV circle when it has one)."""
    if modality == "cf":
        return cf_print(read_cf(case.cf_path), stored_circle(case.cf_fov))
    video = read_ffa(case.ffa_path)
    return ffa_print(video, case.ffa_times_s, stored_circle(case.ffa_fov))


def upload_print(query: CFQuery | FFAQuery) -> VesselPrint:
    """An uploaded photo's or video's print."""
    if isinstance(query, CFQuery):
        return cf_print(query.image)
    return ffa_print(query.frames, query.times_s)


class PrintCache:
    """Candidates' prints by (modality, media path), least recently used dropped first."""

    def __init__(self, size: int = PRINT_CACHE):
        self.size = size
        self._prints: OrderedDict[tuple[str, str], VesselPrint] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, case: CaseInfo, modality: str) -> VesselPrint | None:
        """The case's print (None, logged, when its stored media cannot be read)."""
        key = (modality, str(case.cf_path if modality == "cf" else case.ffa_path))
        with self._lock:
            if key in self._prints:
                self._prints.move_to_end(key)
                return self._prints[key]
        try:
            found = case_print(case, modality)
        except (UnreadableMedia, ValueError) as err:
            log.warning("vessel check: case %s (%s) skipped: %s", case.case_id, modality, err)
            return None
        with self._lock:
            self._prints[key] = found
            while len(self._prints) > self.size:
                self._prints.popitem(last=False)
        return found


def checked(
    ranked: Sequence[tuple[float, int, str]],
    query: VesselPrint,
    case_of: Callable[[int], CaseInfo],
    cache: PrintCache,
) -> list[tuple[float, int, str, float]]:
    """(pair cosine, row id, modality) best first → (cosine, row id, modality, vessel match)
    ordered by the checked score. A candidate whose media cannot be read matches 0."""
    q = QueryPrint.of(query)
    matches = []
    for _, row, modality in ranked:
        found = cache.get(case_of(row), modality)
        matches.append(0.0 if found is None else agreement(q, found))
    order = rerank([s for s, _, _ in ranked], matches)
    return [(*ranked[i], matches[i]) for i in order]
