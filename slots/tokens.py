"""API tokens for the OpenAI gateway and the JSON API: create, verify, revoke.

A token is `hal0_` + 32 random bytes (urlsafe base64). Only its SHA-256 is stored: a token
has 256 bits of entropy, so a slow password hash would buy nothing and cost every request.
The token itself is shown once, when created, and is never logged.

Verification is on the gateway's hot path, so verified hashes are cached in memory for
`HAL0_TOKEN_CACHE_S` seconds (default 10): a revocation or an edit of the allowed slots made
in another process takes effect within that time; one made in this process (admin, CLI in
`serve`'s process) clears the cache at once. Expiry is checked on every request, cached or
not. `last_used_at` is written in the background (see `slots.metrics`), at most once a
minute per token.
"""

from __future__ import annotations

import hashlib
import secrets
import time
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


# hash -> (Principal or None, monotonic deadline)
_cache: dict[str, tuple[Principal | None, float]] = {}
# token id -> monotonic time of the last `last_used_at` write we queued
_used: dict[int, float] = {}
_pending_used: dict[int, datetime] = {}


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
                 listed: str | list[str] | None = None,
                 expires_days: float | None = None, expires_at: datetime | None = None,
                 created_by: str = "") -> tuple[ApiToken, str]:
    """Create a token; returns (row, raw token). The raw token is not stored anywhere."""
    raw = generate()
    if expires_days is not None and expires_at is None:
        expires_at = timezone.now() + timedelta(days=expires_days)
    token = ApiToken(name=name, prefix=raw[: len(PREFIX) + 6], key_hash=hash_token(raw),
                     slots=parse_slots(slots), listed=parse_slots(listed),
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
                     expires_at=token.expires_at, listed=tuple(token.listed_names))


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


def _accept(principal: Principal | None) -> Principal | None:
    if principal is None or principal.expired:
        return None
    now = time.monotonic()
    if now - _used.get(principal.id, -LAST_USED_EVERY_S) >= LAST_USED_EVERY_S:
        _used[principal.id] = now
        _pending_used[principal.id] = timezone.now()
    return principal


def verify(raw: str) -> tuple[Principal | None, str]:
    """(principal, "") or (None, why): "missing", "invalid", "expired". Sync (may query)."""
    if not raw:
        return None, "missing"
    key_hash = hash_token(raw)
    found, principal = _cached(key_hash)
    if not found:
        principal = _lookup(key_hash)
        _remember(key_hash, principal)
    return _why(principal)


async def averify(raw: str) -> tuple[Principal | None, str]:
    """`verify` for async views: a cache hit never leaves the event loop."""
    if not raw:
        return None, "missing"
    key_hash = hash_token(raw)
    found, principal = _cached(key_hash)
    if not found:
        principal = await sync_to_async(_lookup)(key_hash)
        _remember(key_hash, principal)
    return _why(principal)


def _why(principal: Principal | None) -> tuple[Principal | None, str]:
    if principal is None:
        return None, "invalid"
    if principal.expired:
        return None, "expired"
    return _accept(principal), ""


def authenticate(raw: str) -> Principal | None:
    """The principal for a raw bearer token, or None (unknown, revoked or expired).
    Used by `slots.api` for its bearer-token path."""
    return verify(raw)[0]


def flush_last_used() -> int:
    """Write queued `last_used_at` stamps (called by the metrics flusher, off the request
    path). Returns how many tokens were updated."""
    pending = dict(_pending_used)
    for key in pending:
        _pending_used.pop(key, None)
    for token_id, when in pending.items():
        ApiToken.objects.filter(pk=token_id).update(last_used_at=when)
    return len(pending)
