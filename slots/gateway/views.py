"""The gateway's Django views and URL patterns (`/v1/...`, `/metrics`), generated from
the endpoint table. The fast path (`slots.gateway.asgi`) awaits the same views, and answers
every other path under /v1/ and /models itself (`not_served`), so Django never sees them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from django.http import HttpResponse, JsonResponse
from django.urls import URLPattern, path
from django.views.decorators.csrf import csrf_exempt

from .. import metrics, runtime
from ..models import Capability
from . import catalog, router
from .endpoints import (
    ENDPOINTS,
    METRICS_PATH,
    MODELS,
    PREFIX,
    ROOT,
    ROOT_MODELS,
    ROUTER_ENDPOINTS,
)
from .proxy import _principal, _proxy, internal_error, openai_error
from .routes import invalidate_routes, route_table

log = logging.getLogger("hal0.gateway")

View = Callable[..., Awaitable[HttpResponse]]


def gateway_view(endpoint: str):
    @csrf_exempt
    async def view(request):
        if request.method != "POST":
            return openai_error(405, f"Use POST for /v1/{endpoint}.",
                                code="method_not_allowed")
        try:
            return await _proxy(request, endpoint)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("gateway error on /v1/%s", endpoint)
            return internal_error()

    view.__name__ = f"gateway_{endpoint.replace('/', '_')}"
    return view


# --- /v1/models, the TTS slot's voices and models, paths hal0 does not serve ---------------------

@csrf_exempt
async def models(request, model_id: str | None = None):
    if request.method not in ("GET", "HEAD"):
        return openai_error(405, "Use GET for /v1/models.", code="method_not_allowed")
    principal, denied = await _principal(request)
    if principal is None:
        return denied
    table = await route_table()
    invalidate_routes()  # a listing is rare and should show fresh states
    if model_id is not None:
        # ids are slot names (as listed): look the name up first, then what resolve() knows
        route = table.by_name.get(model_id) or table.resolve(model_id, None)
        if route is None or not principal.allows_slot(route.name):
            return openai_error(404, f"The model {model_id!r} does not exist.",
                                code="model_not_found", param="model")
        return JsonResponse(catalog.model_entry(route, table.aliases_of(route)))
    return JsonResponse({"object": "list", "data": [
        catalog.model_entry(r, table.aliases_of(r)) for r in table.slots
        if principal.lists_slot(r.name, r.capability)]})


@csrf_exempt
async def audio_voices(request):
    """The voices lemond's speech backend takes, in the shape Open WebUI reads."""
    _, denied = await _principal(request)
    if denied:
        return denied
    if request.method not in ("GET", "HEAD"):
        return openai_error(405, "Use GET for /v1/audio/voices.", code="method_not_allowed")
    return JsonResponse(catalog.voices())


@csrf_exempt
async def audio_models(request):
    """The TTS slots this token may use and the OpenAI names that reach them (Open WebUI
    offers these in its TTS model field)."""
    principal, denied = await _principal(request)
    if principal is None:
        return denied
    if request.method not in ("GET", "HEAD"):
        return openai_error(405, "Use GET for /v1/audio/models.", code="method_not_allowed")
    table = await route_table()
    ids = []
    for route in table.slots:
        if route.capability == Capability.TTS and principal.allows_slot(route.name):
            ids += [route.name, *table.aliases_of(route)]
    return JsonResponse({"models": [{"id": i} for i in dict.fromkeys(ids)]})


@csrf_exempt
async def not_served(request, endpoint: str = ""):
    """Any other path under /v1/: OpenAI-shaped JSON, never Django's HTML.
    Still behind the token, like every API answer."""
    _, denied = await _principal(request)
    if denied:
        return denied
    what = catalog.not_supported(endpoint)
    if what is not None:
        return openai_error(501, f"hal0 does not offer {what} (/v1/{endpoint}); "
                                 "see docs/gateway.md for what it serves.",
                            type_="invalid_request_error", code="not_supported")
    return openai_error(404, f"Unknown path {request.path_info!r}.", code="not_found")


# --- /metrics ------------------------------------------------------------------------------------

@csrf_exempt
async def prometheus(request):
    """Prometheus text; needs an API token (any) or a logged-in staff session."""
    header = request.headers.get("Authorization", "")
    scope: tuple[str, ...] = ()
    if header[:7].lower() == "bearer ":
        principal, denied = await _principal(request)
        if principal is None:
            return denied
        scope = principal.allowed
    else:
        user = await request.auser()
        if not (user.is_authenticated and user.is_staff):
            response = HttpResponse("authentication required: send an API token\n",
                                    status=401, content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="hal0"'
            return response
    state = runtime.current()
    text = await state.run_db(metrics.prometheus_text, state.serving, state.metrics, scope,
                              state.admission)
    return HttpResponse(text, content_type="text/plain; version=0.0.4; charset=utf-8")



# the views by path, for the fast path; /v1/models/<id> and /models/<id> go to the models view
VIEWS: dict[str, View] = {
    PREFIX + MODELS: models,
    ROOT_MODELS: models,  # llama.cpp's listing path
    PREFIX + "audio/voices": audio_voices,
    PREFIX + "audio/models": audio_models,
    **{PREFIX + endpoint: gateway_view(endpoint) for endpoint in ENDPOINTS},
    **{prefix + endpoint: router.VIEWS[what] for endpoint, what in ROUTER_ENDPOINTS.items()
       for prefix in (PREFIX, ROOT)},
}


def _url_name(url: str) -> str:
    rest = url.removeprefix(PREFIX) if url.startswith(PREFIX) else "root-" + url[1:]
    return "gateway-" + rest.replace("/", "-")


urlpatterns: list[URLPattern] = [
    # django-stubs type views as sync; Django serves async views as they are
    *[path(url[1:], view, name=_url_name(url))  # type: ignore[arg-type]
      for url, view in VIEWS.items()],
    path(f"{PREFIX[1:]}{MODELS}/<path:model_id>", models, name="gateway-model"),
    path(f"{ROOT_MODELS[1:]}/<path:model_id>", models, name="gateway-root-model"),
    path(METRICS_PATH[1:], prometheus, name="metrics"),
]
