"""The slot form's Model field is backed by the node's catalogue (against the real
simulator): a typo is refused naming the closest names, a model of another type is
refused, lemond down saves with a note; the field's picker filters by name, label, size."""

from __future__ import annotations

import pytest

from slots.models import Slot, SlotEvent

pytestmark = pytest.mark.django_db
HTMX = {"HX-Request": "true"}
CHAT = "Qwen3-4B-Instruct-2507-GGUF"


def edit_chat(client, model: str):
    return client.post("/slots/chat/", {
        "name": "chat", "capability": "chat", "device": "gpu-rocm", "model_name": model,
        "idle_timeout_s": "300", "queue_timeout_s": "30", "enabled": "on"}, headers=HTMX)


def test_a_typo_is_refused_with_the_closest_names(admin_client, node):
    html = edit_chat(admin_client, CHAT + "F").content.decode()
    assert f"lemond on local does not know &#x27;{CHAT}F&#x27;" in html
    assert f"Did you mean {CHAT}" in html and "field-error" in html
    assert Slot.objects.get(name="chat").model_name == CHAT
    assert not SlotEvent.objects.filter(slot_name="chat", action="update").exists()


def test_a_model_of_another_type_is_refused(admin_client, node):
    html = edit_chat(admin_client, "nomic-embed-text-v1-GGUF").content.decode()
    assert "is of type embedding; a chat slot serves llm models" in html
    assert Slot.objects.get(name="chat").model_name == CHAT


def test_a_known_model_saves_and_an_unreachable_lemond_saves_with_a_note(admin_client, node,
                                                                        settings):
    html = edit_chat(admin_client, "Qwen3-0.6B-GGUF").content.decode()
    assert "Saved." in html and "Could not check" not in html
    node.base_url = "http://127.0.0.1:9"  # nothing listens there
    node.save()
    html = edit_chat(admin_client, "Qwen3-1.7B-GGUF").content.decode()
    assert "Saved." in html and "Could not check &#x27;Qwen3-1.7B-GGUF&#x27;" in html
    assert Slot.objects.get(name="chat").model_name == "Qwen3-1.7B-GGUF"


def test_the_field_picker_filters_by_name_label_and_size(admin_client, node):
    page = admin_client.get("/slots/chat/").content.decode()
    assert "Browse catalogue…" in page and 'hx-include="#id_capability, #id_node' in page
    html = admin_client.get("/catalogue/", {"capability": "chat", "model_name": CHAT}
                            ).content.decode()
    assert "Pick a chat model on local" in html
    # downloaded first, then the rest; every row says its size in GB
    assert html.index(CHAT) < html.index("not downloaded")
    small = admin_client.get("/catalogue/", {"capability": "chat", "q": "qwen3 <1"}
                             ).content.decode()
    assert 'data-pick-model="Qwen3-0.6B-GGUF"' in small and CHAT not in small
    assert "0.38 GB" in small
    tools = admin_client.get("/catalogue/", {"capability": "embed", "q": "embeddings"}
                             ).content.decode()
    assert 'data-pick-model="nomic-embed-text-v1-GGUF"' in tools
    assert admin_client.get("/catalogue/", {"capability": "fly"}).status_code == 400
