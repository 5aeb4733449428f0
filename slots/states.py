"""A slot's observed states and the rules between them: which action is legal from which
state, which states count as loaded or busy, which actions load a model, and when a busy
state is stale (left by a process that died mid-action, when slots.busy cannot tell).

Everything that asks one of these questions asks it here: the actions, the reconciler, the
gateway, the pages and the templates (through `Slot`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class State(models.TextChoices):
    OFFLINE = "offline", "offline"
    PULLING = "pulling", "pulling"
    LOADING = "loading", "loading"
    READY = "ready", "ready"
    SERVING = "serving", "serving"
    UNLOADING = "unloading", "unloading"
    ERROR = "error", "error"


# A model is up: the gateway may forward to it. `serving` only mirrors in-flight requests.
LOADED = frozenset({State.READY, State.SERVING})
# An action is running on the slot and records its own outcome.
BUSY = frozenset({State.PULLING, State.LOADING, State.UNLOADING})
# Actions whose success leaves a model loaded (audit rows, load-time charts, joins).
LOAD_ACTIONS = ("load", "restart", "swap", "restored")
# Seconds past the load timeout before a busy state counts as abandoned: every action
# ends (and records) within HAL0_LEMONADE_LOAD_TIMEOUT; the margin covers its last writes.
STALE_MARGIN_S = 60

_SETTLED = frozenset({State.OFFLINE, State.READY, State.SERVING, State.ERROR})

# Which lifecycle actions are legal from which state. Busy states admit nothing; a load
# during a load joins it (slots.actions.lifecycle).
LEGAL_FROM: dict[str, frozenset[str]] = {
    "load": _SETTLED,
    "unload": _SETTLED,
    "restart": _SETTLED,
    "swap": _SETTLED,
    "pin": frozenset(State.values),
    "unpin": frozenset(State.values),
}


def can(action: str, state: str) -> bool:
    return state in LEGAL_FROM.get(action, ())


def is_loaded(state: str) -> bool:
    return state in LOADED


def stale_after() -> timedelta:
    """How long a busy state may last before another action may take the slot over."""
    return timedelta(seconds=settings.HAL0_LEMONADE_LOAD_TIMEOUT + STALE_MARGIN_S)


def is_stale(state: str, since: datetime, now: datetime | None = None) -> bool:
    """A busy state older than any action could take: its action died with its process,
    nobody will finish it, so it may be taken over (and the reconciler may correct it).
    The last fallback: a busy state whose owner (slots.busy) is known to be gone is
    settled at once; this covers busy states with no owner recorded."""
    return state in BUSY and since < (now or timezone.now()) - stale_after()
