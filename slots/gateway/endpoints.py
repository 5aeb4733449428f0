"""The gateway's endpoints, once: the URL patterns (`slots.gateway.views.urlpatterns`) and
the fast path in front of Django (`slots.gateway.asgi`) are both generated from this table.
Plain strings only, so the fast path can import it before Django is set up. Also the body
caps (`body_cap`), which `serve`'s Daphne (hal0site.bodylimit) and the gateway share."""

from __future__ import annotations

from django.conf import settings

PREFIX = "/v1/"
MODELS = "models"  # GET /v1/models and /v1/models/<id>
METRICS_PATH = "/metrics"  # Prometheus; served by Django (it accepts a session login)

# endpoint (after /v1/) -> the capability that serves it
ENDPOINTS: dict[str, str] = {
    "chat/completions": "chat",
    "completions": "chat",
    "responses": "chat",  # OpenAI's Responses API; lemond serves it (SSE too)
    "embeddings": "embed",
    "rerank": "rerank",
    "audio/transcriptions": "stt",
    "audio/speech": "tts",
    "images/generations": "img",
}
MULTIPART_ENDPOINTS = frozenset({"audio/transcriptions"})
# paths that carry files get HAL0_MAX_UPLOAD_MB instead of HAL0_MAX_BODY_MB
UPLOAD_PATHS = frozenset(PREFIX + endpoint for endpoint in MULTIPART_ENDPOINTS)
MB = 1024 * 1024

# what hal0 lists itself (GET), besides the proxied ENDPOINTS
LISTINGS = (MODELS, "audio/voices", "audio/models")
MODELS_PREFIX = PREFIX + MODELS + "/"


def handles(path: str) -> bool:
    """Every path under /v1/ is the gateway's (unknown ones answer OpenAI-shaped JSON), and
    so is /models, where a client whose base URL lacks its /v1 lands."""
    return path.startswith(("/v1/", "/models/")) or path in ("/v1", "/models")


def body_cap(path: str) -> int:
    """The largest request body (bytes) hal0 accepts for `path` (no query string):
    `HAL0_MAX_BODY_MB`, or `HAL0_MAX_UPLOAD_MB` for the upload endpoints."""
    if path in UPLOAD_PATHS:
        return int(settings.HAL0_MAX_UPLOAD_MB * MB)
    return int(settings.HAL0_MAX_BODY_MB * MB)


def too_large_message(cap: int) -> str:
    return (f"The request body is larger than {cap / MB:g} MB, the most hal0 accepts here "
            "(HAL0_MAX_BODY_MB, HAL0_MAX_UPLOAD_MB for transcriptions).")
