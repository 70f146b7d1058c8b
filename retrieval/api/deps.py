"""Dependencies of the routes, as `Annotated` aliases (`EngineDep`, `SettingsDep`, ...).

They are `async def` although they never await: FastAPI runs a plain `def` dependency
in the threadpool, a thread hop (~60 µs) per dependency per request.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, APIKeyQuery

from retrieval.search.engine import Engine

from .settings import Settings
from .synthetic import SyntheticStore

_header_key = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Required when the server sets an API key."
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


def api_key_ok(settings: Settings, given: str | None) -> bool:
    """Whether `given` is the configured API key (always, when none is configured)."""
    if settings.api_key is None:
        return True
    expected = settings.api_key.get_secret_value().encode()
    return bool(given) and secrets.compare_digest(given.encode(), expected)


async def require_api_key(
    settings: SettingsDep,
    header: Annotated[str | None, Security(_header_key)] = None,
    query: Annotated[str | None, Security(_query_key)] = None,
) -> None:
    """Refuse the request unless it carries the configured API key (when one is set)."""
    if not api_key_ok(settings, header or query):
        raise HTTPException(
            401,
            "missing or wrong API key: send it in the X-API-Key header "
            "(or as the api_key query parameter of a media link)",
            headers={"WWW-Authenticate": "APIKey"},
        )
