"""A small typed HTTP client of the fundus2video API (the routes in the README's HTTP API table).

The dashboard's only way to the engine: it never imports `encoder`, `index` or
`retrieval` (nor the API's schemas; the shapes it needs are mirrored here). Every
non-2xx answer and every transport failure becomes an `ApiError` carrying the
server's message, which the pages show with `st.error`.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_API = "http://127.0.0.1:8000"
TARGETS = ("cf", "ffa", "both")
VIAS = ("direct", "synthesis", "fused")
FFA_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")


def modality_of(filename: str) -> str:
    """`ffa` for a video file name, else `cf` (for display; the server decides for itself)."""
    return "ffa" if filename.lower().endswith(FFA_SUFFIXES) else "cf"


def content_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


class ApiError(Exception):
    """The API answered with an error, or could not be reached.

    `status` is the HTTP status (None when the server was unreachable); `message` is
    the server's own explanation (FastAPI's `detail`), readable as it stands.
    """

    def __init__(self, message: str, status: int | None = None, route: str = ""):
        super().__init__(message)
        self.message = message
        self.status = status
        self.route = route

    def __str__(self) -> str:
        where = f" ({self.route})" if self.route else ""
        if self.status is None:
            return f"{self.message}{where}"
        return f"API error {self.status}{where}: {self.message}"


@dataclass(frozen=True)
class Result:
    """One ranked case, as `POST /search` and `GET /cases/{id}/similar` return it (the
    API's `ResultRow`; tests/test_catalog_record.py keeps the two alike)."""

    rank: int
    case_id: str
    score: float
    modality: str  # "cf" | "ffa": which index the hit came from
    diagnosis: str | None = None
    eye: str | None = None
    lesions: tuple[str, ...] = ()
    cf_url: str | None = None
    ffa_url: str | None = None
    synthetic: bool = False

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Result:
        return cls(
            rank=int(row["rank"]),
            case_id=str(row["case_id"]),
            score=float(row["score"]),
            modality=str(row.get("modality") or ""),
            diagnosis=row.get("diagnosis"),
            eye=row.get("eye"),
            lesions=tuple(row.get("lesions") or ()),
            cf_url=row.get("cf_url"),
            ffa_url=row.get("ffa_url"),
            synthetic=bool(row.get("synthetic", False)),
        )


@dataclass(frozen=True)
class SearchResponse:
    results: list[Result]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # everything else the API said

    @property
    def synthetic_query(self) -> dict[str, Any] | None:
        """`{video_url, times_s, ...}` of the query's synthesized FFA (via synthesis / fused)."""
        return self.raw.get("synthetic_query") or None

    @property
    def similarity(self) -> str | None:
        """How the results were scored: combined, pair or clinical."""
        return self.raw.get("similarity")

    @property
    def suggestion(self) -> dict[str, Any] | None:
        """`{diagnosis, probability, abstained, probabilities, supporting_case_ids, neighbours,
        calibrated, label}`: the diagnosis suggested by similar cases (None: no model)."""
        found = self.raw.get("suggestion")
        return found if isinstance(found, dict) else None


@dataclass(frozen=True)
class CasePage:
    """One page of `GET /cases`: rows (dicts of catalog columns), the total, the paging."""

    items: list[dict[str, Any]]
    total: int
    offset: int
    limit: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Video:
    """An MP4 and, when the server sent them, its frames' seconds after injection."""

    data: bytes
    times_s: tuple[float, ...] | None = None
    synthetic: bool = False


def _message(response: httpx.Response) -> str:
    """FastAPI's `detail` (string, or validation errors as a list) or the body text."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:500] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # pydantic validation errors
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
                parts.append(f"{loc}: {err.get('msg', err)}" if loc else str(err.get("msg")))
            else:
                parts.append(str(err))
        return "; ".join(parts)
    return str(detail)


def _filters(diagnosis: str | None, eye: str | None, split: str | None) -> dict[str, str]:
    pairs = {"diagnosis": diagnosis, "eye": eye, "split": split}
    return {k: v for k, v in pairs.items() if v}


def _times_header(response: httpx.Response) -> tuple[float, ...] | None:
    value = response.headers.get("x-frame-times")
    if not value:
        return None
    try:
        return tuple(float(t) for t in value.split(",") if t.strip())
    except ValueError:
        return None


class ApiClient:
    """Synchronous client of one API server; cheap to share between Streamlit sessions."""

    def __init__(
        self,
        base_url: str = DEFAULT_API,
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,  # tests: httpx.MockTransport
    ):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    # -- transport --------------------------------------------------------------------
    def _request(self, method: str, route: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, route, **kwargs)
        except httpx.TimeoutException as e:
            raise ApiError(f"the API at {self.base_url} did not answer in time", None, route) from e
        except httpx.HTTPError as e:
            raise ApiError(
                f"cannot reach the API at {self.base_url} ({type(e).__name__}: {e}); "
                "is `fundus2video serve INDEX` running?",
                None,
                route,
            ) from e
        if response.status_code >= 400:
            raise ApiError(_message(response), response.status_code, route)
        return response

    def _json(self, method: str, route: str, **kwargs: Any) -> Any:
        response = self._request(method, route, **kwargs)
        try:
            return response.json()
        except ValueError as e:
            raise ApiError("the API answered with something that is not JSON", None, route) from e

    # -- routes ----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def stats(self) -> dict[str, Any]:
        return self._json("GET", "/stats")

    def search(
        self,
        data: bytes,
        filename: str,
        *,
        target: str = "cf",
        k: int = 10,
        via: str = "direct",
        similarity: str | None = None,
        diagnosis: str | None = None,
        eye: str | None = None,
        split: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> SearchResponse:
        """Ranked cases for an uploaded CF photo or FFA video (`similarity` None: the
        server's default for the query type)."""
        form = {"target": target, "k": str(k), "via": via, **_filters(diagnosis, eye, split)}
        if similarity:
            form["similarity"] = similarity
        body = self._json(
            "POST", "/search", data=form, files={"file": (filename, data, content_type)}
        )
        return _search_response(body)

    def similar(
        self,
        case_id: str,
        *,
        target: str = "cf",
        k: int = 10,
        via: str = "direct",
        query_modality: str | None = None,
        similarity: str | None = None,
        diagnosis: str | None = None,
        eye: str | None = None,
        split: str | None = None,
    ) -> SearchResponse:
        """Ranked cases for a case already in the index."""
        params: dict[str, Any] = {"target": target, "k": k, "via": via}
        if query_modality:
            params["modality"] = query_modality
        if similarity:
            params["similarity"] = similarity
        params.update(_filters(diagnosis, eye, split))
        body = self._json("GET", f"/cases/{_quote(case_id)}/similar", params=params)
        return _search_response(body)

    def cases(
        self,
        *,
        offset: int = 0,
        limit: int = 20,
        diagnosis: str | None = None,
        eye: str | None = None,
        split: str | None = None,
    ) -> CasePage:
        params = {"offset": offset, "limit": limit, **_filters(diagnosis, eye, split)}
        body = self._json("GET", "/cases", params=params)
        if isinstance(body, list):
            return CasePage(body, len(body), offset, limit, {})
        items = body.get("items", body.get("cases", []))
        total = int(body.get("total", len(items)))
        return CasePage(
            list(items), total, int(body.get("offset", offset)), int(body.get("limit", limit)), body
        )

    def case(self, case_id: str) -> dict[str, Any]:
        return self._json("GET", f"/cases/{_quote(case_id)}")

    def case_cf(self, case_id: str) -> bytes:
        return self._request("GET", f"/cases/{_quote(case_id)}/cf").content

    def case_ffa(self, case_id: str) -> Video:
        response = self._request("GET", f"/cases/{_quote(case_id)}/ffa")
        return Video(response.content, _times_header(response))

    def media(self, url: str) -> bytes:
        """The bytes behind a result's `cf_url` / `ffa_url` (relative to the API, or absolute)."""
        return self._request("GET", url).content

    def generate(
        self, data: bytes, filename: str, content_type: str = "application/octet-stream"
    ) -> Video:
        """A synthesized FFA video (MP4, every frame marked SYNTHETIC) for a CF photo."""
        response = self._request(
            "POST", "/generate", files={"file": (filename, data, content_type)}
        )
        return Video(response.content, _times_header(response), synthetic=True)

    def synthetic(self, synthetic_query: dict[str, Any]) -> Video:
        """The synthesized FFA video a search answered with (`synthetic_query.video_url`)."""
        response = self._request("GET", synthetic_query["video_url"])
        times = synthetic_query.get("times_s") or _times_header(response)
        return Video(response.content, tuple(times) if times else None, synthetic=True)

    def embedding_map(self, similarity: str | None = None) -> dict[str, Any]:
        """`{"method": "pca" | "umap" | ..., "similarity": ..., "points": [{case_id,
        modality, diagnosis, x, y}]}`: the space of `similarity` (None: the server's
        default, clinical when the index supports it)."""
        params = {"similarity": similarity} if similarity else None
        body = self._json("GET", "/map", params=params)
        if isinstance(body, list):
            return {"method": None, "points": body}
        points = body.get("points", body.get("items", []))
        return {**body, "method": body.get("method"), "points": list(points)}

    def model(self) -> dict[str, Any]:
        return self._json("GET", "/model")

    def reliability_png(self, url: str = "/model/reliability.png") -> bytes:
        """The diagnosis suggestion's reliability diagram (PNG; ApiError 404 when absent)."""
        return self._request("GET", url).content


def _quote(case_id: str) -> str:
    return quote(case_id, safe="")


def _search_response(body: Any) -> SearchResponse:
    if isinstance(body, list):
        return SearchResponse([Result.from_json(r) for r in body], {})
    rows = body.get("results", [])
    return SearchResponse([Result.from_json(r) for r in rows], body)
