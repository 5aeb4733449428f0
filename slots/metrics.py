"""Gateway request metrics: recorded in memory, written in batches, pruned, summarised.

The request path only calls `MetricsBuffer.record()` (an append and a few counter bumps,
under a lock). A background task (`ensure_flusher`, started by the gateway on its event
loop) writes the buffer with one INSERT every HAL0_METRICS_FLUSH_S seconds, stamps
tokens' `last_used_at`, and prunes rows older than HAL0_METRICS_RETENTION_H hours. The
buffer belongs to the process's `Runtime` (`runtime.current().metrics`). `slot_stats()` summarises a slot for its
page; `prometheus_text()` is what `/metrics` serves (slot state from the database, gateway
counters of this process since it started).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from . import tokens
from .admission import WAIT_BUCKETS, Admission
from .models import Node, RequestMetric, Slot, State
from .serving import ServingTracker, lease_ttl

log = logging.getLogger("hal0.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PRUNE_EVERY_S = 300.0
BUFFER_MAX = 100_000  # if the database is gone for long, drop the oldest rather than grow


@dataclass(slots=True)
class RequestSample:
    """One finished gateway request, as measured on the request path."""

    slot_name: str
    endpoint: str
    status: int
    started_at: datetime
    latency_ms: float
    ttft_ms: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    tokens_per_s: float | None = None
    stream: bool = False
    token_name: str = ""  # the API token's name, or "user:<name>" for a dashboard session

    def row(self) -> RequestMetric:
        return RequestMetric(**dict(zip(COLUMNS, self.values(), strict=True)))

    def values(self, adapt_datetime: Callable[[datetime], Any] = lambda value: value
               ) -> tuple:
        """The row's values in the order of COLUMNS, cut to the columns' lengths."""
        return (self.slot_name[:32], self.endpoint[:40], self.status,
                adapt_datetime(self.started_at), self.latency_ms, self.ttft_ms,
                self.tokens_in, self.tokens_out, self.tokens_per_s, self.stream,
                self.token_name[:64])


# RequestMetric's fields, as RequestSample.values() gives them
COLUMNS = ("slot_name", "endpoint", "status", "started_at", "latency_ms", "ttft_ms",
           "tokens_in", "tokens_out", "tokens_per_s", "stream", "token_name")


def insert(samples: list[RequestSample]) -> None:
    """Write samples as RequestMetric rows: one INSERT, executed for all of them.
    `bulk_create` took ~40 µs more per row, preparing each value through its model field
    and building a model instance first, on the writer thread that shares the GIL with the
    gateway's event loop (docs/benchmarks.md); the values here are already what the
    columns hold (the datetime adapted as the DateTimeField would)."""
    meta = RequestMetric._meta
    quote = connection.ops.quote_name
    columns = ", ".join(quote(meta.get_field(name).column) for name in COLUMNS)
    sql = (f"INSERT INTO {quote(meta.db_table)} ({columns}) "
           f"VALUES ({', '.join(['%s'] * len(COLUMNS))})")
    adapt = connection.ops.adapt_datetimefield_value
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:
        cursor.executemany(sql, [sample.values(adapt) for sample in samples])


class Counters:
    """Process-lifetime counters for Prometheus (reset on restart, as counters may)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = defaultdict(
            lambda: [0] * (len(LATENCY_BUCKETS) + 1))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.ttft_sum: dict[str, float] = defaultdict(float)
        self.ttft_count: dict[str, int] = defaultdict(int)
        self.tokens_in: dict[str, int] = defaultdict(int)
        self.tokens_out: dict[str, int] = defaultdict(int)
        self.written = 0
        self.dropped = 0

    def copy(self) -> Counters:
        other = Counters()
        for name, value in vars(self).items():
            if isinstance(value, defaultdict):
                fresh = getattr(other, name)
                for key, item in value.items():
                    fresh[key] = list(item) if isinstance(item, list) else item
            else:
                setattr(other, name, value)
        return other

    def add(self, obs: RequestSample) -> None:
        slot = obs.slot_name
        self.requests[(slot, obs.endpoint, obs.status)] += 1
        seconds = obs.latency_ms / 1000.0
        buckets = self.latency_buckets[slot]
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
                break
        else:
            buckets[-1] += 1
        self.latency_sum[slot] += seconds
        if obs.ttft_ms is not None:
            self.ttft_sum[slot] += obs.ttft_ms / 1000.0
            self.ttft_count[slot] += 1
        self.tokens_in[slot] += obs.tokens_in or 0
        self.tokens_out[slot] += obs.tokens_out or 0


class MetricsBuffer:
    """Request samples not written yet, the process's counters and the writer's clocks
    (owned by the `Runtime`).

    `record` runs on the event loop and the writer (`flush`) on a worker thread: one lock
    covers the samples and the counters, so a failed write puts its batch back in front
    of whatever was recorded meanwhile, and nothing is lost.
    """

    def __init__(self, *, serving: ServingTracker, stamps: tokens.TokenStamps,
                 clock: Callable[[], float] = time.monotonic,
                 on_written: Callable[[list[RequestSample]], None] | None = None):
        self.counters = Counters()
        # told each batch after its commit (the Activity page's live rows, slots.activity)
        self._on_written = on_written
        self._serving = serving
        self._stamps = stamps
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: list[RequestSample] = []
        self._flusher: asyncio.Task | None = None
        # None: never done in this process (not "at monotonic 0", which may be just now)
        self._last_prune: float | None = None
        self._last_renewal: float | None = None

    # --- the request path ------------------------------------------------------------------
    def record(self, sample: RequestSample) -> None:
        """Record one finished request. Never touches the database."""
        with self._lock:
            self.counters.add(sample)
            self._samples.append(sample)
            self._trim()

    def _trim(self) -> None:
        excess = len(self._samples) - BUFFER_MAX
        if excess > 0:
            self.counters.dropped += excess
            del self._samples[:excess]

    def pending(self) -> list[RequestSample]:
        with self._lock:
            return list(self._samples)

    # --- writing ----------------------------------------------------------------------------
    def flush(self, now: datetime | None = None) -> int:
        """Write buffered samples (one bulk insert), token stamps, and prune. Sync."""
        # first, and on its own: a batch that cannot be written must not let leases lapse
        try:
            self._renew_leases_if_due()
        except Exception:
            log.exception("could not renew serving leases (will retry)")
        with self._lock:
            batch, self._samples = self._samples, []
        if batch:
            try:
                insert(batch)
            except Exception:
                with self._lock:  # keep them for the next try, before what came meanwhile
                    self._samples[:0] = batch
                    self._trim()
                raise
            with self._lock:
                self.counters.written += len(batch)
            if self._on_written is not None:
                on_written = self._on_written
                transaction.on_commit(lambda: on_written(batch))
        self._stamps.flush()
        self.prune_if_due(now)
        return len(batch)

    def _due(self, last: float | None, every: float) -> bool:
        return last is None or self._clock() - last >= every

    def _renew_leases_if_due(self) -> None:
        """The gateway process's serving leases outlive long streams (slots.serving)."""
        if self._due(self._last_renewal, lease_ttl() / 3):
            self._last_renewal = self._clock()
            self._serving.renew_leases()

    def prune_if_due(self, now: datetime | None = None) -> int:
        """Prune at most once per PRUNE_EVERY_S. Called by the flusher and by the
        reconciler's housekeeping, so a process that serves no gateway request prunes too."""
        if not self._due(self._last_prune, PRUNE_EVERY_S):
            return 0
        self._last_prune = self._clock()
        return prune(now)

    def _flush_in_thread(self) -> int:
        try:
            return self.flush()
        finally:
            connection.close()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(settings.HAL0_METRICS_FLUSH_S)
            try:
                await sync_to_async(self._flush_in_thread, thread_sensitive=False)()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not write gateway metrics (will retry)")

    def ensure_flusher(self) -> None:
        """Start the background writer on the running loop (once per loop)."""
        if self._flusher is not None and not self._flusher.done():
            return
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()

    def snapshot(self) -> tuple[Counters, int]:
        """A copy of the counters and the number of samples not written yet (for
        `/metrics`, read on a worker thread while requests keep counting)."""
        with self._lock:
            return self.counters.copy(), len(self._samples)


def prune(now: datetime | None = None) -> int:
    """Delete metrics older than the retention window."""
    cutoff = (now or timezone.now()) - timedelta(hours=settings.HAL0_METRICS_RETENTION_H)
    deleted, _ = RequestMetric.objects.filter(started_at__lt=cutoff).delete()
    return deleted


# --- reading usage from a response -----------------------------------------------------------

_decoder = json.JSONDecoder()


def _object_after(text: str, key: str) -> dict | None:
    """The JSON object after the last `"key":` in text (cheap: no full parse)."""
    marker = f'"{key}"'
    at = text.rfind(marker)
    while at >= 0:
        i = at + len(marker)
        while i < len(text) and text[i] in " \t\r\n:":
            i += 1
        if i < len(text) and text[i] == "{":
            try:
                value, _ = _decoder.raw_decode(text, i)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
        at = text.rfind(marker, 0, at)  # e.g. "usage": null in an earlier chunk
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: float | None) -> int | None:
    """A token count the column can hold (PositiveIntegerField: 0 … 2**31 - 1); anything
    else from upstream is dropped rather than failing the whole batch."""
    if value is None or not 0 <= value < 2**31:
        return None
    return int(value)


def usage_of(payload: bytes) -> dict[str, float | None]:
    """tokens_in/out, tokens_per_s and the backend's prompt time from a response body or
    the tail of an SSE stream (`usage` and llama.cpp `timings`)."""
    text = payload.decode("utf-8", "ignore")
    usage = _object_after(text, "usage") or {}
    timings = _object_after(text, "timings") or {}
    tokens_in = _number(usage.get("prompt_tokens", usage.get("input_tokens")))
    tokens_out = _number(usage.get("completion_tokens", usage.get("output_tokens")))
    if tokens_in is None:
        tokens_in = _number(timings.get("prompt_n"))
    if tokens_out is None:
        tokens_out = _number(timings.get("predicted_n"))
    return {
        "tokens_in": _count(tokens_in),
        "tokens_out": _count(tokens_out),
        "tokens_per_s": _number(timings.get("predicted_per_second")),
        "prompt_ms": _number(timings.get("prompt_ms")),
    }


# --- reading ---------------------------------------------------------------------------------

def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def slot_stats(slot_name: str, pending: list[RequestSample],
               window: timedelta = timedelta(hours=1),
               now: datetime | None = None) -> dict[str, Any]:
    """The slot page's numbers over the last `window`: count, errors, requests_per_min,
    p50_ms, p95_ms (latency), ttft_p50_ms, tokens_per_s (mean of what responses reported),
    tokens_in, tokens_out. Includes `pending` samples (not written yet)."""
    now = now or timezone.now()
    since = now - window
    rows = list(RequestMetric.objects.filter(slot_name=slot_name, started_at__gte=since,
                                             started_at__lte=now)
                .values_list("status", "latency_ms", "ttft_ms", "tokens_per_s", "tokens_in",
                             "tokens_out"))
    rows += [(o.status, o.latency_ms, o.ttft_ms, o.tokens_per_s, o.tokens_in, o.tokens_out)
             for o in pending if o.slot_name == slot_name and since <= o.started_at <= now]
    latencies = sorted(r[1] for r in rows)
    ttfts = sorted(r[2] for r in rows if r[2] is not None)
    rates = [r[3] for r in rows if r[3]]
    minutes = max(window.total_seconds() / 60.0, 1e-9)

    def rounded(value: float | None, digits: int = 1) -> float | None:
        return round(value, digits) if value is not None else None

    return {
        "slot": slot_name,
        "window_s": int(window.total_seconds()),
        "count": len(rows),
        "errors": sum(1 for r in rows if r[0] >= 400),
        "requests_per_min": round(len(rows) / minutes, 2),
        "p50_ms": rounded(_percentile(latencies, 0.50)),
        "p95_ms": rounded(_percentile(latencies, 0.95)),
        "ttft_p50_ms": rounded(_percentile(ttfts, 0.50)),
        "tokens_per_s": rounded(sum(rates) / len(rates) if rates else None),
        "tokens_in": sum(r[4] or 0 for r in rows),
        "tokens_out": sum(r[5] or 0 for r in rows),
    }


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(serving: ServingTracker, buffer: MetricsBuffer,
                    scope: tuple[str, ...] = (), admission: Admission | None = None) -> str:
    """Prometheus text exposition (version 0.0.4) for slots, nodes and the gateway (the
    gateway's counters and in-flight counts are this process's). `scope`: a scoped
    token's slot names; it sees only those slots, their nodes and their gateway numbers
    (() = everything)."""
    counters, buffered = buffer.snapshot()

    def shown(slot_name: str) -> bool:
        return not scope or slot_name in scope

    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    slots = [s for s in Slot.objects.select_related("node").order_by("name") if shown(s.name)]
    _slot_families(family, out, slots, serving)
    if admission is not None:
        _queue_families(family, out, slots, admission)
    family("hal0_slot_last_load_seconds", "gauge", "How long the slot's last load took.")
    for s in slots:
        if s.last_load_ms is not None:
            out.append(f'hal0_slot_last_load_seconds{{slot="{_label(s.name)}"}} '
                       f'{s.last_load_ms / 1000:.3f}')
    family("hal0_node_reachable", "gauge", "1 when the reconciler last reached the lemond node.")
    nodes = Node.objects.order_by("name")
    if scope:
        nodes = nodes.filter(pk__in={s.node_id for s in slots})
    for n in nodes:
        out.append(f'hal0_node_reachable{{node="{_label(n.name)}"}} {int(n.reachable)}')
    _gateway_families(family, out, counters, shown)
    family("hal0_gateway_metrics_buffered", "gauge", "Request metrics not yet written.")
    out.append(f"hal0_gateway_metrics_buffered {buffered}")
    family("hal0_gateway_metrics_written_total", "counter", "Request metrics written.")
    out.append(f"hal0_gateway_metrics_written_total {counters.written}")
    return "\n".join(out) + "\n"


def _histogram(out: list[str], name: str, slot: str, bounds: tuple[float, ...],
               buckets, total: float) -> None:
    """One slot's histogram lines: cumulative buckets, the sum and the count."""
    cumulative = 0
    for bound, count in zip((*bounds, math.inf), buckets, strict=True):
        cumulative += count
        le = "+Inf" if bound == math.inf else repr(bound)
        out.append(f'{name}_bucket{{slot="{_label(slot)}",le="{le}"}} {cumulative}')
    out.append(f'{name}_sum{{slot="{_label(slot)}"}} {total:.6f}')
    out.append(f'{name}_count{{slot="{_label(slot)}"}} {cumulative}')


def _slot_families(family: Callable[[str, str, str], None], out: list[str], slots: list[Slot],
                   serving: ServingTracker) -> None:
    """What each slot is: its configuration, observed state and in-flight requests."""
    family("hal0_slot_info", "gauge", "A declared slot (value 1) and its configuration.")
    for s in slots:
        out.append(f'hal0_slot_info{{slot="{_label(s.name)}",capability="{s.capability}",'
                   f'device="{s.device}",model="{_label(s.model_name)}",'
                   f'node="{_label(s.node.name)}",enabled="{str(s.enabled).lower()}"}} 1')
    family("hal0_slot_state", "gauge", "1 for the slot's current observed state.")
    for s in slots:
        for state in State.values:
            out.append(f'hal0_slot_state{{slot="{_label(s.name)}",state="{state}"}} '
                       f'{int(s.state == state)}')
    family("hal0_slot_loaded", "gauge", "1 when the slot's model is loaded (ready or serving).")
    for s in slots:
        out.append(f'hal0_slot_loaded{{slot="{_label(s.name)}"}} {int(s.is_loaded)}')
    family("hal0_slot_in_flight_requests", "gauge",
           "Gateway requests in flight for the slot in this process.")
    for s in slots:
        out.append(f'hal0_slot_in_flight_requests{{slot="{_label(s.name)}"}} '
                   f'{serving.count(s)}')


def _gateway_families(family: Callable[[str, str, str], None], out: list[str], counters,
                      shown: Callable[[str], bool]) -> None:
    """This process's gateway counters: requests, latency, time to first token, tokens."""
    family("hal0_gateway_requests_total", "counter", "Gateway requests by slot, endpoint, status.")
    for (slot, endpoint, status), value in sorted(counters.requests.items()):
        if shown(slot):
            out.append(f'hal0_gateway_requests_total{{slot="{_label(slot)}",'
                       f'endpoint="{_label(endpoint)}",status="{status}"}} {value}')
    family("hal0_gateway_request_duration_seconds", "histogram",
           "Gateway request latency (to the last byte) by slot.")
    for slot, buckets in sorted(counters.latency_buckets.items()):
        if shown(slot):
            _histogram(out, "hal0_gateway_request_duration_seconds", slot, LATENCY_BUCKETS,
                       buckets, counters.latency_sum[slot])
    family("hal0_gateway_time_to_first_token_seconds", "summary",
           "Time to the first streamed byte (or the backend's prompt time) by slot.")
    for slot in sorted(filter(shown, counters.ttft_count)):
        out.append(f'hal0_gateway_time_to_first_token_seconds_sum{{slot="{_label(slot)}"}} '
                   f'{counters.ttft_sum[slot]:.6f}')
        out.append(f'hal0_gateway_time_to_first_token_seconds_count{{slot="{_label(slot)}"}} '
                   f'{counters.ttft_count[slot]}')
    family("hal0_gateway_tokens_total", "counter", "Tokens through the gateway by slot.")
    for slot in sorted(filter(shown, set(counters.tokens_in) | set(counters.tokens_out))):
        out.append(f'hal0_gateway_tokens_total{{slot="{_label(slot)}",direction="in"}} '
                   f'{counters.tokens_in[slot]}')
        out.append(f'hal0_gateway_tokens_total{{slot="{_label(slot)}",direction="out"}} '
                   f'{counters.tokens_out[slot]}')


def _queue_families(family: Callable[[str, str, str], None], out: list[str], slots: list[Slot],
                    admission: Admission) -> None:
    """The slots' fair queues in this process (slots.admission): depth and waits."""
    family("hal0_slot_queue_depth", "gauge",
           "Gateway requests waiting for a place on the slot in this process "
           "(slots with max_concurrency).")
    gates = [(s, admission.gates.get(s.pk)) for s in slots]
    for s, gate in gates:
        if s.max_concurrency is not None or gate is not None:
            out.append(f'hal0_slot_queue_depth{{slot="{_label(s.name)}"}} '
                       f'{gate.depth if gate is not None else 0}')
    family("hal0_slot_queue_wait_seconds", "histogram",
           "How long gateway requests waited for a place on the slot (0 when one was free).")
    for s, gate in gates:
        if gate is not None:
            _histogram(out, "hal0_slot_queue_wait_seconds", s.name, WAIT_BUCKETS,
                       gate.wait_buckets, gate.wait_sum)
    family("hal0_slot_queue_timeouts_total", "counter",
           "Gateway requests that waited past the slot's queue_timeout_s (answered 429).")
    for s, gate in gates:
        if gate is not None:
            out.append(f'hal0_slot_queue_timeouts_total{{slot="{_label(s.name)}"}} '
                       f'{gate.timed_out}')
