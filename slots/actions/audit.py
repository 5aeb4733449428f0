"""The audit log and the observed-state writes.

`record` saves an action's outcome (observed fields and its `SlotEvent` row) in one
transaction; `fail` records a failed action. `record_observation` writes what the
reconciler saw lemond doing, only if the slot has not moved since it was read
(compare-and-swap on `state` and `state_changed_at`, so a poll never overwrites a newer
action); `record_node_observation` does the same for a node's header fields. Pushes to
open dashboards go out after the commit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.db import transaction
from django.utils import timezone

from .. import runtime
from ..models import EventActor, Node, Slot, SlotEvent, State
from .errors import SlotError

log = logging.getLogger("hal0.actions")

Actor = Any  # a user, a token's Principal (both have get_username()) or an EventActor name


def actor_name(actor: Actor) -> str:
    """Users are recorded by username; services by their name ('cli', 'gateway', …)."""
    if hasattr(actor, "get_username"):
        return actor.get_username() or EventActor.API
    return str(actor or EventActor.CLI)


def ms_since(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


def record(slot: Slot, action: str, *, actor: Actor, from_state: str = "", ok: bool = True,
           duration_ms: int | None = None, code: str = "", message: str = "",
           model: str | None = None, observed: dict[str, Any] | None = None) -> SlotEvent:
    """Save observed fields and the audit row together; broadcast after commit."""
    observed = dict(observed or {})
    with transaction.atomic():
        if observed:
            if "state" in observed:
                observed.setdefault("state_changed_at", timezone.now())
            Slot.objects.filter(pk=slot.pk).update(**observed)
            for key, value in observed.items():
                setattr(slot, key, value)
        event = SlotEvent.objects.create(
            slot=slot, slot_name=slot.name, action=action, actor=actor_name(actor),
            from_state=from_state, to_state=observed.get("state", slot.state),
            model=model if model is not None else slot.model_name, duration_ms=duration_ms,
            ok=ok, error_code=code, message=message[:1000],
        )
        runtime.current().live.broadcast_slot_on_commit(slot.pk)
    return event


def fail(slot: Slot, action: str, from_state: str, error: SlotError, *, actor: Actor,
         started: float, model: str | None = None, **observed: Any) -> SlotError:
    """Record a failed action on the slot (state error unless told otherwise); returns
    the error for the caller to raise."""
    observed.setdefault("state", State.ERROR)
    observed.setdefault("error_code", error.code)
    observed.setdefault("state_message", error.message[:1000])
    record(slot, action, actor=actor, from_state=from_state, ok=False,
           duration_ms=ms_since(started), code=error.code, message=error.message,
           model=model, observed=observed)
    log.warning("slot %s: %s failed: %s", slot.name, action, error)
    return error


def record_node_change(node: Node, action: str, *, actor: Actor, message: str) -> SlotEvent:
    """A node created, changed or deleted: an audit row under the node's name (no slot)."""
    return SlotEvent.objects.create(slot=None, slot_name=node.name[:32], action=action,
                                    actor=actor_name(actor), message=message[:1000])


def record_observation(slot: Slot, action: str | None = None, *, message: str = "",
                       actor: Actor = EventActor.RECONCILER, **observed: Any) -> bool:
    """Write what lemond was seen doing, if the slot is still as it was read.

    `action` ("evicted", "adopted", …) also writes an audit row; without it only the
    observed fields change (e.g. a fresher `lemond_entry`). Returns False when an action
    moved the slot meanwhile: the next poll looks again.
    """
    now = timezone.now()
    fields = dict(observed)
    if "state" in fields and fields["state"] != slot.state:
        fields["state_changed_at"] = now
    with transaction.atomic():
        claimed = Slot.objects.filter(
            pk=slot.pk, state=slot.state, state_changed_at=slot.state_changed_at,
        ).update(**fields)
        if not claimed:
            return False
        if action:
            SlotEvent.objects.create(
                slot=slot, slot_name=slot.name, action=action, actor=actor_name(actor),
                from_state=slot.state, to_state=fields.get("state", slot.state),
                model=fields.get("loaded_model") or slot.loaded_model or slot.model_name,
                message=message[:1000],
            )
        runtime.current().live.broadcast_slot_on_commit(slot.pk)
    for key, value in fields.items():
        setattr(slot, key, value)
    return True


def record_node_observation(node: Node, **observed: Any) -> bool:
    """Write a node's observed fields that changed and push its header; False if none did."""
    changed = {k: v for k, v in observed.items() if getattr(node, k) != v}
    if not changed:
        return False
    with transaction.atomic():
        Node.objects.filter(pk=node.pk).update(**changed)
        runtime.current().live.broadcast_node_on_commit(node.pk)
    for key, value in changed.items():
        setattr(node, key, value)
    return True
