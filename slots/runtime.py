"""The process's state, in one object: `Runtime`.

`manage.py serve`, `manage.py reconcile` and the tests build one, `start()` it and
`stop(grace)` it. It owns:

* the executors: `actions` (lifecycle actions started from pages and the reconciler),
  `gateway_loads` (on-demand loads a gateway request waits for) and `db` (the gateway's
  cache misses and the reconciler's database pass, so neither queues behind the other on
  asgiref's single shared thread). Their threads are daemons: one may wait minutes on
  lemond, and an exiting process records that action as interrupted instead of waiting;
* the actions running in this process (what `stop` records as interrupted) and the busy
  leases that tell other processes they are running (`slots.busy`);
* the serving tracker (`slots.serving`): in-flight counts, serving leases, the mirror;
* the metrics buffer and its writer (`slots.metrics`), and tokens' last-used stamps;
* the live pages' side (`slots.live`): the websockets' loop, viewers, pushes in flight;
* the model downloads running on the event loop (`slots.actions.pulls`) and the loads
  gateway requests share (`slots.gateway`);
* the gateway's per-token rate-limit windows (`slots.ratelimits`) and per-slot fair
  queues (`slots.admission`).

Everything else at module level in `slots` is a constant or a cache documented as one.
A process that never built a runtime (a management command, the admin under `runserver`)
gets a default one on first use of `current()`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection

from . import activity, admission, busy, live, metrics, ratelimits, tokens
from .actions.errors import SlotError
from .serving import ServingTracker

log = logging.getLogger("hal0.runtime")

P = ParamSpec("P")
T = TypeVar("T")


class DaemonExecutor(Executor):
    """A thread pool whose threads the interpreter does not join at exit.

    `ThreadPoolExecutor` joins its threads when the interpreter exits, and a thread may be
    waiting on lemond for HAL0_LEMONADE_LOAD_TIMEOUT: systemd would kill hal0 first, with
    nothing recorded. `Runtime.stop` records what is still running instead and the process
    exits without waiting. Threads start on demand, up to `max_workers`.
    """

    def __init__(self, max_workers: int, name: str):
        self._max = max(1, max_workers)
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"{self._name}: cannot schedule work after shutdown")
            future: Future[T] = Future()
            self._queue.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}-{len(self._threads)}")
                thread.start()
                self._threads.append(thread)
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # the caller sees it on the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()


@dataclass
class RunningAction:
    """An action this process runs on a slot: what `stop` records if it is cut off."""

    slot_name: str
    action: str
    # records the action as interrupted, with why, unless it finished after all
    interrupt: Callable[[str], None]


class Runtime:
    """The state of one hal0 process (see the module docstring)."""

    def __init__(self, *, own_db_thread: bool = True):
        """`own_db_thread=False` (tests on a test-case transaction) runs database passes on
        asgiref's thread-sensitive thread, which shares the test's connection."""
        self.actions = DaemonExecutor(settings.HAL0_BACKGROUND_WORKERS, "hal0-action")
        # a load waits minutes on a thread: its own pool, so loads never starve anything
        self.gateway_loads = DaemonExecutor(8, "hal0-gw-load")
        self.db: DaemonExecutor | None = DaemonExecutor(2, "hal0-db") if own_db_thread \
            else None
        self.pending: set[Future] = set()
        self.running: dict[int, RunningAction] = {}
        self.busy = busy.BusyClaims()
        self.live = live.Live()
        self.serving = ServingTracker(self.live)
        self.token_stamps = tokens.TokenStamps()
        self.metrics = metrics.MetricsBuffer(
            serving=self.serving, stamps=self.token_stamps,
            on_written=lambda batch: activity.push_batch(self.live, batch,
                                                         self.metrics.pending()))
        self.pulls: dict[tuple[int, str], asyncio.Task] = {}
        # slot pk -> the load gateway requests for it wait on (one per slot per process)
        self.gateway_loads_running: dict[int, asyncio.Future] = {}
        # per-token request/token windows (Redis when REDIS_URL is set) and per-slot queues
        self.rate_limits = ratelimits.RateLimits(
            settings.REDIS_URL, key_prefix=f"{settings.HAL0_REDIS_PREFIX}:hal0")
        self.admission = admission.Admission(self.live)
        self.stopped = False

    # --- lifetime ------------------------------------------------------------------------
    def start(self) -> Runtime:
        """Make this the process's runtime (what `current()` returns)."""
        _installed[0] = self
        return self

    def stop(self, grace: float) -> bool:
        """After SIGTERM or Ctrl-C (or at the end of a test): give this process's serving
        leases back, wait up to `grace` seconds for the actions it runs, then record those
        still waiting on lemond as interrupted (lemond finishes them by itself; the next poll
        adopts a model that got loaded) so no slot stays `loading` until it goes stale.
        Returns True when actions were interrupted (their threads still wait on lemond;
        they are daemons, so the process exits anyway)."""
        self.stopped = True
        self.serving.release_leases()
        deadline = time.monotonic() + grace
        wait(list(self.pending), timeout=grace)
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)  # gateway loads run on a pool of their own
        interrupted = list(self.running.values())
        for entry in interrupted:
            entry.interrupt("hal0 stopped")
            log.warning("slot %s: %s interrupted by shutdown; lemond finishes it by itself",
                        entry.slot_name, entry.action)
        # recorded: the busy states are settled, nobody need wait for this process
        self.busy.close()
        for task in self.pulls.values():
            task.cancel()
        self.metrics.stop()
        if self.metrics.pending():
            try:  # what the last seconds measured, best effort
                self.metrics.flush()
            except Exception:
                log.warning("could not write the last gateway metrics at exit")
        for executor in (self.actions, self.gateway_loads, self.db):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        if _installed[0] is self:
            _installed[0] = None
        return bool(interrupted)

    # --- running work --------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run an action on the action pool and return at once (loads take minutes).

        The worker closes its database connection when done. A `SlotError` is already
        recorded on the slot by the action; it is logged here and left on the future.
        """
        name = getattr(fn, "__name__", repr(fn))

        def run() -> T:
            try:
                return fn(*args, **kwargs)
            except SlotError as exc:
                log.info("background %s: %s", name, exc)
                raise
            except Exception:
                log.exception("background %s crashed", name)
                raise
            finally:
                connection.close()

        future = self.actions.submit(run)
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)
        return future

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait for every action started with `submit`; True when all finished in time."""
        _, not_done = wait(list(self.pending), timeout=timeout)
        return not not_done

    async def run_db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a short database function off the event loop, on the runtime's own database
        thread (never behind asgiref's single shared thread)."""
        if self.db is None:
            return await sync_to_async(fn, thread_sensitive=True)(*args, **kwargs)

        def run() -> T:
            # the thread lives on: keep its connection unless the database dropped it or
            # CONN_MAX_AGE retired it
            close_old_connections()
            return fn(*args, **kwargs)

        return await sync_to_async(run, thread_sensitive=False, executor=self.db)()


# The one process-wide reference: set by `Runtime.start`, read by `current()`.
_installed: list[Runtime | None] = [None]
_install_lock = threading.Lock()


def current() -> Runtime:
    """This process's runtime (a default one if nobody built one)."""
    runtime = _installed[0]
    if runtime is None:
        with _install_lock:
            runtime = _installed[0]
            if runtime is None:
                runtime = Runtime().start()
    return runtime
