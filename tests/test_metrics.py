"""Gateway metrics: usage parsing, batched writes, pruning, slot stats, Prometheus text."""

from __future__ import annotations

import json
import sys
import threading
from datetime import timedelta

import pytest
from django.db import OperationalError
from django.utils import timezone

from slots import metrics, runtime
from slots.metrics import RequestSample
from slots.models import RequestMetric


def obs(slot="chat", status=200, latency=100.0, ago=timedelta(minutes=1), **extra):
    return RequestSample(slot_name=slot, endpoint="chat/completions", status=status,
                       started_at=timezone.now() - ago, latency_ms=latency, **extra)


# --- usage ---------------------------------------------------------------------------------------

def test_usage_and_timings_of_a_chat_response():
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 15},
                       "timings": {"prompt_ms": 3.5, "predicted_per_second": 42.0}}).encode()
    assert metrics.usage_of(body) == {"tokens_in": 9, "tokens_out": 15, "tokens_per_s": 42.0,
                                      "prompt_ms": 3.5}


def test_usage_from_the_tail_of_a_stream():
    chunks = [{"choices": [{"delta": {"content": "hi"}}], "usage": None},
              {"choices": [{"delta": {}, "finish_reason": "stop"}],
               "timings": {"prompt_n": 7, "predicted_n": 12, "predicted_per_second": 80.5}}]
    stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    usage = metrics.usage_of(stream.encode())
    assert usage["tokens_in"] == 7 and usage["tokens_out"] == 12
    assert usage["tokens_per_s"] == 80.5


def test_usage_of_things_without_usage():
    assert metrics.usage_of(b"\xff\xfbID3 binary mp3")["tokens_out"] is None
    assert metrics.usage_of(b'{"usage": {"prompt_tokens": 3, "total_tokens": 3}}') == \
        {"tokens_in": 3, "tokens_out": None, "tokens_per_s": None, "prompt_ms": None}
    assert metrics.usage_of(b'{"usage": {"broken": ')["tokens_in"] is None


# --- writing -------------------------------------------------------------------------------------

def test_observations_are_written_in_one_batch_on_flush(db):
    for latency in (10, 20, 30):
        runtime.current().metrics.record(obs(latency=latency))
    assert RequestMetric.objects.count() == 0  # observing never touches the database
    assert runtime.current().metrics.flush() == 3
    assert RequestMetric.objects.count() == 3
    assert runtime.current().metrics.pending() == []
    assert runtime.current().metrics.flush() == 0


def test_the_writers_insert_stores_every_field_of_a_sample(db):
    """metrics.insert writes its own INSERT (not bulk_create): every column of the model,
    the values as the sample holds them, long names cut to the columns' lengths."""
    fields = {f.name for f in RequestMetric._meta.concrete_fields if not f.primary_key}
    assert set(metrics.COLUMNS) == fields  # a new column needs its value in the INSERT
    sample = RequestSample(slot_name="s" * 40, endpoint="chat/completions", status=429,
                           started_at=timezone.now() - timedelta(seconds=5), latency_ms=12.5,
                           ttft_ms=3.25, tokens_in=7, tokens_out=11, tokens_per_s=42.0,
                           stream=True, token_name="t" * 70)
    metrics.insert([sample, obs(latency=1)])
    stored = RequestMetric.objects.filter(status=429).values(*metrics.COLUMNS).get()
    expected = {name: getattr(sample, name) for name in metrics.COLUMNS}
    assert stored == {**expected, "slot_name": "s" * 32, "token_name": "t" * 64}
    assert RequestMetric.objects.count() == 2


def test_old_rows_are_pruned(db, settings):
    settings.HAL0_METRICS_RETENTION_H = 1
    runtime.current().metrics.record(obs(ago=timedelta(hours=2)))
    runtime.current().metrics.record(obs(ago=timedelta(minutes=5)))
    runtime.current().metrics.flush()  # prunes on its first run
    assert RequestMetric.objects.count() == 1
    assert metrics.prune() == 0


def test_the_reconcilers_housekeeping_prunes_without_any_gateway_traffic(db, settings):
    """A process restarted after a quiet day serves no /v1 request, so the flusher never
    starts; the reconciler's housekeeping still prunes (at most once per PRUNE_EVERY_S)."""
    from asgiref.sync import async_to_sync

    from slots import reconciler

    settings.HAL0_METRICS_RETENTION_H = 1
    RequestMetric.objects.bulk_create([obs(ago=timedelta(hours=3)).row(),
                                       obs(ago=timedelta(minutes=5)).row()])
    async_to_sync(reconciler._housekeeping)()
    assert RequestMetric.objects.count() == 1
    RequestMetric.objects.bulk_create([obs(ago=timedelta(hours=3)).row()])
    async_to_sync(reconciler._housekeeping)()  # pruned a moment ago: not yet again
    assert RequestMetric.objects.count() == 2


# --- reading -------------------------------------------------------------------------------------

def test_slot_stats_over_the_last_hour(db):
    for i in range(1, 101):
        runtime.current().metrics.record(obs(latency=float(i), tokens_per_s=50.0 if i <= 50 else 70.0,
                            tokens_in=10, tokens_out=20, ttft_ms=5.0))
    runtime.current().metrics.record(obs(status=502, latency=1000.0))
    runtime.current().metrics.record(obs(latency=9999.0, ago=timedelta(hours=2)))  # outside the window
    runtime.current().metrics.record(obs(slot="embed", latency=1.0))
    runtime.current().metrics.flush()
    runtime.current().metrics.record(obs(latency=0.5))  # not written yet: still counted
    stats = metrics.slot_stats("chat", runtime.current().metrics.pending())
    assert stats["count"] == 102 and stats["errors"] == 1
    assert stats["requests_per_min"] == pytest.approx(102 / 60, abs=0.01)
    assert stats["p50_ms"] == 50.0 and stats["p95_ms"] == 96.0  # nearest rank of 102
    assert stats["tokens_per_s"] == 60.0 and stats["ttft_p50_ms"] == 5.0
    assert stats["tokens_in"] == 1000 and stats["tokens_out"] == 2000
    empty = metrics.slot_stats("img", runtime.current().metrics.pending())
    assert empty["count"] == 0 and empty["p50_ms"] is None and empty["tokens_per_s"] is None


def test_prometheus_text(db):
    runtime.current().metrics.record(obs(latency=30.0, tokens_in=5, tokens_out=7, ttft_ms=12.0))
    runtime.current().metrics.record(obs(status=503, latency=2.0))
    text = metrics.prometheus_text(runtime.current().serving, runtime.current().metrics)
    lines = text.splitlines()
    assert "# TYPE hal0_gateway_requests_total counter" in lines
    assert 'hal0_gateway_requests_total{slot="chat",endpoint="chat/completions",status="200"} 1' \
        in lines
    assert 'hal0_gateway_requests_total{slot="chat",endpoint="chat/completions",status="503"} 1' \
        in lines
    assert 'hal0_gateway_request_duration_seconds_bucket{slot="chat",le="0.005"} 1' in lines
    assert 'hal0_gateway_request_duration_seconds_bucket{slot="chat",le="+Inf"} 2' in lines
    assert 'hal0_gateway_request_duration_seconds_count{slot="chat"} 2' in lines
    assert 'hal0_gateway_tokens_total{slot="chat",direction="out"} 7' in lines
    assert 'hal0_slot_state{slot="chat",state="offline"} 1' in lines
    assert 'hal0_slot_loaded{slot="embed"} 0' in lines
    assert "hal0_gateway_metrics_buffered 2" in lines
    for line in lines:  # every sample line is `name{labels} value`
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("hal0_")


def test_slot_page_shows_the_last_hours_traffic(admin_client):
    from datetime import timedelta

    from django.utils import timezone

    from slots.models import RequestMetric

    now = timezone.now()
    RequestMetric.objects.bulk_create([
        RequestMetric(slot_name="chat", endpoint="chat/completions", status=200,
                      started_at=now - timedelta(minutes=i), latency_ms=100 + i * 10,
                      ttft_ms=20, tokens_in=5, tokens_out=10, tokens_per_s=40.0)
        for i in range(10)])
    page = admin_client.get("/slots/chat/").content.decode()
    assert "Requests, last hour" in page
    assert "requests/min" in page and "0.17" in page  # 10 requests / 60 min
    assert "40.0" in page and "0 of 10" in page
    assert "No gateway requests" in admin_client.get("/slots/embed/").content.decode()


def test_nonsense_token_counts_are_dropped_not_written():
    for bad in (-3, 2**31, 1e12):
        body = json.dumps({"usage": {"prompt_tokens": bad, "completion_tokens": 5}}).encode()
        usage = metrics.usage_of(body)
        assert usage["tokens_in"] is None and usage["tokens_out"] == 5


@pytest.mark.django_db(transaction=True)
def test_a_batch_that_cannot_be_written_does_not_stop_claim_renewal(dead_node, make_slot,
                                                                   hal0_runtime,
                                                                   monkeypatch):
    """The serving claims of a busy process are renewed even when the database refuses the
    metrics batch (here a row its CHECK constraint rejects)."""
    from django.db import IntegrityError

    from slots.models import Lease

    busy = make_slot("busy", node=dead_node)
    hal0_runtime.serving.in_flight[busy.pk] = 1
    runtime.current().metrics.record(obs(tokens_in=-1))  # past usage_of's clamp: PositiveIntegerField says no
    with pytest.raises(IntegrityError):
        runtime.current().metrics.flush()
    assert Lease.objects.filter(name__startswith=f"serving:{busy.pk}:").exists()
    assert len(runtime.current().metrics.pending()) == 1  # kept for the next try


# --- the buffer shared by the event loop and the writer's thread -------------------------------

def test_a_request_recorded_at_any_moment_of_a_failed_write_is_kept(db, hal0_runtime,
                                                                   monkeypatch):
    """The gateway records requests on the event loop while the writer flushes on a worker
    thread, and a write may fail (a locked database): the batch goes back for the next try.
    Here the "event loop" (another thread) records a request between every two bytecodes
    of the failing flush; each one must still be there afterwards, none lost to a batch
    swapped or put back under its feet."""
    buffer = hal0_runtime.metrics

    def locked(samples):
        raise OperationalError("database is locked")

    monkeypatch.setattr(metrics, "insert", locked)
    buffer.record(obs(latency=0.0))
    recorded = [0.0]
    go, done, stop = threading.Event(), threading.Event(), threading.Event()

    def event_loop():
        while True:
            go.wait()
            go.clear()
            if stop.is_set():
                return
            latency = float(len(recorded))
            buffer.record(obs(latency=latency))
            recorded.append(latency)
            done.set()

    flush_code = type(buffer).flush.__code__

    def between_bytecodes(frame, event, arg):
        if event == "call":
            if frame.f_code is not flush_code:
                return None
            frame.f_trace_opcodes = True
        elif event == "opcode":
            done.clear()
            go.set()
            done.wait(0.05)  # under the buffer's lock it waits: that is the point
        return between_bytecodes

    loop = threading.Thread(target=event_loop)
    loop.start()
    sys.settrace(between_bytecodes)
    try:
        with pytest.raises(OperationalError):
            buffer.flush()
    finally:
        sys.settrace(None)
        stop.set()
        go.set()
        loop.join(5)
    assert len(recorded) > 20  # it did record in the middle of the flush
    assert sorted(s.latency_ms for s in buffer.pending()) == recorded


def test_a_process_started_right_after_boot_prunes_and_renews_at_once(db, hal0_runtime,
                                                                      settings, make_slot,
                                                                      dead_node):
    """The appliance starts hal0 seconds after power-on, when the monotonic clock is
    near 0: the first flush still prunes old rows and renews serving leases (nothing is
    "less than PRUNE_EVERY_S since 0.0")."""
    from slots.models import Lease

    settings.HAL0_METRICS_RETENTION_H = 1
    busy = make_slot("busy", node=dead_node)
    hal0_runtime.serving.in_flight[busy.pk] = 1
    buffer = metrics.MetricsBuffer(serving=hal0_runtime.serving,
                                   stamps=hal0_runtime.token_stamps, clock=lambda: 3.0)
    buffer.record(obs(ago=timedelta(hours=2)))
    assert buffer.flush() == 1
    assert RequestMetric.objects.count() == 0  # written, then pruned on the first flush
    assert Lease.objects.filter(name__startswith=f"serving:{busy.pk}:").exists()
    buffer.record(obs(ago=timedelta(hours=2)))
    buffer.flush()
    assert RequestMetric.objects.count() == 1  # the next prune is PRUNE_EVERY_S away
