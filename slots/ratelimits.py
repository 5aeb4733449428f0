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
from typing import NamedTuple

from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage as AsyncRedisStorage
from limits.storage import MemoryStorage


class Window(NamedTuple):
    """One limit as a response reports it (a named tuple: built twice per limited request,
    where a frozen dataclass costs several times as much)."""

    kind: str  # "requests" or "tokens"
    limit: int
    remaining: int
    reset_at: float  # time.time() when the window resets

    def reset_in(self, now: float | None = None) -> float:
        return max(0.0, self.reset_at - (time.time() if now is None else now))

    def retry_after(self, now: float | None = None) -> int:
        """Whole seconds, at least 1 (Retry-After takes no fractions)."""
        return max(1, math.ceil(self.reset_in(now)))


class Verdict(NamedTuple):
    """What `RateLimits.admit` decided: the windows the token has and the one that refused
    it (None: admitted). A 2-tuple, like `slots.gateway.limits.admit`'s answer (verdict,
    refusal): do not unpack one for the other."""

    windows: tuple[Window, ...]
    refused: Window | None = None


WINDOW_S = 60  # both limits are per minute

@functools.lru_cache(maxsize=4096)
def _key(kind: str, limit: int, token_id: int) -> str:
    """The storage key of a token's window, kind "rpm" or "tpm": `limits`' own key for a
    per-minute item of that size (e.g. `hal0-rpm/7/100/1/minute`). Cached (bounded,
    immutable values): building the item and its key costs more than the counting."""
    return RateLimitItemPerMinute(limit, namespace=f"hal0-{kind}").key_for(str(token_id))


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


# `limits` wraps a storage's methods in its error translation once per class, so a subclass
# has them wrapped twice; the parent's (wrapped once) do the same for a fraction of the calls.
for _name in ("incr", "get", "get_expiry", "clear"):
    # what is replaced must be limits' wrapper of the parent's method, never a method
    # defined in `_LazyMemoryStorage` itself
    _own = vars(_LazyMemoryStorage)[_name]
    assert _own.__wrapped__ is getattr(MemoryStorage, _name), f"_LazyMemoryStorage.{_name}"
    setattr(_LazyMemoryStorage, _name, getattr(MemoryStorage, _name))


def _verdict(rpm: int | None, tpm: int | None, requests: tuple[int, float] | None,
             tokens: tuple[int, float] | None) -> Verdict:
    """The windows from what the storage counted: `requests` (requests in the window,
    this one included when it was counted; reset) and `tokens` (tokens charged; reset)."""
    windows = []
    refused = None
    if requests is not None and rpm:
        count, reset = requests
        window = Window("requests", rpm, max(0, rpm - count), reset)
        windows.append(window)
        if count > rpm:
            refused = window
    if tokens is not None and tpm:
        used, reset = tokens
        window = Window("tokens", tpm, max(0, tpm - used), reset)
        windows.append(window)
        if used >= tpm:  # spent: refused, and the request was not counted
            refused = window
    return Verdict(tuple(windows), refused)


class RateLimits:
    """The token windows of one process: memory, or Redis shared by every process."""

    def __init__(self, redis_url: str = "", key_prefix: str = "hal0") -> None:
        self.redis_url = redis_url
        self.key_prefix = f"{key_prefix}:limits"
        self._memory: _LazyMemoryStorage | None = None
        self._aio: tuple[asyncio.AbstractEventLoop, AsyncRedisStorage] | None = None
        self._charges: set[asyncio.Task] = set()  # Redis charges in flight (kept referenced)

    @property
    def shared(self) -> bool:
        return bool(self.redis_url)

    def _memory_storage(self) -> _LazyMemoryStorage:
        # built on first use
        if self._memory is None:
            self._memory = _LazyMemoryStorage()
        return self._memory

    def _redis_storage(self) -> AsyncRedisStorage:
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            url = self.redis_url if self.redis_url.startswith("async+") \
                else f"async+{self.redis_url}"
            self._aio = (loop, AsyncRedisStorage(url, implementation="redispy",
                                                 key_prefix=self.key_prefix))
        return self._aio[1]

    # --- the request path -----------------------------------------------------------------
    # A fixed window, as `limits`' FixedWindowRateLimiter counts it, read and counted through
    # the storage directly: the strategy's `hit` and `get_window_stats` read each key again
    # (with both limits five storage calls per request where four do, with one three for two; on the event loop each one
    # is latency for every request in flight).
    async def admit(self, token_id: int, rpm: int | None, tpm: int | None) -> Verdict:
        """Count one request for the token; refused when its request window is full or its
        token window spent (a request refused for tokens is not counted as a request)."""
        if not self.shared:
            return self.admit_here(token_id, rpm, tpm)
        storage = self._redis_storage()
        tokens = requests = None
        if tpm:
            key = _key("tpm", tpm, token_id)
            tokens = (await storage.get(key), await storage.get_expiry(key))
        if rpm:
            key = _key("rpm", rpm, token_id)
            count = await storage.get(key) if tokens and tokens[0] >= tpm \
                else await storage.incr(key, WINDOW_S)
            requests = (count, await storage.get_expiry(key))
        return _verdict(rpm, tpm, requests, tokens)

    def admit_here(self, token_id: int, rpm: int | None, tpm: int | None) -> Verdict:
        """`admit` with this process's windows (no REDIS_URL): the same steps, synchronous."""
        storage = self._memory_storage()
        tokens = requests = None
        if tpm:
            key = _key("tpm", tpm, token_id)
            tokens = (storage.get(key), storage.get_expiry(key))
        if rpm:
            key = _key("rpm", rpm, token_id)
            count = storage.get(key) if tokens and tokens[0] >= tpm \
                else storage.incr(key, WINDOW_S)
            requests = (count, storage.get_expiry(key))
        return _verdict(rpm, tpm, requests, tokens)

    def charge(self, token_id: int, tpm: int, used: int) -> None:
        """Charge a finished response's tokens to the token's window (from the event loop
        or a thread; with Redis it is sent in the background)."""
        if used <= 0:
            return
        key = _key("tpm", tpm, token_id)
        if not self.shared:
            self._memory_storage().incr(key, WINDOW_S, amount=used)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a dropped stream finalized outside the loop: nothing to send on
            return
        task = loop.create_task(self._redis_storage().incr(key, WINDOW_S, amount=used))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def settle(self) -> None:
        """Wait for the charges still on their way to Redis (tests, shutdown)."""
        if self._charges:
            await asyncio.gather(*self._charges, return_exceptions=True)
