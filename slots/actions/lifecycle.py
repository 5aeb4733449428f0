"""Lifecycle actions: load, unload, restart, swap, restore, pin/unpin, idle unload.

Each one takes the slot with a compare-and-swap on `state` (`_transition`), calls lemond
outside any transaction, and records its outcome (`audit.record` / `audit.fail`). A load
that finds another load running joins it (`_join`) and shares its outcome. What this
process is running is registered on the runtime, so a process that stops mid-action
records it as interrupted rather than leaving the slot busy.

A busy state belongs to the process running its action (a `busy:<slot>` lease taken with
the transition, slots.busy). When that process is gone (SIGKILL, OOM), whoever meets the
slot next settles it from lemond's truth and records `interrupted` (`settle_interrupted`):
an action that would be refused or would join the dead load, and the reconciler.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

import providers
from providers.lemonade.client import LoadedModel
from providers.lemonade.errors import LemonadeError, LemonadeNotLoaded

from .. import busy, leases, runtime, states
from ..models import EventActor, Slot, SlotEvent, State
from ..serving import live_leases
from . import fit
from .audit import Actor, fail, ms_since, record, record_observation
from .errors import SlotError, disabled, get_slot, lemond_error

log = logging.getLogger("hal0.actions")

JOIN_POLL_S = 0.1
OWNER_CHECK_S = 1.0  # how often a joiner asks whether the load's process is still alive


def assert_outside_transaction() -> None:
    """Actions that call lemond must not hold a transaction open (loads take minutes, and
    their audit rows must commit on their own). Like Zulip's `durable=True` actions: a
    test case's own wrapping transaction does not count."""
    with transaction.atomic(durable=True):
        pass


# --- state bookkeeping ---------------------------------------------------------------------

def _transition(slot: Slot, action: str, to_state: str, message: str) -> str | None:
    """Move the slot into `to_state` if `action` is legal from its current state.

    Returns the state it came from, or None when a load is already running and the caller
    should join it. Compare-and-swap on `state`, retried when another writer got there first.
    Every caller goes on to call lemond: no transaction may be open.
    """
    assert_outside_transaction()
    for _ in range(20):
        row = Slot.objects.filter(pk=slot.pk).values("state", "state_changed_at").first()
        if row is None:
            raise SlotError("slot.not_found", f"Slot {slot.name!r} was deleted.", slot.name)
        current, since = row["state"], row["state_changed_at"]
        if current in states.BUSY and _settle_if_orphaned(slot, current, since):
            continue  # its process is gone: settled from lemond's truth, look again
        stale = states.is_stale(current, since)
        if action == "load" and current in (State.LOADING, State.PULLING) and not stale:
            return None
        if not (stale or states.can(action, current)):
            raise SlotError(
                "slot.illegal_transition",
                f"Cannot {action} slot {slot.name!r} while it is {current}.", slot.name,
            )
        with transaction.atomic():  # the busy state and its owner, together
            moved = Slot.objects.filter(pk=slot.pk, state=current, state_changed_at=since) \
                .update(state=to_state, state_message=message, error_code="",
                        state_changed_at=timezone.now())
            if moved:
                runtime.current().busy.claim(slot.pk)
        if moved:
            slot.state = to_state
            runtime.current().live.broadcast_slot_on_commit(slot.pk)
            return current
    raise SlotError("slot.illegal_transition",
                    f"Slot {slot.name!r} is changing too fast to {action}; try again.", slot.name)


def _join(slot: Slot, timeout: float) -> Slot | None:
    """Wait for the load another caller started (a load, restore, or a restart/swap
    reloading), and share its outcome: the audit event it writes when it ends. None when
    there is nothing to wait for after all: the process running it is gone (the slot was
    settled from lemond's truth, by us or another process); the caller loads it itself."""
    since = timezone.now()
    deadline = time.monotonic() + timeout
    owner_checked = time.monotonic()
    while time.monotonic() < deadline:
        event = (SlotEvent.objects.filter(slot_id=slot.pk, created_at__gte=since,
                                          action__in=states.LOAD_ACTIONS)
                 .order_by("created_at", "id").first())
        row = Slot.objects.filter(pk=slot.pk).values("state", "state_changed_at").first()
        if row is None:
            raise SlotError("slot.not_found", f"Slot {slot.name!r} was deleted.", slot.name)
        state = row["state"]
        if event is None and state not in states.BUSY:
            # it ended before we started looking: its outcome is the state it left
            event = SlotEvent.objects.filter(slot_id=slot.pk).order_by("-created_at", "-id") \
                .first()
            if event is not None and event.action == "interrupted" and \
                    state not in states.LOADED:
                return None  # its process died, and nobody loads it any more
            if state != State.ERROR or event is None or event.ok:
                slot.refresh_from_db()
                return slot
        if event is not None:
            if not event.ok:
                raise SlotError(event.error_code or "slot.spawn_failed",
                                event.message or "the load it joined failed", slot.name)
            slot.refresh_from_db()
            return slot
        if time.monotonic() - owner_checked >= OWNER_CHECK_S:
            owner_checked = time.monotonic()
            if _settle_if_orphaned(slot, state, row["state_changed_at"]):
                return None
        time.sleep(JOIN_POLL_S)
    raise SlotError("lemond.timeout", f"Gave up waiting for slot {slot.name!r} to load.",
                    slot.name)


# --- a busy state whose process is gone -----------------------------------------------------

def _settle_if_orphaned(slot: Slot, state: str, since: Any) -> bool:
    """If the process running the slot's busy state (`state` since `since`) is gone,
    settle the slot from lemond's truth; True when it was gone (settled by us, or by
    another process meanwhile: the caller looks again either way)."""
    owner = busy.orphaned([slot.pk]).get(slot.pk)
    if owner is None:
        return False
    status = providers.get().status(slot)
    seen = Slot.objects.select_related("node").filter(pk=slot.pk, state=state,
                                                      state_changed_at=since).first()
    if seen is not None:
        settle_interrupted(seen, owner, status.entry,
                           unreachable="" if status.reachable else status.error)
    return True


def settle_interrupted(slot: Slot, owner: str, entry: LoadedModel | None, *,
                       unreachable: str = "") -> bool:
    """Settle a busy slot whose process (`owner`, a holder id) is gone, from lemond's entry
    for the slot's model: ready (adopted) when lemond has it up, offline when it does not
    (a load lemond is still finishing is adopted by the reconciler once it is up), error
    when lemond cannot be asked. Records `interrupted` and drops the dead owner's lease.
    Compare-and-swap on the slot as read: False when it moved meanwhile."""
    model = slot.model_name
    why = (f"interrupted while {slot.state_message or slot.state}: the hal0 process "
           f"running it ({owner}) is gone")
    fields: dict[str, Any]
    if unreachable:
        why += f"; lemond cannot be asked ({unreachable}), its state shows after the next poll"
        fields = {"state": State.ERROR, "error_code": "lemond.unavailable",
                  "state_message": why[:1000]}
    elif entry is not None and entry.up:
        why += f"; lemond has {model} loaded: adopted"
        fields = {"state": State.READY, "loaded_model": model, "loaded_options": {},
                  "error_code": "", "state_message": "", "lemond_entry": entry.raw}
    else:
        why += f"; lemond {'is still loading' if entry else 'does not have'} {model}"
        fields = {"state": State.OFFLINE, "loaded_model": "", "loaded_options": {},
                  "error_code": "", "state_message": why[:1000], "lemond_entry": {}}
    with transaction.atomic():  # the slot settled and its dead owner's lease gone, together
        if not record_observation(slot, "interrupted", message=why, **fields):
            return False
        leases.release([busy.lease_name(slot.pk)], owner)
    log.warning("slot %s: %s", slot.name, why)
    return True


def _record_interrupted(slot: Slot, action: str, from_state: str, actor: Actor,
                        started: float, why: str, *, only_if_busy: bool = False) -> None:
    if only_if_busy and not Slot.objects.filter(pk=slot.pk, state__in=states.BUSY).exists():
        return  # it finished after all (shutdown raced its last write): keep its result
    verb = "restore" if action == "restored" else action
    error = SlotError("lemond.error", f"{verb} interrupted ({why}); lemond's real state "
                      "shows after the next poll", slot.name)
    try:
        fail(slot, action, from_state, error, actor=actor, started=started)
    except Exception:  # the database may be what failed: the stale rule remains
        log.exception("slot %s: could not record the interrupted %s", slot.name, action)


@contextlib.contextmanager
def _recorded(slot: Slot, action: str, from_state: str, actor: Actor) -> Iterator[float]:
    """Wrap the work after a transition: whatever escapes that is not an already recorded
    `SlotError` (Ctrl-C in the CLI, a database error, a bug) still leaves the slot out of
    its busy state with an audit row, instead of stuck until the busy state goes stale.
    Yields the monotonic start time."""
    started = time.monotonic()
    running = runtime.current().running
    claims = runtime.current().busy
    claim = claims.holder_of(slot.pk)  # taken by the transition just before
    entry = runtime.RunningAction(
        slot_name=slot.name, action=action,
        interrupt=functools.partial(_record_interrupted, slot, action, from_state, actor,
                                    started, only_if_busy=True))
    running[slot.pk] = entry
    try:
        yield started
    except SlotError:
        raise
    except BaseException as exc:
        _record_interrupted(slot, action, from_state, actor, started, exc.__class__.__name__)
        raise
    finally:
        if running.get(slot.pk) is entry:
            del running[slot.pk]
        if claim is not None:  # recorded: the slot is settled, its busy state is over
            claims.release(slot.pk, claim)


def _ready(model: str, elapsed_ms: int, options: dict | None = None) -> dict[str, Any]:
    return {"state": State.READY, "loaded_model": model, "last_load_ms": elapsed_ms,
            "error_code": "", "state_message": "", "last_use_at": timezone.now(),
            "loaded_options": options or {}}


def _loaded_as_asked(slot: Slot, body: dict | None) -> bool:
    """Is the slot loaded (fresh from the database) with its model and exactly `body`?"""
    row = Slot.objects.filter(pk=slot.pk).values("state", "loaded_model",
                                                 "loaded_options").first()
    return (body is not None and row is not None and row["state"] in states.LOADED
            and row["loaded_model"] == slot.model_name and row["loaded_options"] == body)


def _require_enabled(slot: Slot) -> None:
    if not slot.enabled:
        raise disabled(slot.name)


def model_wanted_elsewhere(slot: Slot, model: str) -> bool:
    """Another enabled slot on the same node serves or wants `model`: leave it loaded."""
    return Slot.objects.filter(node_id=slot.node_id, enabled=True).exclude(pk=slot.pk) \
        .filter(Q(model_name=model) | Q(loaded_model=model)).exists()


def model_served_elsewhere(slot: Slot, model: str) -> list[str]:
    """The other enabled slots on the same node that have `model` loaded right now (by
    name): unloading it for `slot` would take them offline too."""
    return list(Slot.objects.filter(node_id=slot.node_id, enabled=True,
                                    state__in=states.LOADED)
                .exclude(pk=slot.pk).filter(Q(model_name=model) | Q(loaded_model=model))
                .order_by("name").values_list("name", flat=True))


def _refuse_shared_unload(slot: Slot, model: str) -> None:
    """One slot may not unload a model another slot serves: with a token scoped to `chat`,
    `swap chat <embed's model>` then `unload chat` would otherwise take `embed` down."""
    others = model_served_elsewhere(slot, model)
    if others:
        names = ", ".join(repr(name) for name in others)
        raise SlotError(
            "slot.model_shared",
            f"Slot {slot.name!r} cannot unload {model}: slot {names} on the same node serves "
            f"it too and would go offline. Disable {names} first to free the model.",
            slot.name)


# --- the actions ------------------------------------------------------------------------------

def do_load_slot(slot: Slot | str, *, actor: Actor, join_timeout: float | None = None) -> Slot:
    """Make lemond serve the slot's model. A second caller joins a load in progress; a
    load of a slot already loaded with the same options is a no-op (no lemond call, no
    audit row: 50 concurrent loads of a ready slot used to make ~20 `/v1/load` calls)."""
    slot = get_slot(slot)
    _require_enabled(slot)
    provider = providers.get()
    try:
        body = provider.load_body(slot)
    except LemonadeError:
        body = None  # refused options: the load below records why
    if _loaded_as_asked(slot, body):
        slot.refresh_from_db()
        return slot
    plan = None
    if slot.state not in states.BUSY:  # a load in progress is joined, not planned again
        plan = fit.check(slot, action="load")
    deadline = time.monotonic() + (join_timeout or settings.HAL0_LEMONADE_LOAD_TIMEOUT)
    while (from_state := _transition(slot, "load", State.LOADING,
                                     f"loading {slot.model_name}")) is None:
        joined = _join(slot, max(0.1, deadline - time.monotonic()))
        if joined is not None:
            return joined
        # the load it joined died with its process: plan and load it here
        plan = fit.check(slot, action="load")
    held = plan.loaded if plan is not None else None
    with _recorded(slot, "load", from_state, actor) as started:
        try:
            provider.load(slot)
        except LemonadeError as exc:
            raise fail(slot, "load", from_state, lemond_error(slot, exc, "load"),
                       actor=actor, started=started, loaded_model="") from None
        elapsed = ms_since(started)
        if _was_no_op(slot, provider, held, body):
            # Still asked (lemond then refreshes its LRU time and the pin), but nothing was
            # loaded: its few milliseconds are no load time for "last load" or the chart.
            observed = _ready(slot.model_name, elapsed, body)
            del observed["last_load_ms"]
            record(slot, "load", actor=actor, from_state=from_state,
                   message=f"{slot.model_name} was loaded in lemond already, with the same "
                   "options: taken over, not reloaded", observed=observed)
            return slot
        record(slot, "load", actor=actor, from_state=from_state, duration_ms=elapsed,
               message=f"loaded {slot.model_name} in {elapsed / 1000:.1f} s",
               observed=_ready(slot.model_name, elapsed, body))
    return slot


def _was_no_op(slot: Slot, provider: Any, held: LoadedModel | None, body: dict | None) -> bool:
    """Did the load just made find the model up in lemond (`held`, seen by the fit check)
    with the options it asked for, so that lemond loaded nothing? Loaded by someone else
    (another tool, or before hal0 knew its options). A backend process that changed since
    (lemond resolved an option hal0 leaves out differently, and reloaded) was a real load."""
    if held is None or not held.up or body is None or not provider.runs_with(held, body):
        return False
    if held.pid is None:
        return True  # this lemond names no process: the options are all there is to compare
    now = provider.status(slot).entry
    return now is not None and now.pid == held.pid


def _refuse_kept_loaded(slot: Slot) -> None:
    """A client may not unload what the operator asked hal0 to keep loaded."""
    if slot.pinned or slot.keep_loaded:
        why = "pinned" if slot.pinned else "keep-loaded"
        raise SlotError("slot.pinned",
                        f"Slot {slot.name!r} is {why}: hal0 keeps it loaded. Unpin it (or "
                        "clear keep-loaded) in hal0 first.", slot.name)


def do_unload_slot(slot: Slot | str, *, actor: Actor, action: str = "unload",
                   keep_pinned: bool = False) -> Slot:
    """Stop serving the slot's model. Idempotent: a model lemond does not have is success.
    Refused (`slot.model_shared`, nothing changed) while another enabled slot on the node
    serves the same model, and with `keep_pinned` (a gateway client asking) for a pinned or
    keep-loaded slot (`slot.pinned`)."""
    slot = get_slot(slot)
    if keep_pinned:
        _refuse_kept_loaded(slot)
    model = slot.loaded_model or slot.model_name
    _refuse_shared_unload(slot, model)
    from_state = _transition(slot, "unload", State.UNLOADING, f"unloading {model}")
    assert from_state is not None  # only loads join
    with _recorded(slot, action, from_state, actor) as started:
        try:
            result = providers.get().unload(slot)
        except LemonadeError as exc:
            raise fail(slot, action, from_state, lemond_error(slot, exc, "unload"),
                       actor=actor, started=started, state=from_state) from None
        record(slot, action, actor=actor, from_state=from_state,
               duration_ms=ms_since(started), message=result.get("noop", "unloaded"),
               observed={"state": State.OFFLINE, "loaded_model": "", "loaded_options": {},
                         "error_code": "",
                         "state_message": "", "lemond_entry": {}})
    return slot


def do_restart_slot(slot: Slot | str, *, actor: Actor) -> Slot:
    """Unload then load again (a fresh backend process, e.g. after a hang)."""
    slot = get_slot(slot)
    _require_enabled(slot)
    from_state = _transition(slot, "restart", State.UNLOADING, "restarting")
    assert from_state is not None
    provider = providers.get()
    with _recorded(slot, "restart", from_state, actor) as started:
        try:
            provider.unload(slot)
            Slot.objects.filter(pk=slot.pk).update(state=State.LOADING,
                                                   state_message=f"loading {slot.model_name}",
                                                   state_changed_at=timezone.now())
            runtime.current().live.broadcast_slot_on_commit(slot.pk)
            provider.load(slot)
        except LemonadeError as exc:
            raise fail(slot, "restart", from_state, lemond_error(slot, exc, "restart"),
                       actor=actor, started=started, loaded_model="") from None
        elapsed = ms_since(started)
        # with the options it loaded with: a load after it is then hal0's own no-op
        record(slot, "restart", actor=actor, from_state=from_state, duration_ms=elapsed,
               message=f"restarted {slot.model_name} in {elapsed / 1000:.1f} s",
               observed=_ready(slot.model_name, elapsed, provider.load_body(slot)))
    return slot


def do_swap_slot(slot: Slot | str, new_model: str, *, actor: Actor) -> Slot:
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
    fit.check(slot, new_model, action="swap")
    old_model = slot.model_name
    from_state = _transition(slot, "swap", State.LOADING, f"swapping {old_model} → {new_model}")
    assert from_state is not None
    provider = providers.get()
    with _recorded(slot, "swap", from_state, actor) as started:
        try:
            provider.load(slot, model_name=new_model)
        except LemonadeError as exc:
            error = lemond_error(slot, exc, f"swap to {new_model}", model=new_model)
            # The old model stays desired, and the dialog promises the slot keeps it.
            still_loaded = _keep_old_model(slot, provider, was_loaded=states.is_loaded(
                from_state))
            observed: dict[str, Any] = {"loaded_model": old_model if still_loaded else "",
                                        "state": State.READY if still_loaded else State.ERROR}
            raise fail(slot, "swap", from_state, error, actor=actor, started=started,
                       model=new_model, **observed) from None
        if old_model != new_model and not model_wanted_elsewhere(slot, old_model):
            try:  # lemond's LRU only evicts within a full pool; don't leave the old one resident
                provider.unload(slot, model_name=old_model)
            except LemonadeError as exc:
                log.info("slot %s: old model %s not unloaded after swap: %s",
                         slot.name, old_model, exc)
        elapsed = ms_since(started)
        record(slot, "swap", actor=actor, from_state=from_state, duration_ms=elapsed,
               model=new_model, message=f"swapped {old_model} → {new_model}",
               observed={"model_name": new_model, **_ready(
                   new_model, elapsed, provider.load_body(slot, model_name=new_model))})
    return slot


def _keep_old_model(slot: Slot, provider: Any, *, was_loaded: bool) -> bool:
    """After a failed swap: is the slot's (old) model loaded, reloading it if lemond dropped
    it? lemond 10.6 evicts every model when a load fails, the old one included."""
    if provider.status(slot).entry:
        return True
    if not was_loaded:
        return False
    try:
        provider.load(slot)
    except LemonadeError as exc:
        log.warning("slot %s: %s not reloaded after a failed swap: %s", slot.name,
                    slot.model_name, exc)
        return False
    return True


def _set_pin(slot: Slot | str, pinned: bool, actor: Actor) -> Slot:
    slot = get_slot(slot)
    assert_outside_transaction()
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
        pass
    except LemonadeError as exc:
        raise lemond_error(slot, exc, action) from None
    note = "" if slot.node.supports_pinning else \
        " (lemond < 10.8 has no pins: hal0 protects the slot itself)"
    record(slot, action, actor=actor, from_state=slot.state, duration_ms=ms_since(started),
           message=f"{action}ned{note}", observed={"pinned": pinned})
    return slot


def do_pin_slot(slot: Slot | str, *, actor: Actor) -> Slot:
    return _set_pin(slot, True, actor)


def do_unpin_slot(slot: Slot | str, *, actor: Actor) -> Slot:
    return _set_pin(slot, False, actor)


def do_restore_slot(slot: Slot | str, *, reason: str = "",
                    actor: Actor = EventActor.RECONCILER) -> Slot:
    """Reload a keep-loaded (or pinned) slot lemond dropped: a load recorded as `restored`."""
    slot = get_slot(slot)
    _require_enabled(slot)
    from_state = _transition(slot, "load", State.LOADING, f"restoring {slot.model_name}")
    if from_state is None:  # someone else is loading it already
        return slot
    provider = providers.get()
    with _recorded(slot, "restored", from_state, actor) as started:
        try:
            provider.load(slot)
        except LemonadeError as exc:
            raise fail(slot, "restored", from_state, lemond_error(slot, exc, "restore"),
                       actor=actor, started=started, loaded_model="") from None
        elapsed = ms_since(started)
        note = f" ({reason})" if reason else ""
        record(slot, "restored", actor=actor, from_state=from_state, duration_ms=elapsed,
               message=f"reloaded {slot.model_name} in {elapsed / 1000:.1f} s{note}",
               observed=_ready(slot.model_name, elapsed, provider.load_body(slot)))
    return slot


def do_ensure_loaded(slot: Slot | str, timeout: float | None = None, *,
                     actor: Actor = EventActor.GATEWAY) -> Slot:
    """Return the slot once it is loaded, loading it (a `load` event, visible live) when it
    is not. Waits out an unload in progress first. Blocking: run it on a worker thread."""
    timeout = settings.HAL0_GATEWAY_LOAD_WAIT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    name = slot.name if isinstance(slot, Slot) else slot
    serving = runtime.current().serving
    while True:
        slot = get_slot(name)
        _require_enabled(slot)
        idle_unloading = serving.is_idle_unloading(slot)
        if slot.is_loaded and slot.loaded_model in ("", slot.model_name) and not idle_unloading:
            return slot
        if slot.state == State.UNLOADING and _settle_if_orphaned(slot, slot.state,
                                                                 slot.state_changed_at):
            continue  # the unload's process is gone: settled, look again
        if slot.state == State.UNLOADING or idle_unloading:
            if time.monotonic() >= deadline:
                raise SlotError("lemond.timeout", f"Slot {slot.name!r} is still unloading.",
                                slot.name)
            time.sleep(JOIN_POLL_S)
            continue
        return do_load_slot(slot, actor=actor,
                            join_timeout=max(0.1, deadline - time.monotonic()))


def do_idle_unload_slot(slot: Slot | str, *, actor: Actor = EventActor.RECONCILER
                        ) -> Slot | None:
    """Unload a slot for being idle (event `idle-unload`), unless it is serving, pinned,
    keep-loaded, never-idle (idle_timeout_s 0) or not ready. The decision of *when* is
    `slots.idle`'s; this only re-checks what must hold at the moment of unloading. A model
    another slot serves stays loaded (the idle slot stays ready: lemond serves it anyway).
    Returns the slot, or None when skipped."""
    slot = get_slot(slot if isinstance(slot, str) else slot.name)
    serving = runtime.current().serving
    with serving.unloading_idle(slot):
        if (serving.count(slot) or slot.state != State.READY or slot.pinned
                or slot.keep_loaded or not slot.idle_timeout_s
                or live_leases(slot.pk).exists()  # another gateway process serves it
                or model_served_elsewhere(slot, slot.loaded_model or slot.model_name)):
            return None
        return do_unload_slot(slot, actor=actor, action="idle-unload")


# The buttons and API calls by name (swap takes the model as well).
ACTIONS: dict[str, Callable[..., Slot]] = {
    "load": do_load_slot,
    "unload": do_unload_slot,
    "restart": do_restart_slot,
    "swap": do_swap_slot,
    "pin": do_pin_slot,
    "unpin": do_unpin_slot,
}


def do_action(action: str, slot: Slot | str, *, actor: Actor, model: str = "") -> Slot:
    """Run the action named `action` (one of ACTIONS); `model` is swap's new model."""
    if action == "swap":
        return do_swap_slot(slot, model, actor=actor)
    return ACTIONS[action](slot, actor=actor)
