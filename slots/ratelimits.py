"""Per-token rate limits: requests per minute and tokens per minute (owned by the `Runtime`).

A token's `rpm_limit` and `tpm_limit` (null = unlimited) are counted in one-minute fixed
windows of the `limits` library, keyed by the token's id: in this process's memory, or in
Redis when REDIS_URL is set, so that several `serve` processes share one count.

* Requests: each admitted request hits the token's request window; the hit that passes the
  limit is refused (429).
* Tokens: a response's input + output tokens (its `usage`, or llama.cpp's `timings`) are
  charged to the token's token window after the response; a request is refused while that
  window is already spent. A response is never cut off: one long answer may take the
  window past its limit, and the next requests wait for the window to reset (OpenAI's
  behaviour too).

A changed limit starts a fresh window (the window's key names its size).

The memory storage is `limits`' thread-safe synchronous one (a dict and a lock: cheaper on
the event loop than its asyncio twin, whose expiry task is bound to one loop), with its
expiry made lazy (`_LazyMemoryStorage`: `limits` starts a new timer thread after almost
every hit otherwise); Redis goes
through `limits`' asyncio storage on redis-py (the client channels-redis already uses),
one per event loop, since a redis-py asyncio connection is bound to its loop.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import RedisStorage as AsyncRedisStorage
from limits.aio.strategies import FixedWindowRateLimiter as AsyncFixedWindow
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter


@dataclass(frozen=True, slots=True)
class Window:
    """One limit as a response reports it."""

    kind: str  # "requests" or "tokens"
    limit: int
    remaining: int
    reset_at: float  # time.time() when the window resets

    def reset_in(self, now: float | None = None) -> float:
        return max(0.0, self.reset_at - (time.time() if now is None else now))

    def retry_after(self, now: float | None = None) -> int:
        """Whole seconds, at least 1 (Retry-After takes no fractions)."""
        return max(1, math.ceil(self.reset_in(now)))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `RateLimits.admit` decided: the windows the token has and the one that refused
    it (None: admitted)."""

    windows: tuple[Window, ...]
    refused: Window | None = None


# a cache of immutable items, one per limit value in use (bounded)
@functools.lru_cache(maxsize=1024)
def _requests(limit: int) -> RateLimitItem:
    return RateLimitItemPerMinute(limit, namespace="hal0-rpm")


@functools.lru_cache(maxsize=1024)
def _tokens(limit: int) -> RateLimitItem:
    return RateLimitItemPerMinute(limit, namespace="hal0-tpm")


class _LazyMemoryStorage(MemoryStorage):
    """`limits`' MemoryStorage without a thread per hit. Its `incr` schedules the sweep of
    expired keys on a `threading.Timer` of 10 ms whenever none is alive: under a steady
    stream of limited requests that starts a new OS thread up to 100 times a second, each
    taking the GIL from the event loop (measured: +1.4 ms at p50 with 16 clients,
    docs/benchmarks.md). Nothing needs the sweep for correctness (`get`, which every
    `incr` and every window read call first, drops an expired key itself); it only keeps
    the dict of a token that stopped sending from lingering. So it runs inline, at most
    once per SWEEP_EVERY_S, on whichever call comes then."""

    SWEEP_EVERY_S = 60.0  # the shortest window hal0 uses (per minute): one sweep each

    def __init__(self) -> None:
        super().__init__()  # its one initial timer: 10 ms, once
        self._next_sweep = time.monotonic() + self.SWEEP_EVERY_S

    # the name MemoryStorage calls (its private hook, name-mangled)
    def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_EVERY_S
            self._MemoryStorage__expire_events()  # type: ignore[attr-defined]


class _Memory:
    """The synchronous in-memory limiter behind the asyncio limiter's interface."""

    __slots__ = ("limiter",)

    def __init__(self, limiter: FixedWindowRateLimiter) -> None:
        self.limiter = limiter

    async def hit(self, item: RateLimitItem, key: str, cost: int = 1) -> bool:
        return self.limiter.hit(item, key, cost=cost)

    async def get_window_stats(self, item: RateLimitItem, key: str) -> tuple[float, int]:
        return tuple(self.limiter.get_window_stats(item, key))  # type: ignore[return-value]


class RateLimits:
    """The token windows of one process: memory, or Redis shared by every process."""

    def __init__(self, redis_url: str = "", key_prefix: str = "hal0") -> None:
        self.redis_url = redis_url
        self.key_prefix = f"{key_prefix}:limits"
        self._memory: _Memory | None = None
        self._aio: tuple[asyncio.AbstractEventLoop, AsyncFixedWindow] | None = None
        self._charges: set[asyncio.Task] = set()  # Redis charges in flight (kept referenced)

    @property
    def shared(self) -> bool:
        return bool(self.redis_url)

    def _memory_limiter(self) -> _Memory:
        # built on first use
        if self._memory is None:
            self._memory = _Memory(FixedWindowRateLimiter(_LazyMemoryStorage()))
        return self._memory

    def _redis_limiter(self) -> AsyncFixedWindow:
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            url = self.redis_url if self.redis_url.startswith("async+") \
                else f"async+{self.redis_url}"
            storage = AsyncRedisStorage(url, implementation="redispy",
                                        key_prefix=self.key_prefix)
            self._aio = (loop, AsyncFixedWindow(storage))
        return self._aio[1]

    # --- the request path -----------------------------------------------------------------
    async def admit(self, token_id: int, rpm: int | None, tpm: int | None) -> Verdict:
        """Count one request for the token; refused when its request window is full or its
        token window spent (a request refused for tokens is not counted as a request)."""
        key = str(token_id)
        windows: _Memory | AsyncFixedWindow = \
            self._redis_limiter() if self.shared else self._memory_limiter()
        requests: Window | None = None
        tokens: Window | None = None
        refused: Window | None = None
        if tpm:
            reset, remaining = await windows.get_window_stats(_tokens(tpm), key)
            tokens = Window("tokens", tpm, remaining, reset)
            if remaining <= 0:
                refused = tokens
        if rpm:
            item = _requests(rpm)
            allowed = refused is not None or await windows.hit(item, key)
            reset, remaining = await windows.get_window_stats(item, key)
            requests = Window("requests", rpm, remaining, reset)
            if not allowed:
                refused = requests
        return Verdict(tuple(w for w in (requests, tokens) if w is not None), refused)

    def charge(self, token_id: int, tpm: int, used: int) -> None:
        """Charge a finished response's tokens to the token's window (from the event loop
        or a thread; with Redis it is sent in the background)."""
        if used <= 0:
            return
        if not self.shared:
            self._memory_limiter().limiter.hit(_tokens(tpm), str(token_id), cost=used)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a dropped stream finalized outside the loop: nothing to send on
            return
        task = loop.create_task(self._redis_limiter().hit(_tokens(tpm), str(token_id),
                                                          cost=used))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def settle(self) -> None:
        """Wait for the charges still on their way to Redis (tests, shutdown)."""
        if self._charges:
            await asyncio.gather(*self._charges, return_exceptions=True)
