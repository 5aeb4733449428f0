"""Slot definitions as a file: `slots export` writes it, `slots import` reads it back.

The file holds only desired state (never observed state or node keys), in a stable order
with one field per line so it diffs well and can live in git as a backup. Import is all or
nothing: the whole file is validated against the final set of slots before anything is
written, and slots that the file does not mention are left alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from .actions import config
from .actions.errors import unknown_keys
from .models import Node, Slot

FORMAT_VERSION = 1


class ImportProblem(Exception):
    """The file cannot be imported; the message names the entry and field."""


def export_data() -> dict:
    slots = Slot.objects.select_related("node").order_by("name")
    return {"hal0_slots": FORMAT_VERSION, "slots": [s.export_dict() for s in slots]}


def export_json() -> str:
    return json.dumps(export_data(), indent=2, ensure_ascii=False) + "\n"


@dataclass
class ImportPlan:
    creates: list[dict] = field(default_factory=list)
    updates: list[tuple[Slot, dict]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def change_count(self) -> int:
        return len(self.creates) + len(self.updates)

    def describe(self) -> list[str]:
        lines = [f"create {d['name']} ({d['capability']}, {d['model_name']})" for d in self.creates]
        for slot, changes in self.updates:
            parts = ", ".join(f"{k}: {_show(getattr(slot, k) if k != 'node' else slot.node.name)}"
                              f" → {_show(v if k != 'node' else v.name)}"
                              for k, v in changes.items())
            lines.append(f"update {slot.name}: {parts}")
        return lines


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _entries(text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ImportProblem(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ImportProblem("not valid JSON: nested too deeply") from None
    if isinstance(data, dict):
        if "slots" not in data:
            raise ImportProblem('expected an object with a "slots" list (as `slots export` writes)')
        data = data["slots"]
    if not isinstance(data, list):
        raise ImportProblem('"slots" must be a list of slot objects')
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ImportProblem(f"slots[{i}]: each slot must be a JSON object")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ImportProblem(f"slots[{i}].name: every slot needs a name")
    return data


def plan_import(text: str) -> ImportPlan:
    """Validate the whole file against the final state and say what would change."""
    entries = _entries(text)
    existing = {s.name: s for s in Slot.objects.select_related("node")}
    nodes = {n.name: n for n in Node.objects.all()}
    new = {e["name"] for e in entries} - set(existing)  # counted before any slow check
    if (error := config.too_many_slots(len(existing) + len(new))) is not None:
        raise ImportProblem(f"the file would make {len(existing) + len(new)} slots: "
                            f"{error.message}")
    plan = ImportPlan()
    final: dict[str, Slot] = dict(existing)
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        name = entry["name"]
        where = f"slots[{i}] ({name!r})"
        if name in seen:
            raise ImportProblem(f"{where}.name: slot {name!r} appears twice in the file")
        seen.add(name)
        current = existing.get(name)
        candidate = _candidate(entry, current, nodes, where)
        _check(candidate, where)
        final[name] = candidate
        _plan_entry(plan, name, candidate, current)
    _check_defaults(final)
    return plan


def _candidate(entry: dict, current: Slot | None, nodes: dict[str, Node], where: str) -> Slot:
    """The slot an entry describes: a new one, or the current one with the entry applied."""
    if unknown := unknown_keys(entry, config.SLOT_FIELDS):
        raise ImportProblem(f"{where}.{unknown[0]}: unknown field "
                            f"(allowed: {', '.join(sorted(config.SLOT_FIELDS))})")
    values = dict(entry)
    node_name = values.pop("node", None)
    if node_name is not None:
        if not isinstance(node_name, str) or node_name not in nodes:
            raise ImportProblem(f"{where}.node: no node named {node_name!r}")
        values["node"] = nodes[node_name]
    if current is None:
        missing = [f for f in ("capability", "device", "model_name") if f not in values]
        if missing:
            raise ImportProblem(f"{where}.{missing[0]}: required for a new slot")
        values.setdefault("node", nodes.get(Node.LOCAL) or Node.local())
        return Slot(**values)
    candidate = Slot(**{f: getattr(current, f) for f in Slot.DESIRED_FIELDS},
                     node=current.node, pk=current.pk)
    for key, value in values.items():
        setattr(candidate, key, value)
    return candidate


def _plan_entry(plan: ImportPlan, name: str, candidate: Slot, current: Slot | None) -> None:
    if current is None:
        plan.creates.append({k: getattr(candidate, k) for k in Slot.DESIRED_FIELDS}
                            | {"node": candidate.node})
        return
    changes = {k: getattr(candidate, k) for k in Slot.DESIRED_FIELDS
               if getattr(candidate, k) != getattr(current, k)}
    if candidate.node_id != current.node_id:
        changes["node"] = candidate.node
    if changes:
        plan.updates.append((current, changes))
    else:
        plan.unchanged.append(name)


def _check_defaults(final: dict[str, Slot]) -> None:
    """At most one default slot per capability, in the state the import would leave."""
    defaults: dict[str, str] = {}
    for name, slot in sorted(final.items()):
        if slot.is_default:
            if slot.capability in defaults:
                raise ImportProblem(
                    f"is_default: both {defaults[slot.capability]!r} and {name!r} would be the "
                    f"default {slot.capability} slot (at most one per capability)")
            defaults[slot.capability] = name


def _check(candidate: Slot, where: str) -> None:
    """Field types and every per-slot rule; the one-default rule is checked on the final set."""
    for key in Slot.DESIRED_FIELDS:
        value = getattr(candidate, key)
        # Django's clean_fields() skips None for blank fields, so a null would only fail
        # at the database (NOT NULL); only ctx_size may be null ("lemond's default").
        if value is None and not Slot._meta.get_field(key).null:
            hint = ' (use "" for none)' if key == "extra_args" else ""
            raise ImportProblem(f"{where}.{key}: may not be null{hint}")
        # JSON allows what no field can hold (1e400 is infinity, NaN, lists, objects); name
        # the field here rather than fail inside Django's converters.
        if isinstance(value, float) and not math.isfinite(value):
            raise ImportProblem(f"{where}.{key}: {value!r} is not a finite number")
        if isinstance(value, (list, dict)):
            raise ImportProblem(f"{where}.{key}: expected a single value, not "
                                f"{'a list' if isinstance(value, list) else 'an object'}")
    try:
        candidate.clean_fields(exclude=["node"])
    except ValidationError as exc:
        key, messages = next(iter(exc.message_dict.items()))
        raise ImportProblem(f"{where}.{key}: {' '.join(messages)}") from None
    errors = candidate.config_errors()
    if errors:
        key, messages = next(iter(errors.items()))
        raise ImportProblem(f"{where}.{key}: {' '.join(messages)}")


def import_json(text: str, *, dry_run: bool = False, actor: Any = "cli") -> ImportPlan:
    plan = plan_import(text)
    if dry_run or not plan.change_count:
        return plan
    with transaction.atomic():
        # Clear defaults that move first, so the one-default constraint holds at every step.
        for slot, changes in plan.updates:
            if changes.get("is_default") is False:
                config.do_update_slot(slot, {"is_default": False}, actor=actor)
        for slot, changes in plan.updates:
            config.do_update_slot(slot, changes, actor=actor)
        for data in plan.creates:
            config.do_create_slot(data, actor=actor)
    return plan
