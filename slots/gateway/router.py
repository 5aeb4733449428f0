"""llama.cpp's router API next to the OpenAI one: what lets a client show which slots are
loaded, offer load and unload buttons, and follow the changes live (Open WebUI, pi, Letta
Code and PocketPal read it from llama-server's router mode).

* `POST /models/load` and `POST /models/unload` (also under /v1/) take `{"model": ...}`,
  resolved like any gateway `model`. They run hal0's own actions with the token as the
  actor (recorded as `token:<name>`), wait up to HAL0_GATEWAY_LOAD_WAIT_S and answer
  `{"success": true}`, or an OpenAI-shaped error: only tokens with `may_manage`, only for
  their own slots; an action's refusal is a 409 with its own code.
* `GET /models/sse` (also under /v1/): server-sent `model_status` events for the slots the
  token may use, one per slot on connect (the snapshot), then one per change, and `: ping`
  comments in between. They come from the live pushes the dashboard gets (`slots.live`, on
  the channel layer: with Redis every process's changes reach every process's listeners),
  never from polling the database.

The listings (`GET /models`, `/v1/models`) are `views.models`; their entries are
`catalog.model_entry`. docs/gateway.md describes all of it for client authors.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from .. import live, runtime, tokens
from ..actions.errors import SlotError
from ..actions.lifecycle import do_ensure_loaded, do_unload_slot
from ..jsonbody import NotAJsonObject, json_object
from . import catalog
from .proxy import (
    _principal,
    _read_capped,
    _Refused,
    _slot_error,
    _unavailable,
    openai_error,
)
from .routes import Route, invalidate_routes, route_table

log = logging.getLogger("hal0.gateway")


# --- POST /models/load, /models/unload -----------------------------------------------------------

def _load(route: Route, principal: tokens.Principal) -> None:
    # waits out an unload in progress and joins a load already running, like a request would
    do_ensure_loaded(route.name, settings.HAL0_LEMONADE_LOAD_TIMEOUT, actor=principal)


def _unload(route: Route, principal: tokens.Principal) -> None:
    do_unload_slot(route.name, actor=principal, keep_pinned=True)


ACTIONS: dict[str, Callable[[Route, tokens.Principal], None]] = {
    "load": _load, "unload": _unload}


def _action_error(exc: SlotError) -> JsonResponse:
    """A refusal (pin, shared model, disabled, busy, the fit check: every 409 an action
    raises) keeps the action's own code; failures answer as the gateway's on-demand loads
    do (502 with lemond's message, 503, 504)."""
    if exc.http_status == 409:
        return openai_error(409, exc.message, code=exc.code.replace(".", "_"), param="model")
    return _slot_error(exc)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # the waiting view reports it, or nobody waits any more


async def _run(action: str, route: Route, principal: tokens.Principal) -> None:
    """Run the action on the runtime's action pool and wait at most
    HAL0_GATEWAY_LOAD_WAIT_S; it goes on after that (the dashboard shows it finish).
    Raises SlotError or TimeoutError."""
    future = asyncio.wrap_future(runtime.current().submit(ACTIONS[action], route, principal))
    future.add_done_callback(_retrieved)
    try:
        await asyncio.wait_for(asyncio.shield(future), settings.HAL0_GATEWAY_LOAD_WAIT_S)
    finally:
        invalidate_routes()  # the listing shows the new state at once


async def _target(request, principal: tokens.Principal) -> tuple[Route | None,
                                                                 HttpResponse | None]:
    """The slot a load/unload names, or the error that answers the request."""
    try:
        data = json_object(_read_capped(request))
    except _Refused as refused:  # past the body cap
        return None, refused.response
    except NotAJsonObject as exc:
        return None, openai_error(400, str(exc))
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        return None, openai_error(400, 'Name the slot: {"model": "<slot, capability or '
                                       'model>"}.', param="model")
    route = (await route_table()).resolve_allowed(model, None, principal.allows_slot)
    if route is None:
        return None, openai_error(404, f"The model {model!r} does not exist: name a slot, a "
                                       "capability or a model a slot serves (GET /v1/models).",
                                  code="model_not_found", param="model")
    if not principal.allows_slot(route.name):
        return None, openai_error(403, f"This API key may not use slot {route.name!r}.",
                                  type_="permission_error", code="slot_not_allowed",
                                  param="model")
    if not principal.may_manage:
        return None, openai_error(
            403, "This API key may not load or unload slots: allow it in hal0 (Tokens page "
                 "'May load and unload', the admin, or `manage.py tokens create "
                 "--may-manage`).", type_="permission_error", code="manage_not_allowed")
    return route, None


def model_action(action: str):
    """The view for `POST /models/<action>` (load or unload)."""

    @csrf_exempt
    async def view(request):
        principal, denied = await _principal(request)
        if principal is None:
            return denied
        if request.method != "POST":
            return openai_error(405, f"Use POST for {request.path_info}.",
                                code="method_not_allowed")
        route, refused = await _target(request, principal)
        if route is None:
            return refused
        try:
            await _run(action, route, principal)
        except SlotError as exc:
            return _action_error(exc)
        except TimeoutError:
            # the shape an on-demand load gives when it outlasts the wait
            return _unavailable(f"Slot {route.name!r} is still {action}ing; it goes on: "
                                "follow it on /models/sse or GET /v1/models.",
                                code=f"slot_{action}ing")
        return JsonResponse({"success": True})

    view.__name__ = f"models_{action}"
    return view


# --- GET /models/sse -------------------------------------------------------------------------------

def _frame(model: str, event: str, data: dict[str, Any] | None = None) -> bytes:
    """One event in llama.cpp's shape: `data: {"model", "event", "data"}`."""
    payload: dict[str, Any] = {"model": model, "event": event}
    if data is not None:
        payload["data"] = data
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _status_frame(name: str, status: dict[str, Any]) -> bytes:
    # llama.cpp's events carry the status word as `status`; the rest as they are listed
    return _frame(name, "model_status",
                  {"status": status["value"], **{k: v for k, v in status.items()
                                                 if k != "value"}})


class _Listener:
    """One /models/sse client: what it may see and what it was last told per slot, so that
    it hears one event per change (a card push that changes nothing it sees is dropped)."""

    def __init__(self, principal: tokens.Principal):
        self.principal = principal
        self.told: dict[str, dict[str, Any]] = {}

    def tell(self, name: str, status: dict[str, Any]) -> bytes | None:
        if not self.principal.allows_slot(name) or self.told.get(name) == status:
            return None
        self.told[name] = status
        return _status_frame(name, status)

    def translate(self, message: dict[str, Any]) -> bytes | None:
        kind, name = message.get("type"), str(message.get("slot", ""))
        if kind == "slot.status":
            return self.tell(name, catalog.status(str(message.get("state", "")),
                                                  str(message.get("message", ""))))
        if kind == "slot.removed" and self.principal.allows_slot(name):
            self.told.pop(name, None)
            return _frame(name, "model_remove")
        if kind == "models.reload":  # slots added or renamed: GET /models again
            return _frame("*", "models_reload")
        return None


async def _events(request, principal: tokens.Principal) -> AsyncIterator[bytes]:
    layer = get_channel_layer()
    if layer is None:  # no channel layer configured: nothing to follow
        return
    pages = runtime.current().live
    pages.bind_loop()  # actions push from worker threads onto this loop
    channel = await layer.new_channel()
    # listen first, then take the snapshot: no change can fall between the two
    await layer.group_add(live.MODELS_GROUP, channel)
    pages.watcher_joined()
    listener = _Listener(principal)
    receiving: asyncio.Future | None = None
    try:
        invalidate_routes()
        for route in (await route_table()).slots:
            frame = listener.tell(route.name, catalog.status(route.state, route.state_message))
            if frame:
                yield frame
        receiving = asyncio.ensure_future(layer.receive(channel))
        while True:
            done, _ = await asyncio.wait({receiving}, timeout=settings.HAL0_GATEWAY_SSE_PING_S)
            if not done:
                again, _ = await _principal(request)
                if again is None:
                    return  # revoked or expired meanwhile: stop telling
                # renews the membership too (a layer forgets a group member after a day)
                await layer.group_add(live.MODELS_GROUP, channel)
                yield b": ping\n\n"
                continue
            message = receiving.result()
            receiving = asyncio.ensure_future(layer.receive(channel))
            frame = listener.translate(message)
            if frame:
                yield frame
    finally:  # the client left (the stream is cancelled or closed) or the key went
        if receiving is not None:
            receiving.cancel()
        pages.watcher_left()
        await layer.group_discard(live.MODELS_GROUP, channel)


@csrf_exempt
async def model_events(request):
    """`GET /models/sse`: the token's slots' status changes as server-sent events."""
    principal, denied = await _principal(request)
    if principal is None:
        return denied
    if request.method != "GET":
        return openai_error(405, f"Use GET for {request.path_info}.", code="method_not_allowed")
    response = StreamingHttpResponse(_events(request, principal),
                                     content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


VIEWS = {"load": model_action("load"), "unload": model_action("unload"),
         "events": model_events}
