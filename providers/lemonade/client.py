"""HTTP clients for lemond: one async, one blocking, both from `client_for()`.

They know lemond's routes (the unprefixed `/v1/...`, plus `/internal/*`), its keys (the
admin key for `/internal/*`), its error shapes (see `errors`) and the health shapes of every
version from v8 to v11 (see `parse_health`). They know nothing about slots.

**One seam.** `client_for(base_url, api_key=..., admin_api_key=...)` is how hal0 gets a
client for a node. Clients of the same node (same URL and keys) share one connection pool
and every client shares one TLS context, so the reconciler's poll, a page and an action
reuse connections instead of opening one per call. The pools are a documented cache
(`_pool()`): keyed by (base URL, api key, admin key), at most `POOL_CACHE_SIZE` entries; an
entry whose keys changed is simply not asked again. The async pool is per event loop
(an `httpx.AsyncClient` belongs to the loop that first used it); the sync client is one
plain `httpx.Client`, safe from any thread, with no event loop involved.

**Untrusted answers.** Every JSON body passes through `untrusted.loads()` (valid UTF-8,
finite numbers, bounded depth) and every model name put in a path is checked by
`names.validate_model_name()` and percent-quoted, so neither lemond nor a slot's
configuration can steer a request to another route with the node's keys.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any
from urllib.parse import quote

import httpx

from . import untrusted
from .errors import (
    LemonadeBadResponse,
    LemonadeError,
    LemonadeTimeout,
    LemonadeUnavailable,
    error_from_response,
)
from .names import find_published, validate_model_name

DEFAULT_TIMEOUT = 5.0
DEFAULT_LOAD_TIMEOUT = 900.0
POOL_CACHE_SIZE = 64

# lemond <= 10.4 called the transcription type "audio" (versions.py): read both.
_TYPE_ALIASES = {"audio": "transcription"}


# --- what lemond answers, normalised ---------------------------------------------------------

@dataclass(frozen=True)
class LoadedModel:
    """One entry of health's loaded list, normalised across lemond versions."""

    model_name: str
    type: str = ""
    checkpoint: str = ""
    recipe: str = ""
    device: tuple[str, ...] = ()
    recipe_options: dict = field(default_factory=dict)
    backend_url: str = ""
    pid: int | None = None
    pinned: bool | None = None  # None: this lemond does not report pins (< 10.8)
    status: str | None = None
    # lemond's `last_use` as sent: steady-clock milliseconds (time since the machine
    # booted), meaningful only next to another last_use of the same lemond process.
    last_use_ms: float | None = None
    raw: dict = field(default_factory=dict)

    @property
    def up(self) -> bool:
        """Loaded and serving (lemond >= 10.8 also lists models still loading)."""
        return self.status in (None, "ready", "in_use")


@dataclass(frozen=True)
class Health:
    status: str
    version: str
    model_loaded: str | None
    loaded: tuple[LoadedModel, ...]
    max_models: dict
    simulated: bool = False
    websocket_port: int | None = None
    raw: dict = field(default_factory=dict)

    def find(self, model_name: str) -> LoadedModel | None:
        """The entry of the model hal0 calls `model_name` (`X`, `user.X`, `builtin.X`),
        matched against the name lemond *publishes* for it (see `names.published_forms`)."""
        by_name = {entry.model_name: entry for entry in self.loaded}
        published = find_published(model_name, by_name)
        return by_name[published] if published is not None else None


def _parse_device(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str) and v)
    if not isinstance(value, str):
        return ()
    return tuple(part for part in value.replace("|", " ").split() if part)


def _text(raw: dict, key: str) -> str:
    """A string field, "" when absent; a field of another type is ignored and logged."""
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value or ""
    untrusted.warn_once(f"health field {key!r}", value)
    return ""


def _parse_entry(raw: Any) -> LoadedModel | None:
    if not isinstance(raw, dict):
        return None
    name = next((raw[k] for k in ("model_name", "model", "name") if raw.get(k)), None)
    if not isinstance(name, str):
        if name is not None:
            untrusted.warn_once("a loaded model's name", name)
        return None
    kind = _text(raw, "type")
    options = raw.get("recipe_options")
    last_use = untrusted.clean_number(raw.get("last_use"))
    return LoadedModel(
        model_name=name,
        type=_TYPE_ALIASES.get(kind, kind),
        checkpoint=_text(raw, "checkpoint"),
        recipe=_text(raw, "recipe"),
        device=_parse_device(raw.get("device")),
        recipe_options=options if isinstance(options, dict) else {},
        backend_url=_text(raw, "backend_url"),
        pid=untrusted.int_or_none(raw.get("pid")),
        pinned=raw.get("pinned") if isinstance(raw.get("pinned"), bool) else None,
        status=untrusted.str_or_none(raw.get("status")),
        last_use_ms=float(last_use) if last_use is not None else None,
        raw=raw,
    )


def parse_health(data: Any) -> Health:
    """Normalise `/v1/health` of any lemond version (v8 Python server to v11)."""
    if not isinstance(data, dict):
        raise LemonadeBadResponse(200, "health is not a JSON object", body=str(data)[:500])
    data = untrusted.clean(data)  # idempotent; callers may hand in a raw dict
    listed = data.get("all_models_loaded")
    if listed is None:
        listed = data.get("loaded")
    entries: list[LoadedModel] = []
    model_loaded = untrusted.str_or_none(data.get("model_loaded"))
    if isinstance(listed, list):
        entries = [e for e in (_parse_entry(item) for item in listed) if e]
    elif model_loaded:
        # v8 Python server: only the one model's name and checkpoint
        entries = [LoadedModel(model_name=model_loaded,
                               checkpoint=_text(data, "checkpoint_loaded"), raw={})]
    elif listed is not None:
        untrusted.warn_once("health field 'all_models_loaded'", listed)
    max_models = data.get("max_models") if isinstance(data.get("max_models"), dict) else {}
    max_models = {_TYPE_ALIASES.get(k, k): v for k, v in max_models.items()
                  if untrusted.int_or_none(v) is not None}
    version = _text(data, "version")
    return Health(
        status=_text(data, "status") or "ok",
        version=version,
        model_loaded=model_loaded,
        loaded=tuple(entries),
        max_models=max_models,
        simulated=data.get("simulated") is True or version.endswith("-sim"),
        websocket_port=untrusted.int_or_none(data.get("websocket_port")),
        raw=data,
    )


@dataclass(frozen=True)
class PullEvent:
    """One server-sent event of `/v1/pull` with `stream: true`: progress, complete, error."""

    event: str
    data: dict

    @property
    def percent(self) -> float | None:
        value = untrusted.clean_number(self.data.get("percent"))
        return float(value) if value is not None else None


def _is_unknown_route(response: httpx.Response) -> bool:
    """lemond's "The requested endpoint does not exist" 404, as opposed to a model 404."""
    try:
        error = untrusted.loads(response.content).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("type") == "not_found" and "path" in error


def _model_path(route: str, model_id: str) -> str:
    """`/v1/models/{id}` with `id` checked and quoted: it stays one path segment."""
    return route.format(quote(validate_model_name(model_id), safe=""))


# --- the shared connections ------------------------------------------------------------------

@cache
def _ssl_context() -> ssl.SSLContext:
    """One TLS context for every client: building one loads the CA bundle (~25 ms)."""
    return ssl.create_default_context()


def _http_options(base_url: str) -> dict[str, Any]:
    return {
        "base_url": base_url, "verify": _ssl_context(),
        # never pick up proxies from the environment: lemond is on our LAN/loopback
        "trust_env": False,
        "limits": httpx.Limits(max_connections=32, max_keepalive_connections=8),
    }


class _Pool:
    """The connections of one node (base URL + keys), shared by all its clients."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        # "/api" once lemond answered an unprefixed /v1 route with "no such endpoint":
        # lemond before 9.3.2 (and the simulator's 10.0 shape) serves only /api/v1/...
        self.api_prefix = ""
        self._sync: httpx.Client | None = None
        self._async: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    def sync(self) -> httpx.Client:
        if self._sync is None:  # a race makes one extra client, which is harmless
            self._sync = httpx.Client(**_http_options(self.base_url))
        return self._sync

    def for_loop(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        http = self._async.get(loop)
        if http is None:
            # forget clients of loops that are gone (tests, a restarted reconciler): their
            # sockets cannot be used from another loop and close when collected
            for old in [old for old in self._async if old.is_closed()]:
                del self._async[old]
            http = self._async[loop] = httpx.AsyncClient(**_http_options(self.base_url))
        return http


@lru_cache(maxsize=POOL_CACHE_SIZE)
def _pool(base_url: str, api_key: str, admin_api_key: str) -> _Pool:
    """The documented cache behind `client_for` (keys are part of the key so a node whose
    keys changed gets fresh connections; old entries age out)."""
    return _Pool(base_url)


def client_for(base_url: str, *, api_key: str = "", admin_api_key: str = "",
               timeout: float = DEFAULT_TIMEOUT,
               load_timeout: float = DEFAULT_LOAD_TIMEOUT) -> LemonadeClient:
    """The client for the lemond at `base_url`: the one way hal0 gets one. Cheap to call;
    `.sync` on the result is its blocking twin over the same pool."""
    return LemonadeClient(base_url, api_key, admin_api_key, timeout=timeout,
                          load_timeout=load_timeout)


# --- the routes, shared by both clients ------------------------------------------------------

@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    json: Any = None
    params: dict | None = None
    long: bool = False  # a load/unload: the load timeout applies
    parse: Callable[[Any], Any] = lambda data: data


def _models_list(data: Any) -> list[dict]:
    rows = data.get("data") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise LemonadeBadResponse(200, "model list is not a list", body=str(data)[:500])
    return [row for row in rows if isinstance(row, dict)]


def _as_dict(data: Any) -> dict:
    if not isinstance(data, dict):
        raise LemonadeBadResponse(200, "lemond answered something that is not a JSON object",
                                  body=str(data)[:500])
    return data


def _stats(data: Any) -> dict:
    """`/v1/stats`; {} when lemond has none to give: v10.6.0 answers 200 with
    `{"error": {"message": "No model loaded", ...}}` while nothing has run."""
    data = _as_dict(data)
    return {} if isinstance(data.get("error"), dict) else data


class _Routes:
    """Which request each client method makes. Only the routes hal0 calls live here."""

    @staticmethod
    def health() -> _Call:
        return _Call("GET", "/v1/health", parse=parse_health)

    @staticmethod
    def models(show_all: bool) -> _Call:
        return _Call("GET", "/v1/models", params={"show_all": "true"} if show_all else None,
                     parse=_models_list)

    @staticmethod
    def model(model_id: str) -> _Call:
        return _Call("GET", _model_path("/v1/models/{}", model_id), parse=_as_dict)

    @staticmethod
    def load(body: dict) -> _Call:
        validate_model_name(body.get("model_name"))
        return _Call("POST", "/v1/load", json=body, long=True, parse=_as_dict)

    @staticmethod
    def unload(model_name: str | None) -> _Call:
        body = {"model_name": validate_model_name(model_name)} if model_name else None
        return _Call("POST", "/v1/unload", json=body, long=True, parse=_as_dict)

    @staticmethod
    def stats() -> _Call:
        return _Call("GET", "/v1/stats", parse=_stats)

    @staticmethod
    def system_stats() -> _Call:
        return _Call("GET", "/v1/system-stats", parse=_as_dict)

    @staticmethod
    def system_info() -> _Call:
        return _Call("GET", "/v1/system-info", parse=_as_dict)

    @staticmethod
    def pin(model_name: str, pinned: bool) -> _Call:
        return _Call("POST", "/internal/pin", parse=_as_dict,
                     json={"model_name": validate_model_name(model_name), "pinned": pinned})


class _Base:
    def __init__(self, base_url: str, api_key: str = "", admin_api_key: str = "",
                 timeout: float = DEFAULT_TIMEOUT, load_timeout: float = DEFAULT_LOAD_TIMEOUT):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_api_key = admin_api_key or api_key
        self.timeout = timeout
        self.load_timeout = load_timeout
        self._pool = _pool(self.base_url, api_key, admin_api_key)

    def __repr__(self) -> str:  # never the keys
        return f"<{type(self).__name__} {self.base_url}>"

    def _headers(self, path: str) -> dict[str, str]:
        key = self.admin_api_key if path.startswith("/internal/") else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _timeout(self, call: _Call) -> httpx.Timeout:
        if call.long:  # connecting stays quick so an unreachable node fails fast
            return httpx.Timeout(self.load_timeout, connect=self.timeout)
        return httpx.Timeout(self.timeout)

    def _route(self, path: str) -> str:
        return self._pool.api_prefix + path if path.startswith("/v1/") else path

    def _request_args(self, call: _Call, path: str) -> dict[str, Any]:
        return {"json": call.json, "params": call.params, "headers": self._headers(path),
                "timeout": self._timeout(call)}

    def _wants_prefix(self, call: _Call, response: httpx.Response) -> bool:
        return (response.status_code == 404 and call.path.startswith("/v1/")
                and not self._pool.api_prefix and _is_unknown_route(response))

    def _error(self, exc: httpx.HTTPError, call: _Call) -> LemonadeError:
        if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            return LemonadeUnavailable(f"cannot connect to lemond at {self.base_url} "
                                       "(connection timed out)")
        if isinstance(exc, httpx.TimeoutException):
            return LemonadeTimeout(f"lemond at {self.base_url} did not answer "
                                   f"{call.method} {call.path} in time")
        return LemonadeUnavailable(f"cannot reach lemond at {self.base_url}: "
                                   f"{exc.__class__.__name__}" + (f" ({exc})" if str(exc) else ""))

    @staticmethod
    def _decode(response: httpx.Response, call: _Call) -> Any:
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.text)
        try:
            data = untrusted.loads(response.content)
        except ValueError:
            raise LemonadeBadResponse(
                response.status_code, "lemond answered with something that is not JSON",
                body=untrusted.clean_str(response.text[:2000]),
            ) from None
        return call.parse(data)


class LemonadeClient(_Base):
    """Async client for one lemond node (get it from `client_for`). Closing it is not
    needed; `async with` is accepted for old call sites and closes nothing shared."""

    def __init__(self, base_url: str, api_key: str = "", admin_api_key: str = "",
                 timeout: float = DEFAULT_TIMEOUT, load_timeout: float = DEFAULT_LOAD_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(base_url, api_key, admin_api_key, timeout, load_timeout)
        # a transport of its own (tests: httpx.MockTransport) means a private client
        self._private = httpx.AsyncClient(**_http_options(self.base_url), transport=transport) \
            if transport is not None else None

    async def __aenter__(self) -> LemonadeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._private is not None:
            await self._private.aclose()

    @property
    def sync(self) -> SyncLemonadeClient:
        """The blocking client for the same node, over the same pool."""
        return SyncLemonadeClient(self.base_url, self.api_key, self.admin_api_key,
                                  timeout=self.timeout, load_timeout=self.load_timeout)

    def _http(self) -> httpx.AsyncClient:
        return self._private or self._pool.for_loop()

    async def _send(self, call: _Call, path: str) -> httpx.Response:
        try:
            return await self._http().request(call.method, path, **self._request_args(call, path))
        except httpx.HTTPError as exc:
            raise self._error(exc, call) from None

    async def _call(self, call: _Call) -> Any:
        response = await self._send(call, self._route(call.path))
        if self._wants_prefix(call, response):
            retry = await self._send(call, "/api" + call.path)
            if not (retry.status_code == 404 and _is_unknown_route(retry)):
                self._pool.api_prefix = "/api"
                response = retry
        return self._decode(response, call)

    # --- routes (each one line over `_Routes`) ---------------------------------------------
    async def health(self) -> Health:
        return await self._call(_Routes.health())

    async def models(self, show_all: bool = False) -> list[dict]:
        return await self._call(_Routes.models(show_all))

    async def model(self, model_id: str) -> dict:
        return await self._call(_Routes.model(model_id))

    async def load(self, body: dict) -> dict:
        return await self._call(_Routes.load(body))

    async def unload(self, model_name: str | None = None) -> dict:
        """Unload one model, or every model when `model_name` is None."""
        return await self._call(_Routes.unload(model_name))

    async def stats(self) -> dict:
        return await self._call(_Routes.stats())

    async def system_stats(self) -> dict:
        return await self._call(_Routes.system_stats())

    async def system_info(self) -> dict:
        """Hardware totals (`Physical Memory`, `devices`), `model_storage` from v10.9."""
        return await self._call(_Routes.system_info())

    async def pin(self, model_name: str, pinned: bool = True) -> dict:
        """Pin/unpin a loaded model (lemond >= 10.8 only)."""
        return await self._call(_Routes.pin(model_name, pinned))

    async def pull(self, model_name: str, **definition: Any) -> AsyncIterator[PullEvent]:
        """Stream `/v1/pull` progress. Leaving the loop early closes the connection, which
        makes lemond cancel the download (lemond-api.md §2.8)."""
        body = {"model_name": validate_model_name(model_name), **definition, "stream": True}
        call = _Call("POST", "/v1/pull", json=body, long=True)
        path = self._route(call.path)
        try:
            async with self._http().stream("POST", path, json=body, headers=self._headers(path),
                                           timeout=self._timeout(call)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response.status_code, response.text)
                event = "message"
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = untrusted.clean_str(line[6:].strip())
                    elif line.startswith("data:"):
                        payload = line[5:].strip()
                        try:
                            data = untrusted.loads(payload)
                        except ValueError:
                            data = {"raw": untrusted.clean_str(payload)}
                        yield PullEvent(event, data if isinstance(data, dict) else {"raw": data})
                        if event in ("complete", "error"):
                            return
                        event = "message"
        except httpx.TimeoutException:
            raise LemonadeTimeout(f"lemond at {self.base_url} stopped sending pull progress") \
                from None
        except httpx.HTTPError as exc:
            raise LemonadeUnavailable(f"pull from lemond at {self.base_url} failed: "
                                      f"{exc.__class__.__name__}") from None

    async def stream_lines(self, path: str) -> AsyncIterator[str]:
        """The lines of a long-lived GET (lemond <= 10.0's SSE log stream), cleaned."""
        call = _Call("GET", path)
        try:
            async with self._http().stream("GET", path, headers=self._headers(path),
                                           timeout=httpx.Timeout(None, connect=self.timeout)
                                           ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response.status_code, response.text)
                async for line in response.aiter_lines():
                    yield untrusted.clean_str(line)
        except httpx.HTTPError as exc:
            raise self._error(exc, call) from None


class SyncLemonadeClient(_Base):
    """The blocking client: a plain `httpx.Client` (shared per node, safe from any thread,
    no event loop) with the same routes as `LemonadeClient`."""

    def _send(self, call: _Call, path: str) -> httpx.Response:
        try:
            return self._pool.sync().request(call.method, path, **self._request_args(call, path))
        except httpx.HTTPError as exc:
            raise self._error(exc, call) from None

    def _call(self, call: _Call) -> Any:
        response = self._send(call, self._route(call.path))
        if self._wants_prefix(call, response):
            retry = self._send(call, "/api" + call.path)
            if not (retry.status_code == 404 and _is_unknown_route(retry)):
                self._pool.api_prefix = "/api"
                response = retry
        return self._decode(response, call)

    def health(self) -> Health:
        return self._call(_Routes.health())

    def models(self, show_all: bool = False) -> list[dict]:
        return self._call(_Routes.models(show_all))

    def model(self, model_id: str) -> dict:
        return self._call(_Routes.model(model_id))

    def load(self, body: dict) -> dict:
        return self._call(_Routes.load(body))

    def unload(self, model_name: str | None = None) -> dict:
        """Unload one model, or every model when `model_name` is None."""
        return self._call(_Routes.unload(model_name))

    def stats(self) -> dict:
        return self._call(_Routes.stats())

    def system_stats(self) -> dict:
        return self._call(_Routes.system_stats())

    def system_info(self) -> dict:
        """Hardware totals (`Physical Memory`, `devices`), `model_storage` from v10.9."""
        return self._call(_Routes.system_info())

    def pin(self, model_name: str, pinned: bool = True) -> dict:
        """Pin/unpin a loaded model (lemond >= 10.8 only)."""
        return self._call(_Routes.pin(model_name, pinned))


__all__ = [
    "Health", "LemonadeClient", "LemonadeError", "LoadedModel", "PullEvent",
    "SyncLemonadeClient", "client_for", "parse_health",
]
