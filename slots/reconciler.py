"""The reconciler: one async loop per process that watches every enabled lemond node and
moves the slots' *observed* fields towards what lemond reports. It never changes what the
operator asked for.

Each poll reads `/v1/health` (and, every few seconds, `/v1/system-stats` and `/v1/stats`),
then, in one database pass per node:

* the node's header fields (reachable, version, stats, a configuration warning) are
  written only when they changed, and pushed to open dashboards;
* a slot hal0 believed loaded whose model is gone is recorded `evicted`, with the likely
  reason (see `_eviction_reason`);
* a model lemond serves that a not-loaded slot wants is `adopted` onto that slot;
* a slot left busy by a process that is gone (slots.busy: SIGKILL, OOM) is settled at once
  from what lemond has, and recorded `interrupted`;
* keep-loaded and pinned slots lemond dropped are reloaded (`restored`) with backoff, but
  only while their type pool has room: hal0 never evicts a model to restore another, and
  when more keep-loaded slots share a pool than `max_loaded_models` allows it shows a
  warning on the node instead of looping;
* `lemond_entry` and `last_use_at` stay fresh, `last_use_at` only when it moved by more
  than `HAL0_OBSERVE_RESOLUTION_S` (no write per poll on a busy box);
* once per `HAL0_POLL_IDLE_S`, slots unused past their idle timeout are unloaded
  (`slots.idle`).

It polls every `HAL0_POLL_ACTIVE_S` while a dashboard is connected to this process and
every `HAL0_POLL_IDLE_S` otherwise; run as its own process (`manage.py reconcile`) or with
a Redis channel layer (`REDIS_URL`: dashboards may be open in *other* processes, whose
viewers it cannot count) it always polls at the active rate. Each node is polled by its
own task with its own timeout, so a hung node never delays the others. `manage.py serve`
runs it beside the web server; `manage.py reconcile` runs it alone. Writes go through
`slots.actions` (`audit.record_observation`, the `restored` action).

With several hal0 processes, only one reconciler polls a given node: the one holding the
node's lease (`slots.leases`, `reconciler:<node>`, `HAL0_LEASE_TTL_S`). The others keep
trying to take it and do so once its holder stops renewing it (docs/scaleout.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from providers.lemonade import hardware, versions
from providers.lemonade.client import Health, LoadedModel
from providers.lemonade.errors import (
    LemonadeBadResponse,
    LemonadeError,
    LemonadeHTTPError,
)
from providers.lemonade.names import find_published

from . import busy, idle, leases, live, runtime, states
from .actions import lifecycle
from .actions.audit import record_node_observation, record_observation
from .models import LEMOND_TYPE, Capability, Node, Slot, SlotEvent, State

log = logging.getLogger("hal0.reconciler")

TICK_S = 0.25
# A failed load this recent explains models vanishing at once (lemond's evict-all).
FAILED_LOAD_WINDOW = timedelta(seconds=60)


@dataclass
class NodeReading:
    """One poll of one node: health, or why there is none."""

    health: Health | None = None
    system_stats: dict | None = None
    request_stats: dict | None = None
    error: str = ""
    started_at: Any = None


@dataclass
class NodeMemory:
    """What the reconciler remembers about a node between polls (in memory only)."""

    models: dict[str, LoadedModel] | None = None  # None: not seen since this process started
    gap: bool = False  # unreachable since the last good poll
    request_total: int | None = None
    websocket_port: int | None = None
    stats_at: float | None = None  # monotonic time of the last stats read; None: never
    polling: bool = False
    polls: int = 0
    started_at: float = float("-inf")
    warned_pools: set[str] = field(default_factory=set)

    def forget(self) -> None:
        """Drop what another process may have made stale (after taking the node's lease)."""
        self.models = None
        self.gap = False
        self.request_total = None
        self.websocket_port = None
        self.warned_pools = set()


@dataclass
class Backoff:
    attempts: int = 0
    next_at: float = 0.0
    future: Any = None

    def wait(self) -> float:
        base = settings.HAL0_RESTORE_BACKOFF_S
        return min(base * (2 ** max(self.attempts - 1, 0)), settings.HAL0_RESTORE_BACKOFF_MAX_S)


@dataclass
class Reconciler:
    nodes: dict[int, NodeMemory] = field(default_factory=dict)
    # slot id -> backoff for slots waiting to be restored
    restores: dict[int, Backoff] = field(default_factory=dict)
    # poll at the active rate even with no dashboard connected to this process
    always_active: bool = False
    # take a lease per node before polling it (run_forever only; poll_once never does)
    use_leases: bool = True
    holder: str = field(default_factory=leases.new_holder_id)
    # node name -> (monotonic time the lease was last taken, until when it is ours)
    leased: dict[str, tuple[float, float]] = field(default_factory=dict)
    leases_checked_at: float = float("-inf")

    # --- the loop ---------------------------------------------------------------------
    async def run_forever(self) -> None:
        runtime.current().live.bind_loop()
        log.info("reconciler %s started (every %.1f s with a dashboard open, %.1f s without%s)",
                 self.holder, settings.HAL0_POLL_ACTIVE_S, settings.HAL0_POLL_IDLE_S,
                 "; always active" if self.always_active else "")
        try:
            await self._loop()
        finally:
            if self.leased:
                try:
                    await sync_to_async(self.release_leases)()
                except Exception:
                    log.exception("could not release the reconciler's leases")

    async def _loop(self) -> None:
        tasks: set[asyncio.Task] = set()
        idle_task: asyncio.Task | None = None
        idle_at = time.monotonic()
        layout_at = float("-inf")
        while True:
            try:
                now = time.monotonic()
                nodes = await sync_to_async(_enabled_nodes)()
                if self.use_leases and now - self.leases_checked_at >= _lease_retry_s():
                    self.leases_checked_at = now
                    await sync_to_async(self.keep_leases)(nodes)
                # housekeeping (idle unload, metrics pruning) once per slow period, never
                # two at once, and only in a process that polls something
                if now - idle_at >= settings.HAL0_POLL_IDLE_S and \
                        (idle_task is None or idle_task.done()) and \
                        (not self.use_leases or self.leased):
                    idle_at = now
                    idle_task = asyncio.ensure_future(_housekeeping())
                viewers = runtime.current().live.viewers()
                active = self.always_active or viewers
                period = settings.HAL0_POLL_ACTIVE_S if active else settings.HAL0_POLL_IDLE_S
                if viewers and live.local_layer() and now - layout_at >= period:
                    layout_at = now
                    await self.watch_layout()
                for node in nodes:
                    if self.use_leases and not self.holds(node.name, now):
                        continue  # another process polls it; we keep trying to take over
                    memory = self.nodes.setdefault(node.pk, NodeMemory())
                    # the period is read every tick: a dashboard that just opened does not
                    # wait for the slow period to end
                    if memory.polling or now < memory.started_at + period:
                        continue
                    memory.polling = True
                    memory.started_at = now
                    task = asyncio.ensure_future(self._poll_guarded(node, memory))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except Exception:
                log.exception("reconciler tick failed")
            await asyncio.sleep(TICK_S)

    @staticmethod
    async def watch_layout() -> None:
        """Slots created, renamed, moved or deleted by another process (`manage.py slots`
        with the in-memory channel layer cannot reach this process's dashboards): push the
        grid when where the cards sit has changed. With Redis every change pushes itself."""
        try:
            pages = runtime.current().live
            if await sync_to_async(pages.layout_moved)():
                await sync_to_async(pages.push_layout)()
        except Exception:  # cosmetic: never let it cost the tick its polls
            log.exception("watching the dashboard layout failed")

    # --- leases (one poller per node across processes) ----------------------------------
    def holds(self, node_name: str, now: float | None = None) -> bool:
        held = self.leased.get(node_name)
        return held is not None and (now if now is not None else time.monotonic()) < held[1]

    def keep_leases(self, nodes: list[Node]) -> None:
        """Renew the leases we hold (every third of their TTL), try to take the others, and
        give up those of nodes no longer enabled. Runs on a worker thread."""
        ttl = leases.ttl_s()
        names = {node.name for node in nodes}
        gone = [name for name in self.leased if name not in names]
        if gone:
            leases.release([leases.node_lease(n) for n in gone], self.holder)
            for name in gone:
                self.leased.pop(name, None)
        for node in nodes:
            now = time.monotonic()
            held = self.leased.get(node.name)
            if held is not None and now < held[0] + ttl / 3 and now < held[1]:
                continue
            if leases.acquire(leases.node_lease(node.name), self.holder, ttl):
                if not self.holds(node.name, now):
                    log.info("polling node %s (lease %s taken by %s)", node.name,
                             leases.node_lease(node.name), self.holder)
                    self.nodes.setdefault(node.pk, NodeMemory()).forget()
                # valid from before we asked, so a slow answer never stretches it
                self.leased[node.name] = (now, now + ttl)
            elif held is not None:
                log.warning("node %s: lease lost to another process; not polling it",
                            node.name)
                self.leased.pop(node.name, None)

    def release_leases(self) -> None:
        _fresh_connection()
        leases.release([leases.node_lease(n) for n in self.leased], self.holder)
        self.leased.clear()

    async def _poll_guarded(self, node: Node, memory: NodeMemory) -> None:
        try:
            await self.poll_node(node)
        except Exception:
            log.exception("polling node %s failed", node.name)
        finally:
            memory.polls += 1
            memory.polling = False

    async def poll_once(self) -> None:
        """Poll every enabled node once, concurrently (tests, and one-shot use)."""
        nodes = await sync_to_async(_enabled_nodes)()
        await asyncio.gather(*(self.poll_node(node) for node in nodes))

    async def poll_node(self, node: Node) -> None:
        memory = self.nodes.setdefault(node.pk, NodeMemory())
        seen = await self.read_node(node, memory)
        # on the runtime's database thread: a slow pass never holds up gateway requests
        restore = await runtime.current().run_db(self.apply, node, memory, seen)
        for slot, reason in restore:
            self._start_restore(slot, reason)

    # --- reading lemond -----------------------------------------------------------------
    async def read_node(self, node: Node, memory: NodeMemory) -> NodeReading:
        seen = NodeReading(started_at=timezone.now())
        want_stats = memory.stats_at is None or \
            time.monotonic() - memory.stats_at >= settings.HAL0_STATS_EVERY_S
        timeout = settings.HAL0_RECONCILE_TIMEOUT_S
        try:
            async with node.client(timeout) as client:
                async with asyncio.timeout(timeout):
                    calls = [client.health()]
                    if want_stats:
                        calls += [client.system_stats(), client.stats(),
                                  client.system_info()]
                    results = await asyncio.gather(*calls, return_exceptions=True)
        except TimeoutError:
            seen.error = f"lemond at {node.base_url} did not answer within {timeout:g} s"
            return seen
        except Exception as exc:  # a broken node must not stop the loop
            seen.error = failure_reason(exc)
            return seen
        health = results[0]
        if isinstance(health, BaseException):
            seen.error = failure_reason(health)
            return seen
        seen.health = health
        if want_stats:
            memory.stats_at = time.monotonic()
            seen.system_stats = _rounded_system(results[1], results[3], health.version)
            seen.request_stats = _rounded_requests(results[2])
        return seen

    # --- the database pass (runs on Django's sync thread) -------------------------------
    def apply(self, node: Node, memory: NodeMemory, seen: NodeReading
              ) -> list[tuple[Slot, str]]:
        _fresh_connection()
        node.refresh_from_db()
        now = timezone.now()
        if seen.health is None:
            record_node_observation(
                node, reachable=False, last_error=seen.error[:500],
                unreachable_since=node.unreachable_since or now,
            )
            memory.gap = memory.gap or memory.models is not None
            return []
        health = seen.health
        node_fields: dict[str, Any] = {
            "reachable": True, "unreachable_since": None, "last_error": "",
            "version": health.version[:40], "simulated": health.simulated,
            "max_loaded_models": _max_loaded(health),
        }
        if node.last_seen is None or not node.reachable or \
                now - node.last_seen > timedelta(seconds=settings.HAL0_OBSERVE_RESOLUTION_S):
            node_fields["last_seen"] = now
        if seen.system_stats is not None:
            node_fields["system_stats"] = seen.system_stats
        if seen.request_stats is not None:
            node_fields["request_stats"] = seen.request_stats
        loaded = {e.model_name: e for e in health.loaded if e.status in (None, "ready", "in_use")}
        restarted = self._restarted(memory, health, seen,
                                    versions.for_version(health.version), loaded)
        slots = list(Slot.objects.filter(node=node).select_related("node"))
        node_fields["config_warning"], memory.warned_pools = _pool_warning(slots, health)
        record_node_observation(node, **node_fields)
        for slot in slots:
            slot.node = node

        # lemond < 10.8 lists a model only once it is up; later ones say "loading". Keys are
        # the names lemond *publishes* (user.X as X): look slots up with `_entry`.
        previous = memory.models
        restore: list[tuple[Slot, str]] = []
        orphans = busy.orphaned([slot.pk for slot in slots if slot.state in states.BUSY])
        for slot in slots:
            try:
                if slot.pk in orphans:
                    outcome = self._settle_interrupted(slot, orphans[slot.pk], loaded, health,
                                                       memory)
                else:
                    outcome = self._reconcile_slot(slot, loaded, previous, restarted, seen,
                                                   health, memory)
            except Exception:
                log.exception("reconciling slot %s failed", slot.name)
                continue
            if outcome:
                restore.append((slot, outcome))
        memory.models = loaded
        memory.gap = False
        return restore

    def _reconcile_slot(self, slot: Slot, loaded: dict[str, LoadedModel],
                        previous: dict[str, LoadedModel] | None, restarted: bool,
                        seen: NodeReading, health: Health, memory: NodeMemory) -> str:
        """Diff one slot; returns a reason when it should be restored, else ''."""
        if slot.state_changed_at >= seen.started_at:
            return ""  # an action moved it while we were asking lemond: look next time
        if slot.state in states.BUSY and not states.is_stale(slot.state, slot.state_changed_at):
            return ""  # an action is running; it records its own outcome
        protected = slot.enabled and (slot.keep_loaded or slot.pinned)
        if slot.is_loaded:
            entry = _entry(loaded, slot.loaded_model or slot.model_name)
            if entry is None:
                reason = self._eviction_reason(slot, loaded, previous, restarted)
                plan = " — hal0 reloads it" if protected else ""
                record_observation(slot, "evicted", message=reason + plan,
                                 state=State.OFFLINE, loaded_model="", lemond_entry={},
                                 loaded_options={},
                                 state_message=reason[:1000])
                if protected:
                    self.restores.setdefault(slot.pk, Backoff())
                    return self._restore_reason(slot, loaded, health, memory, reason)
                return ""
            self.restores.pop(slot.pk, None)
            before = _entry(previous, slot.loaded_model or slot.model_name)
            fresh = _fresh_fields(slot, entry, before, seen.started_at)
            if fresh:
                record_observation(slot, **fresh)
            return ""
        entry = _entry(loaded, slot.model_name)
        if entry is not None and slot.enabled:
            how = "loaded outside hal0" if _entry(previous, slot.model_name) is None \
                else "already loaded in lemond"
            # lemond's last_use says nothing about wall-clock time: becoming ready is the
            # slot's latest activity (idle unload counts from it)
            record_observation(
                slot, "adopted", message=f"lemond serves {slot.model_name} ({how}); adopted",
                state=State.READY, loaded_model=slot.model_name, loaded_options={},
                error_code="", state_message="", lemond_entry=entry.raw)
            self.restores.pop(slot.pk, None)
            return ""
        if slot.pk in self.restores:
            if not protected:
                self.restores.pop(slot.pk, None)
                return ""
            return self._restore_reason(slot, loaded, health, memory, "")
        return ""

    def _settle_interrupted(self, slot: Slot, owner: str, loaded: dict[str, LoadedModel],
                            health: Health, memory: NodeMemory) -> str:
        """The process running the slot's action is gone: settle the slot from what lemond
        has (`interrupted`); a keep-loaded slot left offline is restored like an evicted
        one. Returns a restore reason, or ''."""
        entry = health.find(slot.model_name)
        if not lifecycle.settle_interrupted(slot, owner, entry) or slot.is_loaded or entry:
            return ""  # moved meanwhile, adopted, or lemond is still loading it
        if not (slot.enabled and (slot.keep_loaded or slot.pinned)):
            return ""
        self.restores.setdefault(slot.pk, Backoff())
        return self._restore_reason(slot, loaded, health, memory, "interrupted")

    def _restore_reason(self, slot: Slot, loaded: dict[str, LoadedModel], health: Health,
                        memory: NodeMemory, reason: str) -> str:
        backoff = self.restores[slot.pk]
        if backoff.future is not None and not backoff.future.done():
            return ""
        if time.monotonic() < backoff.next_at:
            return ""
        if _pool_of(slot) in memory.warned_pools:
            return ""  # more keep-loaded slots than the pool holds: warn, don't loop
        limit = _max_loaded(health)
        in_pool = [e for e in loaded.values() if e.type == _pool_of(slot)]
        if limit is not None and limit >= 0 and len(in_pool) >= limit:
            return ""  # never evict another model to restore this one; wait for room
        return reason or "keep-loaded"

    def _start_restore(self, slot: Slot, reason: str) -> None:
        backoff = self.restores.setdefault(slot.pk, Backoff())
        backoff.attempts += 1
        backoff.next_at = time.monotonic() + backoff.wait()
        log.info("restoring slot %s (attempt %d)", slot.name, backoff.attempts)
        backoff.future = runtime.current().submit(lifecycle.do_restore_slot, slot.name,
                                                  reason=f"attempt {backoff.attempts}")

    # --- why a model vanished -----------------------------------------------------------
    @staticmethod
    def _restarted(memory: NodeMemory, health: Health, seen: NodeReading,
                   caps: versions.Capabilities, loaded: dict[str, LoadedModel]) -> bool:
        """lemond has no uptime field: a restart shows as a gap in reachability, a model
        still listed under a new backend `pid` (lemond >= 10.4), request totals going down
        (only lemond >= 10.7 has them), or (v10.1–10.7) a new random log websocket port."""
        restarted = memory.gap
        if memory.models and any(
                entry.pid is not None and before.pid is not None and entry.pid != before.pid
                for name, entry in loaded.items()
                if (before := memory.models.get(name)) is not None):
            restarted = True
        total = (seen.request_stats or {}).get("request_count_total") \
            if caps.stats_totals else None
        if isinstance(total, int):
            if memory.request_total is not None and total < memory.request_total:
                restarted = True
            memory.request_total = total
        port = health.websocket_port
        if memory.websocket_port is not None and port is not None and \
                port != memory.websocket_port:
            restarted = True
        memory.websocket_port = port if port is not None else memory.websocket_port
        return restarted

    @staticmethod
    def _eviction_reason(slot: Slot, loaded: dict[str, LoadedModel],
                         previous: dict[str, LoadedModel] | None, restarted: bool) -> str:
        model = slot.loaded_model or slot.model_name
        if restarted:
            return f"{model} is gone: lemond restarted"
        if previous is None:
            return (f"{model} was not loaded when the reconciler started (lemond restarted "
                    "or unloaded it while hal0 was not watching)")
        pool = _pool_of(slot)
        newcomers = [name for name, e in loaded.items() if name not in previous and e.type == pool]
        if newcomers:
            return (f"{model} evicted by lemond's LRU: {', '.join(sorted(newcomers))} was "
                    f"loaded into the full {pool} pool")
        # a failed load before this slot (re)became loaded cannot have evicted it
        since = max(timezone.now() - FAILED_LOAD_WINDOW, slot.state_changed_at)
        failed = (SlotEvent.objects.filter(
            slot__node_id=slot.node_id, ok=False, action__in=states.LOAD_ACTIONS,
            created_at__gte=since)
            .values_list("model", flat=True).first())
        if failed:
            return (f"{model} evicted: lemond drops every model after a failed load "
                    f"(the load of {failed} failed)")
        loading = (Slot.objects.filter(node_id=slot.node_id, state=State.LOADING)
                   .exclude(pk=slot.pk).values_list("name", flat=True).first())
        if loading:
            # lemond evicts everything before it retries a failing load, and answers only
            # after the retry: the load's failure is not recorded yet
            return (f"{model} evicted while slot {loading!r} was loading: lemond drops every "
                    "model when a load fails")
        vanished = [name for name in previous if name not in loaded]
        if len(vanished) > 1 and not loaded:
            # no failed load explains it: lemond restarting too fast to be seen down (it
            # reports no uptime) looks exactly like this
            return (f"{model} is gone: lemond dropped every model at once (it restarted, or "
                    "evicted all)")
        return f"{model} unloaded outside hal0 (a direct /v1/unload or another client)"


# --- small helpers -------------------------------------------------------------------------

async def _housekeeping() -> None:
    """Once per slow period: slots left serving by a dead gateway process, idle unload,
    and pruning old gateway metrics."""
    try:
        await sync_to_async(runtime.current().serving.settle)()
    except Exception:
        log.exception("settling serving states failed")
    try:
        await idle.aunload_idle_slots()
    except Exception:
        log.exception("idle unload failed")
    try:
        await sync_to_async(runtime.current().metrics.prune_if_due)()
    except Exception:
        log.exception("pruning gateway metrics failed")


def _fresh_connection() -> None:
    """The loop outlives any request: drop a connection the database closed or that
    CONN_MAX_AGE retired (never inside a transaction, e.g. a test's)."""
    if not connection.in_atomic_block:
        close_old_connections()


_CODE_RE = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def failure_reason(exc: BaseException) -> str:
    """Why a node's poll failed, for its banner and /api/health: the status and a short
    reason hal0 wrote itself, never what answered. Whatever listens at a node's URL may
    be another service, and its error body can hold its secrets."""
    if isinstance(exc, LemonadeBadResponse):
        return f"lemond answered {exc.status} with something that is not lemond's JSON"
    if isinstance(exc, LemonadeHTTPError):
        code = exc.code if isinstance(exc.code, str) and _CODE_RE.fullmatch(exc.code) else ""
        return f"lemond answered {exc.status}" + (f" ({code})" if code else "")
    if isinstance(exc, LemonadeError):
        return str(exc)[:300]  # hal0's own words: unreachable, timed out
    return exc.__class__.__name__


def _enabled_nodes() -> list[Node]:
    _fresh_connection()
    return list(Node.objects.filter(enabled=True))


def _pool_of(slot: Slot) -> str:
    """The lemond type pool a slot's model lives in (normalised: `transcription`)."""
    return LEMOND_TYPE[Capability(slot.capability)]


def _max_loaded(health: Health) -> int | None:
    values = [v for v in health.max_models.values() if isinstance(v, int)]
    return max(values) if values else None


def _entry(loaded: dict[str, LoadedModel] | None, name: str) -> LoadedModel | None:
    """lemond's entry for the model a slot names (`X`, `user.X`, `builtin.X`), found under
    the name lemond publishes for it."""
    if not loaded:
        return None
    published = find_published(name, loaded)
    return loaded[published] if published is not None else None


def _fresh_fields(slot: Slot, entry: LoadedModel, before: LoadedModel | None,
                  polled_at: Any) -> dict[str, Any]:
    """The observed fields of a loaded slot that lemond's entry says changed.

    lemond's `last_use` is steady-clock milliseconds of its own process, not a date: only
    a rise since the previous poll of the same backend (same pid) means the model was used
    since then, and then `polled_at` is when hal0 learnt it."""
    fields: dict[str, Any] = {}
    moving = ("last_use", "is_busy", "is_streaming")
    new_raw = {k: v for k, v in entry.raw.items() if k not in moving}
    old_raw = {k: v for k, v in (slot.lemond_entry or {}).items() if k not in moving}
    if new_raw != old_raw:
        fields["lemond_entry"] = entry.raw
    used = (before is not None and entry.pid == before.pid
            and entry.last_use_ms is not None and before.last_use_ms is not None
            and entry.last_use_ms > before.last_use_ms)
    if used and (slot.last_use_at is None or
                 (polled_at - slot.last_use_at).total_seconds()
                 > settings.HAL0_OBSERVE_RESOLUTION_S):
        fields["last_use_at"] = polled_at
        fields["lemond_entry"] = entry.raw
    return fields


def _pool_warning(slots: list[Slot], health: Health) -> tuple[str, set[str]]:
    """Say so when more keep-loaded/pinned slots share a type pool than lemond keeps;
    returns the warning and the pools it is about."""
    limit = _max_loaded(health)
    if limit is None or limit < 0:
        return "", set()
    pools: dict[str, set[str]] = {}
    names: dict[str, list[str]] = {}
    for slot in slots:
        if slot.enabled and (slot.keep_loaded or slot.pinned):
            pools.setdefault(_pool_of(slot), set()).add(slot.model_name)
            names.setdefault(_pool_of(slot), []).append(slot.name)
    over = {pool for pool, models in pools.items() if len(models) > limit}
    warnings = [
        f"{len(pools[pool])} keep-loaded {pool} slots ({', '.join(names[pool])}) but lemond keeps "
        f"{limit} {pool} model{'s' if limit != 1 else ''} (max_loaded_models): hal0 will "
        "not reload them while they would evict each other"
        for pool in sorted(over)
    ]
    return "; ".join(warnings)[:500], over


def _number(value: Any, digits: int) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return round(float(value), digits)


def _rounded_system(data: Any, info: Any = None, version: str = "") -> dict | None:
    """CPU/RAM/VRAM in use rounded to what the header shows, so noise is not a write, plus
    the totals of `/v1/system-info` (`hardware.totals`: RAM, VRAM, GTT, model disk)."""
    if not isinstance(data, dict):
        return None
    keys = {"cpu_percent": 0, "memory_gb": 1, "gpu_percent": 0, "vram_gb": 1, "npu_percent": 0}
    out = {k: _number(data.get(k), d) for k, d in keys.items() if k in data}
    out.update(hardware.totals(info, version))  # an error or odd answer: no totals
    return out


def _rounded_requests(data: Any) -> dict | None:
    if not isinstance(data, dict):
        return None
    out: dict[str, Any] = {}
    for key, digits in (("tokens_per_second", 1), ("time_to_first_token", 3)):
        value = _number(data.get(key), digits)
        if value is not None:
            out[key] = value
    for key in ("request_count_total", "output_tokens_total"):
        if isinstance(data.get(key), int):
            out[key] = data[key]
    return out


def _lease_retry_s() -> float:
    """How often leases are looked at: renewals are due every TTL/3, takeovers are tried
    every second (so a dead holder is replaced within TTL + 1 s)."""
    return min(1.0, leases.ttl_s() / 3)


async def run_forever(standalone: bool = False) -> None:
    """The reconciler loop for this process (`manage.py serve` and `manage.py reconcile`).

    Standalone, or with a Redis channel layer, dashboards live in other processes: poll at
    the active rate rather than guess whether anyone is watching."""
    await Reconciler(always_active=standalone or bool(settings.REDIS_URL)).run_forever()
