"""The actions' one error type and its stable envelope `{"error": {"code", "message",
"slot"}}` (the JSON API and the CLI print it; the gateway maps it to OpenAI's shape)."""

from __future__ import annotations

from typing import Any

from providers.lemonade.errors import (
    LemonadeConflict,
    LemonadeError,
    LemonadeLoadError,
    LemonadeNotFound,
    LemonadeTimeout,
    LemonadeUnavailable,
)

from ..models import Slot


class SlotError(Exception):
    """An action failed; `code` is one of the stable codes below."""

    HTTP_STATUS = {
        "slot.not_found": 404,
        "slot.illegal_transition": 409,
        "slot.config_error": 400,
        "slot.disabled": 409,
        "slot.model_shared": 409,
        "slot.pinned": 409,
        "slot.too_many": 409,
        "slot.wont_fit": 409,
        "slot.spawn_failed": 502,
        "lemond.unavailable": 503,
        "lemond.timeout": 504,
        "lemond.conflict": 409,
        "lemond.error": 502,
    }

    def __init__(self, code: str, message: str, slot: str | None = None,
                 fields: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.slot = slot
        self.fields = fields or {}

    @property
    def http_status(self) -> int:
        return self.HTTP_STATUS.get(self.code, 400)

    def envelope(self) -> dict[str, Any]:
        return envelope(self.code, self.message, self.slot, self.fields)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def envelope(code: str, message: str, slot: str | None = None,
             fields: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The error shape of the JSON API and `slots … --json`."""
    error: dict[str, Any] = {"code": code, "message": message, "slot": slot}
    if fields:
        error["fields"] = fields
    return {"error": error}


def error_code_for(exc: LemonadeError) -> str:
    if isinstance(exc, LemonadeUnavailable):
        return "lemond.unavailable"
    if isinstance(exc, LemonadeTimeout):
        return "lemond.timeout"
    if isinstance(exc, LemonadeConflict):
        return "lemond.conflict"
    if isinstance(exc, LemonadeLoadError):
        return "slot.spawn_failed"
    if isinstance(exc, LemonadeNotFound):
        return "slot.config_error"
    return "lemond.error"


def lemond_error(slot: Slot, exc: LemonadeError, doing: str,
                 model: str | None = None) -> SlotError:
    """A lemond failure while `doing` something to the slot (with `model`, by default the
    slot's own), as the action reports it."""
    if isinstance(exc, LemonadeNotFound):
        message = f"lemond does not know model {model or slot.model_name!r}: {exc.message}"
    else:
        message = f"{doing} failed: {exc}"
    return SlotError(error_code_for(exc), message, slot.name)


def disabled(name: str) -> SlotError:
    """The one message for an action (or a gateway request) on a disabled slot."""
    return SlotError("slot.disabled", f"Slot {name!r} is disabled; enable it first.", name)


def unknown_keys(data: dict[str, Any], allowed: set[str]) -> list[str]:
    """The keys of `data` that are not `allowed`, sorted (the one unknown-field check)."""
    return sorted(set(data) - allowed)


def unknown_fields(data: dict[str, Any], allowed: set[str], slot: str | None) -> None:
    """Reject keys an action does not know, as a `slot.config_error`."""
    unknown = unknown_keys(data, allowed)
    if unknown:
        raise SlotError("slot.config_error", f"Unknown field(s): {', '.join(unknown)}.", slot)


def get_slot(slot: Slot | str) -> Slot:
    """The slot itself, or the one named so (with its node), or `slot.not_found`."""
    if isinstance(slot, Slot):
        return slot
    try:
        return Slot.objects.select_related("node").get(name=slot)
    except Slot.DoesNotExist:
        raise SlotError("slot.not_found", f"No slot named {slot!r}.", str(slot)) from None
