"""Prometheus metrics of the API service: one `CollectorRegistry` per app (`ApiMetrics`).

Requests are counted by `MetricsMiddleware`, the outermost ASGI layer, so every request
counts, the `GET /cases/{case_id}/similar` fast path and the body-limit refusals included.
Labels hold the route *template* (never the path: it may hold a case id), the method and
the status. Search latency comes from the engine (`Engine.add_search_listener`: the
engine's own time, without HTTP); cases per modality, load times and readiness are read
from the engine at scrape time. `GET /metrics` (routes/health.py) writes the text format.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.search.engine import MODALITIES, TARGETS, VIAS, Engine, SearchResult

PREFIX = "fundus2video"
UNROUTED = "(unrouted)"  # no route matched (404): one label, whatever the path
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UPDATES = {("POST", "/cases"): "added", ("DELETE", "/cases/{case_id}"): "deleted"}
UPDATE_RESULTS = ("ok", "rejected", "failed")  # 2xx, 4xx, 5xx (e.g. the save failed)
REFUSAL_STATE = "upload_refused"  # request.state key: why an upload was refused
REFUSAL_REASONS = (
    "too_large",  # the request body exceeds max_upload_bytes
    "bad_type",  # a declared or sniffed type that is not accepted
    "undecodable",  # empty, or the decoder failed
    "too_many_pixels",  # an image or frame above max_pixels
    "too_many_frames",  # a video above max_frames / max_video_pixels
    "too_small",  # a side below min_side
)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SEARCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ApiMetrics:
    """The app's metrics; `engine_of()` gives the engine (None while none is loaded)."""

    def __init__(self, engine_of: Callable[[], Engine | None]):
        self.registry = CollectorRegistry()
        r, p = self.registry, PREFIX
        route = ["method", "route", "status"]
        self.requests = Counter(f"{p}_http_requests", "HTTP requests answered.", route, registry=r)
        self.request_seconds = Histogram(
            f"{p}_http_request_duration_seconds",
            "HTTP request latency, first byte in to last byte out.",
            route,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.search_seconds = Histogram(
            f"{p}_search_duration_seconds",
            "Engine search latency (query vectors, ranking, suggestion; no HTTP).",
            ["via", "target"],
            buckets=SEARCH_BUCKETS,
            registry=r,
        )
        self.updates = {
            kind: Counter(f"{p}_cases_{kind}", f"Cases {kind} by result.", ["result"], registry=r)
            for kind in ("added", "deleted")
        }
        self.rejected = Counter(
            f"{p}_uploads_rejected", "Uploads refused, by reason.", ["reason"], registry=r
        )
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # labels → children
        self._zeros()
        r.register(EngineCollector(engine_of))

    def _zeros(self) -> None:
        """Create every known label set, so that each series exists (at 0) from the start."""
        for via in VIAS:  # synthesis and fused search the FFA index only
            for target in TARGETS if via == "direct" else ("ffa",):
                self.search_seconds.labels(via, target)
        for counter in self.updates.values():
            for result in UPDATE_RESULTS:
                counter.labels(result)
        for reason in REFUSAL_REASONS:
            self.rejected.labels(reason)

    def observe_search(self, result: SearchResult) -> None:
        """An engine search listener: its total time by `via` and `target`."""
        seconds = result.timings_ms.get("total", 0.0) / 1000
        self.search_seconds.labels(result.via, result.target).observe(seconds)

    def observe_request(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        """One answered request: counts, latency, and what it says about updates/uploads."""
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        series = self._series.get((method, route, status))
        if series is None:  # .labels() costs a few µs a call: look each series up once
            labels = (method, route, str(status))
            series = (self.requests.labels(*labels), self.request_seconds.labels(*labels))
            self._series[(method, route, status)] = series
        series[0].inc()
        series[1].observe(seconds)
        kind = UPDATES.get((method, route))
        if kind is not None:
            result = "ok" if status < 400 else "rejected" if status < 500 else "failed"
            self.updates[kind].labels(result).inc()
        reason = (scope.get("state") or {}).get(REFUSAL_STATE)
        if reason is None and status == 413:
            reason = "too_large"  # the body limit (RequestGuard), before any route ran
        if reason in REFUSAL_REASONS:
            self.rejected.labels(reason).inc()

    def attach(self, engine: Engine | None) -> None:
        if engine is not None:
            engine.add_search_listener(self.observe_search)

    def detach(self, engine: Engine | None) -> None:
        if engine is not None:
            engine.remove_search_listener(self.observe_search)


class EngineCollector(Collector):
    """Gauges read from the engine at scrape time (so adds and deletes show at once)."""

    def __init__(self, engine_of: Callable[[], Engine | None]):
        self.engine_of = engine_of

    def describe(self) -> list:
        return []  # the families depend on the engine: collected at scrape time only

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self.engine_of()
        ready = GaugeMetricFamily(
            f"{PREFIX}_ready", "1 when the model and index are loaded and the last save worked."
        )
        ready.add_metric([], float(is_ready(engine)))
        yield ready
        if engine is None:
            return
        cases = GaugeMetricFamily(
            f"{PREFIX}_cases", "Indexed cases per modality.", labels=["modality"]
        )
        modalities = engine.stats()["modalities"]
        for modality in MODALITIES:
            cases.add_metric([modality], float(modalities[modality]["count"]))
        yield cases
        for part in ("model", "index"):
            if part in engine.load_seconds:
                yield GaugeMetricFamily(
                    f"{PREFIX}_{part}_load_seconds",
                    f"Seconds the {part} took to load at startup.",
                    value=engine.load_seconds[part],
                )


def is_ready(engine: Engine | None) -> bool:
    return engine is not None and engine.save_error is None


class MetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI, outermost); see the module docstring."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routes: Callable[[], list[Any]]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]  # what the client gets if nothing answers (an unhandled error)

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = self.template(scope)
            self.metrics.observe_request(scope, route, status[0], time.perf_counter() - t0)

    def template(self, scope: Scope) -> str:
        """The request's route template: the one routing chose, else the first that matches
        its path (a request refused before routing), else UNROUTED."""
        path = getattr(scope.get("route"), "path", None)
        if path is not None:
            return path
        for route in _leaves(self.routes()):
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.path
        return UNROUTED


def _leaves(routes: list[Any]) -> Iterator[Any]:
    """The routes with a path, inside included routers too (FastAPI nests them)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaves(inner.routes)
        elif isinstance(getattr(route, "path", None), str):
            yield route
