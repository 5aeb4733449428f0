"""Per-slot concurrency with a fair queue (owned by the `Runtime`; per process).

A slot with `max_concurrency` N serves at most N gateway requests at once in this process.
The others wait in the slot's queue (a `Gate`), which is FIFO per API token and round-robin
across tokens: each token with waiting requests has its own line, and when a place frees up
the token at the front of the round gets it and goes to the back. A client that sends a
burst of 20 therefore delays another client's lone request by at most one of its own, not
by all 20.

A request waits at most the slot's `queue_timeout_s` (then the gateway answers 429 with a
Retry-After estimated from the queue ahead and the recent service time); a request whose
client disconnects is cancelled and leaves the queue at once. A place is held from the
moment it is granted until the response has been sent to its end (a stream holds it while
it streams).

Slots without `max_concurrency` never reach this module (no gate, no cost). The queue is
this process's: with several `serve` processes each one admits up to N (docs/scaleout.md).
Depth and waits are kept per gate for the slot card, the slot's JSON and `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Any

from django.template.loader import render_to_string

from .live import ACTIVITY_GROUP, Live, local_layer

log = logging.getLogger("hal0.admission")

# hal0_slot_queue_wait_seconds' buckets: from "no wait" to "about to time out"
WAIT_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RECENT_WAITS = 256  # the waits the card's and the JSON's percentiles are taken over
PUSH_EVERY_S = 0.5  # at most one queue push per slot this often (a burst is one push)


class QueueTimeout(Exception):
    """The request waited `queue_timeout_s` without getting a place."""

    def __init__(self, waited: float, retry_after: int):
        super().__init__(f"waited {waited:.1f} s")
        self.waited = waited
        self.retry_after = retry_after


class Gate:
    """One slot's places and its queue (see the module docstring)."""

    def __init__(self, pk: int, name: str, admission: Admission):
        self.pk = pk
        self.name = name
        self._admission = admission
        self.limit = 1
        self.active = 0  # places granted and not yet left
        self.depth = 0  # requests waiting
        # token -> its waiting requests, in round order (the front token is served next)
        self._lines: OrderedDict[Hashable, deque[asyncio.Future]] = OrderedDict()
        self.service_s: float | None = None  # a moving average of how long a place is held
        # what the card, the JSON and /metrics show
        self.recent: deque[float] = deque(maxlen=RECENT_WAITS)
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.wait_count = 0
        self.queued = 0  # requests that had to wait
        self.timed_out = 0
        self.left = 0  # clients that went away while waiting

    # --- entering and leaving ------------------------------------------------------------
    async def enter(self, who: Hashable, limit: int, timeout: float) -> float:
        """Wait for a place (FIFO per `who`, round-robin across them); returns when the
        place was granted (time.monotonic()). Raises QueueTimeout after `timeout` seconds;
        a cancelled request (its client left) leaves the queue."""
        self.limit = limit
        now = time.monotonic()
        if self.active < limit:
            if self.depth:  # the limit was raised while requests waited: they go first
                self._grant()
            if self.active < limit and not self.depth:
                self.active += 1
                self._waited(0.0)
                self._admission.changed(self)  # "serving" moved (one push per burst)
                return now
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        line = self._lines.get(who)
        if line is None:
            line = self._lines[who] = deque()  # a new token joins at the back of the round
        line.append(future)
        self.depth += 1
        self.queued += 1
        self._admission.changed(self)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            if not (future.done() and not future.cancelled()):
                self._withdraw(who, future)
                self.timed_out += 1
                waited = time.monotonic() - now
                raise QueueTimeout(waited, self.retry_after()) from None
            # granted in the same instant the time ran out: take the place
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.leave(time.monotonic())  # granted, then the client left: pass it on
            else:
                self._withdraw(who, future)
                self.left += 1
            raise
        granted = time.monotonic()
        self._waited(granted - now)
        return granted

    def leave(self, granted_at: float) -> None:
        """Give a place back (the response ended); the next in the round gets it."""
        self.active = max(0, self.active - 1)
        held = time.monotonic() - granted_at
        self.service_s = held if self.service_s is None else 0.8 * self.service_s + 0.2 * held
        if self.depth:
            self._grant()
        else:
            self._admission.changed(self)  # nothing waits: only "serving" moved

    def _grant(self) -> None:
        while self._lines and self.active < self.limit:
            who, line = next(iter(self._lines.items()))
            future = line.popleft()
            self.depth -= 1
            if line:
                self._lines.move_to_end(who)  # served: to the back of the round
            else:
                del self._lines[who]
            if not future.done():
                future.set_result(None)
                self.active += 1
        self._admission.changed(self)

    def _withdraw(self, who: Hashable, future: asyncio.Future) -> None:
        line = self._lines.get(who)
        if line is not None and future in line:
            line.remove(future)
            self.depth -= 1
            if not line:
                del self._lines[who]
        self._admission.changed(self)

    def _waited(self, seconds: float) -> None:
        self.recent.append(seconds)
        self.wait_sum += seconds
        self.wait_count += 1
        for i, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self.wait_buckets[i] += 1
                break
        else:
            self.wait_buckets[-1] += 1

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead times the recent service
        time per place (at least 1)."""
        per_place = self.service_s if self.service_s is not None else 1.0
        return max(1, min(3600, math.ceil(per_place * (self.depth + 1) / max(self.limit, 1))))

    # --- reading ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What the slot card and the slot's JSON show."""
        waits = sorted(self.recent)

        def ms(fraction: float) -> float | None:
            if not waits:
                return None
            return round(waits[min(len(waits) - 1, max(0, math.ceil(fraction * len(waits)) - 1))]
                         * 1000.0, 1)

        return {"max_concurrency": self.limit, "active": self.active,
                "depth": self.depth, "queued_total": self.queued,
                "timed_out_total": self.timed_out, "left_total": self.left,
                "wait_p50_ms": ms(0.5), "wait_p95_ms": ms(0.95),
                "wait_max_ms": round(waits[-1] * 1000.0, 1) if waits else None}


class Admission:
    """The gates of this process's slots, by slot pk (owned by the `Runtime`)."""

    def __init__(self, live: Live | None = None):
        self._live = live
        self.gates: dict[int, Gate] = {}
        self._push_due: set[int] = set()

    def gate(self, pk: int, name: str) -> Gate:
        gate = self.gates.get(pk)
        if gate is None:
            gate = self.gates[pk] = Gate(pk, name, self)
        elif gate.name != name:
            gate.name = name  # renamed
        return gate

    def stats(self, pk: int, max_concurrency: int | None) -> dict[str, Any] | None:
        """The slot's queue numbers in this process, for its current `max_concurrency`
        (None: the slot has no limit and nothing was ever queued for it here)."""
        gate = self.gates.get(pk)
        if gate is None:
            if max_concurrency is None:
                return None
            return {"max_concurrency": max_concurrency, "active": 0, "depth": 0,
                    "queued_total": 0, "timed_out_total": 0, "left_total": 0,
                    "wait_p50_ms": None, "wait_p95_ms": None, "wait_max_ms": None}
        return {**gate.stats(), "max_concurrency": max_concurrency}

    # --- the card's live update --------------------------------------------------------------
    def changed(self, gate: Gate) -> None:
        """The queue's depth or serving count changed: push the card's queue line to open
        dashboards and nudge open Activity pages, at most once per PUSH_EVERY_S per slot
        (a call on every request costs a set lookup; the push is scheduled once)."""
        if self._live is None or gate.pk in self._push_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._push_due.add(gate.pk)
        loop.call_later(PUSH_EVERY_S, self._push, gate.pk)

    def _push(self, pk: int) -> None:
        self._push_due.discard(pk)
        gate = self.gates.get(pk)
        if gate is None or self._live is None:
            return
        local = local_layer()
        if not local or self._live.page_watching():  # an Activity page may be open
            # Only a nudge: each Activity page's socket renders its own queue table (that
            # takes the slot list from the database, which this event loop must not read).
            self._live.send_message(ACTIVITY_GROUP, {"type": "activity.queues"})
        if local and not self._live.viewers():
            return  # no dashboard open in this process
        try:
            html = render_to_string("slots/_slot_queue.html",
                                    {"queue": gate.stats(), "name": gate.name, "oob": True})
        except Exception:  # a cosmetic push must never disturb the gateway
            log.exception("could not render the queue of slot %s", gate.name)
            return
        self._live.send(html)
