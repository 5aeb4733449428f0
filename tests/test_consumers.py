"""The websockets, through the real ASGI application (auth, Origin check, routing)."""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from hal0site.asgi import application
from slots import live, runtime
from slots.actions import config, lifecycle
from slots.models import Node, Slot, State
from tests.harness import REDIS_URL, cookie_for, in_a_worker_after_the_loop_stopped, redis_available

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"http://127.0.0.1:8000")


def communicator(path: str, *headers) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, path,
                                 headers=[(b"host", b"127.0.0.1:8000"), *headers])


async def receive_until(comm: WebsocketCommunicator, needle: str, timeout: float = 5) -> str:
    """Messages until one contains `needle` (pushes of earlier changes may come first)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        html = await comm.receive_from(timeout=max(remaining, 0.01))
        if needle in html:
            return html


async def test_anonymous_socket_is_refused(node):
    comm = communicator("/ws/slots/", ORIGIN)
    connected, code = await comm.connect()
    assert not connected and code == 4401
    await comm.disconnect()


async def test_foreign_origin_is_refused(node, session_cookie):
    comm = communicator("/ws/slots/", (b"origin", b"http://evil.example"), session_cookie)
    connected, _ = await comm.connect()
    assert not connected
    comm = communicator("/ws/slots/", session_cookie)  # no Origin at all
    connected, _ = await comm.connect()
    assert not connected


async def test_connect_resyncs_the_page_and_counts_the_viewer(node, session_cookie):
    before = runtime.current().live.viewers()
    comm = communicator("/ws/slots/", ORIGIN, session_cookie)
    connected, _ = await comm.connect()
    assert connected
    html = await comm.receive_from()
    assert 'id="live-status"' in html and "live" in html
    assert 'id="slot-chat"' in html and 'id="node-local"' in html
    assert html.count('hx-swap-oob="true"') >= 1 + 1 + 6
    assert runtime.current().live.viewers() == before + 1
    await comm.disconnect()
    assert runtime.current().live.viewers() == before


async def test_the_slot_page_resyncs_only_its_card(node, session_cookie):
    comm = communicator("/ws/slots/?slot=embed", ORIGIN, session_cookie)
    assert (await comm.connect())[0]
    html = await comm.receive_from()
    assert 'id="slot-embed"' in html and 'id="slot-chat"' not in html
    await comm.disconnect()


async def test_an_action_pushes_the_card_partial(node, session_cookie):
    comm = communicator("/ws/slots/", ORIGIN, session_cookie)
    assert (await comm.connect())[0]
    await comm.receive_from()  # the resync
    await sync_to_async(lifecycle.do_pin_slot)("chat", actor="cli")
    html = await receive_until(comm, 'id="slot-chat"')
    assert html.lstrip().startswith('<article id="slot-chat"')
    assert 'hx-swap-oob="true"' in html and "pinned" in html
    assert html == live.render_slot_card(
        await Slot.objects.select_related("node").aget(name="chat"))
    await comm.disconnect()


async def test_a_button_pushes_loading_then_ready_to_every_dashboard(node, session_cookie,
                                                                     admin_user):
    watchers = [communicator("/ws/slots/", ORIGIN, session_cookie) for _ in range(2)]
    for comm in watchers:
        assert (await comm.connect())[0]
        await comm.receive_from()
    client = AsyncClient()
    await sync_to_async(client.force_login)(admin_user)
    response = await client.post("/slots/chat/do/load/", headers={"HX-Request": "true"})
    assert response.status_code == 200
    for comm in watchers:
        await receive_until(comm, 'data-state="loading"')
        ready = await receive_until(comm, 'data-state="ready"')
        assert "Qwen3-4B-Instruct-2507-GGUF" in ready
    assert (await Slot.objects.aget(name="chat")).state == State.READY
    for comm in watchers:
        await comm.disconnect()


async def test_logs_are_relayed_from_lemond(node, sim, session_cookie):
    comm = communicator("/ws/logs/", ORIGIN, session_cookie)
    assert (await comm.connect())[0]
    # lemond 10.6 serves its log websocket on a port of its own, named in /v1/health
    following = await receive_until(comm, "Following lemond")
    assert f":{sim.websocket_port}/" in following and sim.websocket_port != sim.port
    snapshot = await receive_until(comm, 'id="log-lines"')
    # the snapshot ends with what lemond logged last: the simulator reset before this test
    assert 'hx-swap-oob="afterbegin"' in snapshot and "Reset to the startup state" in snapshot
    # something happens in lemond: its log line arrives
    await sync_to_async(lifecycle.do_load_slot)("embed", actor="cli")
    line = await receive_until(comm, "nomic-embed-text-v1-GGUF")
    assert 'class="log lvl-info"' in line

    # pause holds lines back; resume sends them
    await comm.send_to(text_data='{"pause": "1"}')
    controls = await receive_until(comm, 'id="log-pause"')
    assert "Resume" in controls
    await sync_to_async(lifecycle.do_unload_slot)("embed", actor="cli")
    assert await comm.receive_nothing(timeout=0.3)
    await comm.send_to(text_data='{"pause": "0"}')
    released = await receive_until(comm, "Unloaded nomic-embed-text-v1-GGUF")
    assert 'id="log-lines"' in released

    # the level filter re-renders what is kept
    await comm.send_to(text_data='{"level": "error"}')
    filtered = await receive_until(comm, 'hx-swap-oob="innerHTML"')
    assert "lvl-info" not in filtered
    await comm.disconnect()


async def test_logs_from_lemond_10_0_come_over_server_sent_events(node, lemond_sim_factory,
                                                                  session_cookie):
    old = lemond_sim_factory(version_shape="10.0")
    node.base_url = old.url
    await node.asave()
    comm = communicator("/ws/logs/", ORIGIN, session_cookie)
    assert (await comm.connect())[0]
    await receive_until(comm, "server-sent events, lemond &lt;= 10.0")
    await sync_to_async(lifecycle.do_load_slot)("embed", actor="cli")
    line = await receive_until(comm, "nomic-embed-text-v1-GGUF")
    assert 'class="log lvl-' in line
    await comm.disconnect()


async def test_logs_socket_needs_a_login(node):
    comm = communicator("/ws/logs/", ORIGIN)
    connected, code = await comm.connect()
    assert not connected and code == 4401


async def test_logs_say_so_when_lemond_is_down(dead_node, session_cookie):
    comm = communicator("/ws/logs/", ORIGIN, session_cookie)
    assert (await comm.connect())[0]
    status = await receive_until(comm, 'id="log-status"')
    assert "unavailable" in status and 'class="error"' in status
    await comm.disconnect()


# --- where a card sits: created, moved, renamed, deleted by any means -------------------------

def _holder(html: str, card: str, kind: str) -> str | None:
    """The node section (kind="nodesection") or capability group (kind="group") whose
    element precedes the card in the pushed layout."""
    at = html.find(f'id="slot-{card}"')
    if at < 0:
        return None
    holders = [(m.start(), m.group(1)) for m in re.finditer(rf'id="{kind}-([^"]+)"', html)]
    return [name for start, name in holders if start < at][-1]


async def _dashboard(session_cookie) -> WebsocketCommunicator:
    comm = communicator("/ws/slots/", ORIGIN, session_cookie)
    assert (await comm.connect())[0]
    await comm.receive_from()  # the resync
    return comm


async def test_a_slot_made_outside_the_page_takes_its_place_on_open_dashboards(
        node, session_cookie):
    """Not only the page's own buttons: actions push the grid when a card is new, renamed
    or deleted, so a second browser sees a slot made in the admin or another browser."""
    comm = await _dashboard(session_cookie)
    await sync_to_async(config.do_create_slot)(
        {"name": "chat2", "capability": "chat", "device": "cpu", "model_name": "Qwen3-0.6B-GGUF"}, actor="cli")
    layout = await receive_until(comm, 'id="layout"')
    assert layout.lstrip().startswith('<div id="layout" hx-swap-oob="true"')
    assert _holder(layout, "chat2", "group") == "chat"
    assert _holder(layout, "embed", "group") == "embed"  # the rest stays where it was

    await sync_to_async(config.do_update_slot)("chat2", {"name": "chat3", "capability": "embed",
                                                        "model_name": "nomic-embed-text-v1-GGUF"}, actor="cli")
    layout = await receive_until(comm, 'id="layout"')
    assert _holder(layout, "chat2", "group") is None
    assert _holder(layout, "chat3", "group") == "embed"

    await sync_to_async(config.do_delete_slot)("chat3", actor="cli")
    layout = await receive_until(comm, 'id="layout"')
    assert _holder(layout, "chat3", "group") is None and _holder(layout, "chat", "group")
    await comm.disconnect()


async def test_a_slot_moved_to_another_node_moves_on_open_dashboards(node, session_cookie):
    await Node.objects.acreate(name="b", base_url="http://127.0.0.1:9")  # nothing polls it
    comm = await _dashboard(session_cookie)
    await sync_to_async(config.do_update_slot)("chat", {"node": "b"}, actor="cli")
    layout = await receive_until(comm, 'id="layout"')
    assert _holder(layout, "chat", "nodesection") == "b"
    assert _holder(layout, "embed", "nodesection") == "local"
    await sync_to_async(config.do_update_slot)("chat", {"pinned": True}, actor="cli")  # same place
    card = await receive_until(comm, 'id="slot-chat"')
    assert card.lstrip().startswith('<article id="slot-chat"')  # just the card, no layout
    assert await comm.receive_nothing(timeout=0.5)
    await comm.disconnect()


# --- a push from a worker thread while the server stops ------------------------------------

def test_a_push_from_a_worker_thread_after_the_loop_stopped_returns():
    """A gateway worker thread pushes a card after Daphne's loop stopped (SIGTERM)."""
    _, took = in_a_worker_after_the_loop_stopped(runtime.current().live.send, '<div id="slot-x"></div>')
    assert took < 5


@pytest.mark.scaleout
@pytest.mark.skipif(not redis_available(), reason="needs Redis on 127.0.0.1:6379")
def test_a_push_after_the_loop_stopped_still_reaches_other_processes(settings):
    """With Redis, other processes' dashboards still get the push a stopping process
    makes on its way out."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    settings.CHANNEL_LAYERS = {"default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL.format(db=0)], "prefix": f"hal0-test-{uuid.uuid4().hex}"}}}
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(live.GROUP, channel)
    try:
        _, took = in_a_worker_after_the_loop_stopped(runtime.current().live.send, '<div id="slot-y"></div>')
        assert took < 5
        message = async_to_sync(layer.receive)(channel)
        assert message == {"type": "push.html", "html": '<div id="slot-y"></div>'}
    finally:
        async_to_sync(layer.group_discard)(live.GROUP, channel)


# --- an action's late outcome -----------------------------------------------------------------

async def _two_users(session_cookie, django_user_model):
    """The admin's and bob's open dashboards, and an htmx client logged in as the admin."""
    other = await sync_to_async(django_user_model.objects.create_user)(
        "bob", "", "another-long-password", is_staff=True, is_superuser=True)
    other_cookie = await sync_to_async(cookie_for)(other)
    mine, theirs = await _dashboard(session_cookie), await _dashboard(other_cookie)
    client = AsyncClient()
    client.cookies["sessionid"] = session_cookie[1].decode().split("=", 1)[1]
    return mine, theirs, client


async def _all_until_quiet(comm: WebsocketCommunicator, needle: str) -> list[str]:
    """Every message up to the one containing `needle`, and then until 0.5 s of quiet."""
    seen: list[str] = []
    while not any(needle in html for html in seen):
        seen.append(await comm.receive_from(timeout=10))
    while not await comm.receive_nothing(timeout=0.5):
        seen.append(await comm.receive_from())
    return seen


async def test_a_late_outcome_toast_goes_to_the_pages_of_the_user_who_acted(
        node, sim, session_cookie, django_user_model, monkeypatch):
    """A load that outlasts the view's wait is answered "Loading chat…"; its outcome comes
    later as a toast on the acting user's open pages. Another user's dashboard gets the
    card (everyone sees the state) but not the toast meant for someone else."""
    from slots import views

    monkeypatch.setattr(views, "ACTION_WAIT_S", 0.0)
    sim.configure(load_delay=0.5)
    mine, theirs, client = await _two_users(session_cookie, django_user_model)
    response = await client.post("/slots/chat/do/load/", headers={"HX-Request": "true"})
    assert "Loading chat" in response["HX-Trigger"]
    toast = await receive_until(mine, 'id="toasts"', timeout=10)
    assert "chat is loaded." in toast
    seen = await _all_until_quiet(theirs, "state-ready")  # the card reached bob
    assert not any('id="toasts"' in html for html in seen)
    await mine.disconnect()
    await theirs.disconnect()


async def test_a_downloads_outcome_toast_goes_to_the_user_who_started_it(
        node, sim, session_cookie, django_user_model):
    """A download's progress is on every open page (the slot's download row); its
    outcome's toast only on the starter's pages."""
    model = "Llama-3.2-1B-Instruct-GGUF"  # not downloaded in the simulator
    mine, theirs, client = await _two_users(session_cookie, django_user_model)
    response = await client.post("/slots/chat/pull/", {"model": model},
                                 headers={"HX-Request": "true"})
    assert response.status_code == 200
    toast = await receive_until(mine, 'id="toasts"', timeout=20)
    assert f"Downloaded {model}." in toast
    seen = await _all_until_quiet(theirs, "downloaded")  # bob saw it finish
    assert not any('id="toasts"' in html for html in seen)
    await mine.disconnect()
    await theirs.disconnect()
