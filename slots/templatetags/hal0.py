"""Small display filters for the dashboard templates."""

from django import template
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.timesince import timesince

from slots import capacity, runtime

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


@register.filter
def stamp(moment, fmt: str = "Y-m-d H:i:s") -> str:
    """A moment in hal0's time zone, saying which ('2026-12-07 11:51:38 UTC')."""
    if not moment:
        return "—"
    return date_format(timezone.localtime(moment), f"{fmt} T")


@register.filter
def elapsed(since) -> str:
    """Time since a moment as a clock ('0:42', '5:07', '1:02:03'); hal0.js ticks it on."""
    if not since:
        return ""
    total = max(0, int((timezone.now() - since).total_seconds()))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@register.filter
def ms(value) -> str:
    """A duration in milliseconds, the one unit for TTFT and latency ('212 ms'), or a dash."""
    if value is None or value == "":
        return "—"
    return f"{float(value):.0f} ms"


@register.filter
def gauges(node) -> list:
    """The node's memory and disk bars (`slots.capacity.gauges`)."""
    return capacity.gauges(node.system_stats)


@register.filter
def footprint(slot):
    """What the slot's loaded model takes (an estimate), for its card."""
    return capacity.slot_footprint(slot)
