"""Who may do what: named API keys and their roles, rate limits, the audit log of writes.

Keys: `FUNDUS2VIDEO_API_KEY` is the key named "read" (role read), `FUNDUS2VIDEO_WRITE_KEY`
the key named "write" (role write, which also reads), and `FUNDUS2VIDEO_KEYS_FILE` may name
more (`keys = [{name, role, key}]`, JSON or TOML). Reads need a key once any read key is
configured; writes (POST /cases, DELETE /cases/{case_id}) need a write key or, while none
is configured, `open_writes`. A key is compared in constant time with every configured key.

`AccessGuard` is pure ASGI and sits outside `fastpath.SimilarFastPath`, so the routes and
the fast path pass through the same checks: it classifies a request (search, generate or
write), applies that class's limit per key name (per client address without a valid key;
`slowapi`'s limiter over in-memory moving windows, one per process) and writes one audit
line per write attempt, with its final status, to the logger `fundus2video.audit` and, when
`audit_log` is set, to that file.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from limits import RateLimitItem, parse_many
from slowapi import Limiter
from slowapi.util import get_remote_address
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.errors import Fundus2VideoError

from .schemas import ErrorResponse
from .settings import Settings

audit_logger = logging.getLogger("fundus2video.audit")
log = logging.getLogger("fundus2video.api")

ROLES = ("read", "write")
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_FILE_KEY = 16  # characters of a keys-file key
RATE_SETTINGS = {"search": "rate_search", "generate": "rate_generate", "write": "rate_write"}
READ_REFUSAL = (
    "missing or wrong API key: send it in the X-API-Key header "
    "(or as the api_key query parameter of a media link)"
)
WRITE_MISSING = (
    "missing or wrong write key: adding or deleting cases needs a write key "
    "(FUNDUS2VIDEO_WRITE_KEY on the server) in the X-API-Key header"
)
WRITES_DISABLED = (
    "writes are disabled on this server: set FUNDUS2VIDEO_WRITE_KEY there and send it in "
    "the X-API-Key header (or set FUNDUS2VIDEO_OPEN_WRITES=true for local use)"
)
CHALLENGE = {"WWW-Authenticate": "APIKey"}


class AccessConfigError(Fundus2VideoError, ValueError):
    """A key, a keys file or the audit log path that cannot be used (names the setting)."""


@dataclass(frozen=True)
class ApiKey:
    name: str  # what logs and rate limits show; never the key itself
    role: str  # "read" | "write"
    secret: bytes = field(repr=False)


# --------------------------------------------------------------------------- keys


def read_keys_file(path: Path) -> list[ApiKey]:
    """The named keys of a JSON or TOML (`.toml`) file: `keys = [{name, role, key}, ...]`."""
    where = f"FUNDUS2VIDEO_KEYS_FILE {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = tomllib.loads(text) if Path(path).suffix.lower() == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise AccessConfigError(f"{where}: cannot read it ({type(e).__name__}: {e})") from e
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise AccessConfigError(f"{where}: expected a non-empty list `keys` of {{name, role, key}}")
    return [_key_entry(entry, f"{where}: keys[{i}]") for i, entry in enumerate(entries)]


def _key_entry(entry: Any, where: str) -> ApiKey:
    if not isinstance(entry, dict) or set(entry) != {"name", "role", "key"}:
        raise AccessConfigError(f"{where}: expected exactly the fields name, role and key")
    name, role, key = entry["name"], entry["role"], entry["key"]
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        raise AccessConfigError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise AccessConfigError(f"{where}: role must be read or write (got {role!r})")
    if not isinstance(key, str) or len(key) < MIN_FILE_KEY:
        raise AccessConfigError(f"{where}: key must be a string of {MIN_FILE_KEY}+ characters")
    return ApiKey(name, role, key.encode())


class KeyRing:
    """The configured keys; `identify` finds the one a request carries."""

    def __init__(self, keys: list[ApiKey]):
        names = [k.name for k in keys]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise AccessConfigError(f"two keys are named {twice[0]!r}: names must be unique")
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                if secrets.compare_digest(a.secret, b.secret):
                    raise AccessConfigError(f"keys {a.name!r} and {b.name!r} are the same key")
        self.keys = tuple(keys)
        self.read_required = any(k.role == "read" for k in keys)
        self.writers = any(k.role == "write" for k in keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        keys = []
        for name, value in (("read", settings.api_key), ("write", settings.write_key)):
            if value is not None:
                if not value.get_secret_value():
                    raise AccessConfigError(f"FUNDUS2VIDEO_{name.upper()}_KEY is set but empty")
                keys.append(ApiKey(name, name, value.get_secret_value().encode()))
        if settings.keys_file is not None:  # its names may not reuse "read" or "write"
            keys += read_keys_file(settings.keys_file)
        return cls(keys)

    def identify(self, given: str | None) -> ApiKey | None:
        """The key `given` is, comparing it in constant time with every key (no early exit)."""
        if not given:
            return None
        raw = given.encode("utf-8", "replace")
        found = None
        for key in self.keys:
            if secrets.compare_digest(raw, key.secret):
                found = key
        return found


# --------------------------------------------------------------------------- rate limits


class RateLimits:
    """Each route class's limits (`rate_search`, ...; empty: none) per caller, in memory."""

    def __init__(self, settings: Settings):
        self.items: dict[str, list[RateLimitItem]] = {}
        for kind, name in RATE_SETTINGS.items():
            value = getattr(settings, name).strip()
            if value:
                self.items[kind] = parse_many(value)
        # slowapi's limiter object, used directly (its route decorators cannot reach the
        # fast path): `retry_after` names the caller itself, so key_func stays unused
        self.limiter = Limiter(
            key_func=get_remote_address, storage_uri="memory://", strategy="moving-window"
        )

    def retry_after(self, kind: str, caller: str) -> int | None:
        """Count one request of `kind` by `caller`; None, or the seconds until it may retry."""
        items = self.items.get(kind)
        if not items:
            return None
        strategy = self.limiter.limiter
        if len(items) == 1:  # the usual case: one hit, which refuses without counting
            if strategy.hit(items[0], kind, caller):
                return None
            over = items
        else:  # count the request in every window only if all of them have room
            over = [item for item in items if not strategy.test(item, kind, caller)]
            if not over:
                for item in items:
                    strategy.hit(item, kind, caller)
                return None
        reset = max(strategy.get_window_stats(item, kind, caller).reset_time for item in over)
        return max(1, math.ceil(reset - time.time()))

    def describe(self, kind: str) -> str:
        return " and ".join(str(item) for item in self.items.get(kind, ()))


# --------------------------------------------------------------------------- audit


class AuditLog:
    """One JSON line per write attempt: to the logger, and appended to `path` when set."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            try:
                with open(path, "a", encoding="utf-8"):
                    pass
            except OSError as e:
                message = f"FUNDUS2VIDEO_AUDIT_LOG {path}: cannot append to it ({e})"
                raise AccessConfigError(message) from e

    def record(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
        audit_logger.info(line)
        if self.path is None:
            return
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as out:
                out.write(line + "\n")  # one write of one whole line, appended
        except OSError as e:
            log.error("cannot append to the audit log %s: %s", self.path, e)


# --------------------------------------------------------------------------- the rules


class Access:
    """The keys, the limits and the audit log of one app (`app.state.access`)."""

    def __init__(self, settings: Settings):
        self.keys = KeyRing.from_settings(settings)
        self.open_writes = settings.open_writes
        self.limits = RateLimits(settings)
        self.audit = AuditLog(settings.audit_log)

    def may_read(self, given: str | None) -> bool:
        """Whether `given` may read: any key does; without read keys, anyone may."""
        return not self.keys.read_required or self.keys.identify(given) is not None

    def write_refusal(self, given: str | None) -> HTTPException | None:
        """Why a write with key `given` is refused (401 no valid key, 403 not allowed)."""
        key = self.keys.identify(given)
        if self.keys.writers:
            if key is None:
                return HTTPException(401, WRITE_MISSING, headers=CHALLENGE)
            if key.role != "write":
                return HTTPException(
                    403,
                    f"the key {key.name!r} may only read: adding or deleting cases needs a "
                    "write key (FUNDUS2VIDEO_WRITE_KEY) in the X-API-Key header",
                )
            return None
        if self.keys.read_required and key is None:
            return HTTPException(401, READ_REFUSAL, headers=CHALLENGE)
        return None if self.open_writes else HTTPException(403, WRITES_DISABLED)

    def describe(self) -> str:
        """One line for `serve`: what reads and writes need."""
        reads = "reads need a key" if self.keys.read_required else "reads open"
        if self.keys.writers:
            writes = "writes need a write key"
        else:
            writes = "writes open" if self.open_writes else "writes disabled (no write key)"
        return f"{reads}; {writes}"


# --------------------------------------------------------------------------- middleware


@dataclass(frozen=True)
class RouteClass:
    method: str
    path: re.Pattern[str]
    template: str  # the route's path template, as the request log writes it
    kind: str  # "search" | "generate" | "write"


ROUTE_CLASSES = (
    RouteClass("POST", re.compile(r"/search"), "/search", "search"),
    RouteClass("GET", re.compile(r"/cases/([^/]+)/similar"), "/cases/{case_id}/similar", "search"),
    RouteClass("GET", re.compile(r"/cases/([^/]+)/explain"), "/cases/{case_id}/explain", "search"),
    RouteClass("POST", re.compile(r"/generate"), "/generate", "generate"),
    RouteClass("POST", re.compile(r"/cases"), "/cases", "write"),
    RouteClass("DELETE", re.compile(r"/cases/([^/]+)"), "/cases/{case_id}", "write"),
)


def classify(method: str, path: str) -> tuple[RouteClass, re.Match[str]] | None:
    """The route class of a request (HEAD as GET), and its path match; None: not limited."""
    method = "GET" if method == "HEAD" else method
    for route in ROUTE_CLASSES:
        if route.method == method and (match := route.path.fullmatch(path)):
            return route, match
    return None


def given_key(scope: Scope, *, query: bool = True) -> str | None:
    """The key a request carries: the X-API-Key header, else (`query`) `api_key=`."""
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return value.decode("latin-1")
    if not query:
        return None
    values = [v for k, v in parse_qsl(scope["query_string"].decode("latin-1")) if k == "api_key"]
    return values[-1] if values else None


def too_many(kind: str, limit: str, retry: int, request_id: str | None) -> JSONResponse:
    """429, in the service's error body, with `Retry-After` (seconds)."""
    detail = (
        f"too many {kind} requests: at most {limit} per key (or per client address without "
        f"one; FUNDUS2VIDEO_RATE_{kind.upper()}); retry in {retry} s"
    )
    body = ErrorResponse(detail=detail, request_id=request_id).model_dump()
    return JSONResponse(body, 429, headers={"Retry-After": str(retry)})


class AccessGuard:
    """Rate limits and the audit log, in front of the fast path and the routes."""

    def __init__(self, app: ASGIApp, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = classify(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        route, match = found
        given = given_key(scope, query=route.kind != "write")
        key = self.access.keys.identify(given)
        caller = f"key:{key.name}" if key else f"address:{_client(scope)}"
        status = {"code": 500}
        try:
            retry = self.access.limits.retry_after(route.kind, caller)
            if retry is None:
                await self.app(scope, receive, _recording(send, status))
                return
            scope["route"] = SimpleNamespace(path=route.template)  # for the request log
            rid = scope.get("state", {}).get("request_id")
            limit = self.access.limits.describe(route.kind)
            await too_many(route.kind, limit, retry, rid)(scope, receive, _recording(send, status))
        finally:
            if route.kind == "write":
                self.access.audit.record(_audit_entry(scope, route, match, key, given, status))


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _recording(send: Send, status: dict[str, int]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            status["code"] = message["status"]
        await send(message)

    return wrapped


def _audit_entry(
    scope: Scope,
    route: RouteClass,
    match: re.Match[str],
    key: ApiKey | None,
    given: str | None,
    status: dict[str, int],
) -> dict[str, Any]:
    state = scope.get("state", {})
    case_id = match[1] if match.groups() else state.get("audit_case_id")
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": state.get("request_id"),
        "key": key.name if key else None,
        "key_sent": bool(given),
        "client": _client(scope),
        "method": scope["method"],
        "route": route.template,
        "case_id": case_id[:200] if isinstance(case_id, str) else None,
        "status": status["code"],
    }


# --------------------------------------------------------------------------- OpenAPI


def _error_content(detail: str) -> dict[str, Any]:
    example = {"detail": detail, "errors": None, "request_id": "5f0c2a9e1b7d4c3a"}
    return {"application/json": {"example": example}}


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
RATE_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorResponse,
        "description": "Over this route class's rate limit for the key (or the client address "
        "without one): FUNDUS2VIDEO_RATE_SEARCH, _GENERATE, _WRITE.",
        "headers": RETRY_AFTER,
        "content": _error_content(
            "too many search requests: at most 600 per 1 minute per key (or per client address "
            "without one; FUNDUS2VIDEO_RATE_SEARCH); retry in 12 s"
        ),
    }
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "No valid key: this route needs a write key in X-API-Key.",
        "content": _error_content(WRITE_MISSING),
    },
    403: {
        "model": ErrorResponse,
        "description": "The key may only read, or the server has no write key (writes "
        "disabled unless FUNDUS2VIDEO_OPEN_WRITES).",
        "content": _error_content(
            "the key 'read' may only read: adding or deleting cases needs a write key "
            "(FUNDUS2VIDEO_WRITE_KEY) in the X-API-Key header"
        ),
    },
    **RATE_LIMITED,
}
