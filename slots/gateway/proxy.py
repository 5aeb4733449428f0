"""The OpenAI-compatible gateway's proxy: `/v1/...` requests routed to slots and proxied to lemond.

A request's `model` names a slot (`chat`), a capability (`embed` -> that capability's
default slot) or a model a slot serves. The gateway loads the slot through the `load`
action when it is not loaded (so the dashboard shows it loading), counts the request as
in flight (`ServingTracker.acquire`: the slot shows `serving` and is never idle-unloaded
meanwhile), forwards the body to the slot's lemond node with the slot's model substituted,
and passes the answer back: SSE chunk by chunk, binary and multipart as they are. A client
that disconnects cancels the upstream request.

The hot path stays lean: API tokens are verified from an in-memory cache, the slot routing
table is cached for HAL0_GATEWAY_ROUTE_CACHE_S, one `httpx.AsyncClient` per process (per
event loop) is shared by all requests, and metrics are appended to an in-memory buffer that
`slots.metrics` writes in batches. Nothing in the request path writes to the database.

Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import connection
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.multipartparser import MultiPartParserError
from django.utils import timezone

from providers.lemonade.errors import parse_error_body

from .. import metrics, runtime, tokens
from ..actions.errors import SlotError, disabled
from ..actions.lifecycle import do_ensure_loaded
from ..admission import Gate
from ..jsonbody import NotAJsonObject, json_object
from ..metrics import RequestSample
from . import limits, pool
from .endpoints import ENDPOINTS, MULTIPART_ENDPOINTS, body_cap, too_large_message
from .routes import Route, invalidate_routes, route_table

log = logging.getLogger("hal0.gateway")

TAIL_KEEP = 16_384  # bytes of a stream kept to read its final `usage`/`timings`


# --- errors --------------------------------------------------------------------------------

def openai_error(status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 retry_after: int | None = None) -> JsonResponse:
    response = JsonResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status=status)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def _unavailable(message: str, code: str = "lemond_unavailable") -> JsonResponse:
    return openai_error(503, message, type_="server_error", code=code,
                        retry_after=settings.HAL0_GATEWAY_RETRY_AFTER_S)


def _slot_error(exc: SlotError) -> JsonResponse:
    """An action's failure, as the gateway answers it (issue #6 §7)."""
    code = exc.code.replace(".", "_")
    if exc.code == "slot.disabled":
        return openai_error(409, exc.message, code="slot_disabled")
    if exc.code == "slot.not_found":
        return openai_error(404, exc.message, code="model_not_found", param="model")
    if exc.code in ("lemond.unavailable", "slot.illegal_transition"):
        return _unavailable(exc.message, code)
    if exc.code == "lemond.timeout":
        return openai_error(504, exc.message, type_="server_error", code=code)
    # spawn failures, unknown models, lemond errors: lemond's message, 502
    return openai_error(502, exc.message, type_="server_error", code="model_load_error")


# --- the shared upstream client --------------------------------------------------------------

class _Upstream:
    """The shared client and the loop it is bound to (a cache: rebuilt for a new loop)."""

    http: httpx.AsyncClient | None = None
    loop: asyncio.AbstractEventLoop | None = None


_upstream = _Upstream()


# A cache of lemond's endpoint URLs, parsed: httpx would parse the same string again for
# every request (bounded: a few per slot and node).
_url = functools.lru_cache(maxsize=256)(httpx.URL)


def http_client() -> httpx.AsyncClient:
    """One client per process, created on (and bound to) the running event loop."""
    loop = asyncio.get_running_loop()
    http = _upstream.http
    if http is None or _upstream.loop is not loop or http.is_closed:
        http = _upstream.http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.HAL0_GATEWAY_READ_TIMEOUT_S,
                                  connect=settings.HAL0_GATEWAY_CONNECT_TIMEOUT_S,
                                  pool=settings.HAL0_GATEWAY_CONNECT_TIMEOUT_S),
            # a pool that walks its connections in linear time and checks idle ones with
            # one poll: it walks them all several times per request (slots.gateway.pool)
            transport=pool.wrap(httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
                trust_env=False)),
            trust_env=False,  # lemond is on loopback/LAN: never via an environment proxy
            # uncompressed: the usage is read from the body, and passed on as it came
            headers={"Accept-Encoding": "identity"},
        )
        _upstream.loop = loop
    return http


# --- on-demand load ----------------------------------------------------------------------------

def _ensure_loaded_in_thread(name: str, timeout: float) -> None:
    try:
        do_ensure_loaded(name, timeout)
    finally:
        connection.close()


def _forget_load(loads: dict[int, asyncio.Future], pk: int, future: asyncio.Future) -> None:
    if loads.get(pk) is future:
        del loads[pk]
    if not future.cancelled():
        future.exception()  # retrieved: the waiting requests report it


async def load_for_request(route: Route) -> None:
    """Load the slot (one load per slot per process, shared by every request waiting for
    it); wait at most HAL0_GATEWAY_LOAD_WAIT_S. Raises SlotError or TimeoutError."""
    wait = settings.HAL0_GATEWAY_LOAD_WAIT_S
    state = runtime.current()
    loads = state.gateway_loads_running
    future = loads.get(route.pk)
    if future is None or future.done():
        # loads wait minutes on a thread: the runtime's own pool for them
        run = sync_to_async(_ensure_loaded_in_thread, thread_sensitive=False,  # type: ignore[call-overload]  # any Executor works
                            executor=state.gateway_loads)
        # the load goes on after a client gave up waiting: the dashboard shows it finish
        future = asyncio.ensure_future(run(route.name, settings.HAL0_LEMONADE_LOAD_TIMEOUT))
        loads[route.pk] = future
        future.add_done_callback(functools.partial(_forget_load, loads, route.pk))
    try:
        await asyncio.wait_for(asyncio.shield(future), wait)
    finally:
        invalidate_routes()
    state.serving.refresh(route.pk, force=True)  # in flight: ready -> serving


# --- auth --------------------------------------------------------------------------------------

def bearer_token(header: str) -> str:
    """The token in an `Authorization: Bearer <token>` header ('' if none)."""
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


# the request attribute where the fast path (slots.gateway.asgi) leaves the token it has
# verified before reading the body: (principal, why), as tokens.averify answers
VERIFIED = "hal0_verified_token"


async def _principal(request) -> tuple[tokens.Principal | None, JsonResponse | None]:
    # taken once: a later check on the same request (a /models/sse stream's, while it
    # lasts) verifies afresh and sees a revocation
    verified = vars(request).pop(VERIFIED, None)
    if verified is None:  # through Django's handler (runserver, tests), or a later check
        verified = await tokens.averify(bearer_token(request.headers.get("Authorization", "")))
    principal, why = verified
    if principal is not None:
        runtime.current().token_stamps.note(principal.id)
        return principal, None
    message = {
        "missing": "Missing API key: send `Authorization: Bearer <token>` (create one with "
                   "`manage.py tokens create NAME` or in the admin).",
        "expired": "This API key has expired.",
    }.get(why, "Invalid API key (unknown or revoked).")
    response = openai_error(401, message, code="invalid_api_key")
    response["WWW-Authenticate"] = 'Bearer realm="hal0"'
    return None, response


# --- the proxy ---------------------------------------------------------------------------------

class Flight:
    """One request in flight for a slot: counted as serving until `finish()`."""

    __slots__ = ("charge", "done", "endpoint", "gate", "granted_at", "route", "started",
                 "started_at", "stream", "token_name", "ttft_ms")

    def __init__(self, route: Route, endpoint: str, started: float, started_at,
                 charge: Callable[[int], None] | None = None, token_name: str = ""):
        self.route = route
        self.token_name = token_name  # who asked: the Activity page shows it
        self.endpoint = endpoint
        self.started = started
        self.started_at = started_at
        self.stream = False
        self.ttft_ms: float | None = None
        self.done = False
        # a limited token's tokens-per-minute window, charged with the response's usage
        self.charge = charge
        # the slot's queue place this request holds until its response ends (admission)
        self.gate: Gate | None = None
        self.granted_at = 0.0
        runtime.current().serving.acquire(route.pk)

    def finish(self, status: int, payload: bytes = b"") -> None:
        if self.done:
            return
        self.done = True
        runtime.current().serving.release(self.route.pk)
        if self.gate is not None:
            self.gate.leave(self.granted_at)
        latency_ms = (time.perf_counter() - self.started) * 1000.0
        usage: dict[str, Any] = metrics.usage_of(payload) if payload and status < 400 else {}
        if self.charge is not None and usage:
            self.charge((usage.get("tokens_in") or 0) + (usage.get("tokens_out") or 0))
        ttft_ms = self.ttft_ms if self.stream else usage.get("prompt_ms")
        tokens_out, tps = usage.get("tokens_out"), usage.get("tokens_per_s")
        if tps is None and tokens_out and self.stream and ttft_ms is not None \
                and latency_ms > ttft_ms:
            tps = tokens_out * 1000.0 / (latency_ms - ttft_ms)
        runtime.current().metrics.record(RequestSample(
            slot_name=self.route.name, endpoint=self.endpoint, status=status,
            started_at=self.started_at, latency_ms=round(latency_ms, 3),
            ttft_ms=round(ttft_ms, 3) if ttft_ms is not None else None,
            tokens_in=usage.get("tokens_in"), tokens_out=tokens_out,
            tokens_per_s=round(tps, 2) if tps is not None else None, stream=self.stream,
            token_name=self.token_name))


def _carries_data(chunk: bytes) -> bool:
    """False for a chunk of SSE comment lines only (`: ping`, sent by lemond during long
    prefills): they are passed on as they are, but they are not the first token."""
    return any(line.strip() and not line.startswith(b":") for line in chunk.split(b"\n"))


async def _relay(response: httpx.Response, flight: Flight):
    """Pass an upstream stream through chunk by chunk; closing it cancels upstream."""
    status = response.status_code
    tail = bytearray()
    try:
        async for chunk in response.aiter_raw():
            if flight.ttft_ms is None and _carries_data(chunk):
                flight.ttft_ms = (time.perf_counter() - flight.started) * 1000.0
            tail += chunk
            if len(tail) > 2 * TAIL_KEEP:
                del tail[:-TAIL_KEEP]
            yield chunk
    except httpx.HTTPError as exc:  # lemond went away mid-stream: end the stream
        status = 502
        log.warning("slot %s: upstream stream broke: %s", flight.route.name,
                    exc.__class__.__name__)
    except (asyncio.CancelledError, GeneratorExit):
        status = 499  # the client went away (nginx's code): upstream is closed below
        raise
    finally:
        await response.aclose()
        flight.finish(status, bytes(tail))


def _abandon(response: httpx.Response, flight: Flight) -> None:
    if flight.done:
        return
    flight.finish(499)
    try:
        asyncio.get_running_loop().create_task(response.aclose())
    except RuntimeError:  # no loop any more: the connection dies with the client
        pass


def _upstream_error_body(content: bytes) -> bytes:
    """lemond's error shapes vary (lemond-api.md §1); OpenAI clients want error.message."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) \
            and "message" in data["error"]:
        return content
    message, code, error_type = parse_error_body(content.decode("utf-8", "replace"))
    return json.dumps({"error": {"message": message, "type": error_type or "upstream_error",
                                 "param": None, "code": code}}).encode()


async def _forward(request, endpoint: str, route: Route, flight: Flight, *, content=None,
                   data=None, files=None):
    # (META, not request.headers: that would parse every header name for one of them)
    headers = {"Accept": request.META.get("HTTP_ACCEPT", "*/*")}
    if content is not None:
        headers["Content-Type"] = "application/json"
    if route.api_key:  # lemond's key: only ever in this upstream header
        headers["Authorization"] = f"Bearer {route.api_key}"
    client = http_client()
    upstream = client.build_request("POST", _url(route.upstream_url(endpoint)),
                                    headers=headers, content=content, data=data, files=files)
    try:
        response = await client.send(upstream, stream=True)
    except httpx.TimeoutException as exc:
        if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            flight.finish(503)
            return _unavailable(f"lemond for slot {route.name!r} is unreachable "
                                "(connection timed out).")
        flight.finish(504)
        return openai_error(504, f"lemond did not answer in time for slot {route.name!r}.",
                            type_="server_error", code="lemond_timeout")
    except httpx.HTTPError as exc:
        flight.finish(503)
        return _unavailable(f"lemond for slot {route.name!r} is unreachable "
                            f"({exc.__class__.__name__}).")
    content_type = response.headers.get("content-type", "application/octet-stream")
    if response.status_code < 400 and content_type.startswith("text/event-stream"):
        flight.stream = True
        relay = _relay(response, flight)
        # If the client leaves before Django starts iterating, the generator never runs
        # its `finally`: release the slot and the upstream connection when it is dropped.
        weakref.finalize(relay, _abandon, response, flight)
        out = StreamingHttpResponse(relay, status=response.status_code,
                                    content_type=content_type)
        out["Cache-Control"] = "no-cache"
        out["X-Accel-Buffering"] = "no"
        return out
    try:
        payload = await response.aread()
    except httpx.HTTPError as exc:
        flight.finish(502)
        return openai_error(502, f"lemond's answer broke off ({exc.__class__.__name__}).",
                            type_="server_error", code="upstream_error")
    finally:
        await response.aclose()
    flight.finish(response.status_code, payload)
    if response.status_code >= 400:
        return HttpResponse(_upstream_error_body(payload), status=response.status_code,
                            content_type="application/json")
    return HttpResponse(payload, status=response.status_code, content_type=content_type)


class _Refused(Exception):
    """A request refused before anything is forwarded; carries the answer to send."""

    def __init__(self, response: HttpResponse):
        super().__init__(response.status_code)
        self.response = response


def _too_large(cap: int) -> _Refused:
    return _Refused(openai_error(413, too_large_message(cap), code="request.too_large"))


def _refuse_declared_too_large(request) -> int:
    """Refuse (413) a body whose declared length is over the path's cap, before any of it
    is read or parsed; returns the cap."""
    cap = body_cap(request.path_info)
    declared = str(request.META.get("CONTENT_LENGTH") or "").strip()
    if declared.isdigit() and int(declared) > cap:
        raise _too_large(cap)
    return cap


def _read_capped(request) -> bytes:
    """The body, read at most one byte past the path's cap. `request.read()` bypasses
    Django's DATA_UPLOAD_MAX_MEMORY_SIZE, and outside `serve` (runserver, another ASGI
    server in front of Django's handler) nothing else bounds what it takes in."""
    cap = _refuse_declared_too_large(request)
    raw = bytearray()
    while len(raw) <= cap:
        chunk = request.read(min(1 << 20, cap + 1 - len(raw)))
        if not chunk:
            return bytes(raw)
        raw += chunk
    raise _too_large(cap)


def _multipart_model(request, endpoint: str) -> str | None:
    """The `model` field of a multipart request, after checking its parts."""
    if not request.content_type.startswith("multipart/form-data"):
        raise _Refused(openai_error(400, f"/v1/{endpoint} takes multipart/form-data."))
    _refuse_declared_too_large(request)
    try:
        model = request.POST.get("model")
        has_file = "file" in request.FILES
        model_file = "model" in request.FILES
    except (MultiPartParserError, SuspiciousOperation, RequestDataTooBig) as exc:
        raise _Refused(openai_error(400, f"The multipart body cannot be read: {exc}")) from None
    if model_file:
        # hal0 forwards exactly one `model`, its own: a file part of that name would
        # travel next to it, and lemond would load whatever it names.
        raise _Refused(openai_error(
            400, "`model` must be a form field naming a slot, not a file.", param="model"))
    if not has_file:  # refused here, before a slot is loaded for nothing
        raise _Refused(openai_error(
            400, f"Missing `file`: /v1/{endpoint} takes the audio as a multipart file part "
                 "named `file`.", param="file"))
    return model


def _json_request(request) -> tuple[str | None, dict, bytes]:
    """The JSON body's `model`, the body, and its raw bytes."""
    raw = _read_capped(request)
    try:
        data = json_object(raw)
    except NotAJsonObject as exc:
        raise _Refused(openai_error(400, str(exc))) from None
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise _Refused(openai_error(400, "`model` must be a string.", param="model"))
    return model, data, raw


async def _route_for(principal, model: str | None, endpoint: str) -> Route:
    """The slot a request goes to, checked against the key's scope and the endpoint."""
    capability = ENDPOINTS[endpoint]
    route = (await route_table()).resolve_allowed(model, capability, principal.allows_slot)
    if route is None:
        raise _Refused(openai_error(
            404, f"The model {model!r} does not exist: name a slot, a capability or a model "
                 "a slot serves (GET /v1/models).", code="model_not_found", param="model"))
    if not principal.allows_slot(route.name):
        raise _Refused(openai_error(
            403, f"This API key may not use slot {route.name!r}.", type_="permission_error",
            code="slot_not_allowed", param="model"))
    if route.capability != capability:
        raise _Refused(openai_error(
            400, f"Slot {route.name!r} serves {route.capability}; /v1/{endpoint} needs a slot "
                 f"of capability {capability}.", code="model_not_supported", param="model"))
    if not route.enabled:
        raise _Refused(_slot_error(disabled(route.name)))
    return route


async def _proxy(request, endpoint: str):
    started = time.perf_counter()
    principal, denied = await _principal(request)
    if principal is None:
        return denied
    if not principal.limited:  # no limits: nothing counted, no headers
        return await _serve(request, endpoint, principal, started)
    verdict, refused = await limits.admit(principal)
    if refused is not None:
        return refused
    response = await _serve(request, endpoint, principal, started,
                            limits.token_charger(principal))
    return limits.stamp(response, verdict)


async def serve_session(request, endpoint: str, principal: tokens.Principal, slot_name: str):
    """A logged-in browser's request from a slot page's "Try it" panel (`slots.trying`): the
    same path as `/v1` after the bearer check, with the session standing in for the token
    and the page's slot for the body's `model`. Recorded in the metrics like any other."""
    return await _serve(request, endpoint, principal, time.perf_counter(), slot=slot_name)


async def _serve(request, endpoint: str, principal: tokens.Principal, started: float,
                 charge: Callable[[int], None] | None = None, *, slot: str | None = None):
    multipart = endpoint in MULTIPART_ENDPOINTS
    try:
        if multipart:
            model, data, raw = _multipart_model(request, endpoint), None, b""
        else:
            model, data, raw = _json_request(request)
        route = await _route_for(principal, slot or model, endpoint)
    except _Refused as refused:
        return refused.response
    flight = Flight(route, endpoint, started, timezone.now(), charge, principal.name)
    runtime.current().metrics.ensure_flusher()
    try:
        if not route.serves_its_model or runtime.current().serving.is_idle_unloading(route.pk):
            try:
                await load_for_request(route)
            except SlotError as exc:
                response = _slot_error(exc)
                flight.finish(response.status_code)
                return response
            except TimeoutError:
                flight.finish(503)
                return _unavailable(f"Slot {route.name!r} is still loading; try again shortly.",
                                    code="slot_loading")
            route = (await route_table()).by_name.get(route.name, route)
        if route.max_concurrency is not None:
            place = await limits.wait_for_place(route, principal)
            if isinstance(place, HttpResponse):
                flight.finish(place.status_code)
                return place
            flight.gate, flight.granted_at = place
        if data is None:  # multipart
            # lists, not items(): repeated fields such as timestamp_granularities[] keep
            # every value
            fields = dict(request.POST.lists())
            fields["model"] = route.model_name
            files = [(name, (f.name, f.read(), f.content_type or "application/octet-stream"))
                     for name, uploads in request.FILES.lists() for f in uploads]
            return await _forward(request, endpoint, route, flight, data=fields, files=files)
        if data.get("model") != route.model_name:
            data["model"] = route.model_name
            raw = json.dumps(data).encode()
        return await _forward(request, endpoint, route, flight, content=raw)
    except asyncio.CancelledError:
        flight.finish(499)  # the client went away while we waited or forwarded
        raise
    finally:
        if not flight.done and not flight.stream:
            flight.finish(500)


def internal_error() -> JsonResponse:
    """hal0's own failure (a bug, the database gone): the cause is in the log."""
    return openai_error(500, "hal0's gateway failed on this request; see its log.",
                        type_="server_error", code="internal_error")


