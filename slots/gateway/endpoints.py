"""The gateway's endpoints, once: the URL patterns (`slots.gateway.views.urlpatterns`) and
the fast path in front of Django (`slots.gateway.asgi`) are both generated from this table.
Plain strings only, so the fast path can import it before Django is set up."""

from __future__ import annotations

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

# what hal0 lists itself (GET), besides the proxied ENDPOINTS
LISTINGS = (MODELS, "audio/voices", "audio/models")
MODELS_PREFIX = PREFIX + MODELS + "/"


def handles(path: str) -> bool:
    """Every path under /v1/ is the gateway's (unknown ones answer OpenAI-shaped JSON), and
    so is /models, where a client whose base URL lacks its /v1 lands."""
    return path.startswith(("/v1/", "/models/")) or path in ("/v1", "/models")
