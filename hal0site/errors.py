"""hal0's own 404 and 500 pages; the machine-facing paths keep answering JSON.

A browser gets a page styled like the rest of hal0 (templates/404.html, 500.html); /v1/ gets
OpenAI's error shape, and /api/ the actions' envelope (slots.api.JsonErrorsMiddleware).
"""

from __future__ import annotations

from django.http import HttpResponse
from django.views import defaults

from slots.gateway.proxy import openai_error


def _json_error(request, status: int, message: str) -> HttpResponse | None:
    path = request.path_info
    if path.startswith("/v1/") or path == "/v1":
        return openai_error(status, message, type_="server_error" if status >= 500
                            else "invalid_request_error",
                            code="internal_error" if status >= 500 else "not_found")
    return None  # /api/ answers are made JSON by slots.api.JsonErrorsMiddleware


def page_not_found(request, exception=None):
    answer = _json_error(request, 404, f"Unknown path {request.path_info!r}.")
    if answer is not None:
        return answer
    return defaults.page_not_found(request, exception)


def server_error(request):
    answer = _json_error(request, 500, "hal0 failed inside; the error is in its log.")
    if answer is not None:
        return answer
    # Django's own view renders templates/500.html with no context: the database (the
    # session, the user) may be what failed
    return defaults.server_error(request)


__all__ = ["page_not_found", "server_error"]
