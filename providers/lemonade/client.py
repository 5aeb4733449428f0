"""An async HTTP client for lemond, plus a thin blocking wrapper for commands and actions.

It knows lemond's routes (the unprefixed `/v1/...`, plus `/live` and `/internal/*`), its
keys (the admin key for `/internal/*`), its error shapes (see `errors`) and the health
shapes of every version from v8 to v11 (see `parse_health`). It knows nothing about slots.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import httpx
from asgiref.sync import async_to_sync

from .errors import (
    LemonadeBadResponse,
    LemonadeError,
    LemonadeTimeout,
    LemonadeUnavailable,
    error_from_response,
)

DEFAULT_TIMEOUT = 5.0
DEFAULT_LOAD_TIMEOUT = 900.0

# lemond <= 10.4 called the transcription type "audio" (lemond-api.md §2.1).
_TYPE_ALIASES = {"audio": "transcription"}


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
    last_use: datetime | None = None
    raw: dict = field(default_factory=dict)


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
        for entry in self.loaded:
            if entry.model_name == model_name:
                return entry
        return None


def _parse_last_use(value: Any) -> datetime | None:
    """lemond's code sends integer ms since the epoch; its docs show float seconds."""
    if value in (None, "", 0):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    # 1e11 s is the year 5138, 1e11 ms is 1973: anything above is milliseconds.
    seconds = number / 1000.0 if number > 1e11 else number
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _parse_device(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(str(v) for v in value if v)
    if not value:
        return ()
    return tuple(part for part in str(value).replace("|", " ").split() if part)


def _parse_entry(raw: Any) -> LoadedModel | None:
    if not isinstance(raw, dict):
        return None
    name = raw.get("model_name") or raw.get("model") or raw.get("name")
    if not name:
        return None
    pid = raw.get("pid")
    pinned = raw.get("pinned")
    options = raw.get("recipe_options")
    return LoadedModel(
        model_name=str(name),
        type=_TYPE_ALIASES.get(str(raw.get("type") or ""), str(raw.get("type") or "")),
        checkpoint=str(raw.get("checkpoint") or ""),
        recipe=str(raw.get("recipe") or ""),
        device=_parse_device(raw.get("device")),
        recipe_options=options if isinstance(options, dict) else {},
        backend_url=str(raw.get("backend_url") or ""),
        pid=pid if isinstance(pid, int) else None,
        pinned=pinned if isinstance(pinned, bool) else None,
        status=raw.get("status") if isinstance(raw.get("status"), str) else None,
        last_use=_parse_last_use(raw.get("last_use")),
        raw=raw,
    )


def parse_health(data: Any) -> Health:
    """Normalise `/v1/health` of any lemond version (v8 Python server to v11)."""
    if not isinstance(data, dict):
        raise LemonadeBadResponse(200, "health is not a JSON object", body=str(data)[:500])
    listed = data.get("all_models_loaded")
    if listed is None:
        listed = data.get("loaded")
    entries: list[LoadedModel] = []
    if isinstance(listed, list):
        entries = [e for e in (_parse_entry(item) for item in listed) if e]
    elif isinstance(data.get("model_loaded"), str):
        # v8 Python server: only the one model's name and checkpoint
        entries = [LoadedModel(model_name=data["model_loaded"],
                               checkpoint=str(data.get("checkpoint_loaded") or ""), raw={})]
    max_models = data.get("max_models") if isinstance(data.get("max_models"), dict) else {}
    max_models = {_TYPE_ALIASES.get(k, k): v for k, v in max_models.items()}
    ws_port = data.get("websocket_port")
    return Health(
        status=str(data.get("status") or "ok"),
        version=str(data.get("version") or ""),
        model_loaded=data.get("model_loaded") if isinstance(data.get("model_loaded"), str) else None,
        loaded=tuple(entries),
        max_models=max_models,
        simulated=bool(data.get("simulated")) or str(data.get("version") or "").endswith("-sim"),
        websocket_port=ws_port if isinstance(ws_port, int) else None,
        raw=data,
    )


@dataclass(frozen=True)
class PullEvent:
    """One server-sent event of `/v1/pull` with `stream: true`: progress, complete, error."""

    event: str
    data: dict

    @property
    def percent(self) -> float | None:
        value = self.data.get("percent")
        return float(value) if isinstance(value, (int, float)) else None


# base URL -> "/api" for lemond that serves only the prefixed routes (learned on first 404)
_API_PREFIX: dict[str, str] = {}


def _is_unknown_route(response: httpx.Response) -> bool:
    """lemond's "The requested endpoint does not exist" 404, as opposed to a model 404."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("type") == "not_found" and "path" in error


@cache
def _ssl_context() -> ssl.SSLContext:
    """One TLS context for every client: building one loads the CA bundle (~25 ms), and the
    sync facade and the reconciler create clients often (docs/benchmarks.md, Load)."""
    return ssl.create_default_context()


class LemonadeClient:
    """Async client for one lemond node. Cheap to create; close it (or use `async with`)."""

    def __init__(self, base_url: str, api_key: str = "", admin_api_key: str = "",
                 timeout: float = DEFAULT_TIMEOUT, load_timeout: float = DEFAULT_LOAD_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_api_key = admin_api_key or api_key
        self.timeout = timeout
        self.load_timeout = load_timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport, verify=_ssl_context(),
            # never pick up proxies from the environment: lemond is on our LAN/loopback
            trust_env=False,
        )

    async def __aenter__(self) -> LemonadeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- transport -------------------------------------------------------------------
    def _headers(self, path: str) -> dict[str, str]:
        key = self.admin_api_key if path.startswith("/internal/") else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _long(self) -> httpx.Timeout:
        # connecting stays quick so an unreachable node fails fast even for a load
        return httpx.Timeout(self.load_timeout, connect=self.timeout)

    def _route(self, path: str) -> str:
        if path.startswith("/v1/"):
            return _API_PREFIX.get(self.base_url, "") + path
        return path

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       params: dict | None = None, timeout: Any = None,
                       expect_json: bool = True) -> Any:
        response = await self._send(method, self._route(path), json_body, params, timeout)
        if response.status_code == 404 and path.startswith("/v1/") and \
                self.base_url not in _API_PREFIX and _is_unknown_route(response):
            # lemond before 9.3.2 (and the v10.0 simulator shape) only serves /api/v1/...
            _API_PREFIX[self.base_url] = "/api"
            response = await self._send(method, "/api" + path, json_body, params, timeout)
            if response.status_code == 404 and _is_unknown_route(response):
                _API_PREFIX.pop(self.base_url, None)
        return self._decode(response, expect_json)

    async def _send(self, method: str, path: str, json_body: Any, params: dict | None,
                    timeout: Any) -> httpx.Response:
        try:
            return await self._http.request(
                method, path, json=json_body, params=params, headers=self._headers(path),
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException as exc:
            if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
                raise LemonadeUnavailable(f"cannot connect to lemond at {self.base_url} "
                                          "(connection timed out)") from None
            raise LemonadeTimeout(f"lemond at {self.base_url} did not answer {method} {path} "
                                  "in time") from None
        except httpx.HTTPError as exc:
            raise LemonadeUnavailable(
                f"cannot reach lemond at {self.base_url}: {exc.__class__.__name__}"
                + (f" ({exc})" if str(exc) else "")
            ) from None

    @staticmethod
    def _decode(response: httpx.Response, expect_json: bool) -> Any:
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.text)
        if not expect_json:
            return response.text
        try:
            return response.json()
        except ValueError:
            raise LemonadeBadResponse(
                response.status_code, "lemond answered with something that is not JSON",
                body=response.text[:2000],
            ) from None

    # --- routes ------------------------------------------------------------------------
    async def live(self) -> dict:
        return await self._request("GET", "/live")

    async def health(self) -> Health:
        return parse_health(await self._request("GET", "/v1/health"))

    async def models(self, show_all: bool = False) -> list[dict]:
        data = await self._request("GET", "/v1/models",
                                   params={"show_all": "true"} if show_all else None)
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise LemonadeBadResponse(200, "model list is not a list", body=str(data)[:500])
        return [row for row in rows if isinstance(row, dict)]

    async def model(self, model_id: str) -> dict:
        return await self._request("GET", f"/v1/models/{model_id}")

    async def load(self, body: dict) -> dict:
        return await self._request("POST", "/v1/load", json_body=body, timeout=self._long())

    async def unload(self, model_name: str | None = None) -> dict:
        """Unload one model, or every model when `model_name` is None."""
        body = {"model_name": model_name} if model_name else None
        return await self._request("POST", "/v1/unload", json_body=body, timeout=self._long())

    async def delete(self, model_name: str) -> dict:
        return await self._request("POST", "/v1/delete", json_body={"model_name": model_name},
                                   timeout=self._long())

    async def pull_blocking(self, model_name: str, **definition: Any) -> dict:
        return await self._request("POST", "/v1/pull",
                                   json_body={"model_name": model_name, **definition},
                                   timeout=self._long())

    async def pull(self, model_name: str, **definition: Any) -> AsyncIterator[PullEvent]:
        """Stream `/v1/pull` progress. Leaving the loop early closes the connection, which
        makes lemond cancel the download (lemond-api.md §2.8)."""
        body = {"model_name": model_name, **definition, "stream": True}
        try:
            async with self._http.stream("POST", self._route("/v1/pull"), json=body,
                                         headers=self._headers("/v1/pull"),
                                         timeout=self._long()) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response.status_code, response.text)
                event = "message"
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        payload = line[5:].strip()
                        try:
                            data = json.loads(payload)
                        except ValueError:
                            data = {"raw": payload}
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

    async def stats(self) -> dict:
        return await self._request("GET", "/v1/stats")

    async def system_stats(self) -> dict:
        return await self._request("GET", "/v1/system-stats")

    async def system_info(self) -> dict:
        return await self._request("GET", "/v1/system-info")

    async def params(self) -> dict:
        return await self._request("GET", "/v1/params")

    async def set_params(self, changes: dict) -> dict:
        """Runtime config change that lemond does not persist."""
        return await self._request("POST", "/v1/params", json_body=changes)

    async def internal_config(self) -> dict:
        return await self._request("GET", "/internal/config")

    async def internal_set(self, changes: dict) -> dict:
        """Persisted config change (admin key)."""
        return await self._request("POST", "/internal/set", json_body=changes)

    async def pin(self, model_name: str, pinned: bool = True) -> dict:
        """Pin/unpin a loaded model (lemond >= 10.8 only)."""
        return await self._request("POST", "/internal/pin",
                                   json_body={"model_name": model_name, "pinned": pinned})

    async def shutdown(self) -> dict:
        return await self._request("POST", "/internal/shutdown", expect_json=False)


class SyncLemonadeClient:
    """Blocking facade over `LemonadeClient` for management commands and actions.

    Each call runs on a fresh async client so it is safe from any thread; the cost (a new
    connection per call) is irrelevant next to a model load.
    """

    _ASYNC_METHODS = {
        "live", "health", "models", "model", "load", "unload", "delete", "pull_blocking",
        "stats", "system_stats", "system_info", "params", "set_params", "internal_config",
        "internal_set", "pin", "shutdown",
    }

    def __init__(self, base_url: str, **options: Any):
        self.base_url = base_url.rstrip("/")
        self._options = options

    def __getattr__(self, name: str):
        if name not in self._ASYNC_METHODS:
            raise AttributeError(name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            async with LemonadeClient(self.base_url, **self._options) as client:
                return await getattr(client, name)(*args, **kwargs)

        # A loop of its own even on a worker thread that sync_to_async started: hopping
        # back onto the server's loop would wait for ever once that loop stops (shutdown).
        return async_to_sync(call, force_new_loop=True)


__all__ = [
    "Health", "LemonadeClient", "LemonadeError", "LoadedModel", "PullEvent",
    "SyncLemonadeClient", "parse_health",
]
