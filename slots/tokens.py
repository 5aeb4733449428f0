"""API tokens for the OpenAI gateway and the JSON API: create, verify, revoke.

A token is `hal0_` + 32 random bytes (urlsafe base64). Only its SHA-256 is stored: a token
has 256 bits of entropy, so a slow password hash would buy nothing and cost every request.
The token itself is shown once, when created, and is never logged.

Verification is on the gateway's hot path, so verified hashes are cached in memory for
`HAL0_TOKEN_CACHE_S` seconds (default 10; `_cache` is a documented cache): a revocation or an edit of the allowed slots made
in another process takes effect within that time; one made in this process (admin, CLI in
`serve`'s process) clears the cache at once. Expiry is checked on every request, cached or
not. `last_used_at` is written in the background by the metrics writer, at most once a
minute per token: the process's `TokenStamps` (owned by its `Runtime`) queue the stamps.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .models import ApiToken

PREFIX = "hal0_"
# unknown hashes are remembered too (briefly), so a client retrying a bad key in a loop
# costs a dict lookup rather than a query; bounded so garbage cannot grow memory.
NEGATIVE_TTL_S = 2.0
CACHE_MAX = 4096
LAST_USED_EVERY_S = 60.0


@dataclass(frozen=True)
class Principal:
    """What a verified token allows; a plain snapshot, safe to share between requests."""

    id: int
    name: str
    allowed: tuple[str, ...]
    expires_at: datetime | None
    listed: tuple[str, ...] = ()  # slot names or capabilities GET /v1/models shows
    may_manage: bool = False  # may load and unload its slots (POST /models/load, /unload)
    rpm_limit: int | None = None  # requests per minute (None: unlimited)
    tpm_limit: int | None = None  # input + output tokens per minute (None: unlimited)

    @property
    def limited(self) -> bool:
        """Whether the gateway counts this token's requests (slots.ratelimits)."""
        return bool(self.rpm_limit or self.tpm_limit)

    def allows_slot(self, slot_name: str) -> bool:
        return not self.allowed or slot_name in self.allowed

    def lists_slot(self, slot_name: str, capability: str) -> bool:
        """Whether GET /v1/models shows this slot to the token (a picker's view; what the
        token may use is `allows_slot`)."""
        return self.allows_slot(slot_name) and (
            not self.listed or slot_name in self.listed or capability in self.listed)

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    def get_username(self) -> str:  # events record the actor as "token:<name>"
        return f"token:{self.name}"


# A cache: hash -> (Principal or None, monotonic deadline). Bounded, cleared on changes.
_cache: dict[str, tuple[Principal | None, float]] = {}


class TokenStamps:
    """Tokens' `last_used_at`, queued on the request path and written by the metrics
    writer (`flush`), at most once a minute per token."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._used: dict[int, float] = {}  # token id -> clock time of the last stamp queued
        self._pending: dict[int, datetime] = {}

    def note(self, token_id: int) -> None:
        now = self._clock()
        with self._lock:
            last = self._used.get(token_id)
            if last is None or now - last >= LAST_USED_EVERY_S:
                self._used[token_id] = now
                self._pending[token_id] = timezone.now()

    def flush(self) -> int:
        """Write the queued stamps; returns how many tokens were updated."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for token_id, when in pending.items():
            ApiToken.objects.filter(pk=token_id).update(last_used_at=when)
        return len(pending)


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def clear_cache() -> None:
    _cache.clear()


def parse_slots(value: str | list[str] | tuple[str, ...] | None) -> str:
    if not value:
        return ""
    items = value.split(",") if isinstance(value, str) else value
    return ",".join(dict.fromkeys(s.strip() for s in items if s and s.strip()))


def create_token(name: str, *, slots: str | list[str] | None = None,
                 listed: str | list[str] | None = None, may_manage: bool = False,
                 rpm_limit: int | None = None, tpm_limit: int | None = None,
                 expires_days: float | None = None, expires_at: datetime | None = None,
                 created_by: str = "") -> tuple[ApiToken, str]:
    """Create a token; returns (row, raw token). The raw token is not stored anywhere."""
    raw = generate()
    if expires_days is not None and expires_at is None:
        expires_at = timezone.now() + timedelta(days=expires_days)
    token = ApiToken(name=name, prefix=raw[: len(PREFIX) + 6], key_hash=hash_token(raw),
                     slots=parse_slots(slots), listed=parse_slots(listed),
                     may_manage=may_manage, rpm_limit=rpm_limit, tpm_limit=tpm_limit,
                     expires_at=expires_at, created_by=created_by)
    token.full_clean()
    token.save()
    return token, raw


def revoke_token(name: str) -> ApiToken:
    """Revoke a token by name (raises ApiToken.DoesNotExist)."""
    with transaction.atomic():
        token = ApiToken.objects.select_for_update().get(name=name)
        if token.revoked_at is None:
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
    clear_cache()
    return token


def _principal(token: ApiToken) -> Principal:
    return Principal(id=token.pk, name=token.name, allowed=tuple(token.allowed_slots),
                     expires_at=token.expires_at, listed=tuple(token.listed_names),
                     may_manage=token.may_manage,
                     rpm_limit=token.rpm_limit, tpm_limit=token.tpm_limit)


def _lookup(key_hash: str) -> Principal | None:
    token = ApiToken.objects.filter(key_hash=key_hash, revoked_at__isnull=True).first()
    return _principal(token) if token else None


def _cached(key_hash: str) -> tuple[bool, Principal | None]:
    hit = _cache.get(key_hash)
    if hit is not None and hit[1] > time.monotonic():
        return True, hit[0]
    return False, None


def _remember(key_hash: str, principal: Principal | None) -> None:
    if len(_cache) >= CACHE_MAX:
        _cache.clear()
    ttl = settings.HAL0_TOKEN_CACHE_S if principal else min(NEGATIVE_TTL_S,
                                                              settings.HAL0_TOKEN_CACHE_S)
    _cache[key_hash] = (principal, time.monotonic() + ttl)


def verify(raw: str, stamps: TokenStamps | None = None) -> tuple[Principal | None, str]:
    """(principal, "") or (None, why): "missing", "invalid", "expired". Sync (may query).
    A valid token's use is noted in `stamps` (the runtime's) when given."""
    if not raw:
        return None, "missing"
    key_hash = hash_token(raw)
    found, principal = _cached(key_hash)
    if not found:
        principal = _lookup(key_hash)
        _remember(key_hash, principal)
    return _why(principal, stamps)


async def averify(raw: str, stamps: TokenStamps | None = None
                  ) -> tuple[Principal | None, str]:
    """`verify` for async views: a cache hit never leaves the event loop."""
    if not raw:
        return None, "missing"
    key_hash = hash_token(raw)
    found, principal = _cached(key_hash)
    if not found:
        principal = await sync_to_async(_lookup)(key_hash)
        _remember(key_hash, principal)
    return _why(principal, stamps)


def _why(principal: Principal | None, stamps: TokenStamps | None
         ) -> tuple[Principal | None, str]:
    if principal is None:
        return None, "invalid"
    if principal.expired:
        return None, "expired"
    if stamps is not None:
        stamps.note(principal.id)
    return principal, ""


def authenticate(raw: str, stamps: TokenStamps | None = None) -> Principal | None:
    """The principal for a raw bearer token, or None (unknown, revoked or expired).
    Used by `slots.api` for its bearer-token path."""
    return verify(raw, stamps)[0]
