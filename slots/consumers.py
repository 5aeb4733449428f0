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
import logging
from collections import deque
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.template.loader import render_to_string

from providers.lemonade import logs as lemond_logs

from . import activity, live, runtime
from .jsonbody import NotAJsonObject, json_object
from .models import Node, Slot, can_manage_slots

log = logging.getLogger("hal0.consumers")

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403


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
        pages = runtime.current().live
        pages.bind_loop()
        await self.channel_layer.group_add(live.GROUP, self.channel_name)
        self.user_group = live.user_group(self.scope["user"].pk)  # its own actions' outcomes
        await self.channel_layer.group_add(self.user_group, self.channel_name)
        await self.accept()
        self.counted = True
        pages.viewer_joined()
        slot_name = _query(self.scope).get("slot")
        # a slot page also hears its slot's stats after each metrics batch (slots.activity)
        self.slot_group = activity.slot_group(slot_name) if slot_name else None
        if self.slot_group:
            await self.channel_layer.group_add(self.slot_group, self.channel_name)
            pages.page_watcher(True)
        await self.send(text_data=await self.resync(slot_name))

    async def disconnect(self, code):
        if getattr(self, "counted", False):
            self.counted = False
            runtime.current().live.viewer_left()
            if self.slot_group:
                runtime.current().live.page_watcher(False)
                await self.channel_layer.group_discard(self.slot_group, self.channel_name)
        await self.channel_layer.group_discard(live.GROUP, self.channel_name)
        if getattr(self, "user_group", None):
            await self.channel_layer.group_discard(self.user_group, self.channel_name)

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


class ActivityConsumer(AsyncWebsocketConsumer):
    """The Activity page: each metrics batch's rows this user may see and the page's
    filters (`?slot=`, `?status=`) select, newest first, on top of the table."""

    async def connect(self):
        if not _authenticated(self.scope):
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        query = _query(self.scope)
        user = self.scope["user"]
        self.staff, self.username = user.is_staff, user.get_username()
        self.slot, self.status = query.get("slot", ""), query.get("status", "")
        pages = runtime.current().live
        pages.bind_loop()
        await self.channel_layer.group_add(activity.GROUP, self.channel_name)
        await self.accept()
        self.counted = True
        pages.page_watcher(True)
        await self.send(text_data=render_to_string("slots/_live_status.html",
                                                   {"live": True, "oob": True}))

    async def disconnect(self, code):
        if getattr(self, "counted", False):
            self.counted = False
            runtime.current().live.page_watcher(False)
        await self.channel_layer.group_discard(activity.GROUP, self.channel_name)

    async def activity_rows(self, event):
        rows = [activity.from_data(data) for data in event["rows"]
                if activity.shown_to(self.staff, self.username, data, self.slot, self.status)]
        if rows:
            await self.send(text_data=render_to_string("slots/_activity_rows.html",
                                                       {"rows": rows, "oob": True}))

    async def activity_queues(self, event):
        """A slot's queue moved: the page's queue table again, from this process's queues
        (the table says "this process"; every slot's line, as the page shows them)."""
        html = await database_sync_to_async(activity.render_queues)(
            runtime.current().admission)
        await self.send(text_data=html)


# --- lemond logs -----------------------------------------------------------------------------

LEVELS = lemond_logs.LEVELS
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
        if not await database_sync_to_async(can_manage_slots)(self.scope["user"]):
            await self.close(code=CLOSE_FORBIDDEN)
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
            data = json_object(text_data, empty_ok=True)
        except NotAJsonObject:  # garbage from a browser: nothing to act on
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
                async for entries in lemond_logs.follow(self.lemond(), after, self.status):
                    after = max((e["seq"] for e in entries if e["seq"] is not None),
                                default=after)
                    await self.add_entries(entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self.status(f"lemond's log stream is unavailable ({exc}); "
                                  "retrying in a few seconds.", error=True)
            await asyncio.sleep(3)

    def lemond(self):
        return self.node.client(settings.HAL0_PAGE_LEMOND_TIMEOUT_S)
