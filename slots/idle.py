"""Idle unload: which loaded slots have been unused longer than their `idle_timeout_s`.

A slot is idle when it is ready (not serving, loading, …), unpinned, not keep-loaded, has a
non-zero timeout, has no gateway request in flight in this process, and its last activity
is older than the timeout. Last activity is the latest of: `last_use_at` (written by the
reconciler when lemond's `last_use` for the model moved between two polls: lemond sends
steady-clock milliseconds, never a date, so hal0 never reads it as one), hal0's own
request times (in memory for this process; `last_use_at`, written when a slot stops
serving, for the others) and the moment the slot became ready.

The reconciler calls `aunload_idle_slots()` once per `HAL0_POLL_IDLE_S` (its housekeeping); the
unload itself is the `do_idle_unload_slot` action (event `idle-unload`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from asgiref.sync import sync_to_async
from django.db import connection
from django.utils import timezone

from . import runtime
from .actions.errors import SlotError
from .actions.lifecycle import do_idle_unload_slot
from .models import EventActor, Slot, State

log = logging.getLogger("hal0.idle")


def last_activity(slot: Slot) -> datetime:
    """The latest sign of use of the slot (see the module docstring)."""
    seen = [slot.state_changed_at, slot.last_use_at]
    own = runtime.current().serving.last_request_at(slot)
    if own is not None:
        seen.append(datetime.fromtimestamp(own, tz=UTC))
    return max(d for d in seen if d is not None)


def idle_for(slot: Slot, now: datetime | None = None) -> timedelta:
    return (now or timezone.now()) - last_activity(slot)


def find_idle_slots(now: datetime | None = None) -> list[Slot]:
    """Loaded slots idle longer than their timeout (pinned, keep-loaded, never-idle and
    serving slots excluded)."""
    now = now or timezone.now()
    candidates = (Slot.objects.select_related("node")
                  .filter(state=State.READY, pinned=False, keep_loaded=False,
                          idle_timeout_s__gt=0)
                  .order_by("name"))
    serving = runtime.current().serving
    return [s for s in candidates
            if not serving.count(s)
            and idle_for(s, now) >= timedelta(seconds=s.idle_timeout_s)]


def unload_idle_slots(now: datetime | None = None) -> list[str]:
    """Unload every idle slot (event `idle-unload`). Returns the names unloaded. Blocking."""
    unloaded = []
    for slot in find_idle_slots(now):
        try:
            if do_idle_unload_slot(slot, actor=EventActor.RECONCILER) is not None:
                unloaded.append(slot.name)
                log.info("slot %s: unloaded after %s idle", slot.name,
                         str(idle_for(slot, now)).split(".")[0])
        except SlotError as exc:  # recorded on the slot by the action; try again next cycle
            log.warning("slot %s: idle unload failed: %s", slot.name, exc)
    return unloaded


def _unload_in_thread(now: datetime | None) -> list[str]:
    try:
        return unload_idle_slots(now)
    finally:
        connection.close()


async def aunload_idle_slots(now: datetime | None = None) -> list[str]:
    """`unload_idle_slots` for the reconciler's event loop (runs on the runtime's action
    pool: an unload may wait on lemond)."""
    return await sync_to_async(_unload_in_thread, thread_sensitive=False,
                               executor=runtime.current().actions)(now)
