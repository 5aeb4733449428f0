"""The slot page's "Try it" panels: `/slots/<name>/try/<endpoint>`.

The panels are the dashboard's own (same-origin) requests, so they carry the session and a
CSRF token, never an API token. Each one goes through the gateway's own code after its
bearer check (`proxy.serve_session`): the slot's load on demand, its queue, the forwarding
to lemond, the streaming and the metrics, where the request is recorded under
`user:<name>`. `/v1` itself still takes bearer tokens only (docs/security.md).

Every logged-in operator may use every slot (the roles in docs/security.md), so the
session's principal is unscoped; the page's slot is the one tried, whatever `model` the
body names.
"""

from __future__ import annotations

import asyncio
import logging

from django.contrib.auth.decorators import login_required
from django.views.decorators.http import require_POST

from . import activity
from .gateway.endpoints import ENDPOINTS
from .gateway.proxy import internal_error, openai_error, serve_session
from .tokens import Principal

log = logging.getLogger("hal0.gateway")

# what each capability's panel posts to (one endpoint per capability)
PANEL_ENDPOINTS = {
    "chat": "chat/completions",
    "embed": "embeddings",
    "rerank": "rerank",
    "stt": "audio/transcriptions",
    "tts": "audio/speech",
    "img": "images/generations",
}


def session_principal(user) -> Principal:
    """The gateway's principal for a logged-in user: unscoped, unlimited, named after the
    user so the Activity page and the metrics say who asked."""
    return Principal(id=0, name=activity.session_name(user), allowed=(), expires_at=None)


@login_required
@require_POST
async def try_endpoint(request, name: str, endpoint: str):
    if endpoint not in ENDPOINTS:
        return openai_error(404, f"hal0's gateway has no /v1/{endpoint}.", code="not_found")
    user = await request.auser()
    try:
        return await serve_session(request, endpoint, session_principal(user), name)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("gateway error on a try-it request to /v1/%s", endpoint)
        return internal_error()
