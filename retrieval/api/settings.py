"""API settings: environment variables `FUNDUS2VIDEO_*` (or a `.env` file), read on demand.

`get_settings()` reads them once (cached); `create_app(settings)` takes explicit ones.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from limits import parse_many
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

HARD_MAX_K = 1000  # the largest k any configuration may allow
HARD_MAX_PAGE = 1000

CF_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/tiff")
FFA_TYPES = (
    "video/mp4",
    "video/x-msvideo",
    "video/avi",
    "video/msvideo",
    "video/quicktime",
    "video/x-matroska",
    "video/webm",
    "image/tiff",
)
ANY_TYPES = ("application/octet-stream",)  # clients that do not say: the content decides


class Settings(BaseSettings):
    """Everything configurable about the service (env prefix FUNDUS2VIDEO_)."""

    model_config = SettingsConfigDict(env_prefix="FUNDUS2VIDEO_", env_file=".env", extra="ignore")

    index: Path | None = Field(default=None, description="The index folder to serve.")
    load_in_background: bool = Field(
        default=False,
        description="Open the index folder in the background: the service answers at once, "
        "/ready is 503 (loading) until the model and index are loaded. `serve` sets it.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description='The read key (named "read"): when set, every route but /health and '
        "/ready requires a key (X-API-Key); /metrics too unless metrics_public.",
    )
    write_key: SecretStr | None = Field(
        default=None,
        description='The write key (named "write"): POST /cases and DELETE /cases/{case_id} '
        "need it (X-API-Key); it also reads. A read key there is a 403.",
    )
    keys_file: Path | None = Field(
        default=None,
        description="A JSON or TOML file of more named keys: keys = [{name, role (read or "
        "write), key (16+ characters)}].",
    )
    open_writes: bool = Field(
        default=False,
        description="While no write key is configured, let writes through under the read rule "
        "(local use, the demo); otherwise they are refused (403).",
    )
    rate_search: str = Field(
        default="600/minute",
        description="Rate limit per key (per client address without one) of POST /search, "
        "GET /cases/{case_id}/similar and /explain, e.g. '600/minute' or "
        "'10/second;600/minute'; empty: none.",
    )
    rate_generate: str = Field(default="30/minute", description="The same for POST /generate.")
    rate_write: str = Field(
        default="60/minute", description="The same for POST /cases and DELETE /cases/{case_id}."
    )
    audit_log: Path | None = Field(
        default=None,
        description="Also append the audit log (one JSON line per write attempt, logger "
        "fundus2video.audit) to this file.",
    )
    max_upload_bytes: int = Field(default=64 * 2**20, ge=1024, description="Largest request body.")
    max_pixels: int = Field(default=40_000_000, ge=256, description="Largest image or frame.")
    max_frames: int = Field(default=512, ge=2, description="Most frames of an uploaded video.")
    max_video_pixels: int = Field(
        default=256 * 2**20, ge=256, description="Largest video: frames x width x height."
    )
    min_side: int = Field(default=16, ge=1, description="Smallest accepted image side.")
    max_k: int = Field(default=100, ge=1, le=HARD_MAX_K)
    max_page: int = Field(default=500, ge=1, le=HARD_MAX_PAGE)
    max_synth_frames: int = Field(default=64, ge=1, le=1024)
    map_max_points: int = Field(default=20_000, ge=10)
    synthetic_ttl_s: int = Field(default=600, ge=1, description="How long /synthetic/* live.")
    synthetic_cache_size: int = Field(default=64, ge=1)
    report: Path | None = Field(default=None, description="Evaluation report for /model.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins that browsers may call the API from (CORS), e.g. "
        '["https://viewer.example.org"]; empty (the default): no CORS headers at all.',
    )
    use_gpu: bool | None = None
    fast_path: bool = Field(
        default=True,
        description="Answer GET /cases/{id}/similar without FastAPI's routing (same bodies).",
    )
    metrics_public: bool = Field(
        default=False,
        description="Serve GET /metrics without the API key (for a Prometheus scraper "
        "that cannot send one); by default it needs the key like every other route.",
    )

    @field_validator("rate_search", "rate_generate", "rate_write")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        if value.strip():
            try:
                parse_many(value)
            except ValueError as e:
                raise ValueError(
                    f"not a rate limit like '600/minute' or '10/second;600/minute' (got {value!r})"
                ) from e
        return value.strip()

    def accepted_types(self, kind: str) -> tuple[str, ...]:
        types = {"cf": CF_TYPES, "ffa": FFA_TYPES}.get(kind, CF_TYPES + FFA_TYPES) + ANY_TYPES
        return tuple(dict.fromkeys(types))


@lru_cache
def get_settings() -> Settings:
    return Settings()
