"""Small display filters for the dashboard templates."""

from django import template
from django.utils import timezone
from django.utils.timesince import timesince

from slots import runtime

register = template.Library()


@register.simple_tag
def slot_queue(slot) -> dict:
    """The slot's fair queue in this process (slots.admission), for its card."""
    return runtime.current().admission.stats(slot.pk, slot.max_concurrency) or {}


@register.filter
def seconds(ms) -> str:
    """1234 (ms) -> '1.2 s'."""
    if ms in (None, ""):
        return "—"
    value = float(ms) / 1000
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


@register.filter
def ago(moment) -> str:
    """'3 min ago', 'just now' — short enough for a card."""
    if not moment:
        return "never"
    delta = (timezone.now() - moment).total_seconds()
    if delta < 10:
        return "just now"
    if delta < 60:
        return f"{int(delta)} s ago"
    if delta < 3600:
        return f"{int(delta // 60)} min ago"
    if delta < 86400:
        return f"{int(delta // 3600)} h ago"
    return f"{timesince(moment).split(',')[0]} ago"


@register.filter
def stat(value, unit: str = "") -> str:
    """A number from lemond's stats, or a dash when lemond reports none (null)."""
    if value is None or value == "":
        return "—"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value}{unit}"
