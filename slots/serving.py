"""The gateway's serving bookkeeping for one process (owned by its `Runtime`).

The per-process count of in-flight requests is the source of truth for "this slot is
serving"; the database `state` mirrors it (ready <-> serving, compare-and-swap) so pages and
other processes see it. One worker task per slot writes that mirror off the request path,
coalescing bursts, and a slot goes back to ready only HAL0_SERVING_LINGER_S after its last
request. Everybody else treats `serving` as "loaded": the reconciler must not turn serving
into ready (it may turn it into offline or error when lemond lost the model), and idle
unload skips a slot that is serving.

With several gateway processes each one also holds a *serving lease* (a lease row
`serving:<slot pk>:<process>`) while it has requests in flight for a slot, written by the
same worker, so only at the process's own ready <-> serving edges. A process that goes idle
turns the slot back to ready only when no other live lease exists (one conditional UPDATE).
Leases are renewed by the metrics writer and expire after HAL0_SERVING_CLAIM_TTL_S, so a
process that dies mid-request holds the slot at serving only that long; the reconciler's
housekeeping then settles it (`settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.db.models import Exists, QuerySet
from django.db.models.functions import Now
from django.utils import timezone

from . import leases
from .live import Live
from .models import Lease, Slot, State

log = logging.getLogger("hal0.serving")

LEASE_PREFIX = "serving:"


def lease_ttl() -> float:
    # renewal rides on the metrics writer (every HAL0_METRICS_FLUSH_S): a TTL shorter than
    # a few of its periods would let busy leases lapse
    return max(float(settings.HAL0_SERVING_CLAIM_TTL_S), 3 * settings.HAL0_METRICS_FLUSH_S, 1.0)


def live_leases(pk: int) -> QuerySet[Lease]:
    """Serving leases of any process on the slot that have not expired."""
    return Lease.objects.filter(name__startswith=f"{LEASE_PREFIX}{pk}:", expires_at__gt=Now())


def _pk(slot: Slot | int) -> int:
    return slot if isinstance(slot, int) else slot.pk


def _ready_unless_leased(pk: int, **also: object) -> bool:
    """serving -> ready (and the fields in `also`), unless a live lease (another process's
    requests) remains: one conditional UPDATE. True when it was written."""
    return bool(Slot.objects.filter(pk=pk, state=State.SERVING)
                .exclude(Exists(live_leases(pk)))
                .update(state=State.READY, state_changed_at=timezone.now(), **also))


class ServingTracker:
    """In-flight counts, serving leases and the ready/serving mirror of one process."""

    def __init__(self, live: Live) -> None:
        self._live = live
        self.holder = leases.new_holder_id()
        self._tag = hashlib.sha1(self.holder.encode()).hexdigest()[:16]  # fits Lease.name
        self.in_flight: dict[int, int] = {}
        self.last_request: dict[int, float] = {}  # slot pk -> time.time() of start/end
        self.idle_unloading: set[int] = set()
        self._dirty: set[int] = set()
        self._workers: dict[int, asyncio.Task] = {}
        self._mirrored: dict[int, str] = {}  # the state this process last saw the mirror hold
        self._leased = False  # whether this process ever wrote a serving lease

    # --- the request path (no database) -----------------------------------------------
    def count(self, slot: Slot | int) -> int:
        """Requests in flight for the slot in this process."""
        return self.in_flight.get(_pk(slot), 0)

    def last_request_at(self, slot: Slot | int) -> float | None:
        """time.time() of the slot's last gateway request (start or end) in this process."""
        return self.last_request.get(_pk(slot))

    def acquire(self, slot: Slot | int) -> int:
        """Count one more request in flight (call `release` in a `finally`); returns the
        new count."""
        pk = _pk(slot)
        count = self.in_flight.get(pk, 0) + 1
        self.in_flight[pk] = count
        self.last_request[pk] = time.time()
        if count == 1:
            self.refresh(pk)
        return count

    def release(self, slot: Slot | int) -> int:
        pk = _pk(slot)
        count = max(0, self.in_flight.get(pk, 0) - 1)
        if count:
            self.in_flight[pk] = count
        else:
            self.in_flight.pop(pk, None)
        self.last_request[pk] = time.time()
        if count == 0:
            self.refresh(pk)
        return count

    def is_idle_unloading(self, slot: Slot | int) -> bool:
        """True while an idle unload runs on the slot (a request that arrives then must
        load it again rather than use it)."""
        return _pk(slot) in self.idle_unloading

    @contextlib.contextmanager
    def unloading_idle(self, slot: Slot | int) -> Iterator[None]:
        """Mark the slot as being idle-unloaded: first the flag, then the caller checks the
        count, so a racing request sees one of the two."""
        pk = _pk(slot)
        self.idle_unloading.add(pk)
        try:
            yield
        finally:
            self.idle_unloading.discard(pk)

    # --- the mirror ----------------------------------------------------------------------
    def _lease_name(self, pk: int) -> str:
        return f"{LEASE_PREFIX}{pk}:{self._tag}"

    def refresh(self, slot: Slot | int, *, force: bool = False) -> None:
        """Schedule the ready/serving mirror write for the slot; `force` after another
        action (a load under a waiting request) changed the state behind the mirror's
        back. Without a running event loop it is written right away."""
        pk = _pk(slot)
        if force:
            self._mirrored.pop(pk, None)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.sync_state(pk)
            return
        self._dirty.add(pk)
        worker = self._workers.get(pk)
        if worker is None or worker.done() or worker.get_loop() is not loop:
            self._workers[pk] = loop.create_task(self._worker(pk))

    def sync_state(self, slot: Slot | int) -> str | None:
        """Make the stored state agree with the in-flight count (ready <-> serving only),
        this process's serving lease with it. Returns the state written, or None when
        nothing changed."""
        pk = _pk(slot)
        now = timezone.now()
        if self.in_flight.get(pk, 0) > 0:
            self._leased = True
            leases.acquire(self._lease_name(pk), self.holder, lease_ttl())
            changed = Slot.objects.filter(pk=pk, state=State.READY).update(
                state=State.SERVING, state_changed_at=now, last_use_at=now)
            new_state = State.SERVING
        else:
            leases.release([self._lease_name(pk)], self.holder)
            changed = _ready_unless_leased(pk, last_use_at=now)
            new_state = State.READY
        if changed:
            self._live.broadcast_slot_on_commit(pk)
            return new_state
        return None

    def _sync_in_thread(self, pk: int) -> str | None:
        """Write the mirror; return the state it now holds if that is the wanted one."""
        try:
            written = self.sync_state(pk)
            if written is not None:
                return written
            current = Slot.objects.filter(pk=pk).values_list("state", flat=True).first()
            wanted = State.SERVING if self.in_flight.get(pk) else State.READY
            return current if current == wanted else None
        finally:
            connection.close()  # a pool thread must not keep a connection open

    async def _worker(self, pk: int) -> None:
        try:
            while pk in self._dirty:
                self._dirty.discard(pk)
                if not self.in_flight.get(pk) and settings.HAL0_SERVING_LINGER_S > 0:
                    await asyncio.sleep(settings.HAL0_SERVING_LINGER_S)
                    if pk in self._dirty:
                        continue  # busy again meanwhile: look at the count afresh
                wanted = State.SERVING if self.in_flight.get(pk) else State.READY
                if self._mirrored.get(pk) == wanted:
                    continue  # back-to-back requests: the mirror already says so, no write
                try:
                    held = await sync_to_async(self._sync_in_thread,
                                               thread_sensitive=False)(pk)
                except Exception:  # the mirror is cosmetic: never let it take a request down
                    log.exception("could not write the serving state of slot %s", pk)
                    held = None
                if held is None:
                    self._mirrored.pop(pk, None)
                else:
                    self._mirrored[pk] = held
        finally:
            self._workers.pop(pk, None)

    # --- leases across processes --------------------------------------------------------
    def renew_leases(self) -> int:
        """Keep this process's leases alive while its requests run (long streams outlive
        the TTL). Called by the metrics writer; returns how many were renewed."""
        busy = [pk for pk, count in list(self.in_flight.items()) if count > 0]
        self._leased = self._leased or bool(busy)
        renewed = sum(leases.acquire(self._lease_name(pk), self.holder, lease_ttl())
                      for pk in busy)
        # On PostgreSQL another process's idle edge can read the leases just before ours
        # was committed and turn the slot ready under our requests; put it right here.
        now = timezone.now()
        for pk in busy:
            if Slot.objects.filter(pk=pk, state=State.READY).update(
                    state=State.SERVING, state_changed_at=now, last_use_at=now):
                self._live.broadcast_slot_on_commit(pk)
        return renewed

    def release_leases(self) -> int:
        """Drop every serving lease of this process and turn the slots no other process
        serves back to ready (requests cut off by the exit are over); returns how many
        leases there were. Called once the server has stopped (SIGTERM, Ctrl-C), so a
        restarted gateway does not hold its slots at serving for the leases' TTL."""
        if not self._leased:
            return 0
        try:
            mine = Lease.objects.filter(name__startswith=LEASE_PREFIX, holder=self.holder)
            pks = {int(name.split(":")[1]) for name in mine.values_list("name", flat=True)}
            count = mine.delete()[0]
            for pk in pks:
                _ready_unless_leased(pk)  # no broadcast: this process is on its way out
            return count
        except Exception:  # at exit the database may be gone: the leases expire anyway
            log.warning("could not give serving leases back; they expire after %s s",
                        lease_ttl())
            return 0

    def settle(self) -> list[str]:
        """Turn `serving` back to `ready` for slots no live process leases any more (their
        gateway process died mid-request). Run by the reconciler's housekeeping."""
        Lease.objects.filter(name__startswith=LEASE_PREFIX, expires_at__lt=Now()).delete()
        settled = []
        for slot in Slot.objects.filter(state=State.SERVING).only("pk", "name"):
            if self.in_flight.get(slot.pk):
                continue  # ours, its lease is being written right now
            if _ready_unless_leased(slot.pk):
                self._live.broadcast_slot_on_commit(slot.pk)
                settled.append(slot.name)
        return settled
