"""The log ring and its streams: SSE (<=v10.0) and the websocket (v10.1+)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import deque
from urllib.parse import parse_qs

from providers.lemonade.simulator.constants import WS_APP_PROTOCOL, WS_BEARER_PREFIX
from providers.lemonade.simulator.wire import Request, Response, dumps


class LogBuffer:
    """lemond's in-memory log ring (the websocket snapshot is at most 5000 entries)."""

    def __init__(self, echo: bool = False):
        self.entries: deque[dict] = deque(maxlen=5000)
        self.seq = 0
        self.subscribers: set[asyncio.Queue] = set()
        self.echo = echo

    def add(self, severity: str, tag: str, line: str) -> dict:
        self.seq += 1
        t = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
        entry = {"seq": self.seq, "timestamp": stamp, "severity": severity, "tag": tag,
                 "line": line}
        self.entries.append(entry)
        for queue in list(self.subscribers):
            queue.put_nowait(entry)
        if self.echo:
            print(self.raw(entry), flush=True)
        return entry

    @staticmethod
    def raw(entry: dict) -> str:
        return f"[{entry['timestamp']}] [{entry['severity']}] ({entry['tag']}) {entry['line']}"



class LogsMixin:
    # ---- logs --------------------------------------------------------------------------

    async def h_logs_sse(self, req: Request) -> Response:
        async def lines():
            queue: asyncio.Queue = asyncio.Queue()
            self.logs.subscribers.add(queue)
            try:
                for entry in list(self.logs.entries):
                    yield f"data: {self.logs.raw(entry)}\n\n".encode()
                while True:
                    entry = await queue.get()
                    yield f"data: {self.logs.raw(entry)}\n\n".encode()
            finally:
                self.logs.subscribers.discard(queue)

        return Response(200, content_type="text/event-stream", stream=lines())

    def on_websocket_port(self, port: int) -> bool:
        """Whether a connection came in on the separate websocket listener."""
        return bool(self.websocket_port) and port == self.websocket_port

    def ws_path_ok(self, path: str, port: int) -> bool:
        """The log stream: on `websocket_port` since v10.1 and, since v10.8, on the main
        port too; bare or under any prefix (lemond-api.md §2 table, §2.15)."""
        if not self.since(10, 1):
            return False
        if not self.since(10, 8) and not self.on_websocket_port(port):
            return False  # v10.1-v10.7: the main (cpp-httplib) port has no websocket route
        if path == "/logs/stream":
            return True
        return any(path == f"{p}/logs/stream" for p in self.prefixes())

    async def refuse_websocket(self, scope, receive, send) -> None:
        """An upgrade to a path with no websocket: lemond's HTTP server treats it as the
        plain GET it also is, so it gets exactly the GET's answer — the route's response
        (health, `/live`, the ≤v10.0 SSE log stream, …), the auth 401, or the not-found
        404 for a path lemond does not serve — with the usual default headers. Sent as
        ASGI's websocket denial response when the server offers it (a bare refusal
        otherwise)."""
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        req = self._request({**scope, "method": "GET"}, b"")
        await self.send_response(req, await self.respond(req), send, receive,
                                 channel="websocket.http")

    @staticmethod
    def subprotocol_credentials(offered: list[str]) -> list[str]:
        """Keys offered as `bearer.<base64url(key)>` subprotocols (padding optional)."""
        keys = []
        for protocol in offered:
            if not protocol.startswith(WS_BEARER_PREFIX):
                continue
            encoded = protocol[len(WS_BEARER_PREFIX):]
            try:
                keys.append(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                            .decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
        return keys

    @classmethod
    def offered_credentials(cls, scope: dict, protocols: list[str]) -> list[str]:
        """Keys a websocket upgrade offers: a bearer header, `?api_key=`, or subprotocols."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        auth = headers.get("authorization", "")
        offered = [auth[7:].strip()] if auth.lower().startswith("bearer ") else []
        offered += query.get("api_key", [])
        offered += cls.subprotocol_credentials(protocols)
        return offered

    async def handle_websocket(self, scope, receive, send):
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        path = scope["path"]
        server = scope.get("server") or ("127.0.0.1", 0)
        if not self.ws_path_ok(path, int(server[1] or 0)):
            await self.refuse_websocket(scope, receive, send)
            return
        keys = {k for k in (self.opts.api_key, self.opts.admin_api_key) if k}
        protocols = [str(p) for p in scope.get("subprotocols") or []]
        offered = self.offered_credentials(scope, protocols)
        session = LogSession(self.logs, keys, send)
        session.authenticated = not keys or any(k in keys for k in offered)
        # Select lemond's application protocol when offered, never the credential.
        accept = {"type": "websocket.accept"}
        if WS_APP_PROTOCOL in protocols:
            accept["subprotocol"] = WS_APP_PROTOCOL
        await send(accept)
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                await session.handle(*_ws_message(message))
        finally:
            session.close()


def _ws_message(message: dict) -> tuple[object, str | None]:
    """A client message's JSON and its `type` (({}, None) when it is not JSON)."""
    raw = message.get("text") or (message.get("bytes") or b"").decode("utf-8", "replace")
    try:
        data = json.loads(raw)
        kind = data.get("type") if isinstance(data, dict) else None
    except ValueError:
        data, kind = {}, None
    return data, kind


def _auth_error() -> dict:
    return {"type": "error", "error": {"message": "Invalid or missing API key",
                                       "type": "authentication_error"}}


class LogSession:
    """One log websocket: whether it has authenticated, and its subscription (a queue on
    the log ring and the task forwarding new entries)."""

    def __init__(self, logs: LogBuffer, keys: set[str], send):
        self.logs = logs
        self.keys = keys
        self.send = send
        self.authenticated = False
        self.forwarder: asyncio.Future | None = None
        self.queue: asyncio.Queue | None = None

    async def send_json(self, data: dict) -> None:
        await self.send({"type": "websocket.send", "text": dumps(data)})

    async def handle(self, data, kind: str | None) -> None:
        if kind == "auth":
            self.authenticated = not self.keys or data.get("token") in self.keys
            await self.send_json({"type": "auth.ok"} if self.authenticated else _auth_error())
        elif not self.authenticated:
            await self.send_json(_auth_error())
        elif kind == "logs.subscribe":
            await self.subscribe(data.get("after_seq"))
        elif kind == "logs.unsubscribe":
            self.unsubscribe()
        else:
            await self.send_json({"type": "error", "error": {
                "message": f"Unknown message type: {kind}",
                "type": "invalid_request_error"}})

    async def subscribe(self, after) -> None:
        if self.forwarder is not None:
            self.forwarder.cancel()
            self.logs.subscribers.discard(self.queue)
        queue: asyncio.Queue = asyncio.Queue()
        self.queue = queue
        # Subscribe before the snapshot so nothing falls between the two.
        self.logs.subscribers.add(queue)
        snapshot = [e for e in self.logs.entries
                    if not isinstance(after, int) or e["seq"] > after]
        await self.send_json({"type": "logs.snapshot", "entries": snapshot})
        last = snapshot[-1]["seq"] if snapshot else (after or 0)
        self.forwarder = asyncio.ensure_future(self._forward(queue, last))

    def unsubscribe(self) -> None:
        if self.forwarder is not None:
            self.forwarder.cancel()
            self.forwarder = None
        self.logs.subscribers.discard(self.queue)

    def close(self) -> None:
        if self.forwarder is not None:
            self.forwarder.cancel()
        if self.queue is not None:
            self.logs.subscribers.discard(self.queue)

    async def _forward(self, queue: asyncio.Queue, last: int) -> None:
        while True:
            entry = await queue.get()
            if entry["seq"] > last:
                await self.send_json({"type": "logs.entry", "entry": entry})
