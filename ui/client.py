"""A small typed HTTP client of the fundus2video API (the routes in the README's HTTP API table).

The dashboard's only way to the engine: it never imports `encoder`, `index` or
`retrieval` (nor the API's schemas; the shapes it needs are mirrored here). Every
non-2xx answer and every transport failure becomes an `ApiError` carrying the
server's message, which the pages show with `st.error`.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_API = "http://127.0.0.1:8000"
TARGETS = ("cf", "ffa", "both")
VIAS = ("direct", "synthesis", "fused")
FFA_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
ACCESS_ERRORS = {  # how an ApiError names these statuses
    401: "API key missing or wrong",
    403: "Not allowed",
    429: "Too many requests",
}


def modality_of(filename: str) -> str:
    """`ffa` for a video file name, else `cf` (for display; the server decides for itself)."""
    return "ffa" if filename.lower().endswith(FFA_SUFFIXES) else "cf"


def content_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


class ApiError(Exception):
    """The API answered with an error, or could not be reached.

    `status` is the HTTP status (None when the server was unreachable); `message` is
    the server's own explanation (FastAPI's `detail`), readable as it stands;
    `retry_after` the seconds a 429 (too many requests) says to wait.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        route: str = "",
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.route = route
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" ({self.route})" if self.route else ""
        if self.status is None:
            return f"{self.message}{where}"
        if self.status in ACCESS_ERRORS:
            return f"{ACCESS_ERRORS[self.status]} (HTTP {self.status}{where}): {self.message}"
        return f"API error {self.status}{where}: {self.message}"


class NearDuplicateError(ApiError):
    """409 from `add_case`: the new case's CF or FFA near-duplicates indexed cases.

    `duplicates`: one dict per match (`case_id` of the existing case, `modality`,
    `distance`, `threshold`), nearest first; `existing_case_id` is the nearest one's."""

    def __init__(self, message: str, status: int, route: str, duplicates: list[dict[str, Any]]):
        super().__init__(message, status, route)
        self.duplicates = duplicates
        self.existing_case_id = duplicates[0]["case_id"] if duplicates else None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _api_error(response: httpx.Response, route: str) -> ApiError:
    """The error for a 4xx/5xx answer (a NearDuplicateError when it names duplicates)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    found = body.get("duplicates") if isinstance(body, dict) else None
    if response.status_code == 409 and isinstance(found, list) and found:
        return NearDuplicateError(_message(response), 409, route, found)
    return ApiError(_message(response), response.status_code, route, _retry_after(response))


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
    # a region query: where on this case's CF photo the box matched (normalised x0, y0,
    # x1, y1) and how well (the API's `ResultRow.region`, `region_score`)
    region: tuple[float, float, float, float] | None = None
    region_score: float | None = None
    # a vessel-checked pair search: how well the query's vessels lie on this case's (0-1)
    vessel_match: float | None = None

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
            region=tuple(float(v) for v in row["region"]) if row.get("region") else None,
            region_score=row.get("region_score"),
            vessel_match=row.get("vessel_match"),
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
    def vessel_checked(self) -> bool:
        """Whether the vessel check re-ranked the results (a pair search)."""
        return bool(self.raw.get("vessel_checked"))

    @property
    def region(self) -> tuple[float, float, float, float] | None:
        """A region query's box (normalised x0, y0, x1, y1 on the query photo)."""
        box = (self.raw.get("query") or {}).get("region")
        return tuple(float(v) for v in box) if box else None

    @property
    def feedback(self) -> dict[str, Any]:
        """`{positive, negative, feedback}`: the marks that refined this search (empty lists
        and None when it was not refined)."""
        query = self.raw.get("query") or {}
        return {
            "positive": list(query.get("positive") or ()),
            "negative": list(query.get("negative") or ()),
            "feedback": query.get("feedback"),
        }

    @property
    def suggestion(self) -> dict[str, Any] | None:
        """`{diagnosis, probability, abstained, probabilities, supporting_case_ids, neighbours,
        calibrated, label}`: the diagnosis suggested by similar cases (None: no model)."""
        found = self.raw.get("suggestion")
        return found if isinstance(found, dict) else None

    @property
    def explanations(self) -> list[dict[str, Any]]:
        """With `search(explain_top=n)`: why each of the top n results matched (the API's
        `ExplanationResponse` bodies, in rank order); [] otherwise."""
        found = self.raw.get("explanations")
        return found if isinstance(found, list) else []


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


def _region(region: Sequence[float] | str | None) -> dict[str, str]:
    """The `region` field: a box x0,y0,x1,y1 (normalised, on the CF query photo)."""
    if region is None or region == "":
        return {}
    text = region if isinstance(region, str) else ",".join(f"{float(v):.4f}" for v in region)
    return {"region": text}


def _feedback(positive: Any, negative: Any, feedback: str | None) -> dict[str, list[str] | str]:
    """Relevance-feedback fields (repeated `positive` / `negative` case ids, the strategy)."""
    out: dict[str, list[str] | str] = {}
    for name, ids in (("positive", positive), ("negative", negative)):
        if ids:
            out[name] = [str(i) for i in ids]
    if feedback:
        out["feedback"] = feedback
    return out


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
        api_key: str | None = None,
        write_key: str | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,  # tests: httpx.MockTransport
    ):
        """`api_key` goes with every request (X-API-Key); `write_key`, when given, instead
        with `add_case` and `delete_case` (the server's FUNDUS2VIDEO_WRITE_KEY)."""
        self.base_url = base_url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else None
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, headers=headers
        )
        self._write_headers = {"X-API-Key": write_key} if write_key else {}

    def close(self) -> None:
        self._http.close()

    # -- transport --------------------------------------------------------------------
    def _request(
        self, method: str, route: str, *, accept: tuple[int, ...] = (), **kwargs: Any
    ) -> httpx.Response:
        """The answer; an `ApiError` for a status >= 400 not in `accept`, or no answer."""
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
        if response.status_code >= 400 and response.status_code not in accept:
            raise _api_error(response, route)
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

    def ready(self) -> dict[str, Any]:
        """GET /ready: `ready` (bool), `missing` (model, index, index_save), `detail`, `cases`;
        a 503 (not ready) answers its body too, not an `ApiError`."""
        return self._json("GET", "/ready", accept=(503,), timeout=10.0)

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
        explain_top: int = 0,
        positive: Sequence[str] = (),
        negative: Sequence[str] = (),
        feedback: str | None = None,
        region: Sequence[float] | str | None = None,
        vessel_check: bool = True,
    ) -> SearchResponse:
        """Ranked cases for an uploaded CF photo or FFA video (`similarity` None: the
        server's default for the query type); `explain_top` n > 0 adds `explanations` of
        the top n results (at most 10). `positive` / `negative` case ids refine the search
        (relevance feedback, `feedback`: rocchio or best_score; None: the server's default).
        `region` (x0, y0, x1, y1 normalised on a CF photo) searches by that box's content;
        each result's `region` is then where it matched. `vessel_check` False: a pair search
        ranked by the embedding alone."""
        form: dict[str, Any] = {"target": target, "k": str(k), "via": via}
        form["vessel_check"] = "true" if vessel_check else "false"
        form.update(_filters(diagnosis, eye, split), **_feedback(positive, negative, feedback))
        form.update(_region(region))
        if similarity:
            form["similarity"] = similarity
        if explain_top:
            form.update(explain="true", explain_top=str(explain_top))
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
        positive: Sequence[str] = (),
        negative: Sequence[str] = (),
        feedback: str | None = None,
        region: Sequence[float] | str | None = None,
        vessel_check: bool = True,
    ) -> SearchResponse:
        """Ranked cases for a case already in the index (`positive` / `negative`, `region`
        on the case's CF photo, `vessel_check`: as `search`)."""
        params: dict[str, Any] = {"target": target, "k": k, "via": via}
        params["vessel_check"] = "true" if vessel_check else "false"
        params.update(_feedback(positive, negative, feedback), **_region(region))
        if query_modality:
            params["modality"] = query_modality
        if similarity:
            params["similarity"] = similarity
        params.update(_filters(diagnosis, eye, split))
        body = self._json("GET", f"/cases/{_quote(case_id)}/similar", params=params)
        return _search_response(body)

    def explain(
        self,
        case_id: str,
        other: str,
        *,
        similarity: str | None = None,
        query_modality: str = "cf",
        target: str | None = None,
    ) -> dict[str, Any]:
        """Why `other` matches `case_id` (GET /cases/{id}/explain): `{similarity, score,
        search_score, grid, sum_check, query, result}`, each side with `regions` (grid x grid
        shares of the score), `top_regions` and, for an FFA side, `frames` and `phases`."""
        params: dict[str, Any] = {"other": other, "modality": query_modality}
        if similarity:
            params["similarity"] = similarity
        if target:
            params["target"] = target
        return self._json("GET", f"/cases/{_quote(case_id)}/explain", params=params)

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

    def add_case(
        self,
        case_id: str,
        cf: tuple[str, bytes],
        ffa: tuple[str, bytes],
        *,
        metadata: dict[str, Any] | None = None,
        allow_duplicate: bool = False,
        register: bool = True,
    ) -> dict[str, Any]:
        """`POST /cases`: add a case from its CF photo and FFA video, each (filename, bytes);
        `metadata` holds the other form fields (patient_id, eye, age, sex, diagnosis,
        lesions, split, source, ffa_times_s). Raises NearDuplicateError (409, naming the
        existing case ids) when the media repeat an indexed case, unless `allow_duplicate`.
        The server registers the CF to the FFA unless `register` is false."""
        form: dict[str, Any] = {k: v for k, v in (metadata or {}).items() if v is not None}
        form |= {
            "case_id": case_id,
            "allow_duplicate": "true" if allow_duplicate else "false",
            "register": "true" if register else "false",
        }
        files = {
            "cf": (cf[0], cf[1], content_type(cf[0])),
            "ffa": (ffa[0], ffa[1], content_type(ffa[0])),
        }
        return self._json("POST", "/cases", data=form, files=files, headers=self._write_headers)

    def delete_case(self, case_id: str) -> dict[str, Any]:
        """`DELETE /cases/{id}`: `{case_id, deleted, catalog_rows}` (needs the write key)."""
        route = f"/cases/{_quote(case_id)}"
        return self._json("DELETE", route, headers=self._write_headers)

    def case_duplicates(self, case_id: str) -> list[dict[str, Any]]:
        """Indexed cases whose CF or FFA near-duplicates this case's (`GET .../duplicates`)."""
        return self._json("GET", f"/cases/{_quote(case_id)}/duplicates")["items"]

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
