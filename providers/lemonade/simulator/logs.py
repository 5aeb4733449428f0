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

    async def handle_websocket(self, scope, receive, send):
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        path = scope["path"]
        server = scope.get("server") or ("127.0.0.1", 0)
        if not self.ws_path_ok(path, int(server[1] or 0)):
            await self.refuse_websocket(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        keys = {k for k in (self.opts.api_key, self.opts.admin_api_key) if k}
        auth = headers.get("authorization", "")
        offered = [auth[7:].strip()] if auth.lower().startswith("bearer ") else []
        offered += query.get("api_key", [])
        protocols = [str(p) for p in scope.get("subprotocols") or []]
        offered += self.subprotocol_credentials(protocols)
        authenticated = not keys or any(k in keys for k in offered)
        # Select lemond's application protocol when offered, never the credential.
        accept = {"type": "websocket.accept"}
        if WS_APP_PROTOCOL in protocols:
            accept["subprotocol"] = WS_APP_PROTOCOL
        await send(accept)

        async def send_json(data: dict) -> None:
            await send({"type": "websocket.send", "text": dumps(data)})

        forwarder: asyncio.Task | None = None
        queue: asyncio.Queue | None = None
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text") or (message.get("bytes") or b"").decode("utf-8",
                                                                                    "replace")
                try:
                    data = json.loads(raw)
                    kind = data.get("type") if isinstance(data, dict) else None
                except ValueError:
                    data, kind = {}, None
                if kind == "auth":
                    authenticated = not keys or data.get("token") in keys
                    if authenticated:
                        await send_json({"type": "auth.ok"})
                    else:
                        await send_json({"type": "error", "error": {
                            "message": "Invalid or missing API key",
                            "type": "authentication_error"}})
                elif not authenticated:
                    await send_json({"type": "error", "error": {
                        "message": "Invalid or missing API key", "type": "authentication_error"}})
                elif kind == "logs.subscribe":
                    if forwarder is not None:
                        forwarder.cancel()
                        self.logs.subscribers.discard(queue)
                    after = data.get("after_seq")
                    queue = asyncio.Queue()
                    # Subscribe before the snapshot so nothing falls between the two.
                    self.logs.subscribers.add(queue)
                    snapshot = [e for e in self.logs.entries
                                if not isinstance(after, int) or e["seq"] > after]
                    await send_json({"type": "logs.snapshot", "entries": snapshot})
                    last = snapshot[-1]["seq"] if snapshot else (after or 0)
                    forwarder = asyncio.ensure_future(self._forward_logs(queue, last, send_json))
                elif kind == "logs.unsubscribe":
                    if forwarder is not None:
                        forwarder.cancel()
                        forwarder = None
                    self.logs.subscribers.discard(queue)
                else:
                    await send_json({"type": "error", "error": {
                        "message": f"Unknown message type: {kind}",
                        "type": "invalid_request_error"}})
        finally:
            if forwarder is not None:
                forwarder.cancel()
            if queue is not None:
                self.logs.subscribers.discard(queue)

    @staticmethod
    async def _forward_logs(queue: asyncio.Queue, last: int, send_json) -> None:
        while True:
            entry = await queue.get()
            if entry["seq"] > last:
                await send_json({"type": "logs.entry", "entry": entry})

