"""Busy states belong to a process: who runs the action a `loading` or `unloading` slot is
in, and how the others learn that process is gone.

An action moves a slot into a busy state and, in the same transaction, takes the lease
`busy:<slot pk>` (`BusyClaims.claim`, a `slots.leases` row with the process's holder id);
it gives the lease back once the action has recorded its outcome. While the action runs
(a load may wait on lemond for HAL0_LEMONADE_LOAD_TIMEOUT), a daemon thread renews the
process's busy leases every third of HAL0_LEASE_TTL_S.

A process that dies mid-action (SIGKILL, an OOM kill, power loss) leaves the slot busy
with a lease nobody renews. `orphaned` finds such slots: the owner is gone when it ran on
this host and its pid is dead (at once), or when its lease expired (another host, after
the TTL). Whoever notices first settles the slot from lemond's truth and records
`interrupted` (`slots.actions.lifecycle.record_interrupted`): a restarted `serve` or
`reconcile`, another process's reconciler, or a load or gateway request that would have
joined the dead load. A busy slot without a lease (left by a hal0 from before busy
leases, or set by hand) is left to the stale rule (`slots.states.is_stale`), the last
fallback.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from django.db import connection

from . import leases

log = logging.getLogger("hal0.busy")

PREFIX = "busy:"


def lease_name(pk: int) -> str:
    return f"{PREFIX}{pk}"


def orphaned(pks: Iterable[int]) -> dict[int, str]:
    """Of the busy slots `pks`, those whose owner is gone: slot pk -> the owner's holder id."""
    names = {lease_name(pk): pk for pk in pks}
    if not names:
        return {}
    return {names[name]: holder for name, holder in leases.gone(list(names)).items()}


class BusyClaims:
    """The busy leases of one process (owned by its `Runtime`) and the thread renewing
    them. The thread starts with the object, not with the first claim: starting a thread
    on a loaded box takes a while, and a claim sits on an action's path.

    Each claim has a holder id of its own (`host:pid:random`, so a dead process is still
    recognised by its pid): when this process ends one action on a slot just as it starts
    the next, the first one's release cannot drop the second one's lease."""

    def __init__(self) -> None:
        self._held: dict[int, str] = {}  # slot pk -> the holder id of its claim
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._renew_until_closed, daemon=True,
                         name="hal0-busy-leases").start()

    def holder_of(self, pk: int) -> str | None:
        with self._lock:
            return self._held.get(pk)

    def claim(self, pk: int) -> str:
        """Take the slot's busy lease: call it in the transaction that moves the slot into
        its busy state, so the state and its owner are written together. Returns the
        claim's holder id."""
        holder = leases.new_holder_id()
        leases.take(lease_name(pk), holder, leases.ttl_s())
        with self._lock:
            self._held[pk] = holder
        return holder

    def release(self, pk: int, holder: str) -> None:
        """Give the claim back once its action recorded its outcome (the slot is settled)."""
        with self._lock:
            if self._held.get(pk) == holder:
                del self._held[pk]
        try:
            leases.release([lease_name(pk)], holder)
        except Exception:  # the database may be what failed: the lease expires anyway
            log.warning("could not give the busy lease of slot %s back", pk)

    def close(self) -> None:
        """At exit, once the running actions were recorded as interrupted: give every claim
        back and stop renewing."""
        self._closed.set()
        with self._lock:
            held, self._held = dict(self._held), {}
        for pk, holder in held.items():
            self.release(pk, holder)

    def _renew_until_closed(self) -> None:
        while not self._closed.wait(leases.ttl_s() / 3):
            with self._lock:
                held = list(self._held.items())
            if not held:
                continue
            try:
                for pk, holder in held:
                    leases.renew([lease_name(pk)], holder, leases.ttl_s())
            except Exception:  # retried at the next period, well within the TTL
                log.exception("could not renew busy leases")
            finally:
                connection.close()  # a renewal every few seconds: no connection kept
