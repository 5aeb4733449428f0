"""The ASGI application: one Simulator instance is one simulated lemond process."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from providers.lemonade import catalog
from providers.lemonade.simulator.config import ConfigMixin, SimOptions
from providers.lemonade.simulator.constants import (
    ALL_PREFIXES,
    CORS_HEADERS,
    LEGACY_PREFIXES,
    QUIET_PATHS,
    SHAPES,
    SIM_FLM_MODELS,
)
from providers.lemonade.simulator.downloads import DownloadsMixin
from providers.lemonade.simulator.eviction import EvictionMixin
from providers.lemonade.simulator.extra_models import ExtraModelsMixin
from providers.lemonade.simulator.faults import FaultControl
from providers.lemonade.simulator.logs import LogBuffer, LogsMixin
from providers.lemonade.simulator.options import OptionsMixin
from providers.lemonade.simulator.processes import ProcessMixin
from providers.lemonade.simulator.registry import RegistryMixin
from providers.lemonade.simulator.residency import ResidencyMixin, State
from providers.lemonade.simulator.routes_backends import BackendsMixin
from providers.lemonade.simulator.routes_config import ConfigRoutes
from providers.lemonade.simulator.routes_inference import InferenceRoutes
from providers.lemonade.simulator.routes_lifecycle import LifecycleRoutes
from providers.lemonade.simulator.routes_status import StatusRoutes
from providers.lemonade.simulator.routes_v11 import V11Routes
from providers.lemonade.simulator.wire import (
    ApiError,
    Request,
    Response,
    endpoint_not_found,
    is_loopback,
    json_response,
)


class Simulator(V11Routes, EvictionMixin, OptionsMixin, ProcessMixin, BackendsMixin,
                ConfigMixin, ExtraModelsMixin, RegistryMixin, ResidencyMixin, DownloadsMixin, StatusRoutes,
                LifecycleRoutes, ConfigRoutes, InferenceRoutes, LogsMixin, FaultControl):
    """The ASGI application. One instance is one simulated lemond process."""

    def __init__(self, options: SimOptions | None = None, **kwargs: Any):
        self.startup_options = options or SimOptions.build(**kwargs)
        self.opts = replace(self.startup_options)
        self.logs = LogBuffer(echo=self.opts.verbose)
        self.generation = 0
        self.pid_counter = 41000  # pids when no real backend process can be started
        self.port_counter = 8000
        self.lru_counter = 0
        self.request_counter = 0
        self.shutdown_hook = None  # set by run(): stops the server after /internal/shutdown
        # Set by run() once listening: the main port (the `--port` layer of the effective
        # config) and the separate log websocket port lemond 10.1-10.7 uses (and later
        # versions keep as a legacy listener). Without them the main port stands in.
        self.listen_port: int | None = None
        self.listen_host: str | None = None  # `--host`, the same layer as `--port`
        self.websocket_port: int | None = None
        self.jobs: dict[str, dict] = {}
        self.job_tasks: dict[str, asyncio.Task] = {}
        self._load_lock: asyncio.Lock | None = None
        self._reset_everything()
        self.logs.add("Info", "Server", "Starting Lemonade Server (simulator, no inference)")
        self.logs.add("Info", "Server", f"Version: {self.version}")

    # ---- configuration and version features -----------------------------------------

    def _reset_everything(self) -> None:
        """Startup state: nothing loaded, counters zero, faults cleared, catalogue pristine."""
        if hasattr(self, "state"):
            self.stop_all_backends()
        self.opts = replace(self.startup_options)
        self.generation += 1
        self.catalog = catalog.load_catalog()
        self.catalog.update(copy.deepcopy(SIM_FLM_MODELS))
        self.downloaded = {n for n in self.opts.downloaded if n in self.catalog}
        self.persisted_config: dict = {"max_loaded_models": self.opts.max_loaded_models}
        self.saved_options: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}  # /internal/aliases (v11.6+): alias -> target
        self.faults: dict[str, Any] = {}
        self.load_calls: dict[str, int] = {}
        self.load_requests: dict[str, int] = {}
        self.open_load_requests: dict[str, int] = {}
        self.max_open_load_requests: dict[str, int] = {}
        self.load_failures: dict[str, int] = {}
        self.evictions: list[dict] = []
        self.pulls: dict[str, dict] = {}
        self.cancelled_pulls: list[str] = []
        self._drop_jobs()
        self.state = State(self)
        self.rescan_extra_models()  # also forgets the name maps of the old catalogue
        self.reset_backends()

    def _restart(self) -> None:
        """What a lemond restart forgets: loaded backends, pins, stats, runtime params."""
        self.stop_all_backends()
        self.generation += 1
        self._drop_jobs()  # download jobs live in memory: a restart forgets them
        old = self.state
        self.state = State(self)
        self.state.fail_models = old.fail_models
        self.logs.add("Info", "Server", "Starting Lemonade Server (simulated restart)")

    @property
    def v(self) -> tuple[int, int, int]:
        return SHAPES[self.opts.version_shape]

    def since(self, *version: int) -> bool:
        return self.v >= version

    @property
    def version(self) -> str:
        return "{}.{}.{}-sim".format(*self.v)

    @property
    def load_lock(self) -> asyncio.Lock:
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        return self._load_lock

    def type_name(self, kind: str) -> str:
        # lemond <= v10.4 called transcription models "audio"
        return "audio" if kind == "transcription" and not self.since(10, 5) else kind

    def type_keys(self) -> list[str]:
        keys = ["llm", "embedding", "reranking", self.type_name("transcription"), "image", "tts"]
        if self.since(11, 5):
            keys.append("classification")
        return keys

    def prefixes(self) -> tuple[str, ...]:
        # The brief's (and lemond-api.md §7's) "v10.0 shape" serves only /api/v0 and /api/v1.
        return LEGACY_PREFIXES if self.opts.version_shape == "10.0" else ALL_PREFIXES

    def log(self, severity: str, tag: str, line: str) -> None:
        self.logs.add(severity, tag, line)

    # ---- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            await self.handle_http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.handle_websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    @staticmethod
    def _request(scope, body: bytes) -> Request:
        headers: dict[str, str] = {}
        for key, value in scope.get("headers") or []:
            headers[key.decode("latin-1").lower()] = value.decode("latin-1")
        server = scope.get("server") or ("127.0.0.1", 0)
        client = scope.get("client") or ("127.0.0.1", 0)
        return Request(method=scope["method"].upper(), path=scope["path"],
                       query=parse_qs(scope.get("query_string", b"").decode("latin-1")),
                       headers=headers, body=body, client=str(client[0]),
                       port=int(server[1] or 0))

    async def handle_http(self, scope, receive, send):
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        req = self._request(scope, b"".join(chunks))
        await self.send_response(req, await self.respond(req), send, receive)

    async def respond(self, req: Request) -> Response:
        """lemond's HTTP answer to one request (errors included)."""
        try:
            if self.on_websocket_port(req.port):
                raise endpoint_not_found(req.path)  # that listener speaks websocket only
            return await self.dispatch(req)
        except ApiError as exc:
            return json_response(exc.body, exc.status)
        except Exception as exc:  # a bug in the simulator: answer like lemond's generic 500
            self.log("Error", "Server", f"Unhandled error: {exc!r}")
            return json_response({"error": f"Internal server error: {exc}"}, 500)

    def cors_headers(self, req: Request) -> list[tuple[bytes, bytes]]:
        origin = req.headers.get("origin")
        if self.since(11, 5):
            if origin and self.origin_allowed(origin):
                return [(b"access-control-allow-origin", origin.encode()), *CORS_HEADERS]
            return list(CORS_HEADERS)
        return [(b"access-control-allow-origin", b"*"), *CORS_HEADERS]

    @staticmethod
    def origin_allowed(origin: str) -> bool:
        allowed = os.environ.get("LEMONADE_ALLOWED_ORIGINS", "")
        if allowed.strip() == "*" or origin in [o.strip() for o in allowed.split(",")]:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https", "ws", "wss"):
            return True  # desktop app schemes (tauri://, app://)
        host = parts.hostname or ""
        return is_loopback(host) or host.endswith(".localhost")

    async def send_response(self, req: Request, response: Response, send, receive,
                            channel: str = "http") -> None:
        """Send a response as ASGI `http.response.*` messages, or with channel
        "websocket.http" as the websocket denial response to an upgrade (same content)."""
        start, body_type = f"{channel}.response.start", f"{channel}.response.body"
        disconnect = "websocket.disconnect" if channel.startswith("websocket") \
            else "http.disconnect"
        sim_route = req.path.startswith("/__sim__/")
        if (not sim_route and self.faults.get("malformed_json") and response.stream is None
                and response.content_type == "application/json" and response.body):
            # A proper prefix of a JSON object is never valid JSON.
            response = Response(200, response.body[: max(1, len(response.body) // 2)])
        headers = [(b"content-type", response.content_type.encode()), *response.headers]
        if not sim_route:
            headers += self.cors_headers(req)
        if response.stream is None:
            body = b"" if req.method == "HEAD" else response.body
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": start, "status": response.status, "headers": headers})
            await send({"type": body_type, "body": body})
            return
        headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        await send({"type": start, "status": response.status, "headers": headers})

        async def pump():
            async for chunk in response.stream:
                await send({"type": body_type, "body": chunk, "more_body": True})
            await send({"type": body_type, "body": b""})

        async def watch():
            while (await receive())["type"] != disconnect:
                pass

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # A closed connection cancels the stream (and with it e.g. a pull's download).
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            # Close the generator now (running its `finally`), not whenever it is collected.
            with contextlib.suppress(Exception):
                await response.stream.aclose()

    # ---- routing -----------------------------------------------------------------------

    def api_routes(self) -> dict[str, dict[str, Any]]:
        """Route (after the prefix) → {method: handler}, for this version shape."""
        routes: dict[str, dict[str, Any]] = {
            "health": {"GET": self.h_health},
            "models": {"GET": self.h_models},
            "load": {"POST": self.h_load},
            "unload": {"POST": self.h_unload},
            "delete": {"POST": self.h_delete},
            "pull": {"POST": self.h_pull},
            "stats": {"GET": self.h_stats},
            "system-info": {"GET": self.h_system_info},
            "system-stats": {"GET": self.h_system_stats},
            "params": {"POST": self.h_params_set},
            "log-level": {"POST": self.h_log_level},
            "chat/completions": {"POST": self.h_chat},
            "completions": {"POST": self.h_completions},
            "responses": {"POST": self.h_responses},
            "embeddings": {"POST": self.h_embeddings},
            "reranking": {"POST": self.h_rerank},
            "audio/transcriptions": {"POST": self.h_transcriptions},
            "audio/speech": {"POST": self.h_speech},
            "images/generations": {"POST": self.h_images},
            "install": {"POST": self.h_install},
            "uninstall": {"POST": self.h_uninstall},
        }
        if self.since(10, 6):
            routes["downloads"] = {"GET": self.h_downloads}
            routes["downloads/control"] = {"POST": self.h_downloads_control}
            routes["slots"] = {"GET": self.h_slots}
            routes["tokenize"] = {"POST": self.h_tokenize}
        if self.since(11, 7):  # before v11.7 lemond serves only `reranking`
            routes["rerank"] = {"POST": self.h_rerank}
            routes["reranker"] = {"POST": self.h_rerank}
        if self.since(10, 10):
            routes["params"]["GET"] = self.h_params_get
        if not self.since(10, 1):
            routes["logs/stream"] = {"GET": self.h_logs_sse}  # SSE, removed in v10.1
        routes.update(self.v11_api_routes())
        return routes

    def root_routes(self) -> dict[str, dict[str, Any]]:
        routes: dict[str, dict[str, Any]] = {
            "/live": {"GET": self.h_live},
            "/": {"GET": self.h_web_app},
            "/internal/shutdown": {"POST": self.h_shutdown},
        }
        if self.since(10, 1):
            routes["/internal/set"] = {"POST": self.h_internal_set}
            routes["/internal/config"] = {"GET": self.h_internal_config}
        if self.since(10, 7):
            routes["/metrics"] = {"GET": self.h_metrics}
        if self.since(10, 8):
            routes["/internal/pin"] = {"POST": self.h_pin}
        if self.since(10, 10):
            routes["/internal/config/defaults"] = {"GET": self.h_internal_defaults}
        routes.update(self.v11_root_routes())
        return routes

    def route(self, req: Request) -> Any:
        """The handler for a request, or the ApiError lemond would answer with."""
        methods = self.root_routes().get(req.path)
        rest = None
        if methods is None:
            for prefix in self.prefixes():
                if req.path.startswith(prefix + "/"):
                    rest = req.path[len(prefix) + 1:]
                    break
            methods = self.v11_dynamic_route(req.path, rest)
            if methods is None and rest is not None:
                routes = self.api_routes()
                methods = routes.get(rest)
                if methods is None and rest.startswith("models/") and len(rest) > 7:
                    model_id = unquote(rest[len("models/"):])
                    methods = {"GET": lambda r, m=model_id: self.h_model(r, m)}
                slot = re.fullmatch(r"slots/(\d+)", rest)
                if methods is None and slot and "slots" in routes:
                    methods = {"POST": lambda r, i=int(slot[1]): self.h_slot_action(r, i)}
        if methods is None:
            raise endpoint_not_found(req.path)
        method = "GET" if req.method == "HEAD" else req.method
        if method in methods:
            return methods[method]
        if method == "GET" and "POST" in methods:
            raise ApiError(405, {"error": "Method Not Allowed. Use POST for this endpoint"})
        raise endpoint_not_found(req.path)

    def authenticate(self, req: Request) -> None:
        """Server::authenticate_request (lemond-api.md §1 auth matrix)."""
        api_key = self.opts.api_key
        admin_key = self.opts.admin_api_key or api_key
        header = req.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        path = req.path
        if path.startswith("/internal/") or path == "/internal":
            if admin_key and token != admin_key:
                raise ApiError(401, {"error": "Invalid or missing admin API key"})
            if not self.since(10, 7) and self.since(10, 1) and not is_loopback(req.client):
                self.log("Warning", "Server", "Rejected internal request from non-loopback "
                                              f"address {req.client}")
                raise ApiError(403, {"error": "Internal endpoints are only available from "
                                              "localhost"})
            return
        gated = path == "/metrics" or any(path == p or path.startswith(p + "/")
                                          for p in ("/api", "/v0", "/v1", "/mcp"))
        if gated and api_key and token not in (api_key, admin_key):
            raise ApiError(401, {"error": "Invalid or missing API key"})

    async def dispatch(self, req: Request) -> Response:
        if req.path.startswith("/__sim__/"):
            return await self.sim_control(req)
        if req.method == "OPTIONS":
            return Response(204, content_type="text/plain")
        origin = req.headers.get("origin")
        if self.since(11, 5) and origin and not self.origin_allowed(origin):
            raise ApiError(403, {"error": "Origin not allowed"})
        await self.apply_faults()
        if self.faults.get("html_error"):
            return Response(502, b"<html><head><title>502 Bad Gateway</title></head><body>"
                                 b"<center><h1>502 Bad Gateway</h1></center><hr>"
                                 b"<center>nginx</center></body></html>", "text/html")
        if self.faults.get("error_500"):
            raise ApiError(500, {"error": "Internal server error"})
        self.authenticate(req)
        handler = self.route(req)
        tail = req.path.rsplit("/", 1)[-1]
        if tail not in QUIET_PATHS and req.path != "/live":
            self.log("Debug", "Server", f"{req.method} {req.path}")
        return await handler(req)

