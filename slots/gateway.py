"""The OpenAI-compatible gateway: `/v1/...` requests routed to slots and proxied to lemond.

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
from dataclasses import dataclass, field

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import connection
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.multipartparser import MultiPartParserError
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from . import aliases, gateway_catalog, metrics, runtime, states, tokens
from .actions.errors import SlotError, disabled
from .actions.lifecycle import do_ensure_loaded
from .metrics import RequestSample
from .models import Capability, Slot

log = logging.getLogger("hal0.gateway")

# endpoint (after /v1/) -> the capability that serves it
ENDPOINTS: dict[str, str] = {
    "chat/completions": Capability.CHAT,
    "completions": Capability.CHAT,
    "responses": Capability.CHAT,  # OpenAI's Responses API; lemond serves it (SSE too)
    "embeddings": Capability.EMBED,
    "rerank": Capability.RERANK,
    "audio/transcriptions": Capability.STT,
    "audio/speech": Capability.TTS,
    "images/generations": Capability.IMG,
}
MULTIPART_ENDPOINTS = {"audio/transcriptions"}

# what a client may write for a capability (hal0's names, lemond's type names, plurals)
CAPABILITY_ALIASES: dict[str, str] = {
    "chat": "chat", "llm": "chat",
    "embed": "embed", "embedding": "embed", "embeddings": "embed",
    "rerank": "rerank", "reranking": "rerank", "reranker": "rerank",
    "stt": "stt", "transcription": "stt", "transcriptions": "stt", "audio": "stt",
    "tts": "tts", "speech": "tts",
    "img": "img", "image": "img", "images": "img",
}

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


# --- routing ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Route:
    pk: int
    name: str
    capability: str
    model_name: str
    loaded_model: str
    state: str
    enabled: bool
    is_default: bool
    upstream: str  # base URL + the lemond API prefix, e.g. http://127.0.0.1:13305/v1
    api_key: str = field(repr=False)
    rerank_route: str = "reranking"  # what the node's lemond version serves rerank on
    device: str = ""
    context_length: int | None = None
    created: int = 0  # the slot's creation time (unix seconds): stable for clients

    def upstream_url(self, endpoint: str) -> str:
        """lemond's URL for a gateway endpoint: `/v1/rerank` goes to the rerank route the
        node's version serves (a v10.6 lemond has only `reranking`)."""
        return f"{self.upstream}/{self.rerank_route if endpoint == 'rerank' else endpoint}"

    @property
    def loaded(self) -> bool:
        return states.is_loaded(self.state)

    @property
    def serves_its_model(self) -> bool:
        """Loaded with the slot's own model. After an edit the old model may still be up:
        forwarding then would make lemond load the new one by itself, without the slot's
        device, context size and args, so the gateway runs the load action instead."""
        return self.loaded and self.loaded_model in ("", self.model_name)


@dataclass
class RouteTable:
    slots: list[Route]
    by_name: dict[str, Route]
    defaults: dict[str, Route]
    by_model: dict[str, list[Route]]

    @classmethod
    def build(cls, routes: list[Route]) -> RouteTable:
        by_model: dict[str, list[Route]] = {}
        defaults: dict[str, Route] = {}
        for route in routes:
            by_model.setdefault(route.model_name, []).append(route)
            if route.loaded_model and route.loaded_model != route.model_name:
                by_model.setdefault(route.loaded_model, []).append(route)
            if route.is_default:
                defaults[route.capability] = route
        for route in routes:  # a capability without a declared default: its first slot
            defaults.setdefault(route.capability, route)
        return cls(routes, {r.name: r for r in routes}, defaults, by_model)

    def resolve(self, model: str | None, capability: str | None,
                follow_aliases: bool = True) -> Route | None:
        """A capability's own name with a declared default slot, then a slot name, then a
        capability alias (its default slot), then a model a slot serves, then one of
        OpenAI's names (HAL0_MODEL_ALIASES)."""
        if not model:
            return self.defaults.get(capability) if capability else None
        # The seeded slots are named after their capabilities and cannot be renamed, so
        # "embed" must follow is_default to another slot ("requests naming the capability
        # go to this slot"); the seeded slot stays reachable by its model's name.
        declared = self.defaults.get(model)
        if declared is not None and declared.is_default:
            return declared
        route = self.by_name.get(model)
        if route is not None:
            return route
        alias = CAPABILITY_ALIASES.get(model.lower())
        if alias is not None:
            return self.defaults.get(alias)
        candidates = self.by_model.get(model) or self.by_model.get(model.removesuffix(":latest"))
        if candidates:
            return min(candidates, key=lambda r: (r.capability != capability, not r.enabled,
                                                  not r.loaded, not r.is_default, r.name))
        # last: OpenAI's names (gpt-4o-mini, whisper-1, ...), whose target is a slot or a
        # capability; an alias never leads to another alias
        target = settings.HAL0_MODEL_ALIASES.get(model.lower()) if follow_aliases else None
        return self.resolve(target, capability, follow_aliases=False) if target else None

    def aliases_of(self, route: Route) -> list[str]:
        """The OpenAI names that lead to `route` (GET /v1/models shows them)."""
        targets = {route.name}
        if self.defaults.get(route.capability) is route:
            targets |= {route.capability}
        return [name for name in aliases.names_for(settings.HAL0_MODEL_ALIASES, targets)
                if self.resolve(name, route.capability) is route]


def _load_routes() -> RouteTable:
    routes = []
    for slot in Slot.objects.select_related("node").order_by("name"):
        node = slot.node
        caps = node.lemond  # what the version it last reported serves (providers.versions)
        routes.append(Route(
            pk=slot.pk, name=slot.name, capability=slot.capability,
            model_name=slot.model_name, loaded_model=slot.loaded_model, state=slot.state,
            enabled=slot.enabled and node.enabled, is_default=slot.is_default,
            upstream=node.base_url.rstrip("/") + caps.api_prefix + "/v1",
            api_key=node.api_key, rerank_route=caps.rerank_route,
            device=slot.device, created=int(slot.created_at.timestamp()),
            context_length=gateway_catalog.context_length(slot.ctx_size, slot.lemond_entry)))
    return RouteTable.build(routes)


_table: RouteTable | None = None
_table_until = 0.0


async def route_table() -> RouteTable:
    global _table, _table_until
    if _table is None or time.monotonic() >= _table_until:
        # on the runtime's database thread: never queued behind a reconciler pass
        _table = await runtime.current().run_db(_load_routes)
        _table_until = time.monotonic() + settings.HAL0_GATEWAY_ROUTE_CACHE_S
    return _table


def invalidate_routes() -> None:
    global _table
    _table = None


# --- the shared upstream client --------------------------------------------------------------

_http: httpx.AsyncClient | None = None
_http_loop: asyncio.AbstractEventLoop | None = None


def http_client() -> httpx.AsyncClient:
    """One client per process, created on (and bound to) the running event loop."""
    global _http, _http_loop
    loop = asyncio.get_running_loop()
    if _http is None or _http_loop is not loop or _http.is_closed:
        _http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.HAL0_GATEWAY_READ_TIMEOUT_S,
                                  connect=settings.HAL0_GATEWAY_CONNECT_TIMEOUT_S,
                                  pool=settings.HAL0_GATEWAY_CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            trust_env=False,  # lemond is on loopback/LAN: never via an environment proxy
        )
        _http_loop = loop
    return _http


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


async def ensure_loaded(route: Route) -> None:
    """Load the slot (one load per slot per process, shared by every request waiting for
    it); wait at most HAL0_GATEWAY_LOAD_WAIT_S. Raises SlotError or TimeoutError."""
    wait = settings.HAL0_GATEWAY_LOAD_WAIT_S
    state = runtime.current()
    loads = state.gateway_loads_running
    future = loads.get(route.pk)
    if future is None or future.done():
        # loads wait minutes on a thread: the runtime's own pool for them
        run = sync_to_async(_ensure_loaded_in_thread, thread_sensitive=False,
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

async def _principal(request) -> tuple[tokens.Principal | None, JsonResponse | None]:
    header = request.headers.get("Authorization", "")
    raw = header[7:].strip() if header[:7].lower() == "bearer " else ""
    principal, why = await tokens.averify(raw, runtime.current().token_stamps)
    if principal is not None:
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

    __slots__ = ("done", "endpoint", "route", "started", "started_at", "stream", "ttft_ms")

    def __init__(self, route: Route, endpoint: str, started: float, started_at):
        self.route = route
        self.endpoint = endpoint
        self.started = started
        self.started_at = started_at
        self.stream = False
        self.ttft_ms: float | None = None
        self.done = False
        runtime.current().serving.acquire(route.pk)

    def finish(self, status: int, payload: bytes = b"") -> None:
        if self.done:
            return
        self.done = True
        runtime.current().serving.release(self.route.pk)
        latency_ms = (time.perf_counter() - self.started) * 1000.0
        usage = metrics.usage_of(payload) if payload and status < 400 else {}
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
            tokens_per_s=round(tps, 2) if tps is not None else None, stream=self.stream))


def _json_body(raw: bytes) -> tuple[dict | None, JsonResponse | None]:
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None, openai_error(400, "The request body is not valid JSON.")
    if not isinstance(data, dict):
        return None, openai_error(400, "The request body must be a JSON object.")
    return data, None


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
    from providers.lemonade.errors import parse_error_body

    message, code, error_type = parse_error_body(content.decode("utf-8", "replace"))
    return json.dumps({"error": {"message": message, "type": error_type or "upstream_error",
                                 "param": None, "code": code}}).encode()


async def _forward(request, endpoint: str, route: Route, flight: Flight, *, content=None,
                   data=None, files=None):
    headers = {"Accept-Encoding": "identity",
               "Accept": request.headers.get("Accept", "*/*")}
    if content is not None:
        headers["Content-Type"] = "application/json"
    if route.api_key:  # lemond's key: only ever in this upstream header
        headers["Authorization"] = f"Bearer {route.api_key}"
    client = http_client()
    upstream = client.build_request("POST", route.upstream_url(endpoint), headers=headers,
                                    content=content, data=data, files=files)
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


async def _proxy(request, endpoint: str):
    started = time.perf_counter()
    principal, denied = await _principal(request)
    if denied:
        return denied
    capability = ENDPOINTS[endpoint]
    multipart = endpoint in MULTIPART_ENDPOINTS
    data: dict | None = None
    raw = b""
    if multipart:
        if not request.content_type.startswith("multipart/form-data"):
            return openai_error(400, f"/v1/{endpoint} takes multipart/form-data.")
        try:
            model = request.POST.get("model")
            has_file = "file" in request.FILES
            model_file = "model" in request.FILES
        except (MultiPartParserError, SuspiciousOperation, RequestDataTooBig) as exc:
            return openai_error(400, f"The multipart body cannot be read: {exc}")
        if model_file:
            # hal0 forwards exactly one `model`, its own: a file part of that name would
            # travel next to it, and lemond would load whatever it names.
            return openai_error(400, "`model` must be a form field naming a slot, not a file.",
                                param="model")
        if not has_file:  # refused here, before a slot is loaded for nothing
            return openai_error(400, f"Missing `file`: /v1/{endpoint} takes the audio as a "
                                     "multipart file part named `file`.", param="file")
    else:
        raw = request.read()
        data, bad = _json_body(raw)
        if bad:
            return bad
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            return openai_error(400, "`model` must be a string.", param="model")
    table = await route_table()
    route = table.resolve(model, capability)
    if route is None:
        return openai_error(404, f"The model {model!r} does not exist: name a slot, a "
                                 "capability or a model a slot serves (GET /v1/models).",
                            code="model_not_found", param="model")
    named = table.by_name.get(model) if model else None
    if named is not None and not principal.allows_slot(route.name) \
            and principal.allows_slot(named.name):
        route = named  # a key scoped to the seeded `embed` slot still reaches it by name
    if not principal.allows_slot(route.name):
        return openai_error(403, f"This API key may not use slot {route.name!r}.",
                            type_="permission_error", code="slot_not_allowed", param="model")
    if route.capability != capability:
        return openai_error(400, f"Slot {route.name!r} serves {route.capability}; "
                                 f"/v1/{endpoint} needs a slot of capability {capability}.",
                            code="model_not_supported", param="model")
    if not route.enabled:
        return _slot_error(disabled(route.name))

    flight = Flight(route, endpoint, started, timezone.now())
    runtime.current().metrics.ensure_flusher()
    try:
        if not route.serves_its_model or runtime.current().serving.is_idle_unloading(route.pk):
            try:
                await ensure_loaded(route)
            except SlotError as exc:
                response = _slot_error(exc)
                flight.finish(response.status_code)
                return response
            except TimeoutError:
                flight.finish(503)
                return _unavailable(f"Slot {route.name!r} is still loading; try again shortly.",
                                    code="slot_loading")
            route = (await route_table()).by_name.get(route.name, route)
        if multipart:
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
    if denied:
        return denied
    table = await route_table()
    invalidate_routes()  # a listing is rare and should show fresh states
    if model_id is not None:
        # ids are slot names (as listed): look the name up first, then what resolve() knows
        route = table.by_name.get(model_id) or table.resolve(model_id, None)
        if route is None or not principal.allows_slot(route.name):
            return openai_error(404, f"The model {model_id!r} does not exist.",
                                code="model_not_found", param="model")
        return JsonResponse(gateway_catalog.model_entry(route, table.aliases_of(route)))
    return JsonResponse({"object": "list", "data": [
        gateway_catalog.model_entry(r, table.aliases_of(r)) for r in table.slots
        if principal.lists_slot(r.name, r.capability)]})


@csrf_exempt
async def audio_voices(request):
    """The voices lemond's speech backend takes, in the shape Open WebUI reads."""
    _, denied = await _principal(request)
    if denied:
        return denied
    if request.method not in ("GET", "HEAD"):
        return openai_error(405, "Use GET for /v1/audio/voices.", code="method_not_allowed")
    return JsonResponse(gateway_catalog.voices())


@csrf_exempt
async def audio_models(request):
    """The TTS slots this token may use and the OpenAI names that reach them (Open WebUI
    offers these in its TTS model field)."""
    principal, denied = await _principal(request)
    if denied:
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
    """Any other path under /v1/ (or /models): OpenAI-shaped JSON, never Django's HTML.
    Still behind the token, like every API answer."""
    _, denied = await _principal(request)
    if denied:
        return denied
    what = gateway_catalog.not_supported(endpoint)
    if what is not None:
        return openai_error(501, f"hal0 does not offer {what} (/v1/{endpoint}); "
                                 "see docs/gateway.md for what it serves.",
                            type_="invalid_request_error", code="not_supported")
    hint = " (hal0's OpenAI API is under /v1/: use http://<host>:<port>/v1 as the base URL)" \
        if request.path_info.startswith("/models") else ""
    return openai_error(404, f"Unknown path {request.path_info!r}{hint}.", code="not_found")


# --- /metrics ------------------------------------------------------------------------------------

@csrf_exempt
async def prometheus(request):
    """Prometheus text; needs an API token (any) or a logged-in staff session."""
    header = request.headers.get("Authorization", "")
    scope: tuple[str, ...] = ()
    if header[:7].lower() == "bearer ":
        principal, denied = await _principal(request)
        if denied:
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
    text = await state.run_db(metrics.prometheus_text, state.serving, state.metrics, scope)
    return HttpResponse(text, content_type="text/plain; version=0.0.4; charset=utf-8")

