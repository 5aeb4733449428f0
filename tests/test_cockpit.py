"""The slot page's "Try it" panels and the Activity page, in-process (Django's clients, the
ASGI communicator, the shared simulator): the session path into the gateway (login, CSRF,
the user recorded as the token name), who sees which rows, the live rows, the 24 h trend.
The real browser covers the same in tests/test_browser_cockpit.py."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from hal0site.asgi import application
from slots import activity, runtime
from slots.gateway.routes import invalidate_routes
from slots.metrics import RequestSample
from slots.models import RequestMetric, Slot
from tests.harness import cookie_for

ORIGIN = (b"origin", b"http://127.0.0.1:8000")
HOST = (b"host", b"127.0.0.1:8000")


def _csrf_client(user) -> tuple[Client, str]:
    """A logged-in client that enforces CSRF like a browser, and the page's token."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    page = client.get("/slots/embed/")
    assert page.status_code == 200
    return client, str(page.context["csrf_token"])


@pytest.fixture
def alice(db, django_user_model):
    return django_user_model.objects.create_user("alice", "", "correct-horse-battery")


def _embed_body() -> str:
    return json.dumps({"input": ["a cat on a mat", "a cat on a rug"], "model": "chat"})


@pytest.mark.django_db(transaction=True)
def test_a_try_request_goes_through_the_gateway_as_the_session_user(node, alice):
    client, csrf = _csrf_client(alice)  # a non-staff operator may try every slot
    response = client.post("/slots/embed/try/embeddings", _embed_body(),
                           content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    # the page's slot, not the body's `model` ("chat" cannot embed)
    assert len(data) == 2 and len(data[0]["embedding"]) > 1
    assert runtime.current().metrics.flush() == 1
    row = RequestMetric.objects.get()
    assert (row.slot_name, row.endpoint, row.status, row.token_name) == (
        "embed", "embeddings", 200, "user:alice")


@pytest.mark.django_db(transaction=True)
def test_try_needs_a_login_and_a_csrf_token(node, alice):
    anonymous = Client()  # even past the CSRF check, no session: the login page
    response = anonymous.post("/slots/embed/try/embeddings", _embed_body(),
                              content_type="application/json")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    client, _ = _csrf_client(alice)
    response = client.post("/slots/embed/try/embeddings", _embed_body(),
                           content_type="application/json")
    assert response.status_code == 403
    response = client.get("/slots/embed/try/embeddings")
    assert response.status_code == 405
    runtime.current().metrics.flush()
    assert not RequestMetric.objects.exists()  # nothing reached the gateway


@pytest.mark.django_db(transaction=True)
def test_try_answers_the_gateways_error_messages(node, alice, dead_node):
    client, csrf = _csrf_client(alice)
    Slot.objects.filter(name="embed").update(enabled=False)
    invalidate_routes()
    response = client.post("/slots/embed/try/embeddings", _embed_body(),
                           content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 409
    assert "disabled" in response.json()["error"]["message"]
    Slot.objects.filter(name="embed").update(enabled=True)
    invalidate_routes()  # the gateway's routing table is cached (HAL0_GATEWAY_ROUTE_CACHE_S)
    # lemond down (the local node now points where nothing listens): a message, no crash
    response = client.post("/slots/embed/try/embeddings", _embed_body(),
                           content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code in (502, 503)
    assert response.json()["error"]["message"]
    response = client.post("/slots/embed/try/nothing/here", "{}",
                           content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 404


def test_the_slot_page_offers_its_capabilitys_panel_and_says_simulator(admin_client, node):
    node.simulated = True
    node.save()
    html = admin_client.get("/slots/rerank/").content.decode()
    assert 'action="/slots/rerank/try/rerank"' in html
    assert "the simulator's" in html
    html = admin_client.get("/slots/chat/").content.decode()
    assert 'action="/slots/chat/try/chat/completions"' in html and 'id="try-prompt"' in html


def _metric(slot: str, status: int, token: str, minutes_ago: float = 1.0, **extra):
    return RequestMetric.objects.create(
        slot_name=slot, endpoint="chat/completions", status=status, token_name=token,
        started_at=timezone.now() - timedelta(minutes=minutes_ago), latency_ms=120.0,
        **extra)


def test_activity_rows_follow_the_roles_and_the_filters(client, admin_client, alice):
    _metric("chat", 200, "ci-bot", tokens_in=5, tokens_out=7, tokens_per_s=42.5, ttft_ms=31)
    _metric("embed", 503, "ci-bot", minutes_ago=2)
    _metric("chat", 200, "user:alice", minutes_ago=3)
    html = admin_client.get("/activity/").content.decode()
    assert html.count("<tr class=") == 3 and "ci-bot" in html and "42.5" in html
    assert "31 ms" in html and " UTC" in html  # TTFT in ms, times with their zone
    assert html.index("ci-bot") < html.index("user:alice")  # newest first
    html = admin_client.get("/activity/?status=error").content.decode()
    assert html.count("<tr class=") == 1 and "503" in html
    html = admin_client.get("/activity/?slot=chat&status=ok").content.decode()
    assert html.count("<tr class=") == 2 and 'ws-connect="/ws/activity/?slot=chat&amp;status=ok"' in html
    client.force_login(alice)  # an operator sees her own session's requests only
    html = client.get("/activity/").content.decode()
    assert html.count("<tr class=") == 1 and "ci-bot" not in html
    client.logout()
    assert client.get("/activity/").status_code == 302


def test_the_activity_page_shows_the_slot_queues(admin_client):
    Slot.objects.filter(name="chat").update(max_concurrency=2)
    html = admin_client.get("/activity/").content.decode()
    assert "Slot queues" in html and "0 / 2" in html


@pytest.mark.django_db(transaction=True)
async def test_a_written_batch_appears_live_for_those_who_may_see_it(admin_user, alice):
    async def connect(user, query=""):
        cookie = await sync_to_async(cookie_for)(user)
        socket = WebsocketCommunicator(application, f"/ws/activity/{query}",
                                       headers=[HOST, cookie, ORIGIN])
        connected, _ = await socket.connect()
        assert connected
        assert "live-status" in await socket.receive_from(timeout=5)
        return socket

    staff = await connect(admin_user)
    errors_only = await connect(admin_user, "?status=error")
    operator = await connect(alice)
    state = runtime.current()
    state.live.bind_loop()
    batch = [RequestSample(slot_name="chat", endpoint="chat/completions", status=200,
                           started_at=timezone.now(), latency_ms=80.0, ttft_ms=12.0,
                           tokens_in=3, tokens_out=9, tokens_per_s=55.0, token_name="ci-bot")]
    await sync_to_async(activity.push_batch)(state.live, batch)
    html = await staff.receive_from(timeout=5)
    assert 'hx-swap-oob="afterbegin:#activity-rows"' in html and "ci-bot" in html
    assert "55.0" in html and "12 ms" in html
    assert await errors_only.receive_nothing(timeout=0.3)
    assert await operator.receive_nothing(timeout=0.1)  # a token's request: staff only
    for socket in (staff, errors_only, operator):
        await socket.disconnect()
    assert state.live.page_watching() == 0


@pytest.mark.django_db(transaction=True)
def test_the_metrics_writer_hands_its_committed_batch_on(hal0_runtime):
    seen: list[list[RequestMetric]] = []
    buffer = hal0_runtime.metrics
    buffer._on_written = seen.append
    buffer.record(activity.RequestSample(
        slot_name="chat", endpoint="chat/completions", status=200,
        started_at=timezone.now(), latency_ms=10.0, token_name="ci-bot"))
    assert buffer.flush() == 1
    assert [[r.token_name for r in batch] for batch in seen] == [["ci-bot"]]


def test_the_slot_page_charts_the_last_24_hours_with_axes_and_units(admin_client):
    _metric("chat", 200, "ci-bot", minutes_ago=30, tokens_per_s=40.0)
    _metric("chat", 200, "ci-bot", minutes_ago=300, tokens_per_s=20.0)
    _metric("chat", 200, "ci-bot", minutes_ago=60 * 30, tokens_per_s=99.0)  # too old
    chart = activity.trend("chat")
    assert chart["count"] == 2
    tps, latency = chart["charts"]
    assert [d["value"] for d in tps["dots"]] == [20.0, 40.0]
    assert tps["top"] == 50 and latency["unit"] == "ms"
    html = admin_client.get("/slots/chat/").content.decode()
    assert html.count('class="axis"') == 4 and "tok/s" in html and ">ms<" in html
    assert "time axis in UTC" in html
