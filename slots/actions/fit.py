"""The fit check: before a load, a swap or a download, what it needs, what is free, which
models lemond's LRU would evict, and a refusal when it would evict a pinned or
keep-loaded slot or a download does not fit on the model disk.

`plan()` asks lemond (health and the model's catalogue row, short timeouts) and computes
`slots.capacity.compute`; `check()` raises the refusal as `slot.wont_fit`. The lifecycle
and download actions call `check()`, so every entry point — pages, the JSON API, the CLI,
the gateway's on-demand loads — gets it; `?dry_run=1` and `slots load --dry-run` answer
`plan()` without acting. When lemond cannot be asked nothing is refused: the action itself
then reports lemond's state.
"""

from __future__ import annotations

from typing import Any

import providers
from providers.lemonade.errors import LemonadeError, LemonadeNotFound

from ..capacity import Plan, compute
from ..models import Slot
from .errors import SlotError, get_slot

ACTIONS = ("load", "swap", "download")


def plan(slot: Slot | str, model: str | None = None, *, action: str = "load",
         entry: dict | None = None, health: Any = None) -> Plan:
    """The plan for `action` of `model` (default: the slot's own) on the slot. `entry` and
    `health`, when the caller has them (the picker lists every model), save the calls."""
    if action not in ACTIONS:
        raise SlotError("slot.config_error", f"There is no fit check for {action!r}; only "
                        f"{', '.join(ACTIONS)}.", getattr(slot, "name", str(slot)))
    slot = get_slot(slot)
    model = (model or slot.model_name).strip()
    client = providers.get().client(slot.node)
    try:
        if health is None:
            health = client.health()
        if entry is None:
            try:
                entry = client.model(model)
            except LemonadeNotFound:
                entry = None
    except LemonadeError:
        health = None
    slots = list(Slot.objects.filter(node_id=slot.node_id))
    return compute(slot, model, action, entry=entry, health=health,
                   stats=slot.node.system_stats or {}, slots=slots)


def check(slot: Slot, model: str | None = None, *, action: str = "load") -> Plan:
    """`plan()`, raising its refusal (`slot.wont_fit`, HTTP 409) with the reason."""
    result = plan(slot, model, action=action)
    if result.refusal:
        raise SlotError("slot.wont_fit", f"Refused: {result.refusal}", slot.name)
    return result
