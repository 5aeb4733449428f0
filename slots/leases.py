"""Leases in the database: who may do a job only one process at a time should do.

The reconciler takes one lease per lemond node (`reconciler:<node>`), so that with several
hal0 processes (two `serve --no-reconciler` and one or more `manage.py reconcile`, or several
`serve` each with its reconciler) exactly one of them polls a node and writes what it sees.
A holder renews its lease every few seconds; a holder that dies (SIGKILL, power loss) stops
renewing and another process takes the lease over once it has expired. The same rows
record which process owns a slot's busy state (`busy:<slot pk>`, slots.busy) and which
gateway processes serve a slot (`serving:…`, slots.serving).

* Acquire and renew are one conditional UPDATE (`expires_at < now OR holder = me`), atomic
  in PostgreSQL and SQLite alike, and an INSERT for a lease that does not exist yet (the
  unique name makes a second INSERT fail, so only one process creates it).
* Times are the **database's** clock (`Now()`), not the processes': several boxes with
  skewed clocks still agree on when a lease expired.
* A holder id is `hostname:pid:random`. A lease left behind by a dead process on this same
  host (e.g. `serve` restarted after a crash) is taken at once instead of after its TTL,
  so the embedded default never waits for itself. (This assumes hal0 boxes have distinct
  host names; set `HAL0_HOSTNAME` where they do not, e.g. in containers.)
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models.functions import Now

from .models import Lease

PREFIX = "reconciler:"


def ttl_s() -> float:
    """`HAL0_LEASE_TTL_S` (default 10 s): a dead holder's lease is taken over after this
    (plus at most a second). Holders renew every third of it."""
    return max(float(settings.HAL0_LEASE_TTL_S), 0.5)


def new_holder_id() -> str:
    # HAL0_HOSTNAME: for containers that share a host name (and for tests of two "boxes")
    host = os.environ.get("HAL0_HOSTNAME") or socket.gethostname()
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


def node_lease(node_name: str) -> str:
    return f"{PREFIX}{node_name}"


def _expiry(ttl: float) -> models.Expression:
    return models.ExpressionWrapper(Now() + timedelta(seconds=ttl),
                                    output_field=models.DateTimeField())


def acquire(name: str, holder: str, ttl: float) -> bool:
    """Take or renew the lease `name` for `ttl` seconds; True when `holder` now holds it."""
    taken = Lease.objects.filter(name=name).filter(
        models.Q(expires_at__lt=Now()) | models.Q(holder=holder),
    ).update(holder=holder, expires_at=_expiry(ttl))
    if taken:
        return True
    current = Lease.objects.filter(name=name).values_list("holder", flat=True).first()
    if current is None:
        try:
            with transaction.atomic():
                Lease.objects.create(name=name, holder=holder, expires_at=_expiry(ttl))
            return True
        except IntegrityError:  # another process created it first
            return False
    if _dead_local_holder(current, holder):
        # compare-and-swap on the dead holder: of two processes racing here, one wins
        return bool(Lease.objects.filter(name=name, holder=current)
                    .update(holder=holder, expires_at=_expiry(ttl)))
    return False


def take(name: str, holder: str, ttl: float) -> None:
    """Take the lease `name` whoever holds it. Only for a caller that has already won what
    the lease stands for, in the same transaction (a busy slot's compare-and-swap): an
    earlier holder's row is left over from an action that ended or died."""
    if not Lease.objects.filter(name=name).update(holder=holder, expires_at=_expiry(ttl)):
        Lease.objects.create(name=name, holder=holder, expires_at=_expiry(ttl))


def renew(names: list[str], holder: str, ttl: float) -> int:
    """Extend the leases `holder` still holds among `names`; returns how many."""
    return Lease.objects.filter(name__in=names, holder=holder).update(expires_at=_expiry(ttl))


def gone(names: list[str]) -> dict[str, str]:
    """Of the leases `names`, those whose holder is gone (name -> holder): expired, or held
    by a process of this host that no longer runs (known at once, without the TTL)."""
    me = new_holder_id()
    expired = models.ExpressionWrapper(models.Q(expires_at__lt=Now()),
                                       output_field=models.BooleanField())
    rows = Lease.objects.filter(name__in=names).annotate(expired=expired) \
        .values_list("name", "holder", "expired")
    return {name: holder for name, holder, is_expired in rows
            if is_expired or _dead_local_holder(holder, me)}


def release(names: list[str], holder: str) -> int:
    """Give leases up (a clean shutdown): another process may take them at once."""
    return Lease.objects.filter(name__in=names, holder=holder).delete()[0]


def holders(prefix: str = PREFIX) -> dict[str, str]:
    """Unexpired leases under `prefix`: name without the prefix -> holder."""
    rows = Lease.objects.filter(name__startswith=prefix, expires_at__gte=Now()) \
        .values_list("name", "holder")
    return {name[len(prefix):]: holder for name, holder in rows}


def _dead_local_holder(current: str, me: str) -> bool:
    host, _, rest = current.partition(":")
    pid_text = rest.partition(":")[0]
    if host != me.partition(":")[0] or not pid_text.isdigit() or current == me:
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
