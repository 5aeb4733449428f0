"""The Django admin: renders for a superuser, redirects anonymous users, never shows node
keys, writes through the actions (audit events), refuses to delete seeded slots."""

import pytest

from slots.models import Node, Slot, SlotEvent

pytestmark = pytest.mark.django_db

PAGES = ["/admin/", "/admin/slots/slot/", "/admin/slots/node/", "/admin/slots/slotevent/",
         "/admin/slots/slot/add/", "/admin/slots/node/add/"]


@pytest.mark.parametrize("url", PAGES)
def test_admin_pages_render_for_superuser(admin_client, url):
    assert admin_client.get(url).status_code == 200


@pytest.mark.parametrize("url", PAGES)
def test_admin_redirects_anonymous_to_login(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_slot_change_page_and_filters(admin_client):
    chat = Slot.objects.get(name="chat")
    assert admin_client.get(f"/admin/slots/slot/{chat.pk}/change/").status_code == 200
    page = admin_client.get("/admin/slots/slot/?capability=chat&state=offline").content.decode()
    assert "Qwen3-4B-Instruct-2507-GGUF" in page and "nomic-embed" not in page


def test_node_keys_are_write_only(admin_client):
    node = Node.local()
    node.api_key, node.admin_api_key = "sk-very-secret-1", "sk-admin-secret-2"
    node.save()
    page = admin_client.get(f"/admin/slots/node/{node.pk}/change/").content.decode()
    assert "sk-very-secret-1" not in page and "sk-admin-secret-2" not in page
    # saving without retyping keeps them
    admin_client.post(f"/admin/slots/node/{node.pk}/change/", {
        "name": "local", "base_url": node.base_url, "api_key": "", "admin_api_key": "",
        "enabled": "on"})
    node.refresh_from_db()
    assert node.api_key == "sk-very-secret-1" and node.admin_api_key == "sk-admin-secret-2"


def test_admin_edit_goes_through_actions(admin_client):
    chat = Slot.objects.get(name="chat")
    response = admin_client.post(f"/admin/slots/slot/{chat.pk}/change/", {
        "capability": "chat", "device": "cpu", "model_name": "Qwen3-0.6B-GGUF",
        "ctx_size": "4096", "extra_args": "", "node": chat.node_id, "idle_timeout_s": "300",
        "enabled": "on", "is_default": "on"})
    assert response.status_code == 302, response.content.decode()[:2000]
    chat.refresh_from_db()
    assert (chat.device, chat.model_name, chat.ctx_size) == ("cpu", "Qwen3-0.6B-GGUF", 4096)
    event = SlotEvent.objects.get(slot=chat, action="update")
    assert event.actor == "boss" and "device 'gpu-rocm' → 'cpu'" in event.message


def test_admin_shows_validation_errors(admin_client):
    chat = Slot.objects.get(name="chat")
    response = admin_client.post(f"/admin/slots/slot/{chat.pk}/change/", {
        "capability": "chat", "device": "cpu", "model_name": "m", "extra_args": "-ngl 99",
        "node": chat.node_id, "idle_timeout_s": "300", "enabled": "on"})
    assert response.status_code == 200
    assert "extra_args may not contain -ngl: lemond sets it itself." in response.content.decode()
    chat.refresh_from_db()
    assert chat.extra_args == ""


def test_seeded_slot_cannot_be_deleted(admin_client):
    chat = Slot.objects.get(name="chat")
    assert admin_client.get(f"/admin/slots/slot/{chat.pk}/delete/").status_code == 403
    assert Slot.objects.filter(name="chat").exists()


def test_events_are_read_only(admin_client):
    chat = Slot.objects.get(name="chat")
    event = SlotEvent.objects.create(slot=chat, slot_name="chat", action="load")
    page = admin_client.get(f"/admin/slots/slotevent/{event.pk}/change/")
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
