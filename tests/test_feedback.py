"""What a page tells its user (issue #12 §5), server side: a message for every action
(Django messages after a full-page post, an `HX-Trigger` toast after an htmx one),
confirmations, a node tested when saved, healthy nodes first, hal0's own 404/500 pages,
the favicon, and times that say their zone. The browser side is tests/test_a11y.py."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.contrib.messages import get_messages
from django.test import override_settings
from django.utils import timezone

from slots import live
from slots.models import ApiToken, Node, Slot, SlotEvent
from slots.views import readable_entry
from tests.harness import free_port

HTMX = {"HX-Request": "true"}


def said(response) -> list[tuple[str, str]]:
    return [(m.level_tag, m.message) for m in get_messages(response.wsgi_request)]


@pytest.mark.django_db
def test_slot_create_update_delete_say_so(admin_client, node):
    response = admin_client.post("/new-slot/", {
        "name": "chat2", "capability": "chat", "device": "cpu",
        "model_name": "Qwen3-0.6B-GGUF", "ctx_size": "", "idle_timeout_s": "0",
        "enabled": "on"}, follow=True)
    assert ("success", "Created slot chat2.") in said(response)
    assert "Created slot chat2." in response.content.decode()  # shown on the slot's page

    # an htmx save answers with a toast, success or not
    response = admin_client.post("/slots/chat2/", {
        "name": "chat2", "capability": "chat", "device": "cpu",
        "model_name": "Qwen3-0.6B-GGUF", "idle_timeout_s": "60", "enabled": "on"},
        headers=HTMX)
    assert json.loads(response["HX-Trigger"])["hal0:toast"] == {
        "level": "success", "message": "Saved chat2.", "target": "body"}
    response = admin_client.post("/slots/chat2/", {"name": "chat2"}, headers=HTMX)
    assert json.loads(response["HX-Trigger"])["hal0:toast"]["level"] == "error"

    response = admin_client.post("/slots/chat2/delete/", follow=True)
    assert ("success", "Deleted slot chat2.") in said(response)


@pytest.mark.django_db
def test_a_node_is_tested_when_saved_and_saved_either_way(admin_client, node, sim):
    response = admin_client.post("/nodes/", {"name": "twin", "base_url": sim.url,
                                             "enabled": "on"}, follow=True)
    [(level, text)] = said(response)
    assert level == "success" and "Added node twin." in text and "answered (lemond" in text

    nowhere = f"http://127.0.0.1:{free_port()}"
    response = admin_client.post("/nodes/", {"name": "ghost", "base_url": nowhere,
                                             "enabled": "on"}, follow=True)
    [(level, text)] = said(response)
    assert level == "warning" and "Connection test failed" in text and nowhere in text
    assert Node.objects.filter(name="ghost").exists()  # saved all the same
    assert "Connection test failed" in response.content.decode()

    response = admin_client.post("/nodes/ghost/", {"name": "ghost", "base_url": sim.url,
                                                   "enabled": "on"})
    assert response.status_code == 200 and "answered (lemond" in response.content.decode()


@pytest.mark.django_db
def test_a_node_url_must_be_http(admin_client, node):
    response = admin_client.post("/nodes/", {"name": "ftp", "base_url": "ftp://127.0.0.1/",
                                             "enabled": "on"})
    assert response.status_code == 400 and not Node.objects.filter(name="ftp").exists()
    assert "http://" in response.content.decode()
    assert ("error", "The node was not added: see the form's errors.") in said(response)


@pytest.mark.django_db
def test_node_delete_and_token_revoke_ask_first_and_say_so(admin_client, node):
    Node.objects.create(name="spare", base_url="http://127.0.0.1:9")
    page = admin_client.get("/nodes/spare/").content.decode()
    assert 'data-confirm="Delete node spare?' in page
    response = admin_client.post("/nodes/spare/delete/", follow=True)
    assert ("success", "Deleted node spare.") in said(response)

    response = admin_client.post("/tokens/", {"name": "webui"})
    assert any(m.startswith("Created token webui") for _, m in said(response))
    page = admin_client.get("/tokens/").content.decode()
    assert 'data-confirm="Revoke token webui?' in page
    assert 'Revoke<span class="vh"> token webui</span>' in page
    response = admin_client.post("/tokens/webui/revoke/", follow=True)
    assert any(m.startswith("Revoked token webui") for _, m in said(response))
    assert ApiToken.objects.get(name="webui").revoked_at is not None


@pytest.mark.django_db(transaction=True)  # the action runs on a worker: it must see the rows
def test_a_button_without_htmx_leaves_a_message(admin_client, node):
    Slot.objects.filter(name="tts").update(enabled=False)
    response = admin_client.post("/slots/tts/do/load/", {"next": "/slots/tts/"}, follow=True)
    [(level, text)] = said(response)
    assert level == "error" and "disabled" in text


@pytest.mark.django_db
def test_healthy_nodes_first_and_logs_open_on_a_reachable_node(admin_client, node):
    node.reachable = True
    node.save()
    Node.objects.create(name="aaa-dead", base_url="http://127.0.0.1:9",
                        unreachable_since=timezone.now() - timedelta(hours=1))
    context = live.layout_context()
    assert [n.name for n in context["nodes"]] == ["local", "aaa-dead"]
    assert context["nodes"][1].dead and not context["nodes"][0].dead
    page = admin_client.get("/").content.decode()
    assert page.index('id="node-local"') < page.index('id="node-aaa-dead"')
    assert 'class="node down dead"' in page
    logs = admin_client.get("/logs/").content.decode()
    assert 'ws-connect="/ws/logs/?node=local"' in logs


@pytest.mark.django_db
def test_lemond_last_use_reads_as_an_age(node):
    slot = Slot.objects.get(name="chat")
    slot.lemond_entry = {"model_name": slot.model_name, "last_use": 123456789}
    slot.last_use_at = timezone.now() - timedelta(minutes=3)
    entry = readable_entry(slot)
    assert entry["last_use"].startswith("3 min ago") and "123456789 ms" in entry["last_use"]


@pytest.mark.django_db
def test_a_cancelled_download_is_not_a_failure(admin_client, node):
    slot = Slot.objects.get(name="chat")
    SlotEvent.objects.create(slot=slot, slot_name="chat", action="pull", ok=False,
                             error_code="pull.cancelled", message="download of X cancelled")
    page = admin_client.get("/slots/chat/").content.decode()
    row = page.split("download of X cancelled")[0].rsplit("<tr", 1)[1]
    assert 'class="cancelled"' in row and "failed" not in row


@pytest.mark.django_db
def test_times_say_their_zone(admin_client, node):
    ApiToken.objects.create(name="t", prefix="hal0_x", key_hash="h",
                            expires_at=timezone.now() + timedelta(days=3))
    page = admin_client.get("/tokens/").content.decode()
    assert " UTC</time>" in page
    SlotEvent.objects.create(slot=Slot.objects.get(name="chat"), slot_name="chat",
                             action="load")
    assert " UTC</time>" in admin_client.get("/slots/chat/").content.decode()


@pytest.mark.django_db
def test_every_page_has_the_skip_link_favicon_and_toast_region(admin_client, client, node):
    for path in ("/", "/slots/chat/", "/tokens/", "/nodes/", "/logs/"):
        page = admin_client.get(path).content.decode()
        assert 'class="skip-link" href="#main"' in page and '<main id="main"' in page, path
        assert 'rel="icon" href="/static/favicon.svg"' in page, path
        assert 'id="toasts" class="toasts" aria-live="polite"' in page, path
        assert '<dialog id="confirm"' in page and 'id="conn-banner"' in page, path
    assert client.get("/static/favicon.svg").status_code == 200
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"] == "/static/favicon.svg"


@pytest.mark.django_db
@override_settings(DEBUG=False)
def test_hal0s_own_error_pages_and_json_where_machines_ask(admin_client, node):
    response = admin_client.get("/no/such/page/")
    page = response.content.decode()
    assert response.status_code == 404 and "Page not found" in page
    assert 'href="/static/css/hal0.css"' in page and "/no/such/page/" in page
    for path in ("/api/slots/nope/x/y/", "/v1/nope"):
        response = admin_client.get(path)
        assert response.status_code == 404, path
        assert response["Content-Type"].startswith("application/json"), path


@pytest.mark.django_db
def test_server_error_page_is_hal0s_and_json_under_v1(rf):
    from hal0site.errors import server_error

    page = server_error(rf.get("/slots/chat/"))
    assert page.status_code == 500 and b"Something went wrong inside hal0" in page.content
    assert b"hal0.css" in page.content
    answer = server_error(rf.get("/v1/chat/completions"))
    assert answer.status_code == 500 and answer["Content-Type"] == "application/json"
    assert json.loads(server_error(rf.get("/v1/models")).content)["error"]["type"] == \
        "server_error"
