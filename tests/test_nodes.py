"""Several lemond nodes: managed on the nodes page (keys write-only, no delete while slots
use a node), slots placed on any enabled node, the dashboard grouped by node in a constant
number of queries, and — against three simulators and a real `serve` — a dead or hanging
node never delays the others' updates."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from slots.models import Node, Slot, SlotEvent
from tests.harness import Stack, card_state, free_port, login, wait_for, websocket

SECRET = "sk-node-secret-123"


def add_node(client, name: str, url: str, **extra):
    data = {"name": name, "base_url": url, "enabled": "on", "api_key": SECRET, **extra}
    if isinstance(client, httpx.Client):  # a real server: a form post like a browser's
        return client.post("/nodes/", data={
            **data, "csrfmiddlewaretoken": client.cookies["csrftoken"]})
    return client.post("/nodes/", data)


@pytest.mark.django_db
def test_nodes_page_lists_and_adds_nodes_and_never_shows_keys(admin_client, node):
    page = admin_client.get("/").content.decode()
    assert 'href="/nodes/"' in page  # in the nav
    response = add_node(admin_client, "gpu2", "http://127.0.0.1:13399")
    assert response.status_code == 302 and response["Location"] == "/nodes/gpu2/"
    gpu2 = Node.objects.get(name="gpu2")
    assert gpu2.api_key == SECRET and gpu2.enabled

    listing = admin_client.get("/nodes/").content.decode()
    assert 'id="noderow-local"' in listing and 'id="noderow-gpu2"' in listing
    edit = admin_client.get("/nodes/gpu2/").content.decode()
    assert SECRET not in listing and SECRET not in edit
    assert 'type="password"' in edit

    # saving with empty key fields keeps the keys (same URL); clear_keys removes them
    response = admin_client.post("/nodes/gpu2/", {"name": "gpu2", "enabled": "on",
                                                  "base_url": "http://127.0.0.1:13399"})
    assert response.status_code == 200 and SECRET not in response.content.decode()
    gpu2.refresh_from_db()
    assert (gpu2.base_url, gpu2.api_key) == ("http://127.0.0.1:13399", SECRET)
    admin_client.post("/nodes/gpu2/", {"name": "gpu2", "base_url": gpu2.base_url,
                                       "clear_keys": "on"})
    gpu2.refresh_from_db()
    assert gpu2.api_key == "" and not gpu2.enabled  # unchecked box: disabled

    response = add_node(admin_client, "Bad Name", "not a url")
    assert response.status_code == 400 and not Node.objects.filter(name="Bad Name").exists()


@pytest.mark.django_db
def test_a_node_cannot_be_deleted_while_slots_use_it(admin_client, node, make_slot):
    gpu2 = Node.objects.create(name="gpu2", base_url="http://127.0.0.1:13399")
    make_slot("coder", node=gpu2)
    response = admin_client.post("/nodes/gpu2/delete/")
    assert response.status_code == 409
    assert "still serves 1 slot (coder)" in response.content.decode()
    assert Node.objects.filter(name="gpu2").exists()

    Slot.objects.filter(name="coder").delete()
    response = admin_client.post("/nodes/gpu2/delete/")
    assert response.status_code == 302 and not Node.objects.filter(name="gpu2").exists()
    assert admin_client.post("/nodes/local/delete/").status_code == 409  # seeded slots


@pytest.mark.django_db
def test_slots_can_be_placed_on_any_enabled_node(admin_client, node):
    gpu2 = Node.objects.create(name="gpu2", base_url="http://127.0.0.1:13399")
    Node.objects.create(name="off", base_url="http://127.0.0.1:13398", enabled=False)
    form = admin_client.get("/new-slot/").content.decode()
    assert f'<option value="{gpu2.pk}">gpu2</option>' in form and ">off</option>" not in form

    response = admin_client.post("/new-slot/", {
        "name": "coder", "capability": "chat", "device": "gpu-vulkan", "node": gpu2.pk,
        "model_name": "Qwen3-0.6B-GGUF", "idle_timeout_s": "300", "enabled": "on"})
    assert response.status_code == 302
    assert Slot.objects.get(name="coder").node == gpu2

    # move a seeded slot over on its page
    chat = Slot.objects.get(name="chat")
    data = {f: getattr(chat, f) for f in Slot.DESIRED_FIELDS if getattr(chat, f) not in
            (None, False)}
    response = admin_client.post("/slots/chat/", {**data, "node": gpu2.pk})
    assert response.status_code == 200
    assert Slot.objects.get(name="chat").node == gpu2


@pytest.mark.django_db
def test_the_dashboard_groups_by_node_in_a_constant_number_of_queries(admin_client, node,
                                                                      make_slot):
    one_node = admin_client.get("/").content.decode()
    assert 'id="group-chat"' in one_node and "nodesection-" not in one_node  # unchanged

    gpu2 = Node.objects.create(name="gpu2", base_url="http://127.0.0.1:13399")
    make_slot("coder", node=gpu2)
    with CaptureQueriesContext(connection) as few:
        html = admin_client.get("/").content.decode()
    assert 'id="nodesection-local"' in html and 'id="nodesection-gpu2"' in html
    assert 'id="group-gpu2-chat"' in html and 'id="group-local-embed"' in html
    section = html.split('id="nodesection-gpu2"')[1].split('id="nodesection-')[0]
    assert 'id="node-gpu2"' in section and 'id="slot-coder"' in section
    assert 'id="slot-chat"' not in section
    # nodes by name, each header before its cards
    assert html.index('id="node-gpu2"') < html.index('id="slot-coder"') < \
        html.index('id="node-local"') < html.index('id="slot-chat"')

    for i in range(6):
        extra = Node.objects.create(name=f"n{i}", base_url=f"http://127.0.0.1:{14000 + i}")
        for j in range(5):
            make_slot(f"s{i}-{j}", node=extra, capability="embed", device="cpu",
                      model_name="nomic-embed-text-v1-GGUF")
    with CaptureQueriesContext(connection) as many:
        html = admin_client.get("/").content.decode()
    assert html.count('class="slot-card') == Slot.objects.count()
    assert len(many) == len(few), [q["sql"] for q in many]


# --- three lemond nodes behind a real `serve` ----------------------------------------------

def node_pk(client, name: str) -> str:
    form = client.get("/new-slot/").text
    return re.search(rf'<option value="(\d+)">{re.escape(name)}</option>', form).group(1)


def timed_get(client, path: str) -> float:
    started = time.perf_counter()
    response = client.get(path)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, (path, response.status_code)
    return elapsed


@pytest.mark.e2e
def test_a_dead_or_hanging_node_never_delays_the_others(tmp_path, lemond_sim_factory):
    sims = {name: lemond_sim_factory() for name in ("local", "b", "c")}
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=sims["local"].url, HAL0_POLL_ACTIVE_S="0.2",
                  HAL0_POLL_IDLE_S="0.2", HAL0_RECONCILE_TIMEOUT_S="3",
                  HAL0_STATS_EVERY_S="1")
    stack.setup()
    try:
        url = stack.serve()
        client = login(url)
        for name in ("b", "c"):
            assert add_node(client, name, sims[name].url).status_code == 302
        # a chat slot on each node, loaded
        slots = {"local": "chat"}
        for name in ("b", "c"):
            response = client.post("/new-slot/", data={
                "name": f"chat-{name}", "capability": "chat", "device": "gpu-vulkan",
                "node": node_pk(client, name), "model_name": "Qwen3-0.6B-GGUF",
                "idle_timeout_s": "0", "enabled": "on",
                "csrfmiddlewaretoken": client.cookies["csrftoken"]})
            assert response.status_code == 302, response.text[:2000]
            slots[name] = f"chat-{name}"
        for slot in slots.values():
            assert client.post(f"/api/slots/{slot}/load").status_code == 200
        model = {"local": "Qwen3-4B-Instruct-2507-GGUF", "b": "Qwen3-0.6B-GGUF",
                 "c": "Qwen3-0.6B-GGUF"}
        html = client.get("/").text
        for name in ("local", "b", "c"):
            assert f'id="nodesection-{name}"' in html

        dashboard = websocket(url, client)
        try:
            dashboard.wait(lambda m: 'id="slot-chat-c"' in m)
            # node b dies mid-test
            sims["b"].kill()
            killed = time.monotonic()
            for name in ("local", "c"):
                httpx.post(f"{sims[name].url}/v1/unload", json={"model_name": model[name]},
                           timeout=5)
            for name in ("local", "c"):
                _, at = dashboard.wait(lambda m, s=slots[name]: card_state(m, s) == "offline",
                                       since=killed, timeout=5)
                print(f"\nnode b dead: {slots[name]}'s eviction on the dashboard after "
                      f"{(at - killed) * 1000:.0f} ms")
                assert at - killed < 2.0  # the state shown is true within 2 s
            _, at = dashboard.wait(lambda m: 'id="node-b"' in m and "unreachable" in m,
                                   since=killed, timeout=5)
            print(f"node b's banner after {(at - killed) * 1000:.0f} ms")
            assert card_state(client.get("/").text, "chat-b") == "ready"  # last seen, kept

            # node c hangs: local's updates still arrive at once
            sims["c"].fault("hang", seconds=30)
            hung = time.monotonic()
            time.sleep(0.5)  # polls of c are now stuck until their 3 s timeout
            changed = time.monotonic()
            httpx.post(f"{sims['local'].url}/v1/load", json={"model_name": model["local"]},
                       timeout=5)
            _, at = dashboard.wait(lambda m: card_state(m, "chat") == "ready", since=changed,
                                   timeout=5)
            print(f"node c hanging, b dead: local's adoption on the dashboard after "
                  f"{(at - changed) * 1000:.0f} ms")
            assert at - changed < 2.0  # waiting on c's poll would take its 3 s timeout
            dashboard.wait(lambda m: 'id="node-c"' in m and "unreachable" in m, since=hung,
                           timeout=10)
            slowest = max(timed_get(client, path) for path in ("/", "/slots/chat-c/",
                                                               "/api/slots/", "/api/health",
                                                               "/nodes/") for _ in range(3))
            print(f"slowest page with one node dead and one hanging: {slowest * 1000:.0f} ms")
            # no page waits on a node (that would take its timeout); the 200 ms target
            # itself is measured by bench/faults.py, not asserted on a shared machine
            assert slowest < 1.0
            sims["c"].fault("clear")
            wait_for(lambda: all(n["reachable"] for n in client.get("/api/health").json()
                                 ["nodes"] if n["name"] == "c"), timeout=8)
        finally:
            dashboard.close()
            client.close()
    finally:
        stack.stop()
    assert "Traceback" not in stack.logs(), stack.logs()[-4000:]


def test_node_pages_are_staff_only(db, django_user_model):
    from django.test import Client

    user = django_user_model.objects.create_user("viewer", password="x" * 12)
    viewer = Client()
    viewer.force_login(user)
    assert viewer.get("/nodes/").status_code == 403
    assert viewer.post("/nodes/local/", {"name": "local", "base_url": "http://evil.example:1",
                                         "enabled": "on"}).status_code == 403
    from slots.models import Node

    assert Node.local().base_url != "http://evil.example:1"


def test_moving_a_node_drops_its_keys_unless_retyped(admin_client):
    from slots.models import Node

    node = Node.local()
    node.api_key, node.admin_api_key = "k-user", "k-admin"
    node.save()
    admin_client.post("/nodes/local/", {"name": "local", "base_url": node.base_url,
                                        "enabled": "on"})
    node.refresh_from_db()
    assert (node.api_key, node.admin_api_key) == ("k-user", "k-admin")  # same URL: kept
    admin_client.post("/nodes/local/", {"name": "local", "base_url": "http://127.0.0.1:9",
                                        "enabled": "on"})
    node.refresh_from_db()
    assert node.base_url == "http://127.0.0.1:9" and (node.api_key, node.admin_api_key) == ("", "")


@pytest.mark.e2e
def test_the_local_node_follows_hal0_lemonade_url_on_every_start(tmp_path, lemond_sim):
    """The installer rewrites HAL0_LEMONADE_URL in hal0.env when lemond's port changes:
    the next start of `serve` (or `reconcile`) points the `local` node there, instead of
    the URL the first migrate copied, and the Nodes page says which setting governs it."""
    first = f"http://127.0.0.1:{free_port()}"  # lemond's old port: nothing there now
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=first, HAL0_LEMONADE_API_KEY="old-key")
    stack.setup()

    def local() -> tuple[str, str]:
        with contextlib.closing(sqlite3.connect(tmp_path / "hal0.sqlite3", timeout=10)) as db:
            return db.execute("SELECT base_url, api_key FROM slots_node "
                              "WHERE name = 'local'").fetchone()

    assert local() == (first, "old-key")
    try:
        url = stack.serve(HAL0_LEMONADE_URL=lemond_sim.url, HAL0_LEMONADE_API_KEY="")
        client = login(url)
        wait_for(lambda: {n["name"]: n["reachable"] for n in
                          client.get("/api/health").json()["nodes"]}.get("local"), timeout=10)
        page = client.get("/nodes/").text
        assert f"<code>{lemond_sim.url}</code>" in page and "HAL0_LEMONADE_URL" in page
        assert "HAL0_LEMONADE_URL" in client.get("/nodes/local/").text
        client.close()
        stack.terminate(stack.procs[-1])
        assert local() == (lemond_sim.url, "")  # its keys are the environment's too

        # `reconcile` follows it too
        third = f"http://127.0.0.1:{free_port()}"
        reconcile = stack.start("reconcile", name="reconcile", HAL0_LEMONADE_URL=third)
        wait_for(lambda: "reconciler running" in stack.logs(), timeout=30)
        stack.terminate(reconcile)
        assert local()[0] == third
        logs = stack.logs()
        assert f"follows HAL0_LEMONADE_URL: {first} -> {lemond_sim.url}" in logs
        assert f"follows HAL0_LEMONADE_URL: {lemond_sim.url} -> {third}" in logs
    finally:
        stack.stop()
    assert "Traceback" not in stack.logs()


@pytest.mark.django_db
def test_following_hal0_lemonade_url_is_audited_and_leaves_a_node_already_there_alone(
        settings, node):
    from slots.actions.config import do_follow_lemonade_url

    settings.HAL0_LEMONADE_URL = node.base_url
    Node.objects.filter(pk=node.pk).update(api_key="typed-on-the-page")
    assert do_follow_lemonade_url(actor="serve") == ""
    assert Node.local().api_key == "typed-on-the-page"
    settings.HAL0_LEMONADE_URL = "http://127.0.0.1:13399"
    assert do_follow_lemonade_url(actor="serve") == (
        f"The local node follows HAL0_LEMONADE_URL: {node.base_url} -> http://127.0.0.1:13399")
    event = SlotEvent.objects.filter(slot_name="local", action="node-update").get()
    assert event.actor == "serve" and "http://127.0.0.1:13399" in event.message
    assert "typed-on-the-page" not in event.message
