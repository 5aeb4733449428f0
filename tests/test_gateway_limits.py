"""Per-token rate limits and per-slot fair queues (issue #13 §2-4), in-process through the
gateway's ASGI fast path. The upstream is a small loopback HTTP server of this module that
answers with the `usage` and after the delay each request asks for, and counts how many
requests it serves at once; the gateway talks real HTTP to it."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.core.management import CommandError, call_command

from slots import live, portability, ratelimits, runtime, tokens
from slots.forms import SlotForm, TokenForm
from slots.gateway import asgi as gateway_asgi
from slots.gateway import limits, routes
from slots.models import ApiToken, Node, Slot, State
from tests.harness import Stack, wait_for
from tests.sim_fixtures import start_simulator

MODEL = "Upstream-Model-GGUF"


class Upstream(BaseHTTPRequestHandler):
    """POST: waits `delay` s, answers `usage` [in, out] (as SSE when `stream`); notes the
    request's `tag` when it arrives and how many it serves at once."""

    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    now = 0
    most = 0
    served: list[str] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        cls = type(self)
        with cls.lock:  # what reached lemond, in the order it arrived
            cls.now += 1
            cls.most = max(cls.most, cls.now)
            cls.served.append(body.get("tag", ""))
        try:
            time.sleep(body.get("delay", 0))
            tokens_in, tokens_out = body.get("usage", [3, 4])
            usage = {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                     "total_tokens": tokens_in + tokens_out}
            if body.get("stream"):
                chunks = [{"choices": [{"delta": {"content": "hi"}}]},
                          {"choices": [], "usage": usage}]
                payload = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n"
                                   for c in chunks) + b"data: [DONE]\n\n"
                content_type = "text/event-stream"
            else:
                payload = json.dumps({"choices": [{"message": {"content": "hi"}}],
                                      "usage": usage}).encode()
                content_type = "application/json"
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        finally:
            with cls.lock:
                cls.now -= 1

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    Upstream.now = Upstream.most = 0
    Upstream.served = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def slot(upstream):
    node = Node.objects.create(name="up", base_url=upstream)
    slot = Slot.objects.create(name="talk", capability="chat", device="cpu", model_name=MODEL,
                               node=node, state=State.READY, loaded_model=MODEL)
    routes.invalidate_routes()
    return slot


def _token(name: str, **limits_) -> str:
    tokens.clear_cache()
    return tokens.create_token(name, **limits_)[1]


async def _call(raw: str, body: dict, *, disconnect: asyncio.Event | None = None):
    """One chat completion through gateway_asgi.serve: (status, headers, body)."""
    content = json.dumps({"model": "talk", "messages": [], **body}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(content)).encode()),
                         (b"authorization", f"Bearer {raw}".encode())]}
    sent: list[dict] = []
    read = False

    async def receive():
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": content, "more_body": False}
        if disconnect is None:
            await asyncio.sleep(3600)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(gateway_asgi.serve(scope, receive, send), 30)
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:
        return None, {}, b""
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, data


def call(raw: str, **body):
    return async_to_sync(_call)(raw, body)


# --- per-token limits --------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_token_without_limits_gets_no_headers_and_counts_nothing(slot):
    raw = _token("free")
    for _ in range(3):
        status, headers, _ = call(raw)
        assert status == 200
        assert not any(h.startswith("x-ratelimit") for h in headers), headers
    state = runtime.current()
    assert state.rate_limits._memory is None  # no window was ever built
    assert state.admission.gates == {}  # nor a queue for a slot without max_concurrency


@pytest.mark.django_db(transaction=True)
def test_past_the_requests_limit_a_token_gets_openais_429(slot):
    raw, other = _token("two-a-minute", rpm_limit=2), _token("other", rpm_limit=2)
    remaining = []
    for _ in range(2):
        status, headers, _ = call(raw)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in headers  # no tokens limit, no tokens trio
        remaining.append(headers["x-ratelimit-remaining-requests"])
    assert remaining == ["1", "0"]
    status, headers, content = call(raw)
    assert status == 429
    error = json.loads(content)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "Limit 2" in error["message"] and "two-a-minute" in error["message"]
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert Upstream.served.count("") == 2  # the refused request never reached lemond
    assert call(other)[0] == 200  # every token has its own window


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_tokens_are_charged_after_the_response_and_a_spent_window_refuses(slot, stream):
    raw = _token("hundred", tpm_limit=100)
    status, headers, _ = call(raw, usage=[60, 50], stream=stream)  # 110: over, yet served
    assert status == 200
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "100"  # before this response's usage
    status, headers, content = call(raw, stream=stream)
    assert status == 429, content
    error = json.loads(content)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert "Limit 100, Used 100" in error["message"]
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(headers["retry-after"]) >= 1


@pytest.mark.django_db(transaction=True)
def test_a_request_refused_for_tokens_does_not_use_a_request(slot):
    raw = _token("both", rpm_limit=5, tpm_limit=10)
    status, headers, _ = call(raw, usage=[10, 10])
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "4"
    status, headers, _ = call(raw)
    assert status == 429 and headers["x-ratelimit-remaining-requests"] == "4"


def test_reset_durations_are_written_as_openai_writes_them():
    assert limits.duration(0.02) == "20ms"
    assert limits.duration(1) == "1s"
    assert limits.duration(1.5) == "1.5s"
    assert limits.duration(360) == "6m0s"
    assert limits.duration(59.9996) == "1m0s"


def test_in_memory_windows_start_no_thread_per_request(monkeypatch):
    """`limits`' own MemoryStorage starts a 10 ms timer thread on a hit whenever none is
    alive: up to 100 threads a second under a steady stream, each taking the GIL from the
    event loop. hal0's windows count the same without any."""
    windows = ratelimits.RateLimits()
    asyncio.run(windows.admit(7, 1000, 1000))  # builds the storage (its one first timer)
    time.sleep(0.05)
    timers = []
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (
        isinstance(self, threading.Timer) and timers.append(self), start(self))[1])

    async def requests() -> list[int]:
        remaining = []
        for _ in range(5):
            verdict = await windows.admit(7, 1000, 1000)
            remaining.append(verdict.windows[0].remaining)
            windows.charge(7, 1000, 10)
            await asyncio.sleep(0.02)  # past the 10 ms timer: limits would start a new one
        return remaining

    assert asyncio.run(requests()) == [998, 997, 996, 995, 994]  # still counted
    assert timers == []


def test_in_memory_windows_sweep_expired_keys_inline():
    storage = ratelimits._LazyMemoryStorage()
    time.sleep(0.05)  # past the one timer its constructor starts
    storage.incr("gone", expiry=0.01)
    time.sleep(0.02)
    storage.incr("here", expiry=60)
    assert "gone" in storage.storage  # not swept yet: at most once per SWEEP_EVERY_S
    storage._next_sweep = 0.0
    storage.incr("here", expiry=60)
    assert "gone" not in storage.storage and storage.get("here") == 2


# --- setting the limits -------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("value", ["0", "-3", "many", "1.5"])
def test_tokens_create_refuses_a_bad_limit_and_creates_nothing(value):
    with pytest.raises(CommandError, match="--rpm must be a whole number"):
        call_command("tokens", "create", "ci", "--rpm", value)
    with pytest.raises(CommandError, match="--tpm must be a whole number"):
        call_command("tokens", "create", "ci", "--tpm", value)
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
def test_tokens_create_sets_the_limits(capsys):
    call_command("tokens", "create", "ci", "--rpm", "60", "--tpm", "5000")
    token = ApiToken.objects.get(name="ci")
    assert (token.rpm_limit, token.tpm_limit) == (60, 5000)
    assert "60 requests/min, 5000 tokens/min" in capsys.readouterr().err
    call_command("tokens", "list", "--json")
    row = json.loads(capsys.readouterr().out)[0]
    assert (row["rpm_limit"], row["tpm_limit"]) == (60, 5000)


@pytest.mark.django_db
def test_the_tokens_page_sets_limits_and_refuses_zero(admin_client):
    response = admin_client.post("/tokens/", {"name": "zero", "rpm_limit": "0"})
    assert response.status_code == 200 and not ApiToken.objects.exists()
    assert "greater than or equal to 1" in response.content.decode()
    assert not TokenForm({"name": "x", "tpm_limit": "-1"}).is_valid()
    response = admin_client.post("/tokens/", {"name": "webui", "rpm_limit": "30",
                                              "tpm_limit": "20000"})
    assert response.status_code == 200
    token = ApiToken.objects.get(name="webui")
    assert (token.rpm_limit, token.tpm_limit) == (30, 20000)
    assert "30 req/min, 20000 tokens/min" in admin_client.get("/tokens/").content.decode()


@pytest.mark.django_db
def test_the_admin_sets_a_tokens_limits(admin_client):
    response = admin_client.post("/admin/slots/apitoken/add/",
                                 {"name": "admin-made", "slots": "", "listed": "",
                                  "rpm_limit": "12", "tpm_limit": ""})
    assert response.status_code == 302, response.content.decode()[:2000]
    token = ApiToken.objects.get(name="admin-made")
    assert (token.rpm_limit, token.tpm_limit) == (12, None)
    response = admin_client.post(f"/admin/slots/apitoken/{token.pk}/change/",
                                 {"name": "admin-made", "slots": "", "listed": "",
                                  "rpm_limit": "0", "tpm_limit": "7"})
    assert response.status_code == 200  # the form again, with the error
    token.refresh_from_db()
    assert (token.rpm_limit, token.tpm_limit) == (12, None)


# --- per-slot fair queue ------------------------------------------------------------------

async def until(check, timeout: float = 30.0) -> None:
    """Wait (on the loop) until `check()` is true; `timeout` is a ceiling, not a measure."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.01)


def _queued(pk: int) -> int:
    gate = runtime.current().admission.gates.get(pk)
    return gate.depth if gate is not None else 0


@pytest.mark.django_db(transaction=True)
def test_a_busy_slot_queues_round_robin_across_tokens(slot):
    """One token sends 8 at once, another sends 1 after them: with max_concurrency 1 the
    lone request is served second or third, not ninth, and lemond never sees two at once."""
    Slot.objects.filter(pk=slot.pk).update(max_concurrency=1, queue_timeout_s=60)
    routes.invalidate_routes()
    burst, lone = _token("burst"), _token("lone")

    async def scenario():
        # b0 is served first and holds the slot for 2 s, so the other seven and then the
        # lone one are all queued before it ends, however slow the machine (with all eight
        # sent at once, any of them could arrive first, and a 50 ms first one could end
        # before the queue reached 7)
        first = [asyncio.ensure_future(_call(burst, {"delay": 2.0, "tag": "b0"}))]
        await until(lambda: Upstream.now == 1, timeout=30)
        first += [asyncio.ensure_future(_call(burst, {"delay": 0.05, "tag": f"b{i}"}))
                  for i in range(1, 8)]
        await until(lambda: _queued(slot.pk) == 7, timeout=30)
        alone = asyncio.ensure_future(_call(lone, {"delay": 0.05, "tag": "lone"}))
        await until(lambda: _queued(slot.pk) == 8, timeout=30)
        return await asyncio.gather(*first, alone)

    results = async_to_sync(scenario)()
    assert [r[0] for r in results] == [200] * 9
    assert Upstream.most == 1
    assert Upstream.served.index("lone") <= 2, Upstream.served
    assert Upstream.served[:1] == ["b0"]
    stats = runtime.current().admission.stats(slot.pk, 1)
    assert stats["depth"] == 0 and stats["active"] == 0 and stats["queued_total"] == 8
    assert stats["wait_max_ms"] > 0


@pytest.mark.django_db(transaction=True)
def test_a_request_waiting_past_the_queue_timeout_gets_a_429(slot):
    Slot.objects.filter(pk=slot.pk).update(max_concurrency=1, queue_timeout_s=0)
    routes.invalidate_routes()
    raw = _token("impatient")

    async def scenario():
        held = asyncio.ensure_future(_call(raw, {"delay": 0.5}))
        await until(lambda: Upstream.now == 1, timeout=30)
        refused = await _call(raw, {})
        return refused, await held

    (status, headers, content), (held_status, _, _) = async_to_sync(scenario)()
    assert held_status == 200
    assert status == 429
    error = json.loads(content)["error"]
    assert error["code"] == "slot_busy" and "at most 1 request" in error["message"]
    assert int(headers["retry-after"]) >= 1
    assert Upstream.served == [""]  # the refused one never reached lemond
    assert runtime.current().admission.stats(slot.pk, 1)["timed_out_total"] == 1


@pytest.mark.django_db(transaction=True)
def test_a_client_that_leaves_while_queued_leaves_the_queue_at_once(slot):
    Slot.objects.filter(pk=slot.pk).update(max_concurrency=1, queue_timeout_s=60)
    routes.invalidate_routes()
    raw = _token("leaver")

    async def scenario():
        gone = asyncio.Event()
        held = asyncio.ensure_future(_call(raw, {"delay": 0.3, "tag": "held"}))
        await until(lambda: Upstream.now == 1, timeout=30)
        waiting = asyncio.ensure_future(_call(raw, {"tag": "left"}, disconnect=gone))
        await until(lambda: _queued(slot.pk) == 1, timeout=30)
        gone.set()
        await until(lambda: _queued(slot.pk) == 0, timeout=30)
        assert not held.done()  # it left while the place was still taken
        return await waiting, await held

    (left_status, _, _), (held_status, _, _) = async_to_sync(scenario)()
    assert left_status is None and held_status == 200
    assert Upstream.served == ["held"]
    stats = runtime.current().admission.stats(slot.pk, 1)
    assert stats["left_total"] == 1 and stats["active"] == 0


@pytest.mark.django_db(transaction=True)
def test_queue_numbers_reach_the_card_the_json_and_metrics(slot, admin_client):
    Slot.objects.filter(pk=slot.pk).update(max_concurrency=2)
    routes.invalidate_routes()
    raw = _token("watcher")
    assert call(raw)[0] == 200
    card = live.render_slot_card(Slot.objects.get(pk=slot.pk))
    assert 'id="slot-queue-talk"' in card and "0/2 serving" in card
    assert 'data-testid="queue-depth">0<' in card
    detail = admin_client.get("/api/slots/talk/").json()
    assert detail["max_concurrency"] == 2 and detail["queue_timeout_s"] == 30
    assert detail["queue"]["depth"] == 0 and detail["queue"]["wait_p50_ms"] == 0.0
    text = admin_client.get("/metrics").content.decode()
    assert 'hal0_slot_queue_depth{slot="talk"} 0' in text
    assert 'hal0_slot_queue_wait_seconds_count{slot="talk"} 1' in text
    assert 'hal0_slot_queue_wait_seconds_bucket{slot="talk",le="0.005"} 1' in text
    # a slot without a limit has no queue line and no queue series
    seeded = Slot.objects.get(name="chat")
    assert "slot-queue-" not in live.render_slot_card(seeded)
    assert 'hal0_slot_queue_depth{slot="chat"}' not in text


@pytest.mark.django_db
def test_slot_queue_settings_are_validated_and_travel_with_export(node):
    data = {**Slot.objects.get(name="chat").export_dict(), "max_concurrency": "0",
            "queue_timeout_s": "5", "node": node.pk}
    form = SlotForm(data, instance=Slot.objects.get(name="chat"))
    assert not form.is_valid() and "max_concurrency" in form.errors
    exported = json.loads(portability.export_json())
    chat = next(s for s in exported["slots"] if s["name"] == "chat")
    assert chat["max_concurrency"] is None and chat["queue_timeout_s"] == 30
    plan = portability.plan_import(json.dumps(
        {"slots": [{"name": "chat", "max_concurrency": 4, "queue_timeout_s": 10}]}))
    assert plan.updates[0][1] == {"max_concurrency": 4, "queue_timeout_s": 10}
    with pytest.raises(portability.ImportProblem, match="max_concurrency"):
        portability.plan_import(json.dumps({"slots": [{"name": "chat", "max_concurrency": 0}]}))
    with pytest.raises(portability.ImportProblem, match="queue_timeout_s"):
        portability.plan_import(json.dumps({"slots": [{"name": "chat",
                                                       "queue_timeout_s": 99999}]}))


# --- a real serve, a real client that goes away ---------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The simulator and one `serve` whose chat slot takes one request at a time."""
    sim = start_simulator(load_delay=0.1, token_delay=0.005)
    stack = Stack(tmp_path_factory.mktemp("hal0-queue"), HAL0_LEMONADE_URL=sim.url)
    try:
        stack.manage("migrate", "-v0")
        settings_file = stack.tmp_path / "queue.json"
        settings_file.write_text(json.dumps(
            {"slots": [{"name": "chat", "max_concurrency": 1, "queue_timeout_s": 120}]}))
        stack.manage("slots", "import", str(settings_file))
        raw = stack.manage("tokens", "create", "e2e").stdout.strip()
        yield stack.serve("--no-reconciler"), raw, sim
    finally:
        stack.stop()
        sim.stop()


@pytest.mark.e2e
def test_a_real_client_that_disconnects_while_queued_leaves_the_queue(served):
    url, raw, sim = served
    headers = {"Authorization": f"Bearer {raw}"}
    body = {"model": "chat", "messages": [{"role": "user", "content": "Say hello."}]}

    def queue() -> dict:
        return httpx.get(f"{url}/api/slots/chat/", headers=headers, timeout=30).json()["queue"]

    assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=60).status_code == 200  # loaded
    sim.configure(token_delay=0.2, reply_length=300)  # a stream of a minute
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                      headers=headers, timeout=60) as holding:
        chunks = holding.iter_raw()
        next(chunks)  # it holds the slot's one place
        # a second client queues behind it, over a plain socket, and hangs up
        content = json.dumps(body).encode()
        port = int(url.rsplit(":", 1)[1])
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/json\r\n"
                       + f"Authorization: Bearer {raw}\r\n"
                         f"Content-Length: {len(content)}\r\n\r\n".encode() + content)
        wait_for(lambda: queue()["depth"] == 1, timeout=30)
        client.close()
        wait_for(lambda: queue()["depth"] == 0, timeout=30)
        stats = queue()
        assert stats["left_total"] == 1 and stats["active"] == 1  # the stream still holds it
        assert sim.state()["in_flight_requests"] == 1  # the one that left never reached lemond
    sim.configure(token_delay=0.005)
    wait_for(lambda: queue()["active"] == 0, timeout=30)
    metrics = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    assert 'hal0_slot_queue_depth{slot="chat"} 0' in metrics


@pytest.mark.django_db(transaction=True)
def test_a_queue_that_builds_up_is_pushed_to_open_dashboards(slot):
    """The card's queue line follows the queue by itself (one push per burst), through the
    same channel group the dashboard's websocket listens on."""
    from channels.layers import get_channel_layer

    Slot.objects.filter(pk=slot.pk).update(max_concurrency=1, queue_timeout_s=60)
    routes.invalidate_routes()
    raw = _token("pushed")
    state = runtime.current()
    state.live.viewer_joined()  # a dashboard is open in this process

    async def scenario():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(live.GROUP, channel)
        held = [asyncio.ensure_future(_call(raw, {"delay": 1.0})) for _ in range(3)]
        while True:  # the slot's card comes too (ready -> serving): wait for the queue line
            html = (await asyncio.wait_for(layer.receive(channel), 30))["html"].strip()
            if html.startswith('<p id="slot-queue-talk"'):
                break
        await asyncio.gather(*held)
        return html

    html = async_to_sync(scenario)()
    assert 'hx-swap-oob="true"' in html and "/1 serving" in html
    # one or two wait behind the one served (the push comes 0.5 s after the first change)
    assert re.search(r'data-testid="queue-depth">[12]<', html), html


@pytest.mark.django_db(transaction=True)
def test_a_queue_that_builds_up_is_pushed_to_open_activity_pages(slot, admin_user):
    """The Activity page's queue table follows the queue too: the admission nudges the
    Activity group, and each page's socket answers with its table, out-of-band."""
    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator
    from django.test import AsyncClient

    from hal0site.asgi import application

    Slot.objects.filter(pk=slot.pk).update(max_concurrency=1, queue_timeout_s=60)
    routes.invalidate_routes()
    raw = _token("watched")

    async def scenario():
        client = AsyncClient()
        await sync_to_async(client.force_login)(admin_user)
        cookie = f"sessionid={client.cookies['sessionid'].value}"
        socket = WebsocketCommunicator(application, "/ws/activity/",
                                       headers=[(b"host", b"testserver"),
                                                (b"cookie", cookie.encode()),
                                                (b"origin", b"http://testserver")])
        connected, _ = await socket.connect()
        assert connected
        await socket.receive_from(5)  # the live-status badge
        held = [asyncio.ensure_future(_call(raw, {"delay": 1.0})) for _ in range(3)]
        while True:
            html = await socket.receive_from(30)
            if 'id="activity-queues"' in html:
                break
        await asyncio.gather(*held)
        await socket.disconnect()
        return html

    html = async_to_sync(scenario)()
    assert 'hx-swap-oob="true"' in html and 'id="queue-talk"' in html
    assert re.search(r'data-testid="queue-waiting">[12]<', html), html
    assert 'data-testid="queue-serving">1 / 1<' in html
