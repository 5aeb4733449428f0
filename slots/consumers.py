"""Websockets for logged-in browsers. Origins are checked in `hal0site.asgi`.

* `/ws/slots/` — the dashboard group: every pushed fragment is a partial the pages render,
  swapped in by id (htmx out-of-band). On connect it re-sends what the page shows, so
  nothing that changed between page render and socket open is missed.
* `/ws/logs/` — lemond's log stream, relayed: hal0 connects to lemond (the browser never
  does: lemond >= 11.5 refuses foreign origins) and pushes rendered lines. Pause and the
  level filter are handled here, so the page needs no script for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from urllib.parse import parse_qs, urlsplit, urlunsplit

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.template.loader import render_to_string

from providers.lemonade.client import LemonadeClient
from providers.lemonade.errors import LemonadeError

from . import live
from .models import Node, Slot, parse_version

log = logging.getLogger("hal0.consumers")

CLOSE_UNAUTHENTICATED = 4401


def _authenticated(scope) -> bool:
    user = scope.get("user")
    return user is not None and user.is_authenticated


def _query(scope) -> dict[str, str]:
    raw = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return {k: v[-1] for k, v in raw.items()}


class DashboardConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        if not _authenticated(self.scope):
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        live.bind_loop()
        await self.channel_layer.group_add(live.GROUP, self.channel_name)
        await self.accept()
        self.counted = True
        live.viewer_joined()
        await self.send(text_data=await self.resync(_query(self.scope).get("slot")))

    async def disconnect(self, code):
        if getattr(self, "counted", False):
            self.counted = False
            live.viewer_left()
        await self.channel_layer.group_discard(live.GROUP, self.channel_name)

    async def push_html(self, event):
        await self.send(text_data=event["html"])

    @database_sync_to_async
    def resync(self, slot_name: str | None) -> str:
        """The cards (and node headers) as they are now, all out-of-band."""
        slots = Slot.objects.for_dashboard()
        nodes = [] if slot_name else Node.objects.all()
        if slot_name:
            slots = slots.filter(name=slot_name)
        return render_to_string("slots/_resync.html", {"slots": slots, "nodes": nodes})


# --- lemond logs -----------------------------------------------------------------------------

LEVELS = ("trace", "debug", "info", "warning", "error", "fatal")
KEEP_LINES = 500  # what the relay remembers (re-rendered when the filter changes)
RESET_AFTER = 1000  # lines appended before the page's list is replaced by the last KEEP_LINES


def level_rank(severity: str) -> int:
    try:
        return LEVELS.index((severity or "info").lower())
    except ValueError:
        return LEVELS.index("info")


class LogsConsumer(AsyncWebsocketConsumer):
    """One browser tab's relay of one node's lemond log."""

    async def connect(self):
        if not _authenticated(self.scope):
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.node = await self.find_node(_query(self.scope).get("node") or "")
        await self.accept()
        await self.send(text_data=render_to_string("slots/_live_status.html",
                                                   {"live": True, "oob": True}))
        self.lines: deque[dict] = deque(maxlen=KEEP_LINES)
        self.held: list[dict] = []
        self.level = "info"
        self.paused = False
        self.appended = 0
        if self.node is None:
            await self.status("No such node.", error=True)
            await self.close()
            return
        self.relay = asyncio.ensure_future(self.relay_forever())

    async def disconnect(self, code):
        relay = getattr(self, "relay", None)
        if relay is not None:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await relay

    @database_sync_to_async
    def find_node(self, name: str) -> Node | None:
        nodes = Node.objects.filter(enabled=True)
        return (nodes.filter(name=name) if name else nodes.order_by("pk")).first()

    # browser -> hal0: htmx `ws-send` forms arrive as JSON of their fields
    async def receive(self, text_data=None, bytes_data=None):
        try:
            data = json.loads(text_data or "{}")
        except (ValueError, RecursionError):  # garbage, or nesting deep enough to overflow
            return
        if not isinstance(data, dict):
            return
        if data.get("level") in LEVELS and data["level"] != self.level:
            self.level = data["level"]
            await self.send_lines(list(self.lines), replace=True)
        if "pause" in data:
            self.paused = data["pause"] in ("1", "true", True, "on")
            if not self.paused and self.held:
                held, self.held = self.held, []
                await self.send_lines(held)
            await self.send(text_data=render_to_string("slots/_log_controls.html", {
                "paused": self.paused, "level": self.level, "levels": LEVELS, "oob": True}))

    # lemond -> hal0 -> browser
    async def add_entries(self, entries: list[dict]) -> None:
        self.lines.extend(entries)
        if self.paused:
            self.held.extend(entries)
            del self.held[:-KEEP_LINES]
            return
        await self.send_lines(entries)

    async def send_lines(self, entries: list[dict], replace: bool = False) -> None:
        shown = [e for e in entries if level_rank(e.get("severity", "")) >= level_rank(self.level)]
        if not shown and not replace:
            return
        self.appended += len(shown)
        if self.appended > RESET_AFTER:
            replace = True
            shown = [e for e in self.lines
                     if level_rank(e.get("severity", "")) >= level_rank(self.level)]
        if replace:
            self.appended = len(shown)
        await self.send(text_data=render_to_string("slots/_log_lines.html", {
            "entries": shown, "replace": replace}))

    async def status(self, message: str, error: bool = False) -> None:
        await self.send(text_data=render_to_string("slots/_log_status.html", {
            "message": message, "error": error}))

    async def relay_forever(self) -> None:
        """Follow lemond's log; reconnect (from the last line seen) when it drops."""
        after: int | None = None
        while True:
            try:
                after = await self.follow(after)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self.status(f"lemond's log stream is unavailable ({exc}); "
                                  "retrying in a few seconds.", error=True)
            await asyncio.sleep(3)

    async def follow(self, after: int | None) -> int | None:
        node = self.node
        async with LemonadeClient(node.base_url, node.api_key, node.admin_api_key,
                                  timeout=settings.HAL0_PAGE_LEMOND_TIMEOUT_S) as client:
            try:
                health = await client.health()
            except LemonadeError as exc:
                raise RuntimeError(str(exc)) from None
            version = parse_version(health.version)
            if version and version < (10, 1):
                return await self.follow_sse(client, after)
        url = _logs_ws_url(node.base_url, version, health.websocket_port)
        return await self.follow_ws(url, node.api_key, after)

    async def follow_ws(self, url: str, api_key: str, after: int | None) -> int | None:
        try:
            from websockets.asyncio.client import connect
        except ImportError:  # pragma: no cover - the `websockets` package is a dependency
            raise RuntimeError("the 'websockets' package is not installed") from None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        async with connect(url, additional_headers=headers, open_timeout=5,
                           max_size=16 * 2**20) as socket:
            await socket.send(json.dumps({"type": "logs.subscribe", "after_seq": after}))
            await self.status(f"Following lemond's log at {url}.")
            async for raw in socket:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == "logs.snapshot":
                    entries = [e for e in message.get("entries") or [] if isinstance(e, dict)]
                    entries = entries[-200:]
                elif kind == "logs.entry" and isinstance(message.get("entry"), dict):
                    entries = [message["entry"]]
                elif kind == "error":
                    error = message.get("error") or {}
                    raise RuntimeError(error.get("message") if isinstance(error, dict)
                                       else str(error))
                else:
                    continue
                if entries:
                    seqs = [e.get("seq") for e in entries if isinstance(e.get("seq"), int)]
                    after = max(seqs) if seqs else after
                    await self.add_entries(entries)
        return after

    async def follow_sse(self, client: LemonadeClient, after: int | None) -> int | None:
        """lemond <= 10.0 streamed raw log lines as server-sent events."""
        await self.status("Following lemond's log (server-sent events, lemond <= 10.0).")
        path = "/api/v1/logs/stream"
        async with client._http.stream("GET", path, headers=client._headers(path),
                                       timeout=None) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    text = line[5:].strip()
                    severity = next((lv for lv in LEVELS if f"[{lv}]" in text.lower()), "info")
                    await self.add_entries([{"line": text, "severity": severity,
                                             "timestamp": "", "tag": ""}])
        return after


def _logs_ws_url(base_url: str, version: tuple[int, ...], websocket_port: int | None) -> str:
    """lemond serves the log websocket on its main port from 10.8, before on its own port."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    netloc = parts.netloc
    if websocket_port and version and version < (10, 8) and parts.hostname:
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = f"{host}:{websocket_port}"
    return urlunsplit((scheme, netloc, "/logs/stream", "", ""))
