"""The Activity page's data and its live rows, and a slot's 24 h request trend.

Nothing here is on the gateway's request path: the rows are the metrics batches the writer
(`MetricsBuffer.flush`) has just committed, handed to `push_batch` after the commit, which
sends them as plain data to the `activity` group; each open Activity page (its consumer)
keeps the rows its user may see and its filters select, and renders them. The same batch
re-renders the stats of the slots it touched for their open slot pages (group
`slot.<name>`).

Who sees what (docs/security.md, roles): staff see every request, whichever token made it;
other operators see the requests their own session made from the "Try it" panels (API
tokens are staff business, and so is what they were used for).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Avg, Count, QuerySet
from django.db.models.functions import TruncHour
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .admission import Admission
from .live import ACTIVITY_GROUP, Live, local_layer
from .metrics import RequestSample, slot_stats
from .models import SLOT_NAME_RE, RequestMetric, Slot

log = logging.getLogger("hal0.activity")

GROUP = ACTIVITY_GROUP
PAGE_ROWS = 100  # rows the page opens with (and keeps: hal0.js trims older ones)
STATUSES = {"ok": "succeeded (< 400)", "error": "failed (≥ 400)"}
FIELDS = ("slot_name", "endpoint", "status", "latency_ms", "ttft_ms", "tokens_in",
          "tokens_out", "tokens_per_s", "stream", "token_name")


def session_name(user) -> str:
    """What a dashboard session's gateway requests are recorded under (the token column)."""
    return f"user:{user.get_username()}"


def slot_group(name: str) -> str | None:
    """The group of a slot's open pages (None for a legacy name a group cannot carry)."""
    return f"slot.{name}" if SLOT_NAME_RE.match(name) else None


# --- reading -----------------------------------------------------------------------------

def visible(user, rows: QuerySet[RequestMetric]) -> QuerySet[RequestMetric]:
    return rows if user.is_staff else rows.filter(token_name=session_name(user))


def recent(user, slot: str = "", status: str = "") -> list[RequestMetric]:
    """The newest requests `user` may see, filtered; one query."""
    rows = visible(user, RequestMetric.objects.all())
    if slot:
        rows = rows.filter(slot_name=slot)
    if status == "ok":
        rows = rows.filter(status__lt=400)
    elif status == "error":
        rows = rows.filter(status__gte=400)
    return list(rows.order_by("-started_at", "-pk")[:PAGE_ROWS])


def row_data(metric: RequestMetric) -> dict[str, Any]:
    """A row as plain data, fit for any channel layer (Redis serialises it)."""
    return {"started_at": metric.started_at.isoformat(),
            **{name: getattr(metric, name) for name in FIELDS}}


def from_data(data: dict[str, Any]) -> RequestMetric:
    started = parse_datetime(data["started_at"]) or timezone.now()
    return RequestMetric(started_at=started, **{name: data.get(name) for name in FIELDS})


def shown_to(user_is_staff: bool, username: str, data: dict[str, Any], slot: str,
             status: str) -> bool:
    """Whether a pushed row belongs on one open Activity page (its user, its filters)."""
    if not user_is_staff and data.get("token_name") != f"user:{username}":
        return False
    if slot and data.get("slot_name") != slot:
        return False
    code = data.get("status") or 0
    return not ((status == "ok" and code >= 400) or (status == "error" and code < 400))


# --- the slot page's trend ----------------------------------------------------------------

CHART_W, CHART_H = 320, 90  # the plot area; the axes' labels sit outside it
PAD_L, PAD_B, PAD_T, PAD_R = 44, 18, 6, 6


def _nice_top(value: float) -> float:
    """The y axis' top: 1, 2 or 5 times a power of ten, at least `value`."""
    if value <= 0:
        return 1.0
    scale = 10 ** len(str(int(value))) / 10
    for step in (1, 2, 5, 10):
        if step * scale >= value:
            return step * scale
    return 10 * scale  # pragma: no cover - the loop always returns


def _series(points: list[tuple[datetime, float]], start: datetime, unit: str,
            label: str) -> dict[str, Any]:
    top = _nice_top(max((v for _, v in points), default=0.0))
    span = 24 * 3600.0

    def x(moment: datetime) -> float:
        return round(PAD_L + CHART_W * (moment - start).total_seconds() / span, 1)

    def y(value: float) -> float:
        return round(PAD_T + CHART_H * (1 - value / top), 1)

    dots = [{"x": x(at + timedelta(minutes=30)), "y": y(v), "value": v, "at": at}
            for at, v in points]
    ticks_x = [{"x": x(start + timedelta(hours=h)), "at": start + timedelta(hours=h)}
               for h in (0, 6, 12, 18, 24)]
    ticks_y = [{"y": y(top * f), "value": top * f} for f in (0, 0.5, 1)]
    return {"label": label, "unit": unit, "dots": dots, "top": top,
            "line": " ".join(f"{d['x']},{d['y']}" for d in dots),
            "ticks_x": ticks_x, "ticks_y": ticks_y, "x0": PAD_L, "x1": PAD_L + CHART_W,
            "y0": PAD_T + CHART_H, "y1": PAD_T,
            "width": PAD_L + CHART_W + PAD_R, "height": PAD_T + CHART_H + PAD_B}


def trend(slot_name: str, now: datetime | None = None) -> dict[str, Any]:
    """The slot's last 24 h by hour: mean tokens/s and mean latency, as two SVG charts
    with axes (one query)."""
    now = now or timezone.now()
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    hours = list(RequestMetric.objects.filter(slot_name=slot_name, started_at__gte=start)
                 .annotate(hour=TruncHour("started_at")).values("hour")
                 .annotate(n=Count("pk"), tps=Avg("tokens_per_s"), latency=Avg("latency_ms"))
                 .order_by("hour"))
    tps = [(h["hour"], round(h["tps"], 1)) for h in hours if h["tps"] is not None]
    latency = [(h["hour"], round(h["latency"], 1)) for h in hours if h["latency"] is not None]
    return {"count": sum(h["n"] for h in hours), "start": start, "end": start + timedelta(hours=24),
            "charts": [_series(tps, start, "tok/s", "tokens/s"),
                       _series(latency, start, "ms", "latency")]}


def queues(admission: Admission, slots: Any = None) -> list[tuple[str, dict[str, Any]]]:
    """Each slot's fair queue in this process (by name), for the page's queue table: the
    slots with a concurrency limit, and any that queued here before losing theirs.
    `slots`: the page's own list of slots (by name), to save the query."""
    if slots is None:
        slots = Slot.objects.order_by("name").only("pk", "name", "max_concurrency")
    return [(s.name, stats) for s in slots
            if (stats := admission.stats(s.pk, s.max_concurrency)) is not None]


def render_queues(admission: Admission) -> str:
    """The queue table, out-of-band: what an open Activity page gets when a queue moves."""
    return render_to_string("slots/_activity_queues.html",
                            {"queues": queues(admission), "oob": True})


# --- pushing -------------------------------------------------------------------------------

def push_batch(pages: Live, batch: Sequence[RequestSample],
               pending: list[RequestSample] | None = None) -> None:
    """After a batch is committed: its rows (the writer's samples) to open Activity pages,
    and fresh stats to the open pages of the slots it touched. Never raises (the writer
    must go on)."""
    try:
        _push(pages, batch, pending or [])
    except Exception:
        log.exception("could not push the activity of a metrics batch")


def _push(pages: Live, batch: Sequence[RequestSample], pending: list[RequestSample]) -> None:
    if not batch or (local_layer() and not pages.page_watching()):
        return  # nobody in this process is watching (a shared layer: maybe elsewhere)
    # rows as the database holds them, built only now that somebody is watching
    rows = [sample.row() for sample in batch]
    newest_first = sorted(rows, key=lambda r: r.started_at, reverse=True)
    pages.send_message(GROUP, {"type": "activity.rows",
                               "rows": [row_data(r) for r in newest_first]})
    for name in {r.slot_name for r in rows}:
        group = slot_group(name)
        slot = Slot.objects.filter(name=name).first() if group else None
        if slot is None or group is None:
            continue
        html = render_to_string("slots/_traffic.html", {
            "slot": slot, "traffic": slot_stats(name, pending), "trend": trend(name),
            "oob": True})
        pages.send_to(group, html)
