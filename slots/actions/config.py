"""Desired-state actions: create, update and delete slots and nodes.

Nothing here loads a model: a changed slot shows its drift until a lifecycle action runs.
Each change writes its audit row in the same transaction as the change, and dashboards get
the new card, or the whole grid when a card's place changed, after the commit.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

import providers
from providers.lemonade import catalog
from providers.lemonade.errors import LemonadeError
from providers.lemonade.names import resolution_forms

from .. import runtime, states
from ..models import LEMOND_TYPE, Capability, Node, Slot, SlotEvent
from .audit import Actor, actor_name, record, record_node_change
from .errors import SlotError, get_slot, unknown_fields
from .lifecycle import model_wanted_elsewhere

log = logging.getLogger("hal0.actions")

SLOT_FIELDS = {*Slot.DESIRED_FIELDS, "node"}


def _validated(slot: Slot) -> None:
    try:
        slot.full_clean(exclude=["node"] if slot.node_id else None)
    except ValidationError as exc:
        fields = exc.message_dict
        summary = "; ".join(f"{k}: {' '.join(v)}" for k, v in fields.items())
        raise SlotError("slot.config_error", summary, slot.name or None, fields=fields) from None


def _coerce_node(data: dict[str, Any]) -> dict[str, Any]:
    node = data.get("node")
    if isinstance(node, str):
        try:
            data["node"] = Node.objects.get(name=node)
        except Node.DoesNotExist:
            raise SlotError("slot.config_error", f"No node named {node!r}.",
                            data.get("name"), fields={"node": [f"No node named {node!r}."]}) \
                from None
    elif node is None:
        data["node"] = Node.local()
    return data


def too_many_slots(count: int) -> SlotError | None:
    """The error for a change that would leave `count` slots, past HAL0_MAX_SLOTS."""
    cap = settings.HAL0_MAX_SLOTS
    if count <= cap:
        return None
    return SlotError("slot.too_many", f"hal0 keeps at most {cap} slots (HAL0_MAX_SLOTS); "
                     "delete some, or raise the limit.")


@dataclass(frozen=True)
class ModelCheck:
    """What lemond's catalogue says about a slot's model: `error` refuses the save,
    `note` is shown beside a save that went ahead (lemond could not be asked)."""

    error: str = ""
    note: str = ""
    suggestions: tuple[str, ...] = ()


def check_model(node: Node, model: str, capability: str) -> ModelCheck:
    """Is `model` in the node's catalogue (built-in, imported or a user model: lemond's
    `/v1/models?show_all=true`)? If not, the closest names (difflib), those of the slot's
    model type first. A model of another type is refused too (a chat slot cannot serve an
    embedding model). lemond unreachable: no error, a note."""
    try:
        rows = providers.get().client(node).models(show_all=True)
    except LemonadeError as exc:
        return ModelCheck(note=f"Could not check {model!r} against lemond's catalogue ({exc}); "
                               "saved anyway: a load will tell.")
    kinds = {row["id"]: catalog.model_type(row) for row in rows
             if isinstance(row.get("id"), str) and row["id"]}
    found = next((form for form in resolution_forms(model) if form in kinds), None)
    wanted = LEMOND_TYPE.get(Capability(capability)) if capability in Capability.values else None
    if found is not None:
        if wanted and kinds[found] not in (wanted, "collection"):
            return ModelCheck(error=f"{model} is of type {kinds[found]}; a {capability} slot "
                                    f"serves {wanted} models.")
        return ModelCheck()
    same = [name for name, kind in kinds.items() if kind == wanted]
    close = difflib.get_close_matches(model, same, n=3, cutoff=0.6) or \
        difflib.get_close_matches(model, list(kinds), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else \
        " Pick one from the catalogue."
    return ModelCheck(error=f"lemond on {node.name} does not know {model!r}: it is neither "
                            f"in its catalogue nor one of its user models.{hint}",
                      suggestions=tuple(close))


def do_create_slot(data: dict[str, Any], *, actor: Actor) -> Slot:
    unknown_fields(data, SLOT_FIELDS, data.get("name"))
    if (error := too_many_slots(Slot.objects.count() + 1)) is not None:
        raise error
    slot = Slot(**_coerce_node(dict(data)))
    _validated(slot)
    with transaction.atomic():
        slot.save()
        record(slot, "create", actor=actor, message=f"created {slot.capability} slot")
        runtime.current().live.push_layout_on_commit()  # a new card: open dashboards place it in its group
    return slot


def do_update_slot(slot: Slot | str, changes: dict[str, Any], *, actor: Actor) -> Slot:
    """Change the desired state. Nothing is loaded here: drift shows until an action runs."""
    slot = get_slot(slot)
    unknown_fields(changes, SLOT_FIELDS, slot.name)
    if "name" in changes and changes["name"] != slot.name and slot.seeded:
        raise SlotError("slot.config_error", f"Seeded slot {slot.name!r} cannot be renamed.",
                        slot.name, fields={"name": ["Seeded slots keep their name."]})
    changes = _coerce_node(dict(changes)) if "node" in changes else dict(changes)
    fresh = Slot.objects.select_related("node").get(pk=slot.pk)
    before = {f: getattr(fresh, f) for f in (*Slot.DESIRED_FIELDS, "node_id")}
    for key, value in changes.items():
        setattr(fresh, key, value)
    _validated(fresh)
    changed = [f for f in (*Slot.DESIRED_FIELDS, "node_id") if getattr(fresh, f) != before[f]]
    if not changed:
        return fresh
    with transaction.atomic():
        fresh.save(update_fields=[*changed, "updated_at"])
        record(fresh, "update", actor=actor,
               message="changed " + ", ".join(
                   f"{f} {before[f]!r} → {getattr(fresh, f)!r}" for f in changed))
        if {"name", "capability", "node_id"} & set(changed):
            runtime.current().live.push_layout_on_commit()  # the card's id or its place on the page changed
    return fresh


def do_delete_slot(slot: Slot | str, *, actor: Actor) -> None:
    slot = get_slot(slot)
    if slot.seeded:
        raise SlotError("slot.config_error",
                        f"Slot {slot.name!r} is one of the seeded slots: disable it instead "
                        "of deleting it.", slot.name)
    if slot.state in states.BUSY:
        raise SlotError("slot.illegal_transition",
                        f"Cannot delete slot {slot.name!r} while it is {slot.state}.", slot.name)
    name, loaded = slot.name, slot.is_loaded and not model_wanted_elsewhere(
        slot, slot.loaded_model or slot.model_name)
    with transaction.atomic():
        SlotEvent.objects.create(slot=slot, slot_name=name, action="delete",
                                 actor=actor_name(actor), from_state=slot.state,
                                 model=slot.model_name, message="deleted")
        slot.delete()
        runtime.current().live.broadcast_removed_on_commit(name)  # its own page too
        runtime.current().live.push_layout_on_commit()  # its group may be empty now
        if loaded:
            # Best effort, after the commit and off this thread: callers (the admin) may hold
            # a transaction, and lemond may take minutes or not answer.
            transaction.on_commit(lambda: runtime.current().submit(_unload_orphan, slot))


def _unload_orphan(slot: Slot) -> None:
    """Don't leave a deleted slot's model resident in lemond."""
    try:
        providers.get().unload(slot)
    except LemonadeError as exc:
        log.info("slot %s deleted while its model stays loaded: %s", slot.name, exc)


# --- nodes ------------------------------------------------------------------------------------
# A node's form (`slots.forms.NodeForm`) validates it; these save it with an audit row
# (under the node's name) and push the grid: a node is a section of the dashboard.

NODE_AUDITED = ("name", "base_url", "enabled")  # keys are never written into the log


def do_create_node(node: Node, *, actor: Actor) -> Node:
    """Save a new, validated node."""
    with transaction.atomic():
        node.save()
        record_node_change(node, "node-create", actor=actor,
                           message=f"created node {node.name} at {node.base_url}")
        runtime.current().live.push_layout_on_commit()
    return node


def do_update_node(node: Node, *, actor: Actor) -> Node:
    """Save a validated edit of an existing node (its form has applied the changes)."""
    before = Node.objects.get(pk=node.pk)
    changed = [f for f in (*NODE_AUDITED, "api_key", "admin_api_key")
               if getattr(before, f) != getattr(node, f)]
    if not changed:
        return node
    shown = [f"{f} {getattr(before, f)!r} → {getattr(node, f)!r}" for f in changed
             if f in NODE_AUDITED] + [f"{f} changed" for f in changed if f not in NODE_AUDITED]
    with transaction.atomic():
        node.save()
        record_node_change(node, "node-update", actor=actor, message="changed " + ", ".join(shown))
        runtime.current().live.push_layout_on_commit()
    return node


def do_follow_lemonade_url(*, actor: Actor) -> str:
    """Point the `local` node at HAL0_LEMONADE_URL, as `serve` and `reconcile` do on every
    start: the setting (hal0.env, which the installer rewrites when lemond's port changes)
    governs it, not the URL a migration copied once. Its keys go with the URL
    (HAL0_LEMONADE_API_KEY, HAL0_LEMONADE_ADMIN_API_KEY), as when a node is moved on its
    page. Returns what changed, for the start's log ("" when nothing did)."""
    url = settings.HAL0_LEMONADE_URL
    node = Node.objects.filter(name=Node.LOCAL).first()
    if node is None or node.base_url == url:  # no local node yet: Node.local() makes it
        return ""
    old = node.base_url
    node.base_url = url
    node.api_key = settings.HAL0_LEMONADE_API_KEY
    node.admin_api_key = settings.HAL0_LEMONADE_ADMIN_API_KEY
    do_update_node(node, actor=actor)
    return f"The local node follows HAL0_LEMONADE_URL: {old} -> {url}"


def do_delete_node(node: Node, *, actor: Actor) -> None:
    """Delete a node no slot uses (SlotError naming the slots otherwise)."""
    used_by = list(node.slots.order_by("name").values_list("name", flat=True))
    if used_by:
        raise SlotError(
            "slot.config_error",
            f"Node {node.name} still serves {len(used_by)} slot"
            f"{'s' if len(used_by) != 1 else ''} ({', '.join(used_by)}): move them "
            "to another node or delete them first.")
    with transaction.atomic():
        record_node_change(node, "node-delete", actor=actor, message=f"deleted node {node.name}")
        node.delete()
        runtime.current().live.push_layout_on_commit()
