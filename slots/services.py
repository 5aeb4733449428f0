"""Actions: every change to a slot goes through one function here.

Each action validates, claims the slot with a compare-and-swap on its `state` column (no
database transaction is ever held open across a lemond call: loads take minutes), calls
the provider, records the outcome and a `SlotEvent`, and broadcasts the new card after
the transaction commits. Views, the admin, commands, the gateway and the reconciler all
call these; nobody else calls the provider.

Failures raise `SlotError`, whose `envelope()` is the stable error shape
`{"error": {"code", "message", "slot"}}` used by the API and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Exists, Q
from django.db.models.functions import Now
from django.utils import timezone

import providers
from providers.lemonade.errors import (
    LemonadeConflict,
    LemonadeError,
    LemonadeLoadError,
    LemonadeNotFound,
    LemonadeNotLoaded,
    LemonadeTimeout,
    LemonadeUnavailable,
)

from . import leases, live
from .models import EventActor, Node, Slot, SlotEvent, State

log = logging.getLogger("hal0.services")

BUSY_STATES = {State.PULLING, State.LOADING, State.UNLOADING}
JOIN_POLL_S = 0.1


class SlotError(Exception):
    """An action failed; `code` is one of the stable codes below."""

    HTTP_STATUS = {
        "slot.not_found": 404,
        "slot.illegal_transition": 409,
        "slot.config_error": 400,
        "slot.disabled": 409,
        "slot.spawn_failed": 502,
        "lemond.unavailable": 503,
        "lemond.timeout": 504,
        "lemond.conflict": 409,
        "lemond.error": 502,
    }

    def __init__(self, code: str, message: str, slot: str | None = None,
                 fields: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.slot = slot
        self.fields = fields or {}

    @property
    def http_status(self) -> int:
        return self.HTTP_STATUS.get(self.code, 400)

    def envelope(self) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "slot": self.slot}
        if self.fields:
            error["fields"] = self.fields
        return {"error": error}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def error_code_for(exc: LemonadeError) -> str:
    if isinstance(exc, LemonadeUnavailable):
        return "lemond.unavailable"
    if isinstance(exc, LemonadeTimeout):
        return "lemond.timeout"
    if isinstance(exc, LemonadeConflict):
        return "lemond.conflict"
    if isinstance(exc, LemonadeLoadError):
        return "slot.spawn_failed"
    if isinstance(exc, LemonadeNotFound):
        return "slot.config_error"
    return "lemond.error"


def _lemond_error(slot: Slot, exc: LemonadeError, doing: str) -> SlotError:
    code = error_code_for(exc)
    if isinstance(exc, LemonadeNotFound):
        message = f"lemond does not know model {slot.model_name!r}: {exc.message}"
    else:
        message = f"{doing} failed: {exc}"
    return SlotError(code, message, slot.name)


def get_slot(slot: Slot | str) -> Slot:
    if isinstance(slot, Slot):
        return slot
    try:
        return Slot.objects.select_related("node").get(name=slot)
    except Slot.DoesNotExist:
        raise SlotError("slot.not_found", f"No slot named {slot!r}.", str(slot)) from None


def actor_name(actor: Any) -> str:
    """Users are recorded by username; services by their name ('cli', 'gateway', …)."""
    if hasattr(actor, "get_username"):
        return actor.get_username() or EventActor.API
    return str(actor or EventActor.CLI)


def _ms_since(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


# --- state bookkeeping ---------------------------------------------------------------------

def _claim(slot: Slot, action: str, to_state: str, message: str) -> str | None:
    """Move the slot into `to_state` if `action` is legal from its current state.

    Returns the state it came from, or None when a load is already running and the caller
    should join it. Compare-and-swap on `state`, retried when another writer got there first.
    """
    for _ in range(20):
        row = Slot.objects.filter(pk=slot.pk).values("state", "state_changed_at").first()
        if row is None:
            raise SlotError("slot.not_found", f"Slot {slot.name!r} was deleted.", slot.name)
        current, since = row["state"], row["state_changed_at"]
        stale = current in BUSY_STATES and since < timezone.now() - timedelta(
            seconds=settings.HAL0_LEMONADE_LOAD_TIMEOUT)
        if action == "load" and current in (State.LOADING, State.PULLING) and not stale:
            return None
        # a busy state older than any load can take was left by a process that died
        # mid-action: nobody will finish it, so it may be taken over
        if not (stale or Slot.can(action, current)):
            raise SlotError(
                "slot.illegal_transition",
                f"Cannot {action} slot {slot.name!r} while it is {current}.", slot.name,
            )
        claimed = Slot.objects.filter(pk=slot.pk, state=current, state_changed_at=since).update(
            state=to_state, state_message=message, error_code="",
            state_changed_at=timezone.now(),
        )
        if claimed:
            slot.state = to_state
            live.broadcast_slot_on_commit(slot.pk)
            return current
    raise SlotError("slot.illegal_transition",
                    f"Slot {slot.name!r} is changing too fast to {action}; try again.", slot.name)


def _join(slot: Slot, timeout: float) -> Slot:
    """Wait for the load another caller started (a load, or a restart/swap reloading), and
    share its outcome: the audit event it writes when it ends."""
    since = timezone.now()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = (SlotEvent.objects.filter(slot_id=slot.pk, created_at__gte=since,
                                          action__in=("load", "restart", "swap"))
                 .order_by("created_at", "id").first())
        state = Slot.objects.filter(pk=slot.pk).values_list("state", flat=True).first()
        if state is None:
            raise SlotError("slot.not_found", f"Slot {slot.name!r} was deleted.", slot.name)
        if event is None and state not in BUSY_STATES:
            # it ended before we started looking: its outcome is the state it left
            event = SlotEvent.objects.filter(slot_id=slot.pk).order_by("-created_at", "-id") \
                .first() if state == State.ERROR else None
            if event is None or event.ok:
                slot.refresh_from_db()
                return slot
        if event is not None:
            if not event.ok:
                raise SlotError(event.error_code or "slot.spawn_failed",
                                event.message or "the load it joined failed", slot.name)
            slot.refresh_from_db()
            return slot
        time.sleep(JOIN_POLL_S)
    raise SlotError("lemond.timeout", f"Gave up waiting for slot {slot.name!r} to load.",
                    slot.name)


def record(slot: Slot, action: str, *, actor: Any, from_state: str = "", ok: bool = True,
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
        live.broadcast_slot_on_commit(slot.pk)
    return event


def _fail(slot: Slot, action: str, from_state: str, error: SlotError, *, actor: Any,
          started: float, model: str | None = None, **observed: Any) -> SlotError:
    """Record a failed action on the slot (state error unless told otherwise)."""
    observed.setdefault("state", State.ERROR)
    observed.setdefault("error_code", error.code)
    observed.setdefault("state_message", error.message[:1000])
    record(slot, action, actor=actor, from_state=from_state, ok=False,
           duration_ms=_ms_since(started), code=error.code, message=error.message,
           model=model, observed=observed)
    log.warning("slot %s: %s failed: %s", slot.name, action, error)
    return error


# --- lifecycle actions ----------------------------------------------------------------------

# slot id -> the action this process is running on it (slot, action, from_state, actor,
# started): what a process that exits mid-action records as interrupted
_running: dict[int, tuple[Slot, str, str, Any, float]] = {}


def _record_interrupted(slot: Slot, action: str, from_state: str, actor: Any,
                        started: float, why: str, *, only_if_busy: bool = False) -> None:
    if only_if_busy and not Slot.objects.filter(pk=slot.pk, state__in=BUSY_STATES).exists():
        return  # it finished after all (shutdown raced its last write): keep its result
    verb = "restore" if action == "restored" else action
    error = SlotError("lemond.error", f"{verb} interrupted ({why}); lemond's real state "
                      "shows after the next poll", slot.name)
    try:
        _fail(slot, action, from_state, error, actor=actor, started=started)
    except Exception:  # the database may be what failed: the stale-claim rule remains
        log.exception("slot %s: could not record the interrupted %s", slot.name, action)


@contextlib.contextmanager
def _recorded(slot: Slot, action: str, from_state: str, actor: Any):
    """Wrap the work after a claim: whatever escapes that is not an already recorded
    `SlotError` (Ctrl-C in the CLI, a database error, a bug) still leaves the slot out of its
    busy state with an audit row, instead of stuck until the busy state goes stale."""
    started = time.monotonic()
    entry = (slot, action, from_state, actor, started)
    _running[slot.pk] = entry
    try:
        yield started
    except SlotError:
        raise
    except BaseException as exc:
        _record_interrupted(slot, action, from_state, actor, started, exc.__class__.__name__)
        raise
    finally:
        if _running.get(slot.pk) is entry:
            del _running[slot.pk]


def settle_actions_at_exit(grace: float) -> bool:
    """For `serve` and `reconcile` after SIGTERM: wait up to `grace` seconds for the actions
    this process runs, then record those still waiting on lemond as interrupted (lemond
    finishes them by itself; the next poll adopts a model that got loaded) so no slot stays
    `loading` for HAL0_LEMONADE_LOAD_TIMEOUT. Returns True when actions were interrupted
    (their threads still wait on lemond)."""
    from concurrent.futures import wait

    deadline = time.monotonic() + grace
    wait(list(_pending), timeout=grace)
    while _running and time.monotonic() < deadline:
        time.sleep(0.05)  # gateway loads run on a pool of their own
    interrupted = list(_running.values())
    for entry in interrupted:
        _record_interrupted(*entry, "hal0 stopped", only_if_busy=True)
        log.warning("slot %s: %s interrupted by shutdown; lemond finishes it by itself",
                    entry[0].name, entry[1])
    return bool(interrupted)


def _ready(model: str, elapsed_ms: int) -> dict[str, Any]:
    return {"state": State.READY, "loaded_model": model, "last_load_ms": elapsed_ms,
            "error_code": "", "state_message": "", "last_use_at": timezone.now()}


def _require_enabled(slot: Slot) -> None:
    if not slot.enabled:
        raise SlotError("slot.disabled", f"Slot {slot.name!r} is disabled; enable it first.",
                        slot.name)


def load_slot(slot: Slot | str, *, actor: Any = EventActor.CLI,
              join_timeout: float | None = None) -> Slot:
    """Make lemond serve the slot's model. A second caller joins a load in progress."""
    slot = get_slot(slot)
    _require_enabled(slot)
    from_state = _claim(slot, "load", State.LOADING, f"loading {slot.model_name}")
    if from_state is None:
        return _join(slot, join_timeout or settings.HAL0_LEMONADE_LOAD_TIMEOUT)
    with _recorded(slot, "load", from_state, actor) as started:
        try:
            providers.get().load(slot)
        except LemonadeError as exc:
            raise _fail(slot, "load", from_state, _lemond_error(slot, exc, "load"),
                        actor=actor, started=started, loaded_model="") from None
        elapsed = _ms_since(started)
        record(slot, "load", actor=actor, from_state=from_state, duration_ms=elapsed,
               message=f"loaded {slot.model_name} in {elapsed / 1000:.1f} s",
               observed=_ready(slot.model_name, elapsed))
    return slot


def unload_slot(slot: Slot | str, *, actor: Any = EventActor.CLI,
                action: str = "unload") -> Slot:
    """Stop serving the slot's model. Idempotent: a model lemond does not have is success."""
    slot = get_slot(slot)
    model = slot.loaded_model or slot.model_name
    from_state = _claim(slot, "unload", State.UNLOADING, f"unloading {model}")
    with _recorded(slot, action, from_state, actor) as started:
        try:
            result = providers.get().unload(slot)
        except LemonadeError as exc:
            raise _fail(slot, action, from_state, _lemond_error(slot, exc, "unload"),
                        actor=actor, started=started, state=from_state) from None
        record(slot, action, actor=actor, from_state=from_state,
               duration_ms=_ms_since(started), message=result.get("noop", "unloaded"),
               observed={"state": State.OFFLINE, "loaded_model": "", "error_code": "",
                         "state_message": "", "lemond_entry": {}})
    return slot


def restart_slot(slot: Slot | str, *, actor: Any = EventActor.CLI) -> Slot:
    """Unload then load again (a fresh backend process, e.g. after a hang)."""
    slot = get_slot(slot)
    _require_enabled(slot)
    from_state = _claim(slot, "restart", State.UNLOADING, "restarting")
    provider = providers.get()
    with _recorded(slot, "restart", from_state, actor) as started:
        try:
            provider.unload(slot)
            Slot.objects.filter(pk=slot.pk).update(state=State.LOADING,
                                                   state_message=f"loading {slot.model_name}",
                                                   state_changed_at=timezone.now())
            live.broadcast_slot_on_commit(slot.pk)
            provider.load(slot)
        except LemonadeError as exc:
            raise _fail(slot, "restart", from_state, _lemond_error(slot, exc, "restart"),
                        actor=actor, started=started, loaded_model="") from None
        elapsed = _ms_since(started)
        record(slot, "restart", actor=actor, from_state=from_state, duration_ms=elapsed,
               message=f"restarted {slot.model_name} in {elapsed / 1000:.1f} s",
               observed=_ready(slot.model_name, elapsed))
    return slot


def swap_slot(slot: Slot | str, new_model: str, *, actor: Any = EventActor.CLI) -> Slot:
    """Serve another model. It becomes the desired one only if its load succeeds."""
    slot = get_slot(slot)
    new_model = (new_model or "").strip()
    candidate = Slot(**{f: getattr(slot, f) for f in Slot.DESIRED_FIELDS}, node=slot.node)
    candidate.pk, candidate.model_name = slot.pk, new_model
    try:
        candidate.clean()
    except ValidationError as exc:
        raise SlotError("slot.config_error", "; ".join(exc.messages), slot.name,
                        fields=exc.message_dict) from None
    _require_enabled(slot)
    old_model = slot.model_name
    from_state = _claim(slot, "swap", State.LOADING, f"swapping {old_model} → {new_model}")
    provider = providers.get()
    with _recorded(slot, "swap", from_state, actor) as started:
        try:
            provider.load(slot, model_name=new_model)
        except LemonadeError as exc:
            error = _lemond_error(slot, exc, f"swap to {new_model}")
            if isinstance(exc, LemonadeNotFound):
                error.message = f"lemond does not know model {new_model!r}: {exc.message}"
            # The old model stays desired. If lemond still has it, the slot still serves it.
            status = provider.status(slot)
            still_loaded = bool(status.entry)
            observed = {"loaded_model": old_model if still_loaded else "",
                        "state": State.READY if still_loaded else State.ERROR}
            raise _fail(slot, "swap", from_state, error, actor=actor, started=started,
                        model=new_model, **observed) from None
        if old_model != new_model and not _model_wanted_elsewhere(slot, old_model):
            try:  # lemond's LRU only evicts within a full pool; don't leave the old one resident
                provider.unload(slot, model_name=old_model)
            except LemonadeError as exc:
                log.info("slot %s: old model %s not unloaded after swap: %s",
                         slot.name, old_model, exc)
        elapsed = _ms_since(started)
        record(slot, "swap", actor=actor, from_state=from_state, duration_ms=elapsed,
               model=new_model, message=f"swapped {old_model} → {new_model}",
               observed={"model_name": new_model, **_ready(new_model, elapsed)})
    return slot


def _model_wanted_elsewhere(slot: Slot, model: str) -> bool:
    """Another enabled slot on the same node serves or wants `model`: leave it loaded."""
    return Slot.objects.filter(node_id=slot.node_id, enabled=True).exclude(pk=slot.pk) \
        .filter(Q(model_name=model) | Q(loaded_model=model)).exists()


def _set_pin(slot: Slot | str, pinned: bool, actor: Any) -> Slot:
    slot = get_slot(slot)
    action = "pin" if pinned else "unpin"
    provider = providers.get()
    started = time.monotonic()
    # Ask lemond first: the pin matters to lemond's LRU (>= 10.8) and an unreachable node
    # must be reported, not papered over.
    try:
        health = provider.health(slot.node)
        entry = health.find(slot.loaded_model or slot.model_name)
        if entry and slot.node.supports_pinning:
            provider.pin(slot, pinned)
    except LemonadeNotLoaded:
        entry = None
    except LemonadeError as exc:
        raise _lemond_error(slot, exc, action) from None
    note = "" if slot.node.supports_pinning else \
        " (lemond < 10.8 has no pins: hal0 protects the slot itself)"
    record(slot, action, actor=actor, from_state=slot.state, duration_ms=_ms_since(started),
           message=f"{action}ned{note}", observed={"pinned": pinned})
    return slot


def pin_slot(slot: Slot | str, *, actor: Any = EventActor.CLI) -> Slot:
    return _set_pin(slot, True, actor)


def unpin_slot(slot: Slot | str, *, actor: Any = EventActor.CLI) -> Slot:
    return _set_pin(slot, False, actor)


# --- desired-state actions -------------------------------------------------------------------

def _validated(slot: Slot) -> None:
    try:
        slot.full_clean(exclude=["node"] if slot.node_id else None)
    except ValidationError as exc:
        fields = exc.message_dict
        summary = "; ".join(f"{k}: {' '.join(v)}" for k, v in fields.items())
        raise SlotError("slot.config_error", summary, slot.name or None, fields=fields) from None


def _coerce_node(data: dict) -> dict:
    node = data.get("node")
    if isinstance(node, str):
        try:
            data["node"] = Node.objects.get(name=node)
        except Node.DoesNotExist:
            raise SlotError("slot.config_error", f"No node named {node!r}.",
                            data.get("name"), fields={"node": [f"No node named {node!r}."]}) \
                from None
    elif node is None:
        data["node"] = Node.local()
    return data


def create_slot(data: dict, *, actor: Any = EventActor.CLI) -> Slot:
    unknown = set(data) - set(Slot.DESIRED_FIELDS) - {"node"}
    if unknown:
        raise SlotError("slot.config_error", f"Unknown field(s): {', '.join(sorted(unknown))}.",
                        data.get("name"))
    slot = Slot(**_coerce_node(dict(data)))
    _validated(slot)
    with transaction.atomic():
        slot.save()
        record(slot, "create", actor=actor, message=f"created {slot.capability} slot")
        live.push_layout_on_commit()  # a new card: open dashboards place it in its group
    return slot


def update_slot(slot: Slot | str, changes: dict, *, actor: Any = EventActor.CLI) -> Slot:
    """Change the desired state. Nothing is loaded here: drift shows until an action runs."""
    slot = get_slot(slot)
    unknown = set(changes) - set(Slot.DESIRED_FIELDS) - {"node"}
    if unknown:
        raise SlotError("slot.config_error", f"Unknown field(s): {', '.join(sorted(unknown))}.",
                        slot.name)
    if "name" in changes and changes["name"] != slot.name and slot.seeded:
        raise SlotError("slot.config_error", f"Seeded slot {slot.name!r} cannot be renamed.",
                        slot.name, fields={"name": ["Seeded slots keep their name."]})
    changes = _coerce_node(dict(changes)) if "node" in changes else dict(changes)
    fresh = Slot.objects.select_related("node").get(pk=slot.pk)
    before = {f: getattr(fresh, f) for f in (*Slot.DESIRED_FIELDS, "node_id")}
    for key, value in changes.items():
        setattr(fresh, key, value)
    _validated(fresh)
    changed = [f for f in (*Slot.DESIRED_FIELDS, "node_id") if getattr(fresh, f) != before[f]]
    if not changed:
        return fresh
    with transaction.atomic():
        fresh.save(update_fields=[*changed, "updated_at"])
        record(fresh, "update", actor=actor,
               message="changed " + ", ".join(
                   f"{f} {before[f]!r} → {getattr(fresh, f)!r}" for f in changed))
        if {"name", "capability", "node_id"} & set(changed):
            live.push_layout_on_commit()  # the card's id or its place on the page changed
    return fresh


def delete_slot(slot: Slot | str, *, actor: Any = EventActor.CLI) -> None:
    slot = get_slot(slot)
    if slot.seeded:
        raise SlotError("slot.config_error",
                        f"Slot {slot.name!r} is one of the seeded slots: disable it instead "
                        "of deleting it.", slot.name)
    if slot.state in BUSY_STATES:
        raise SlotError("slot.illegal_transition",
                        f"Cannot delete slot {slot.name!r} while it is {slot.state}.", slot.name)
    name, loaded = slot.name, slot.is_loaded and not _model_wanted_elsewhere(
        slot, slot.loaded_model or slot.model_name)
    with transaction.atomic():
        SlotEvent.objects.create(slot=slot, slot_name=name, action="delete",
                                 actor=actor_name(actor), from_state=slot.state,
                                 model=slot.model_name, message="deleted")
        slot.delete()
        live.broadcast_removed_on_commit(name)  # its own page too
        live.push_layout_on_commit()  # its group may be empty now
        if loaded:
            # Best effort, after the commit and off this thread: callers (the admin) may hold
            # a transaction, and lemond may take minutes or not answer.
            transaction.on_commit(lambda: start_in_background(_unload_orphan, slot))


def _unload_orphan(slot: Slot) -> None:
    """Don't leave a deleted slot's model resident in lemond."""
    try:
        providers.get().unload(slot)
    except LemonadeError as exc:
        log.info("slot %s deleted while its model stays loaded: %s", slot.name, exc)


# --- gateway ---------------------------------------------------------------------------------
# The gateway's in-flight bookkeeping. The per-process count of in-flight requests is the
# source of truth for "this slot is serving"; the database `state` mirrors it (ready <->
# serving, compare-and-swap) so pages and other processes see it. One worker task per slot
# writes that mirror off the request path, coalescing bursts, and a slot goes back to ready
# only HAL0_SERVING_LINGER_S after its last request. Everybody else treats `serving` as
# "loaded": the reconciler must not turn serving into ready (it may turn it into offline or
# error when lemond lost the model), and idle unload skips a slot that is serving.
#
# With several gateway processes each one also holds a *serving claim* (a lease row
# `serving:<slot pk>:<process>`) while it has requests in flight for a slot, written by the
# same worker, so only at the process's own ready <-> serving edges. A process that goes idle
# turns the slot back to ready only when no other live claim exists (one conditional UPDATE).
# Claims are renewed by the metrics writer and expire after HAL0_SERVING_CLAIM_TTL_S, so a
# process that dies mid-request holds the slot at serving only that long; the reconciler's
# housekeeping then settles it (`settle_serving`).

SERVING_CLAIM_PREFIX = "serving:"
_process_id = leases.new_holder_id()
_process_tag = hashlib.sha1(_process_id.encode()).hexdigest()[:16]  # fits Lease.name
_in_flight: dict[int, int] = {}
_last_request: dict[int, float] = {}  # slot pk -> time.time() of its last request start/end
_idle_unloading: set[int] = set()
_serving_dirty: set[int] = set()
_serving_workers: dict[int, asyncio.Task] = {}
_mirrored: dict[int, str] = {}  # the state this process last saw the mirror hold


def _pk(slot: Slot | int) -> int:
    return slot if isinstance(slot, int) else slot.pk


def serving_count(slot: Slot | int) -> int:
    """Requests in flight for the slot in this process."""
    return _in_flight.get(_pk(slot), 0)


def last_request_at(slot: Slot | int) -> float | None:
    """time.time() of the slot's last gateway request (start or end) in this process."""
    return _last_request.get(_pk(slot))


def acquire_serving(slot: Slot | int) -> int:
    """Count one more request in flight (no database access; call `release_serving` in a
    `finally`). Returns the new count."""
    pk = _pk(slot)
    count = _in_flight.get(pk, 0) + 1
    _in_flight[pk] = count
    _last_request[pk] = time.time()
    if count == 1:
        refresh_serving_state(pk)
    return count


def release_serving(slot: Slot | int) -> int:
    pk = _pk(slot)
    count = max(0, _in_flight.get(pk, 0) - 1)
    if count:
        _in_flight[pk] = count
    else:
        _in_flight.pop(pk, None)
    _last_request[pk] = time.time()
    if count == 0:
        refresh_serving_state(pk)
    return count


def is_idle_unloading(slot: Slot | int) -> bool:
    """True while `idle_unload_slot` is unloading the slot (a request that arrives then
    must load it again rather than use it)."""
    return _pk(slot) in _idle_unloading


def _claim_name(pk: int) -> str:
    return f"{SERVING_CLAIM_PREFIX}{pk}:{_process_tag}"


def _live_claims(pk: int):
    return leases.Lease.objects.filter(name__startswith=f"{SERVING_CLAIM_PREFIX}{pk}:",
                                       expires_at__gt=Now())


def _claim_ttl() -> float:
    # renewal rides on the metrics writer (every HAL0_METRICS_FLUSH_S): a TTL shorter than
    # a few of its periods would let busy claims lapse
    return max(float(settings.HAL0_SERVING_CLAIM_TTL_S), 3 * settings.HAL0_METRICS_FLUSH_S, 1.0)


def _ready_unless_claimed(pk: int, **also) -> bool:
    """serving -> ready (and the fields in `also`), unless a live claim (another process's
    requests) remains: one conditional UPDATE. True when it was written."""
    return bool(Slot.objects.filter(pk=pk, state=State.SERVING)
                .exclude(Exists(_live_claims(pk)))
                .update(state=State.READY, state_changed_at=timezone.now(), **also))


def sync_serving_state(slot: Slot | int) -> str | None:
    """Make the stored state agree with the in-flight count (ready <-> serving only), this
    process's serving claim with it. Returns the state written, or None when nothing
    changed."""
    pk = _pk(slot)
    now = timezone.now()
    if _in_flight.get(pk, 0) > 0:
        leases.acquire(_claim_name(pk), _process_id, _claim_ttl())
        changed = Slot.objects.filter(pk=pk, state=State.READY).update(
            state=State.SERVING, state_changed_at=now, last_use_at=now)
        new_state = State.SERVING
    else:
        leases.release([_claim_name(pk)], _process_id)
        changed = _ready_unless_claimed(pk, last_use_at=now)
        new_state = State.READY
    if changed:
        live.broadcast_slot_on_commit(pk)
        return new_state
    return None


def _sync_serving_in_thread(pk: int) -> str | None:
    """Write the mirror; return the state it now holds if that is the wanted one."""
    try:
        written = sync_serving_state(pk)
        if written is not None:
            return written
        current = Slot.objects.filter(pk=pk).values_list("state", flat=True).first()
        wanted = State.SERVING if _in_flight.get(pk) else State.READY
        return current if current == wanted else None
    finally:
        connection.close()  # a pool thread must not keep a connection open


async def _serving_worker(pk: int) -> None:
    try:
        while pk in _serving_dirty:
            _serving_dirty.discard(pk)
            if not _in_flight.get(pk) and settings.HAL0_SERVING_LINGER_S > 0:
                await asyncio.sleep(settings.HAL0_SERVING_LINGER_S)
                if pk in _serving_dirty:
                    continue  # busy again meanwhile: look at the count afresh
            wanted = State.SERVING if _in_flight.get(pk) else State.READY
            if _mirrored.get(pk) == wanted:
                continue  # back-to-back requests: the mirror already says so, no write
            try:
                held = await sync_to_async(_sync_serving_in_thread, thread_sensitive=False)(pk)
            except Exception:  # the mirror is cosmetic: never let it take a request down
                log.exception("could not write the serving state of slot %s", pk)
                held = None
            if held is None:
                _mirrored.pop(pk, None)
            else:
                _mirrored[pk] = held
    finally:
        _serving_workers.pop(pk, None)


def refresh_serving_state(slot: Slot | int, *, force: bool = False) -> None:
    """Schedule the ready/serving mirror write for the slot; `force` after another action
    (a load under a waiting request) changed the state behind the mirror's back. Without a
    running event loop it is written right away."""
    pk = _pk(slot)
    if force:
        _mirrored.pop(pk, None)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        sync_serving_state(pk)
        return
    _serving_dirty.add(pk)
    worker = _serving_workers.get(pk)
    if worker is None or worker.done() or worker.get_loop() is not loop:
        _serving_workers[pk] = loop.create_task(_serving_worker(pk))


def release_serving_claims() -> int:
    """Drop every serving claim of this process and turn the slots no other process
    serves back to ready (requests cut off by the exit are over); returns how many claims
    there were. `manage.py serve` calls it once Daphne has stopped (SIGTERM, Ctrl-C), so a
    restarted gateway does not hold its slots at serving for the claims' TTL."""
    try:
        mine = leases.Lease.objects.filter(name__startswith=SERVING_CLAIM_PREFIX,
                                           holder=_process_id)
        pks = {int(name.split(":")[1]) for name in mine.values_list("name", flat=True)}
        count = mine.delete()[0]
        for pk in pks:
            _ready_unless_claimed(pk)  # no broadcast: this process is on its way out
        return count
    except Exception:  # at exit the database may be gone: the claims expire anyway
        log.warning("could not give serving claims back; they expire after %s s",
                    _claim_ttl())
        return 0


def renew_serving_claims() -> int:
    """Keep this process's claims alive while its requests run (long streams outlive the
    TTL). Called by the metrics writer; returns how many claims were renewed."""
    busy = [pk for pk, count in list(_in_flight.items()) if count > 0]
    renewed = sum(leases.acquire(_claim_name(pk), _process_id, _claim_ttl()) for pk in busy)
    # On PostgreSQL another process's idle edge can read the claims just before ours was
    # committed and turn the slot ready under our requests; put it right here.
    now = timezone.now()
    for pk in busy:
        if Slot.objects.filter(pk=pk, state=State.READY).update(
                state=State.SERVING, state_changed_at=now, last_use_at=now):
            live.broadcast_slot_on_commit(pk)
    return renewed


def settle_serving() -> list[str]:
    """Turn `serving` back to `ready` for slots no live process claims any more (their
    gateway process died mid-request). Run by the reconciler's housekeeping."""
    leases.Lease.objects.filter(name__startswith=SERVING_CLAIM_PREFIX,
                                expires_at__lt=Now()).delete()
    settled = []
    for slot in Slot.objects.filter(state=State.SERVING).only("pk", "name"):
        if _in_flight.get(slot.pk):
            continue  # ours, its claim is being written right now
        if _ready_unless_claimed(slot.pk):
            live.broadcast_slot_on_commit(slot.pk)
            settled.append(slot.name)
    return settled


def ensure_loaded(slot: Slot | str, timeout: float | None = None, *,
                  actor: Any = EventActor.GATEWAY) -> Slot:
    """Return the slot once it is loaded, loading it (a `load` event, visible live) when it
    is not. Waits out an unload in progress first. Blocking: run it on a worker thread."""
    timeout = settings.HAL0_GATEWAY_LOAD_WAIT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    name = slot.name if isinstance(slot, Slot) else slot
    while True:
        slot = get_slot(name)
        if not slot.enabled:
            raise SlotError("slot.disabled", f"Slot {slot.name!r} is disabled; enable it first.",
                            slot.name)
        if slot.is_loaded and slot.loaded_model in ("", slot.model_name) \
                and slot.pk not in _idle_unloading:
            return slot
        if slot.state == State.UNLOADING or slot.pk in _idle_unloading:
            if time.monotonic() >= deadline:
                raise SlotError("lemond.timeout", f"Slot {slot.name!r} is still unloading.",
                                slot.name)
            time.sleep(JOIN_POLL_S)
            continue
        return load_slot(slot, actor=actor,
                         join_timeout=max(0.1, deadline - time.monotonic()))


def idle_unload_slot(slot: Slot | str, *, actor: Any = EventActor.RECONCILER) -> Slot | None:
    """Unload a slot for being idle (event `idle-unload`), unless it is serving, pinned,
    keep-loaded, never-idle (idle_timeout_s 0) or not ready. The decision of *when* is
    `slots.idle`'s; this only re-checks what must hold at the moment of unloading.
    Returns the slot, or None when skipped."""
    slot = get_slot(slot if isinstance(slot, str) else slot.name)
    pk = slot.pk
    _idle_unloading.add(pk)  # first the flag, then the count: a racing request sees one
    try:
        if (_in_flight.get(pk) or slot.state != State.READY or slot.pinned
                or slot.keep_loaded or not slot.idle_timeout_s
                or _live_claims(pk).exists()):  # another gateway process serves it
            return None
        return unload_slot(slot, actor=actor, action="idle-unload")
    finally:
        _idle_unloading.discard(pk)


# --- reconciler ---------------------------------------------------------------------------
# What the reconciler and the dashboard's background work need: observed-state writes that
# only land when the slot has not moved since it was read (compare-and-swap on state and
# state_changed_at, so a poll never overwrites a newer action), node observations, the
# `restored` reload, background execution of actions, and model downloads with progress.

_background: ThreadPoolExecutor | None = None
_background_lock = threading.Lock()


_pending: set[Future] = set()


def start_in_background(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """Run an action on a small worker pool and return at once (loads take minutes).

    The worker closes its database connection when done. A `SlotError` is already recorded
    on the slot by the action; it is logged here and left on the returned future.
    """
    global _background
    with _background_lock:
        if _background is None:
            _background = ThreadPoolExecutor(
                max_workers=settings.HAL0_BACKGROUND_WORKERS, thread_name_prefix="hal0-action")

    def run() -> Any:
        try:
            return fn(*args, **kwargs)
        except SlotError as exc:
            log.info("background %s: %s", getattr(fn, "__name__", fn), exc)
            raise
        except Exception:
            log.exception("background %s crashed", getattr(fn, "__name__", fn))
            raise
        finally:
            connection.close()

    future = _background.submit(run)
    _pending.add(future)
    future.add_done_callback(_pending.discard)
    return future


def wait_for_background(timeout: float = 30.0) -> bool:
    """Wait for every action started with `start_in_background` (tests, shutdown).
    True when all finished in time."""
    from concurrent.futures import wait

    _, not_done = wait(list(_pending), timeout=timeout)
    return not not_done


def observe(slot: Slot, action: str | None = None, *, message: str = "",
            actor: Any = EventActor.RECONCILER, **observed: Any) -> bool:
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
        live.broadcast_slot_on_commit(slot.pk)
    for key, value in fields.items():
        setattr(slot, key, value)
    return True


def observe_node(node: Node, **observed: Any) -> bool:
    """Write a node's observed fields that changed and push its header; False if none did."""
    changed = {k: v for k, v in observed.items() if getattr(node, k) != v}
    if not changed:
        return False
    with transaction.atomic():
        Node.objects.filter(pk=node.pk).update(**changed)
        live.broadcast_node_on_commit(node.pk)
    for key, value in changed.items():
        setattr(node, key, value)
    return True


def restore_slot(slot: Slot | str, *, reason: str = "") -> Slot:
    """Reload a keep-loaded (or pinned) slot lemond dropped: a load recorded as `restored`."""
    slot = get_slot(slot)
    if not slot.enabled:
        raise SlotError("slot.disabled", f"Slot {slot.name!r} is disabled.", slot.name)
    from_state = _claim(slot, "load", State.LOADING, f"restoring {slot.model_name}")
    if from_state is None:  # someone else is loading it already
        return slot
    with _recorded(slot, "restored", from_state, EventActor.RECONCILER) as started:
        try:
            providers.get().load(slot)
        except LemonadeError as exc:
            raise _fail(slot, "restored", from_state, _lemond_error(slot, exc, "restore"),
                        actor=EventActor.RECONCILER, started=started,
                        loaded_model="") from None
        elapsed = _ms_since(started)
        note = f" ({reason})" if reason else ""
        record(slot, "restored", actor=EventActor.RECONCILER, from_state=from_state,
               duration_ms=elapsed,
               message=f"reloaded {slot.model_name} in {elapsed / 1000:.1f} s{note}",
               observed=_ready(slot.model_name, elapsed))
    return slot


# Downloads run as tasks on the serving process's event loop: closing lemond's SSE stream
# is how a download is cancelled (lemond-api.md §2.8), so the task owns the stream.
_pulls: dict[tuple[int, str], asyncio.Task] = {}


def pull_running(node_id: int, model: str) -> bool:
    task = _pulls.get((node_id, model))
    return task is not None and not task.done()


def start_pull(slot: Slot, model: str, *, actor: Any,
               progress: Callable[[str, dict], Awaitable[None]]) -> bool:
    """Start downloading `model` on the slot's node (call from the event loop). `progress`
    gets ("progress" | "complete" | "error" | "cancelled", data). False if one is running."""
    key = (slot.node_id, model)
    if pull_running(*key):
        return False
    # A fresh context: the task outlives the request, whose thread-sensitive executor
    # (Django's per-request context) is gone by the time the download ends.
    _pulls[key] = asyncio.get_running_loop().create_task(
        _pull(slot, model, actor_name(actor), progress), context=contextvars.Context())
    _pulls[key].add_done_callback(lambda _task: _pulls.pop(key, None))
    return True


def cancel_pull(node_id: int, model: str) -> bool:
    task = _pulls.get((node_id, model))
    if task is None or task.done():
        return False
    task.cancel()
    return True


async def _pull(slot: Slot, model: str, actor: str,
                progress: Callable[[str, dict], Awaitable[None]]) -> None:
    from asgiref.sync import sync_to_async

    from providers.lemonade.client import LemonadeClient

    node = slot.node
    started = time.monotonic()
    outcome, message = "error", ""
    try:
        async with LemonadeClient(node.base_url, node.api_key, node.admin_api_key,
                                  timeout=settings.HAL0_LEMONADE_TIMEOUT,
                                  load_timeout=settings.HAL0_LEMONADE_LOAD_TIMEOUT) as client:
            async for event in client.pull(model):
                if event.event == "error":
                    message = str(event.data.get("error") or event.data)
                    break
                await progress("progress" if event.event != "complete" else "complete",
                               event.data)
                if event.event == "complete":
                    outcome, message = "complete", f"downloaded {model}"
    except asyncio.CancelledError:
        outcome, message = "cancelled", f"download of {model} cancelled"
    except LemonadeError as exc:
        message = str(exc)
    if outcome == "error":
        message = message or f"download of {model} ended without completing"
    try:
        await progress(outcome, {"message": message})
        await sync_to_async(_record_and_close, thread_sensitive=False)(
            slot, "pull", actor=actor, ok=outcome == "complete",
            duration_ms=_ms_since(started), model=model,
            code="" if outcome == "complete" else f"pull.{outcome}", message=message)
    except Exception:  # the slot may be gone; the download outcome was still shown
        log.exception("could not record the pull of %s", model)


def _record_and_close(*args: Any, **kwargs: Any) -> None:
    try:
        record(*args, **kwargs)
    finally:
        connection.close()
