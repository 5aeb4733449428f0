"""The gateway's endpoints, once: the URL patterns (`slots.gateway.views.urlpatterns`) and
the fast path in front of Django (`slots.gateway.asgi`) are both generated from this table.
Plain strings only, so the fast path can import it before Django is set up. Also the body
caps (`body_cap`), which `serve`'s Daphne (hal0site.bodylimit) and the gateway share."""

from __future__ import annotations

import re

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
# ... and so do the slot pages' Try-it uploads (slots/urls.py: slots/<name>/try/<endpoint>)
_UPLOADS = "|".join(re.escape(endpoint) for endpoint in sorted(MULTIPART_ENDPOINTS))
TRY_UPLOAD_PATH = re.compile(rf"/slots/[^/]+/try/(?:{_UPLOADS})")
MB = 1024 * 1024

# what hal0 lists itself (GET), besides the proxied ENDPOINTS
LISTINGS = (MODELS, "audio/voices", "audio/models")
MODELS_PREFIX = PREFIX + MODELS + "/"

# llama.cpp's router API, next to OpenAI's (slots.gateway.router): endpoint -> what it does.
# llama-server serves these at the root, so hal0 serves them at the root and under /v1/
# alike (a client's base URL may have /v1 or not), and GET /models too.
ROOT = "/"
ROUTER_ENDPOINTS: dict[str, str] = {
    "models/load": "load",  # POST {"model": ...} -> {"success": true}
    "models/unload": "unload",
    "models/sse": "events",  # GET: model status changes, server-sent
}
ROOT_MODELS = ROOT + MODELS  # GET /models, llama.cpp's listing
ROOT_MODELS_PREFIX = ROOT_MODELS + "/"


def handles(path: str) -> bool:
    """Every path under /v1/ is the gateway's (unknown ones answer OpenAI-shaped JSON), and
    so are /models and /models/... (llama.cpp's router API, at the root as llama-server
    serves it)."""
    return path.startswith(("/v1/", "/models/")) or path in ("/v1", "/models")


def body_cap(path: str) -> int:
    """The largest request body (bytes) hal0 accepts for `path` (no query string):
    `HAL0_MAX_BODY_MB`, or `HAL0_MAX_UPLOAD_MB` for the upload endpoints (the gateway's and
    the Try-it panels' that post to them)."""
    if path in UPLOAD_PATHS or TRY_UPLOAD_PATH.fullmatch(path):
        return int(settings.HAL0_MAX_UPLOAD_MB * MB)
    return int(settings.HAL0_MAX_BODY_MB * MB)


def too_large_message(cap: int) -> str:
    return (f"The request body is larger than {cap / MB:g} MB, the most hal0 accepts here "
            "(HAL0_MAX_BODY_MB, HAL0_MAX_UPLOAD_MB for transcriptions).")
