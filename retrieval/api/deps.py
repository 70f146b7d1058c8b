"""Dependencies of the routes, as `Annotated` aliases (`EngineDep`, `SettingsDep`, ...).

They are `async def` although they rarely await: FastAPI runs a plain `def` dependency
in the threadpool, a thread hop (~60 µs) per dependency per request. `require_api_key`
and `require_write_key` apply the rules of `access.Access` (`app.state.access`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, APIKeyQuery

from retrieval.search.engine import Engine

from .access import READ_REFUSAL, Access
from .settings import Settings
from .synthetic import SyntheticStore

_header_key = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Any configured key: the read key (FUNDUS2VIDEO_API_KEY), the write key "
    "(FUNDUS2VIDEO_WRITE_KEY) or a keys-file key. Required once a read key is set.",
)
_write_key = APIKeyHeader(
    name="X-API-Key",
    scheme_name="WriteKey",
    auto_error=False,
    description="A write key: FUNDUS2VIDEO_WRITE_KEY or a keys-file key with role write "
    "(a read key is refused with 403).",
)
_query_key = APIKeyQuery(
    name="api_key",
    auto_error=False,
    description="The same key as a query parameter, for media links (<video src>, <img src>).",
)


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_loaded_engine(request: Request) -> Engine | None:
    """The engine, or None while no index is loaded."""
    return getattr(request.app.state, "engine", None)


async def get_engine(request: Request) -> Engine:
    """The engine; 503 while no index is loaded."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise HTTPException(503, "no index is loaded (start the server with an index folder)")
    return engine


async def get_synthetic_store(request: Request) -> SyntheticStore:
    return request.app.state.synthetic


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
LoadedEngineDep = Annotated[Engine | None, Depends(get_loaded_engine)]
SyntheticDep = Annotated[SyntheticStore, Depends(get_synthetic_store)]


async def require_api_key(
    request: Request,
    header: Annotated[str | None, Security(_header_key)] = None,
    query: Annotated[str | None, Security(_query_key)] = None,
) -> None:
    """Refuse the request unless it carries a configured key (when a read key is set)."""
    access: Access = request.app.state.access
    if not access.may_read(header or query):
        raise HTTPException(401, READ_REFUSAL, headers={"WWW-Authenticate": "APIKey"})


async def require_write_key(
    request: Request, header: Annotated[str | None, Security(_write_key)] = None
) -> None:
    """Refuse a change to the index unless it carries a write key (or writes are open).

    Notes the case id of a POST for the audit line (`access.AccessGuard` writes it)."""
    if request.method == "POST":
        form = await request.form()  # already parsed for the route's fields: cached
        case_id = form.get("case_id")
        request.state.audit_case_id = case_id if isinstance(case_id, str) else None
    access: Access = request.app.state.access
    refusal = access.write_refusal(header)
    if refusal is not None:
        raise refusal
