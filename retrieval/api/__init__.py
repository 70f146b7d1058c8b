"""The HTTP API (FastAPI): `create_app(settings)`; routes in `routes/`, models in `schemas`."""

from .main import create_app
from .settings import Settings, get_settings

__all__ = ["Settings", "create_app", "get_settings"]
