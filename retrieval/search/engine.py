"""The search engine: one index folder opened once (encoder, indexes, catalog), answering
searches by CF photo, FFA video or case id, and taking cases in and out.

`Engine.search(query, target, k, via, filters)`:
- `direct`: the query's embedding against the target index (`cf`, `ffa`, or `both`
  merged by score);
- `synthesis`: CF query → generated FFA video → its FFA embedding → the FFA index;
- `fused`: `reciprocal_rank_fusion` of the two (CF → FFA only).

Similarity. Stored vectors are [sqrt(1-w)·pair, sqrt(w)·clinical] (`encoder.embedder`);
a query vector multiplied by `encoder.similarity_weights(similarity)` scores by the
combined, the pair or the clinical cosine. `similarity=None` takes
`retrieval.models.similarity.default_similarity`: clinical (the same disease) for every
query type, pair for an encoder without a clinical part.

Diagnosis suggestion. When the index manifest holds suggestion models
(`extra["suggestion"]`, one per modality, `retrieval.models.suggestion.SuggestionModel`), a
search also asks the query's own modality index for the model's k nearest cases with a
diagnosis the model knows (by the model's similarity, ignoring the search's filters,
never the query case itself) and turns their diagnoses into `retrieval.models.suggestion.
suggest`'s probabilities: decision support, not a diagnosis. One more index search.

Concurrency. Searches share a readers-writer lock (`index.sync.RWLock`); an update
(`add_case`, `remove_case`) changes the indexes, the catalog and the lookups under
its write lock, so a search sees the index wholly before or wholly after it. Model
work (embedding, synthesis) is serialised by its own lock and runs outside the
index lock. Updates are serialised among themselves and, across processes, by a
lock file beside the folder.

Persistence. Every update is saved at once (`index.save_index_folder`: a complete
new folder swapped in atomically). Media of added cases live in the folder's
`media/<row_id>/` (cf.png, ffa.mp4), carried into each rewrite by hard links, so
they survive restarts; the catalog stores them relative to the folder. When a save
fails, the engine reloads the last saved folder, raises `PersistError` and keeps the
error in `save_error` until a save succeeds (the API's readiness probe reads it).
The folder's manifest names its backend (`index.backend`): with `milvus` the vectors
go to Milvus at once and the folder (manifest, catalog) follows; filters reach the
store as `FilteredIds` (`IndexFolder.allowed_ids`), which Milvus applies as expressions.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from index import ROW_ID, IndexFolder, load_index_folder, read_manifest
from index.atomic import atomic_write_bytes
from index.sync import RWLock
from retrieval.data.cohort import CASE_METADATA, case_values
from retrieval.data.duplicates import (
    DuplicateIndex,
    DuplicatePair,
    case_descriptor,
    duplicate_match,
)
from retrieval.data.media import read_cf, read_ffa
from retrieval.data.media_write import mark_synthetic, mp4_bytes, png_bytes
from retrieval.data.registration import measure_pair
from retrieval.data.vessel_check import CHECK_DEPTH, VesselPrint
from retrieval.errors import (
    DuplicateCase,
    Fundus2VideoError,
    IndexChanged,
    NearDuplicate,
    PersistError,
    QueryError,
    UnknownCase,
    UnreadableMedia,
)
from retrieval.models.similarity import SIMILARITIES, check_similarity, default_similarity
from retrieval.models.suggestion import Suggestion, SuggestionModel, suggest

from . import vessels
from .explain import Explanation, SideParts, explain_pair
from .feedback import (
    Example,
    Feedback,
    Rocchio,
    UnknownExample,
    check_feedback,
    feedback_info,
    feedback_rank,
    resolve,
)
from .feedback import score_kind as feedback_score_kind
from .queries import (
    FILTER_KEYS,
    MODALITIES,
    RRF_K,
    SUGGESTION_LABEL,
    TARGETS,
    VIAS,
    CaseInfo,
    CaseQuery,
    CFQuery,
    FFAQuery,
    Hit,
    NewCase,
    Query,
    SearchResult,
    SyntheticQuery,
    as_query,
    check_times,
    normalize_filters,
    reciprocal_rank_fusion,
    suggestion_record,
)
from .region import (
    REGION_SHARE,
    RegionQuery,
    anchored,
    locate,
    parse_region,
    photo_circle,
    region_info,
    region_query,
)

__all__ = [
    "FILTER_KEYS",
    "MODALITIES",
    "RRF_K",
    "SIMILARITIES",
    "SUGGESTION_LABEL",
    "TARGETS",
    "VIAS",
    "CFQuery",
    "CaseInfo",
    "CaseQuery",
    "Engine",
    "FFAQuery",
    "Hit",
    "NewCase",
    "Query",
    "QueryEncoder",
    "SearchResult",
    "Suggestion",
    "SuggestionModel",
    "SyntheticQuery",
    "WouldBlock",
    "as_query",
    "check_similarity",
    "check_times",
    "default_similarity",
    "normalize_filters",
    "reciprocal_rank_fusion",
    "suggestion_record",
]

log = logging.getLogger(__name__)

FUSE_DEPTH = 50  # each ranking fused is at least this deep
MEDIA_DIR = "media"  # inside the index folder: media of cases added through the engine
MAX_K = 10_000
MAX_SYNTH_FRAMES = 64
_FILTER_CACHE = 128
_CASE_ID = re.compile(r"[^/\\\x00-\x1f\x7f]{1,200}")


def _announced(search: Callable[..., SearchResult]) -> Callable[..., SearchResult]:
    """`Engine.search`, then each of the engine's search listeners called with its result."""

    @functools.wraps(search)
    def announced(self: Engine, *args: Any, **kwargs: Any) -> SearchResult:
        result = search(self, *args, **kwargs)
        for listener in self._search_listeners:
            listener(result)
        return result

    return announced


class WouldBlock(Exception):
    """A non-blocking search found an update in progress (retry it blocking)."""


@dataclass(slots=True)
class _QueryVectors:
    """What a search needs of its query before ranking (embeddings unweighted, (1, D))."""

    raw: np.ndarray | None  # the query's own embedding
    row: int | None  # the query case's row id (None: an upload)
    image: np.ndarray | None  # the CF photo to synthesize from (via synthesis, fused)
    synthetic: SyntheticQuery | None = None  # the FFA video synthesized from it
    synth: np.ndarray | None = None  # that video's embedding
    region: RegionQuery | None = None  # a region query: `raw` is then the box's embedding
    whole: np.ndarray | None = None  # and this the whole photo's (for the suggestion)
    vessels: VesselPrint | None = None  # a vessel-checked pair search: the query's print

    @property
    def own(self) -> np.ndarray | None:
        """The whole query's own embedding (not a region's)."""
        return self.raw if self.whole is None else self.whole


class QueryEncoder(Protocol):
    """What the engine needs from `retrieval.models.embedding.QueryEncoder` (or a stand-in)."""

    encoder_id: str
    dim: int
    image_size: int
    similarities: tuple[str, ...]  # the SIMILARITIES its vectors support

    def similarity_weights(self, similarity: str) -> np.ndarray: ...
    def embed_cf(self, images: Sequence[np.ndarray]) -> np.ndarray: ...
    def embed_ffa(self, videos: Sequence[np.ndarray], times: Any = None) -> np.ndarray: ...
    def synthesize_unmarked(self, image: np.ndarray, times_s: Any = None) -> tuple: ...
    def default_times(self) -> np.ndarray: ...

    # region queries (`retrieval.search.region`): the g of the g x g regions of a vector,
    # a box's embedding (cells: row0, row1, col0, col1), the window score maps of photos
    region_grid: int

    def embed_cf_region(self, images: Sequence[np.ndarray], cells: tuple) -> np.ndarray: ...
    def locate_cf_region(self, query, images: Sequence, shape: tuple, similarity: str) -> Any: ...
    def cf_parts(self, image: np.ndarray) -> np.ndarray: ...  # (R, D) summing to embed_cf
    def ffa_parts(self, video: np.ndarray, times: Any = None) -> tuple: ...  # (T, R, D), t, attn


# --------------------------------------------------------------------------- the engine


class Engine:
    """An opened index folder and its encoder. Thread-safe; see the module docstring."""

    def __init__(self, folder: IndexFolder, encoder: QueryEncoder):
        missing = [m for m in MODALITIES if m not in folder.indexes]
        if missing:
            raise Fundus2VideoError(f"{folder.path}: no {', '.join(missing)} index")
        self.encoder = encoder
        self.path = Path(folder.path).resolve()
        self._lock = RWLock()  # searches read; the in-memory part of an update writes
        self._update = threading.Lock()  # one update (and save) at a time
        self._model = threading.Lock()  # one model call at a time
        self._prints = vessels.PrintCache()  # candidates' vessel prints (the vessel check)
        self._cache_lock = threading.Lock()
        self._dup_lock = threading.Lock()  # builds the near-duplicate descriptors once
        self.similarities = tuple(s for s in SIMILARITIES if s in encoder.similarities)
        # query-vector factors per similarity (the encoder never changes)
        self._weights = {
            s: np.ascontiguousarray(encoder.similarity_weights(s), np.float32)
            for s in self.similarities
        }
        self._install(folder)
        self.opened_at = time.time()
        self.load_seconds: dict[str, float] = {}  # "model", "index": set by `open`
        self.save_error: str | None = None  # the last save's error; None once one succeeds
        self._search_listeners: tuple[Callable[[SearchResult], None], ...] = ()

    @classmethod
    def open(
        cls, path: str | Path, *, encoder: QueryEncoder | None = None, use_gpu: bool | None = None
    ) -> Engine:
        """Open an index folder and the run's encoder its manifest names (`extra.run_dir`).
        `load_seconds` records how long the encoder and the index took (model 0: given)."""
        t0 = time.perf_counter()
        if encoder is None:
            extra = cls.check_folder(path).get("extra") or {}
            from retrieval.models.embedding import QueryEncoder as RunEncoder  # imports torch

            encoder = RunEncoder.open(
                extra["run_dir"],
                extra.get("embedder_dir"),
                precision=extra.get("precision", "float32"),  # as the vectors were made
            )
        t_model = time.perf_counter() - t0
        folder = load_index_folder(path, expected_encoder_id=encoder.encoder_id, use_gpu=use_gpu)
        engine = cls(folder, encoder)
        engine.load_seconds = {"model": t_model, "index": time.perf_counter() - t0 - t_model}
        log.info("opened %s: %d cases, encoder %s", path, engine.case_count, encoder.encoder_id)
        return engine

    @staticmethod
    def check_folder(path: str | Path) -> dict[str, Any]:
        """The manifest of the index folder at `path`, checked in milliseconds (before a
        long load): a readable manifest of this format that names its run, which exists.
        Raises IndexFormatError or Fundus2VideoError naming the problem."""
        manifest = read_manifest(path)
        run_dir = (manifest.get("extra") or {}).get("run_dir")
        if not run_dir:
            raise Fundus2VideoError(
                f"{path}: the manifest names no run (extra.run_dir); "
                "build it with `fundus2video index RUN COHORT --out INDEX`"
            )
        if not Path(run_dir).is_dir():
            raise Fundus2VideoError(f"{path}: its run folder {run_dir} does not exist")
        return manifest

    def _install(self, folder: IndexFolder) -> None:
        """Take `folder` as the current state (caller holds the write lock, or is __init__)."""
        self._folder = folder
        rows = [self._case_info(r) for r in folder.catalog.iter_rows(named=True)]
        self._rows: dict[int, CaseInfo] = {r.row_id: r for r in rows}
        self._by_case: dict[str, int] = {r.case_id: r.row_id for r in rows}
        self._order = np.asarray([r.row_id for r in rows], np.int64)  # catalog order
        stored = [folder.extra.get("next_row_id", 0)]
        stored += [int(self._order.max()) + 1] if self._order.size else []
        for vi in folder.indexes.values():
            stored += [int(t) + 1 for t in vi.tombstones[-1:]]
        self._next_row_id = max(stored)
        self._revision = folder.extra.get("revision")
        self._generation = getattr(self, "_generation", 0) + 1
        self._filters: dict[tuple, np.ndarray | None] = {}
        self._derived: dict[str, Any] = {}
        self._suggesters = self._suggestion_models(folder)
        self._dups: DuplicateIndex | None = None  # built from the media on first use

    def _suggestion_models(self, folder: IndexFolder) -> dict[str, SuggestionModel]:
        """The manifest's suggestion models that this encoder can serve, per modality."""
        models = {}
        for modality, spec in (folder.extra.get("suggestion") or {}).items():
            try:
                model = SuggestionModel.from_dict(spec)
            except (TypeError, KeyError, ValueError) as err:
                log.warning("%s: unreadable %s suggestion model (%s)", folder.path, modality, err)
                continue
            if modality not in MODALITIES or model.similarity not in self._weights:
                log.warning(
                    "%s: %s suggestion model (similarity %s) not servable; skipped",
                    folder.path,
                    modality,
                    model.similarity,
                )
                continue
            models[modality] = model
        return models

    def suggestion_model(self, modality: str) -> SuggestionModel | None:
        """The diagnosis-suggestion model of one modality's index (None: none)."""
        return self._suggesters.get(modality)

    def _case_info(self, row: dict[str, Any]) -> CaseInfo:
        cf = Path(row.get("cf_path") or "")
        return CaseInfo(
            **case_values(row, self.path),
            row_id=int(row[ROW_ID]),
            added=not cf.is_absolute() and cf.parts[:1] == (MEDIA_DIR,),
        )

    # ------------------------------------------------------------------ reading
    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    @property
    def case_count(self) -> int:
        return len(self._rows)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities it has an index of (every one of MODALITIES: it opens no less)."""
        return tuple(m for m in MODALITIES if m in self._folder.indexes)

    @property
    def generation(self) -> int:
        """Increases with every change of the index (for caches)."""
        return self._generation

    def case(self, case_id: str) -> CaseInfo:
        with self._lock.read():
            return self._case_locked(case_id)

    def _case_locked(self, case_id: str) -> CaseInfo:
        row_id = self._by_case.get(case_id)
        if row_id is None:
            raise UnknownCase(case_id)
        return self._rows[row_id]

    def cases(
        self, offset: int = 0, limit: int = 50, filters: Mapping[str, Any] | None = None
    ) -> tuple[int, list[CaseInfo]]:
        """(total matching, one page of cases in catalog order)."""
        if offset < 0 or limit < 0:
            raise QueryError(f"offset and limit must be >= 0, got {offset}, {limit}")
        flt = normalize_filters(filters)
        with self._lock.read():
            allowed = self._allowed(flt)
            order = self._order
            if allowed is not None:
                order = order[np.isin(order, allowed)]
            return int(order.size), [self._rows[int(i)] for i in order[offset : offset + limit]]

    def _allowed(self, flt: dict[str, tuple[str, ...]]) -> np.ndarray | None:
        """Row ids the filters allow (None: all); cached until the next update. Read lock held."""
        if not flt:
            return None
        key = tuple(sorted(flt.items()))
        with self._cache_lock:
            if key in self._filters:
                return self._filters[key]
        columns = {FILTER_KEYS[k]: list(v) for k, v in flt.items()}
        allowed = self._folder.allowed_ids(columns)  # the ids; a Milvus store: its filter too
        with self._cache_lock:
            if len(self._filters) >= _FILTER_CACHE:
                self._filters.pop(next(iter(self._filters)))
            self._filters[key] = allowed
        return allowed

    def vectors(self, modality: str, row_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored embeddings (n, D) of these rows in one modality's index."""
        return self._folder.indexes[modality].reconstruct(row_ids)

    # ------------------------------------------------------------------ search
    @_announced
    def search(
        self,
        query: Query | str | np.ndarray,
        target: str = "cf",
        k: int = 10,
        via: str = "direct",
        filters: Mapping[str, Any] | None = None,
        *,
        exclude_self: bool = True,
        synthesis_times: Sequence[float] | None = None,
        blocking: bool = True,
        similarity: str | None = None,
        suggestion: bool = True,
        positive: Sequence[Example] | None = None,
        negative: Sequence[Example] | None = None,
        feedback: str | Rocchio | None = None,
        region: Sequence[float] | str | None = None,
        vessel_check: bool = True,
    ) -> SearchResult:
        """Ranked cases for a CF photo, an FFA video or a case id (module docstring): scored by
        `similarity` (None: the default), refined by `positive`/`negative` examples (`.feedback`)
        or a CF `region` box (`.region`), a pair search re-ranked by the vessel check (`.vessels`);
        `blocking=False` (direct case queries) raises `WouldBlock` rather than wait."""
        t0 = time.perf_counter()
        query = as_query(query)
        qmod = self._check_search(query, target, k, via, blocking)
        flt = normalize_filters(filters)
        similarity, weights = self._similarity(similarity)
        model = self._suggesters.get(qmod) if suggestion else None
        timings: dict[str, float] = {}
        own = via != "synthesis" or model is not None  # the query's own vector is needed
        vecs = self._query_vectors(query, via, own, blocking, synthesis_times, timings, region)
        if vessel_check and similarity == "pair" and not (positive or negative):
            vecs.vessels = self._query_print(query, via, region, blocking, timings)
        t = time.perf_counter()
        with self._reading(blocking):
            allowed = self._allowed(flt)
            fb = self._feedback(positive, negative, feedback)
            exclude = vecs.row if exclude_self else None
            ranked = self._ranked(via, target, k, allowed, exclude, vecs, weights, fb)
            hits = [self._hit(n, found) for n, found in enumerate(ranked, 1)]
            candidates = self._candidates(target, allowed)
            suggested = self._suggest_locked(model, qmod, vecs.own, vecs.row)
        timings.update(search=_ms(t), total=_ms(t0))
        return SearchResult(
            hits=self._locate(hits, vecs, similarity, timings),
            target=target,
            via=via,
            k=k,
            query=region_info(self._query_info(query, qmod, similarity, fb), vecs.region),
            filters=flt,
            score_kind="rrf" if via == "fused" else feedback_score_kind(fb),
            candidates=candidates,
            synthetic=vecs.synthetic,
            timings_ms=timings,
            similarity=similarity,
            suggestion=suggested,
            suggestion_model=model if suggested is not None else None,
            vessel_checked=vecs.vessels is not None,
        )

    def add_search_listener(self, listener: Callable[[SearchResult], None]) -> None:
        """Call `listener(result)` after every search (e.g. the API's latency metrics)."""
        self._search_listeners = (*self._search_listeners, listener)

    def remove_search_listener(self, listener: Callable[[SearchResult], None]) -> None:
        self._search_listeners = tuple(f for f in self._search_listeners if f != listener)

    def _similarity(self, similarity: str | None) -> tuple[str, np.ndarray]:
        """The search's similarity (None: the default) and its query factors."""
        similarity = default_similarity(self.similarities) if similarity is None else similarity
        return similarity, self._weights[check_similarity(similarity, self.similarities)]

    @staticmethod
    def _query_info(query: Query, qmod: str, similarity: str, fb: Feedback | None) -> dict:
        """The result's `query`: its kind, modality, similarity, case id and feedback."""
        info: dict[str, Any] = {"kind": "upload", "modality": qmod, "similarity": similarity}
        if isinstance(query, CaseQuery):
            info.update(kind="case", case_id=query.case_id)
        return {**info, **feedback_info(fb)}

    def _feedback(self, positive, negative, strategy) -> Feedback | None:
        """The search's feedback examples resolved (None: none): a case's stored vectors in
        every modality (one shared space); an unknown case id raises `UnknownExample`
        naming its list. Read lock held."""
        spec = check_feedback(positive, negative, strategy, self.encoder.dim)
        if spec is None:
            return None
        modalities = self.modalities

        def rows(param: str, case_id: str) -> int:
            if case_id not in self._by_case:
                raise UnknownExample(param, case_id)
            return self._by_case[case_id]

        def vectors(ids: Sequence[int]) -> np.ndarray:
            return np.concatenate([self.vectors(m, ids) for m in modalities])

        return resolve(spec, rows, vectors, self.encoder.dim)

    def _feedback_rank(self, fb, weights, vec, target, k, allowed, exclude) -> list[tuple]:
        """`_rank` of the weighted query `vec` refined by the examples `fb`. Read lock held."""

        def search(v: np.ndarray, n: int) -> list[tuple[float, int, str]]:
            return self._rank(v, target, n, allowed, None)

        return feedback_rank(fb, vec, weights, k, search, self.vectors, exclude)

    def suggest(self, query: Query | str | np.ndarray) -> Suggestion | None:
        """The diagnosis suggested for a query by its nearest labelled cases in the query's
        own modality (see the module docstring); None when the index has no model for it."""
        query = as_query(query)
        modality = self._check_search(query, "cf", 1, "direct")
        model = self._suggesters.get(modality)
        if model is None and not isinstance(query, CaseQuery):
            return None  # (a case query still checks that the case exists)
        vecs = self._query_vectors(
            query, "direct", own=model is not None, blocking=True, times=None, timings={}
        )
        with self._lock.read():
            return self._suggest_locked(model, modality, vecs.raw, vecs.row)

    def _suggest_locked(
        self,
        model: SuggestionModel | None,
        modality: str,
        vec: np.ndarray | None,
        exclude: int | None,
    ) -> Suggestion | None:
        """`model`'s vote of the `model.k` nearest cases with a diagnosis it knows to the raw
        query vector `vec` (1, D), `exclude` (the query case) left out. Read lock held.

        One unfiltered search, deep enough for the share of labelled cases (no per-query
        filter to build); a filtered search only when that finds fewer than k of them."""
        if model is None or vec is None:
            return None
        index = self._folder.indexes[modality]
        labelled = self._labelled(modality, model)
        n_labelled = index.ntotal if labelled is None else int(labelled.size)
        if n_labelled == 0:
            return None
        query = vec * self._weights[model.similarity]
        want = model.k + (exclude is not None)
        known = set(model.classes)

        def votes(D: np.ndarray, I: np.ndarray) -> list[tuple[float, CaseInfo]]:  # noqa: E741
            rows = [self._rows.get(i) for i in I[0].tolist()]
            return [
                (d, r)
                for d, r in zip(D[0].tolist(), rows, strict=True)
                if r is not None and r.row_id != exclude and r.diagnosis in known
            ][: model.k]

        depth = min(index.ntotal, math.ceil(want * index.ntotal / n_labelled * 1.5))
        found = votes(*index.search(query, max(depth, 1)))
        if len(found) < min(model.k, n_labelled - (exclude is not None)) and labelled is not None:
            found = votes(*index.search(query, want, allowed=labelled))
        if not found:
            return None
        return suggest(
            model,
            np.asarray([d for d, _ in found]),
            [r.diagnosis or "" for _, r in found],
            [r.case_id for _, r in found],
        )

    def _labelled(self, modality: str, model: SuggestionModel) -> np.ndarray | None:
        """Row ids of `modality`'s index whose diagnosis `model` knows (None: every one).
        Kept until the next update. Read lock held."""
        key = f"labelled:{modality}:{hash(model.classes)}"
        if key not in self._derived:
            known = set(model.classes)
            ids = self._folder.indexes[modality].ids()
            keep = np.fromiter((self._rows[int(i)].diagnosis in known for i in ids), bool, ids.size)
            self._derived[key] = None if keep.all() else ids[keep]
        return self._derived[key]

    @contextlib.contextmanager
    def _reading(self, blocking: bool) -> Iterator[None]:
        with self._lock.read(blocking) as acquired:
            if not acquired:
                raise WouldBlock("an update holds the index")
            yield

    def _check_search(
        self, query: Query, target: str, k: int, via: str, blocking: bool = True
    ) -> str:
        """The query's modality, once the search's parameters are checked."""
        if target not in TARGETS:
            raise QueryError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        if via not in VIAS:
            raise QueryError(f"via must be one of {', '.join(VIAS)}, got {via!r}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
            raise QueryError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        qmod = self._modality(query)
        if qmod not in MODALITIES:
            raise QueryError(f"a case query's modality is cf or ffa, got {qmod!r}")
        if via != "direct" and qmod != "cf":
            raise QueryError(
                f"via={via} synthesizes an FFA video from a CF photo; the query is an FFA video "
                "(use via=direct)"
            )
        if via != "direct" and target != "ffa":
            raise QueryError(f"via={via} searches the FFA index: use target=ffa, not {target!r}")
        if not blocking and (via != "direct" or not isinstance(query, CaseQuery)):
            raise ValueError("blocking=False is for direct case queries only")
        return qmod

    @staticmethod
    def _modality(query: Query) -> str:
        if isinstance(query, CaseQuery):
            return query.modality
        return "cf" if isinstance(query, CFQuery) else "ffa"

    def _embed(self, query: Query) -> np.ndarray:
        if isinstance(query, CFQuery):
            return self.encoder.embed_cf([query.image])
        times = None if query.times_s is None else [np.asarray(query.times_s, np.float32)]
        if times is not None and len(times[0]) != len(query.frames):
            raise QueryError(f"times has {len(times[0])} values for {len(query.frames)} frames")
        return self.encoder.embed_ffa([query.frames], times)

    def _synthesize_and_embed(self, image, times, timings) -> tuple[SyntheticQuery, np.ndarray]:
        if times is not None:
            times = check_times(times, "synthesis times")
        with self._model:
            t = time.perf_counter()
            frames, used = self.encoder.synthesize_unmarked(image, times)  # (T, S, S)
            timings["synthesize"] = _ms(t)
            t = time.perf_counter()
            vec = self.encoder.embed_ffa([frames], [np.asarray(used, np.float32)])
            timings["embed"] = _ms(t)
        marked = SyntheticQuery(mark_synthetic(frames), np.asarray(used, np.float32))
        return marked, vec

    def _query_vectors(
        self,
        query: Query,
        via: str,
        own: bool,
        blocking: bool,
        times: Sequence[float] | None,
        timings: dict[str, float],
        region: Sequence[float] | str | None = None,
    ) -> _QueryVectors:
        """The query's own embedding (when `own`) and, via synthesis or fused, the embedding
        of the FFA video synthesized from its CF photo (at `times`); with a `region`, the
        embedding of that box of its CF photo (`_region_vectors`)."""
        if isinstance(query, CaseQuery):
            vecs = self._case_vectors(query, via, own, blocking)
        else:
            vecs = self._upload_vectors(query, own, timings)
        if via != "direct":
            vecs.synthetic, vecs.synth = self._synthesize_and_embed(vecs.image, times, timings)
        if region is not None:
            self._region_vectors(query, region, via, blocking, vecs, timings)
        return vecs

    def _region_vectors(self, query, region, via, blocking, vecs, timings) -> None:
        """A region query: `vecs.raw` becomes the embedding of the box (x0, y0, x1, y1,
        normalised on the query's CF photo) alone; the whole photo's moves to `vecs.whole`."""
        box = parse_region(region)
        if box is None:
            return
        if not blocking:
            raise WouldBlock("a region query reads the photo and embeds the box (model work)")
        image = self._region_image(query, via)
        stored = self.case(query.case_id).cf_fov if isinstance(query, CaseQuery) else None
        circle = photo_circle(image, stored)  # the FOV square the embedder sees
        rq = region_query(box, image.shape[:2], self.encoder.region_grid, circle)
        with self._model:
            t = time.perf_counter()
            rq = replace(rq, vector=self.encoder.embed_cf_region([image], rq.cells))
            timings["embed_region"] = _ms(t)
        vec = rq.vector
        if "clinical" in self._weights and vecs.raw is not None:  # the photo as its context
            vec = anchored(vec, vecs.raw, self._weights["clinical"] > 0, REGION_SHARE)
        vecs.whole, vecs.raw, vecs.region = vecs.raw, vec, rq

    def _region_image(self, query: Query, via: str) -> np.ndarray:
        """The CF photo a region query's box lies on; QueryError (naming `region`) otherwise."""
        if via != "direct":
            raise QueryError(f"region: a region query searches via=direct, not via={via}")
        if isinstance(query, CFQuery):
            return query.image
        if not isinstance(query, CaseQuery) or query.modality != "cf":
            raise QueryError(
                "region: a box lies on a CF photo; query by a CF photo or a case's CF "
                "(modality cf), not an FFA video"
            )
        return self._stored_cf(self.case(query.case_id))

    @staticmethod
    def _stored_cf(case: CaseInfo) -> np.ndarray:
        try:
            return read_cf(case.cf_path)
        except UnreadableMedia as err:  # the server's own file: not the client's fault
            raise Fundus2VideoError(f"stored CF photo of case {case.case_id!r}: {err}") from err

    def _locate(self, hits: list[Hit], vecs: _QueryVectors, similarity: str, timings) -> list[Hit]:
        """A region query's hits, each with the part of its CF photo that matched: the window
        of the box's size most like the box, or the same place when the encoder's region
        vectors are bound to the place for this similarity (its map is None)."""
        rq = vecs.region
        if rq is None or not hits:
            return hits
        t = time.perf_counter()
        images = [self._stored_cf(h.case) for h in hits]
        with self._model:
            maps = self.encoder.locate_cf_region(rq.vector[0], images, rq.shape, similarity)
        for n, (hit, image) in enumerate(zip(hits, images, strict=True)):
            circle = photo_circle(image, hit.case.cf_fov)  # the FOV square the embedder saw
            box, score = locate(rq, image.shape[:2], None if maps is None else maps[n], circle)
            hit.region, hit.region_score = box, score
        timings["locate"] = _ms(t)
        return hits

    def _case_vectors(self, query: CaseQuery, via: str, own: bool, blocking: bool) -> _QueryVectors:
        """A case query's stored vector (when `own`) and, for synthesis, its stored CF photo."""
        with self._reading(blocking):
            case = self._case_locked(query.case_id)
            raw = self._folder.indexes[query.modality].vector(case.row_id) if own else None
        image = None
        if via != "direct":
            try:
                image = read_cf(case.cf_path)
            except UnreadableMedia as err:  # the server's own file: not the client's fault
                raise Fundus2VideoError(f"stored CF photo of case {case.case_id!r}: {err}") from err
        return _QueryVectors(raw, case.row_id, image)

    def _upload_vectors(
        self, query: CFQuery | FFAQuery, own: bool, timings: dict[str, float]
    ) -> _QueryVectors:
        """An uploaded photo's or video's embedding (when `own`), and the photo for synthesis."""
        raw = None
        if own:
            with self._model:
                t = time.perf_counter()
                raw = self._embed(query)
                timings["embed"] = _ms(t)
        return _QueryVectors(raw, None, query.image if isinstance(query, CFQuery) else None)

    def _hit(self, rank: int, found: tuple) -> Hit:
        """A ranked (score, row id, modality[, vessel match]) as the search's `Hit`."""
        score, row, modality, *match = found
        return Hit(rank, score, modality, self._rows[row], vessel_match=match[0] if match else None)

    def _query_print(self, query: Query, via: str, region, blocking, timings) -> VesselPrint | None:
        """A pair search's query as a vessel print (its upload, or a case's stored media);
        None for a search the vessel check leaves alone (via synthesis or fused, a region)."""
        if via != "direct" or region is not None:
            return None
        if not blocking:
            raise WouldBlock("the vessel check reads and filters the query's picture")
        t = time.perf_counter()
        if isinstance(query, CaseQuery):
            with self._reading(blocking):
                case = self._case_locked(query.case_id)
            found = self._prints.get(case, query.modality)
            if found is None:  # the server's own file: not the client's fault
                raise Fundus2VideoError(
                    f"stored {query.modality} of case {case.case_id!r} unreadable"
                )
        else:
            found = vessels.upload_print(query)
        timings["vessel_print"] = _ms(t)
        return found

    def _ranked(self, via, target, k, allowed, exclude, vecs, weights, fb=None) -> list[tuple]:
        """(score, row id, modality) best first for the search's `via`: `vecs` scored by the
        similarity's query factors `weights`, refined by the feedback `fb`; with the query's
        vessel print, the CHECK_DEPTH best re-ranked by the vessel check, each with its
        match last. Read lock held."""
        if vecs.vessels is not None:
            depth = max(k, CHECK_DEPTH)
            ranked = self._rank(vecs.raw * weights, target, depth, allowed, exclude)
            return vessels.checked(ranked, vecs.vessels, self._rows.__getitem__, self._prints)[:k]
        rank = self._rank if fb is None else partial(self._feedback_rank, fb, weights)
        if via != "fused":
            vec = vecs.raw if via == "direct" else vecs.synth
            return rank(vec * weights, target, k, allowed, exclude)
        depth = max(k, FUSE_DEPTH)
        a = rank(vecs.raw * weights, target, depth, allowed, exclude)
        b = rank(vecs.synth * weights, target, depth, allowed, exclude)
        fused = reciprocal_rank_fusion([[i for _, i, _ in a], [i for _, i, _ in b]])
        return [(s, i, target) for i, s in fused[:k]]

    def _rank(self, vec, target, k, allowed, exclude) -> list[tuple[float, int, str]]:
        """(score, row id, modality) best first, the excluded row left out. Read lock held."""
        hits: list[tuple[float, int, str]] = []
        fetch = k + (exclude is not None)
        for modality in MODALITIES if target == "both" else (target,):
            D, I = self._folder.indexes[modality].search(vec, fetch, allowed=allowed)  # noqa: E741
            hits += [
                (d, i, modality)
                for d, i in zip(D[0].tolist(), I[0].tolist(), strict=True)
                if i >= 0 and i != exclude and i in self._rows
            ][:k]
        if target == "both":
            hits.sort(key=lambda h: -h[0])
        return hits[:k]

    def _candidates(self, target: str, allowed: np.ndarray | None) -> int:
        targets = MODALITIES if target == "both" else (target,)
        if allowed is None:
            return sum(self._folder.indexes[m].ntotal for m in targets)
        return len(allowed) * len(targets)

    # ------------------------------------------------------------------ explanations
    def explain(
        self,
        query: Query | str | np.ndarray,
        other_case_id: str,
        similarity: str | None = None,
        target: str | None = None,
    ) -> Explanation:
        """Why `other_case_id` matches `query`: the `similarity` score (None: the default)
        between the query and the other case's `target` embedding (None: the query's
        modality), split over both sides' regions and an FFA side's frames and phases
        (`retrieval.search.explain`). Runs the model on both sides' media."""
        return self.explain_many(query, [(other_case_id, target)], similarity)[0]

    def explain_many(
        self,
        query: Query | str | np.ndarray,
        others: Sequence[tuple[str, str | None]],
        similarity: str | None = None,
    ) -> list[Explanation]:
        """`explain` for several (case id, target) results of one query (its side once)."""
        query = as_query(query)
        qmod = self._modality(query)
        similarity = default_similarity(self.similarities) if similarity is None else similarity
        weights = self._weights[check_similarity(similarity, self.similarities)]
        targets = [t or qmod for _, t in others]
        for t in (qmod, *targets):
            if t not in MODALITIES:
                raise QueryError(f"target must be one of {', '.join(MODALITIES)}, got {t!r}")
        with self._lock.read():
            q_case = self._case_locked(query.case_id) if isinstance(query, CaseQuery) else None
            cases = [self._case_locked(case_id) for case_id, _ in others]
            vectors = [
                self._folder.indexes[t].vector(c.row_id)[0]
                for c, t in zip(cases, targets, strict=True)
            ]
            q_vec = None if q_case is None else self._folder.indexes[qmod].vector(q_case.row_id)[0]
        inputs = [self._explain_input(qmod, q_case, query)]
        inputs += [self._explain_input(t, c, None) for c, t in zip(cases, targets, strict=True)]
        with self._model:
            if q_vec is None:
                q_vec = self._embed(query)[0]  # the upload's vector, as a search computes it
            sides = [self._explain_parts(*side) for side in inputs]
        q_id = None if q_case is None else q_case.case_id
        return [
            explain_pair(
                sides[0],
                side,
                weights,
                similarity=similarity,
                search_score=float(np.dot(q_vec * weights, vec)),
                ids=(q_id, case.case_id),
            )
            for side, case, vec in zip(sides[1:], cases, vectors, strict=True)
        ]

    @staticmethod
    def _explain_input(modality: str, case: CaseInfo | None, query: Query | None) -> tuple:
        """(modality, photo or frames, frame times) of a stored case, or of an upload."""
        if case is None:
            if isinstance(query, CFQuery):
                return modality, query.image, None
            return modality, query.frames, query.times_s
        try:
            if modality == "cf":
                return modality, read_cf(case.cf_path), None
            return modality, read_ffa(case.ffa_path), case.ffa_times_s
        except UnreadableMedia as err:  # the server's own file: not the client's fault
            raise Fundus2VideoError(f"stored {modality} of case {case.case_id!r}: {err}") from err

    def _explain_parts(self, modality: str, media: np.ndarray, times: Any) -> SideParts:
        """One side's embedding split into region (and frame) parts. Model lock held."""
        hw = media.shape[-3:-1] if modality == "cf" else media.shape[-2:]
        from encoder.fov import detect_video_fov

        circle = photo_circle(media) if modality == "cf" else detect_video_fov(media)
        if modality == "cf":
            return SideParts("cf", self.encoder.cf_parts(media), hw=hw, circle=circle)
        t = None if times is None else np.asarray(times, np.float32)
        parts, used, attention = self.encoder.ffa_parts(media, t)
        return SideParts("ffa", parts, np.asarray(used, np.float32), attention, hw, circle)

    def generate(
        self, image: np.ndarray, times_s: Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """A CF photo's synthesized FFA video, SYNTHETIC burned into every frame, and its times."""
        times = None if times_s is None else check_times(times_s)
        with self._model:
            frames, used = self.encoder.synthesize_unmarked(image, times)
        return mark_synthetic(frames), np.asarray(used, np.float32)

    def default_times(self) -> np.ndarray:
        return np.asarray(self.encoder.default_times(), np.float32)

    # ------------------------------------------------------------------ updates
    def add_case(
        self,
        case: NewCase,
        cf: np.ndarray,
        ffa: np.ndarray,
        *,
        allow_duplicate: bool = False,
        register: bool = True,
    ) -> CaseInfo:
        """Embed and index a new case; its media are stored in the folder. Saved at once.
        A case whose CF or FFA is a near-duplicate of an indexed one's raises NearDuplicate
        unless `allow_duplicate` (`retrieval.data.duplicates`). Its measured fields are
        filled as ingest fills them: the fields of view and, when `register`, the CF → FFA
        registration (`retrieval.data.registration.measure_pair`)."""
        meta = self._check_new_case(case, ffa)
        if case.case_id in self._by_case:
            raise DuplicateCase(case.case_id)
        dup_desc = self._check_near_duplicates(case.case_id, cf, ffa, allow_duplicate)
        meta |= measure_pair(cf, ffa, case.ffa_times_s, register=register)
        times = None if case.ffa_times_s is None else [np.asarray(case.ffa_times_s, np.float32)]
        with self._model:
            v_cf = self.encoder.embed_cf([cf])
            v_ffa = self.encoder.embed_ffa([ffa], times)
        png, mp4 = png_bytes(cf), mp4_bytes(ffa)
        with self._update, self._disk_lock():
            if case.case_id in self._by_case:
                raise DuplicateCase(case.case_id)
            row_id = self._next_row_id
            media = self.path / MEDIA_DIR / str(row_id)
            atomic_write_bytes(media / "cf.png", png)
            atomic_write_bytes(media / "ffa.mp4", mp4)
            row = {
                **meta,
                ROW_ID: row_id,
                "cf_path": f"{MEDIA_DIR}/{row_id}/cf.png",
                "ffa_path": f"{MEDIA_DIR}/{row_id}/ffa.mp4",
                "ffa_times_source": None if case.ffa_times_s is None else "api",
            }
            catalog = self._folder.catalog
            new = pl.DataFrame([{c: row.get(c) for c in catalog.columns}], schema=catalog.schema)
            info = self._case_info(row)
            with self._lock.write():
                self._folder.add_rows({"cf": v_cf, "ffa": v_ffa}, new)  # indexes and catalog
                self._rows[row_id], self._by_case[info.case_id] = info, row_id
                self._order = np.append(self._order, np.int64(row_id))
                self._next_row_id = row_id + 1
                self._changed()
            self._save()
            self._duplicate_index().add(row_id, info.case_id, dup_desc)
            log.info("added a case as row %d", row_id)
            return self._rows[row_id]

    def remove_case(self, case_id: str) -> CaseInfo:
        """Take a case out of both indexes and the catalog (its stored media too). Saved at once."""
        with self._update, self._disk_lock():
            case = self.case(case_id)
            with self._lock.write():
                for vi in self._folder.indexes.values():
                    vi.remove([case.row_id])
                catalog = self._folder.catalog
                self._folder.catalog = catalog.filter(pl.col(ROW_ID) != case.row_id)
                del self._rows[case.row_id], self._by_case[case.case_id]
                self._order = self._order[self._order != case.row_id]
                self._changed()
            self._save()
            if self._dups is not None:
                self._dups.remove(case.row_id)
            if case.added:
                shutil.rmtree(self.path / MEDIA_DIR / str(case.row_id), ignore_errors=True)
            log.info("removed row %d", case.row_id)
            return case

    def _duplicate_index(self) -> DuplicateIndex:
        """The near-duplicate descriptors of the indexed cases, decoded from their media on
        first use (about 30 ms a 128-px case; kept in memory, updated by add and remove)."""
        with self._dup_lock:
            if self._dups is None:
                with self._lock.read():
                    rows = [
                        (r.row_id, r.case_id, r.cf_path, r.ffa_path) for r in self._rows.values()
                    ]
                self._dups = DuplicateIndex.from_media(rows)
                log.info("near-duplicate descriptors of %d case(s) ready", len(self._dups))
            return self._dups

    def near_duplicates(
        self, cf: np.ndarray, ffa: np.ndarray, *, exclude: str | None = None
    ) -> list[DuplicatePair]:
        """Indexed cases whose CF or FFA is a near-duplicate of these media, nearest first."""
        row = self._by_case.get(exclude) if exclude is not None else None
        return self._duplicate_index().find(case_descriptor(cf, ffa), exclude=row)

    def duplicates_of(self, case_id: str) -> list[DuplicatePair]:
        """Indexed cases whose CF or FFA is a near-duplicate of the indexed case `case_id`'s."""
        case = self.case(case_id)
        desc = self._duplicate_index().of_row(case.row_id)
        if desc is None:  # its media could not be read
            return []
        return self._duplicate_index().find(desc, exclude=case.row_id)

    def _check_near_duplicates(
        self, case_id: str, cf: np.ndarray, ffa: np.ndarray, allow: bool
    ) -> dict[str, np.ndarray]:
        """The new case's descriptor; NearDuplicate (409) when it repeats an indexed case."""
        desc = case_descriptor(cf, ffa)
        found = self._duplicate_index().find(desc)
        if found and not allow:
            raise NearDuplicate(
                case_id,
                [duplicate_match(p) for p in found],
            )
        return desc

    @staticmethod
    def _check_new_case(case: NewCase, ffa: np.ndarray) -> dict[str, Any]:
        """The new case's catalog row without its media paths; QueryError names a bad value."""
        if not isinstance(case.case_id, str) or not _CASE_ID.fullmatch(case.case_id):
            raise QueryError(
                f"case_id must be 1-200 characters without '/', '\\' or control characters, "
                f"got {case.case_id!r}"
            )
        row = {f.name: getattr(case, f.name) for f in CASE_METADATA}
        row["patient_id"] = case.patient_id or case.case_id
        row["lesions"] = list(case.lesions)
        for f in CASE_METADATA:
            value = row[f.name]
            if f.choices and (value is not None or f.required) and value not in f.choices:
                raise QueryError(f"{f.name} must be one of {', '.join(f.choices)}, got {value!r}")
        if case.age is not None and not 0 <= case.age <= 130:
            raise QueryError(f"age must be from 0 to 130, got {case.age}")
        if len(ffa) < 2:
            raise QueryError(f"the FFA video needs at least 2 frames, got {len(ffa)}")
        if case.ffa_times_s is not None:
            times = check_times(case.ffa_times_s, "ffa_times_s").astype(float).tolist()
            if len(times) != len(ffa):
                raise QueryError(f"ffa_times_s has {len(times)} values for {len(ffa)} frames")
            row["ffa_times_s"] = times
        return row

    def _changed(self) -> None:
        """After an in-memory update (write lock held): drop what was derived from the old state."""
        self._folder.extra = {**self._folder.extra, "next_row_id": self._next_row_id}
        self._generation += 1
        with self._cache_lock:
            self._filters = {}
        self._derived = {}

    def _save(self) -> None:
        """Write the folder (update lock held); on failure go back to the last saved one."""
        revision = uuid.uuid4().hex
        self._folder.extra = {**self._folder.extra, "revision": revision}
        try:
            self._folder.save(keep=(MEDIA_DIR,))
        except Exception as err:
            self.save_error = f"{type(err).__name__}: {err}"
            log.exception("saving %s failed; reloading the last saved index", self.path)
            folder = load_index_folder(self.path, expected_encoder_id=self.encoder_id)
            with self._lock.write():
                self._install(folder)
            raise PersistError(f"could not save the index ({err}); nothing was changed") from err
        self._revision = revision
        self.save_error = None

    @contextlib.contextmanager
    def _disk_lock(self) -> Iterator[None]:
        """Exclusive across processes; refuses an update if another process changed the folder."""
        lock_file = self.path.parent / f".{self.path.name}.lock"
        with open(lock_file, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                on_disk = (read_manifest(self.path).get("extra") or {}).get("revision")
                if on_disk != self._revision:
                    raise IndexChanged(
                        f"{self.path} was rewritten by another process since this one loaded "
                        "it; restart to load it (updates are refused until then)"
                    )
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ summaries
    def stats(self) -> dict[str, Any]:
        with self._lock.read():
            modalities = {m: vi.stats() for m, vi in self._folder.indexes.items()}
            counts = self._derived.get("counts")
            if counts is None:
                rows = self._rows.values()
                counts = {
                    "diagnoses": dict(Counter(r.diagnosis or "unknown" for r in rows)),
                    "splits": dict(Counter(r.split or "unknown" for r in rows)),
                    "added": sum(r.added for r in rows),
                }
                self._derived["counts"] = counts
            return {
                "encoder_id": self.encoder_id,
                "catalog_rows": len(self._rows),
                "added_cases": counts["added"],
                "modalities": modalities,
                "device": "gpu"
                if any(s["device"] == "gpu" for s in modalities.values())
                else "cpu",
                "dim": self.encoder.dim,
                "image_size": self.encoder.image_size,
                "diagnoses": counts["diagnoses"],
                "splits": counts["splits"],
                "index_created_at": self._folder.manifest.get("created_at"),
                "similarities": list(self.similarities),
                "default_similarity": {
                    "same_modality": default_similarity(self.similarities),
                    "cross_modal": default_similarity(self.similarities),
                },
                "suggestion": {m: model.to_dict() for m, model in self._suggesters.items()},
            }

    def snapshot_vectors(
        self, modalities: Sequence[str], limit: int, seed: int = 0, similarity: str | None = None
    ) -> tuple[list[CaseInfo], list[str], np.ndarray, int]:
        """Up to `limit` stored vectors over `modalities` (a seeded sample when more):
        their cases, modalities, vectors (n, D), and how many there are in all.

        `similarity` (one of `self.similarities`; None: as stored) gives the vectors of
        that similarity's space: each times sqrt of its query factors, so that their inner
        products are its scores (pair or clinical part alone; "combined" is as stored)."""
        scale = None
        if similarity is not None:
            weights = self._weights[check_similarity(similarity, self.similarities)]
            scale = np.sqrt(weights)
        with self._lock.read():
            parts = [(m, self._folder.indexes[m].ids()) for m in modalities]
            total = sum(ids.size for _, ids in parts)
            rng = np.random.default_rng(seed)
            cases, mods, vecs = [], [], []
            for m, ids in parts:
                take = ids
                if total > limit:
                    share = max(1, round(limit * ids.size / total))
                    take = np.sort(rng.choice(ids, min(share, ids.size), replace=False))
                vecs.append(self.vectors(m, take))
                cases += [self._rows[int(i)] for i in take]
                mods += [m] * len(take)
        out = np.concatenate(vecs) if vecs else np.zeros((0, self.encoder.dim), np.float32)
        return cases, mods, out * scale if scale is not None else out, total

    def close(self) -> None:
        """Nothing to flush (every update is saved at once); kept for symmetry with open."""


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
