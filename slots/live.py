"""Live pages: what goes out on the dashboard websocket group, and who is watching.

Every push to the dashboards is HTML: the same partials the pages render
(`slots/_slot_card.html`, `slots/_node.html`, …), marked for an htmx out-of-band swap by
element id. The same pushes also go, as data, to a second group (`MODELS_GROUP`: a slot's
name, state and message) that the gateway's `GET /models/sse` streams to API clients
(`slots.gateway.router`); with the in-memory layer only while this process has such
listeners. Nothing here talks to lemond.

Pushes can start on any thread (actions run on worker threads). The in-memory channel
layer is not thread-safe, so a push from a foreign thread is handed to the event loop that
started the thread (sync_to_async) or else the one the consumers run on (`bind_loop`), never
run on a loop of its own; it waits at most 5 s, so a stopping server never hangs a thread.

The state of this (the loop, the viewer count, pushes in flight, where the cards were last
pushed) is a `Live` object owned by the process's `Runtime`: `runtime.current().live`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

from asgiref.sync import SyncToAsync, async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import transaction
from django.template.loader import render_to_string

from .models import Node, Slot

log = logging.getLogger("hal0.live")

GROUP = "dashboard"
ACTIVITY_GROUP = "activity"  # the Activity pages (slots.activity pushes their rows and queues)
MODELS_GROUP = "models"  # the gateway's /models/sse listeners: slot states as data

Message = tuple[str, dict[str, Any]]  # (group, channel-layer message)


def user_group(user_id: int) -> str:
    """The open dashboards of one user: an action's late outcome (a toast) goes there, not
    to everyone else watching."""
    return f"user-{user_id}"


def render_slot_card(slot: Slot) -> str:
    return render_to_string("slots/_slot_card.html", {"slot": slot, "oob": True})


def render_node(node: Node) -> str:
    return render_to_string("slots/_node.html", {"node": node, "oob": True})


def layout_context() -> dict[str, Any]:
    """What the dashboard shows: two queries whatever the number of slots and nodes. With
    more than one node the slots are grouped by node first (`by_node`), working nodes
    first."""
    slots = list(Slot.objects.for_dashboard())
    nodes = list(Node.objects.all())
    used = {s.node_id for s in slots}
    for node in nodes:
        node.has_slots = node.pk in used
    # working nodes first: a dead one must not push the cards below the fold
    nodes.sort(key=lambda n: (n.health_rank(), n.name))
    by_node = len(nodes) > 1
    sections = [(node, [s for s in slots if s.node_id == node.pk]) for node in nodes] \
        if by_node else []
    return {"slots": slots, "nodes": nodes, "by_node": by_node, "sections": sections}


def _fingerprint(slots: Any, nodes: Any) -> tuple:
    return (tuple(sorted(slots)), tuple(sorted(nodes)))


def layout_fingerprint() -> tuple:
    """Where the cards sit: which slots and nodes exist, under which names, capabilities
    and nodes (two small queries; what changes here needs `push_layout`)."""
    return _fingerprint(Slot.objects.values_list("pk", "name", "capability", "node_id"),
                        Node.objects.values_list("pk", "name"))


def local_layer() -> bool:
    """True with the in-memory channel layer: only this process's dashboards hear it."""
    return isinstance(get_channel_layer(), InMemoryChannelLayer)


def _caller_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop that called into this worker thread through sync_to_async, if any."""
    if getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) != os.getpid():
        return None
    return getattr(SyncToAsync.threadlocal, "main_event_loop", None)


class Live:
    """This process's side of the live pages (owned by its `Runtime`)."""

    def __init__(self) -> None:
        self._home_loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Task] = set()  # pushes scheduled from async code
        self._viewers = 0
        self._watchers = 0  # GET /models/sse listeners in this process
        self._page_watchers = 0  # Activity and slot pages (they do not speed up polling)
        self._viewers_lock = threading.Lock()
        # where the cards sat when this process last pushed the grid or looked
        self._layout_seen: tuple | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Remember the event loop the websockets live on (called by consumers and the
        reconciler from inside it)."""
        self._home_loop = loop or asyncio.get_running_loop()

    # --- who is watching (the reconciler polls faster while anyone is) ------------------
    def viewer_joined(self) -> None:
        with self._viewers_lock:
            self._viewers += 1

    def viewer_left(self) -> None:
        with self._viewers_lock:
            self._viewers = max(0, self._viewers - 1)

    def viewers(self) -> int:
        """Dashboards connected to this process."""
        return self._viewers

    def watcher_joined(self) -> None:
        with self._viewers_lock:
            self._watchers += 1

    def watcher_left(self) -> None:
        with self._viewers_lock:
            self._watchers = max(0, self._watchers - 1)

    def _for_watchers(self, message: dict[str, Any]) -> list[Message]:
        """`message` for the /models/sse listeners, unless none can hear it: with the
        in-memory layer only this process's listeners can."""
        if local_layer() and not self._watchers:
            return []
        return [(MODELS_GROUP, message)]

    def page_watcher(self, joined: bool) -> None:
        """An Activity page or a slot page's stats opened (True) or closed (False)."""
        with self._viewers_lock:
            self._page_watchers = max(0, self._page_watchers + (1 if joined else -1))

    def page_watching(self) -> int:
        """Activity and slot pages connected to this process."""
        return self._page_watchers

    # --- pushing ---------------------------------------------------------------------------
    def send_message(self, group: str, message: dict[str, Any]) -> None:
        """Send one channel-layer message to another page's group (never raises)."""
        self._publish([(group, message)])

    def send_to(self, group: str, html: str) -> None:
        """Push an HTML fragment to one group of pages (a slot page's stats, a user's own
        pages' toasts)."""
        if html:
            self._publish([(group, {"type": "push.html", "html": html})])

    def send(self, html: str, *also: Message) -> None:
        """Push an HTML fragment to every open dashboard (and `also` these messages to their
        groups, in the same hop). Never raises: a broken channel layer must not fail the
        action that triggered the push."""
        if not html:
            return
        self._publish([(GROUP, {"type": "push.html", "html": html}), *also])

    def _publish(self, messages: list[Message]) -> None:
        layer = get_channel_layer()
        if layer is None or not messages:
            return

        async def deliver() -> None:
            for group, message in messages:
                await layer.group_send(group, message)

        try:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not None:  # called from async code: schedule, don't block the loop
                task = running.create_task(deliver())
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                return
            # the loop that started this thread if it was sync_to_async, else the websockets'
            loop = _caller_loop() or self._home_loop
            if loop is not None and loop.is_running() and not loop.is_closed():
                future = asyncio.run_coroutine_threadsafe(deliver(), loop)
                try:
                    future.result(timeout=5)
                finally:
                    future.cancel()  # the loop stopped meanwhile (shutdown): don't leave it
            elif loop is not None:
                # A worker thread whose server loop has stopped (shutdown). Plain
                # async_to_sync would queue the send on that stopped loop and wait for ever,
                # and the interpreter waits for this thread at exit. This process's
                # dashboards are gone; other processes' are reached through a shared layer
                # on a loop of our own.
                if not isinstance(layer, InMemoryChannelLayer):
                    async def bounded() -> None:
                        await asyncio.wait_for(deliver(), 5)

                    async_to_sync(bounded, force_new_loop=True)()
            else:  # a management command: no server loop in this process
                async_to_sync(deliver)()
        except Exception:  # e.g. Redis down: the dashboard catches up on its next load
            log.exception("could not push a dashboard update")

    def broadcast_slot(self, slot_id: int) -> None:
        slot = Slot.objects.select_related("node").filter(pk=slot_id).first()
        if slot is not None:
            self.send(render_slot_card(slot), *self._for_watchers(
                {"type": "slot.status", "slot": slot.name, "state": slot.state,
                 "message": slot.state_message}))

    def broadcast_slot_on_commit(self, slot_id: int) -> None:
        transaction.on_commit(lambda: self.broadcast_slot(slot_id))

    def broadcast_node(self, node_id: int) -> None:
        node = Node.objects.filter(pk=node_id).first()
        if node is not None:
            self.send(render_node(node))

    def broadcast_node_on_commit(self, node_id: int) -> None:
        transaction.on_commit(lambda: self.broadcast_node(node_id))

    def broadcast_removed_on_commit(self, name: str) -> None:
        transaction.on_commit(
            lambda: self.send(f'<div id="slot-{name}" hx-swap-oob="delete"></div>',
                              *self._for_watchers({"type": "slot.removed", "slot": name})))

    def push_layout(self) -> None:
        """Re-send the dashboard's whole grid to open dashboards: a card's place changed,
        not just its content (a slot created, renamed, moved to another node or capability;
        a node added or removed), whichever way the change was made (page, API, CLI,
        admin). API clients on /models/sse hear `models.reload`."""
        self._publish(self._for_watchers({"type": "models.reload"}))
        if local_layer() and not self.viewers():
            return  # no dashboard in this process can hear it (a CLI command): don't render
        context = layout_context()
        self._layout_seen = _fingerprint(
            ((s.pk, s.name, s.capability, s.node_id) for s in context["slots"]),
            ((n.pk, n.name) for n in context["nodes"]))
        html = render_to_string("slots/dashboard.html#layout", context)
        self.send(html.replace('id="layout"', 'id="layout" hx-swap-oob="true"', 1))

    def push_layout_on_commit(self) -> None:
        # Taken note of now, inside the transaction (which sees its own writes): the
        # reconciler's watcher looking between the commit and this push must not take the
        # change for another process's and push the grid a second time.
        self._layout_seen = layout_fingerprint()
        transaction.on_commit(self.push_layout)

    def layout_moved(self) -> bool:
        """True when the cards' places differ from what this process last pushed or saw: a
        change made by another process, which with the in-memory layer could not push here
        itself (`manage.py slots import`). The first look only takes note."""
        seen, self._layout_seen = self._layout_seen, layout_fingerprint()
        return seen is not None and seen != self._layout_seen
