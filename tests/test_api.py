"""The JSON API: session (CSRF enforced) auth, listing, actions, the
error envelope, and /api/health."""

import json

import pytest
from django.test import Client

from slots.models import Slot

pytestmark = pytest.mark.django_db


@pytest.fixture
def live_client(transactional_db, admin_user, sim):
    """A logged-in client whose actions really run: the local node points at the simulator
    and the database is transactional (API actions run on a worker thread)."""
    from slots.models import Node

    node = Node.local()
    node.base_url = sim.url
    node.save()
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture
def csrf_client(admin_user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    client.get("/api/slots/")  # any page
    return client


@pytest.mark.parametrize("method,url", [
    ("get", "/api/slots/"), ("get", "/api/slots/chat/"), ("post", "/api/slots/chat/load"),
    ("post", "/api/slots/chat/swap")])
def test_anonymous_gets_401_json(client, method, url):
    response = getattr(client, method)(url)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "auth.required"


def test_list_and_detail(admin_client):
    data = admin_client.get("/api/slots/").json()
    assert [s["name"] for s in data["slots"]] == ["chat", "embed", "img", "rerank", "stt", "tts"]
    chat = admin_client.get("/api/slots/chat/").json()
    assert chat["model_name"] == "Qwen3-4B-Instruct-2507-GGUF" and chat["state"] == "offline"
    assert "api_key" not in json.dumps(chat)
    missing = admin_client.get("/api/slots/nope/")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "slot.not_found",
                                        "message": "No slot named 'nope'.", "slot": "nope"}}


def test_post_without_csrf_is_refused_and_changes_nothing(csrf_client, node):
    response = csrf_client.post("/api/slots/chat/load")
    assert response.status_code == 403 and response.json()["error"]["code"] == "auth.csrf"
    assert Slot.objects.get(name="chat").state == "offline"


@pytest.mark.django_db(transaction=True)  # the action runs on a worker thread
def test_load_with_csrf_header(csrf_client, node, sim):
    csrf_client.get("/accounts/login/")  # sets the CSRF cookie, as a browser page would
    token = csrf_client.cookies["csrftoken"].value
    response = csrf_client.post("/api/slots/chat/load", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 200, response.content
    assert response.json()["state"] == "ready"
    assert sim.state()["loaded_names"] == ["Qwen3-4B-Instruct-2507-GGUF"]


@pytest.mark.django_db(transaction=True)
def test_actions_and_errors(live_client, sim):
    client = live_client
    assert client.post("/api/slots/chat/load").json()["state"] == "ready"
    swap = client.post("/api/slots/chat/swap", {"model": "Qwen3-0.6B-GGUF"},
                       content_type="application/json")
    assert swap.status_code == 200 and swap.json()["model_name"] == "Qwen3-0.6B-GGUF"
    bad = client.post("/api/slots/chat/swap", {}, content_type="application/json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "slot.config_error"
    not_json = client.post("/api/slots/chat/swap", "{oops", content_type="application/json")
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "api.bad_json"
    assert client.post("/api/slots/chat/dance").status_code == 404
    assert client.get("/api/slots/chat/load").status_code == 405
    sim.fault("fail_next_load")
    failed = client.post("/api/slots/embed/load")
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "slot.spawn_failed"
    assert client.post("/api/slots/chat/unload").json()["state"] == "offline"


@pytest.mark.django_db(transaction=True)
def test_unreachable_lemond_is_503(admin_client, dead_node):
    response = admin_client.post("/api/slots/chat/load")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "lemond.unavailable"


def test_health(admin_client):
    anonymous = Client().get("/api/health").json()
    assert anonymous["status"] == "ok" and "nodes" not in anonymous
    full = admin_client.get("/api/health").json()
    assert full["nodes"][0]["name"] == "local"
    assert set(full["nodes"][0]) >= {"reachable", "version", "simulated", "last_error"}


@pytest.mark.django_db(transaction=True)
def test_actions_answer_with_or_without_a_trailing_slash(live_client):
    client = live_client
    assert client.post("/api/slots/chat/load/").json()["state"] == "ready"
    assert client.post("/api/slots/chat/unload").json()["state"] == "offline"


@pytest.mark.django_db
def test_api_errors_are_always_json(node):
    """Oversized bodies, too many multipart fields, a missing boundary, unknown paths and
    wrong methods answer the envelope, never Django's HTML pages."""
    from slots import tokens

    _, raw = tokens.create_token("errors")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    fields = "".join(f'--b\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n'
                     for i in range(1200)) + "--b--\r\n"
    cases = [
        (client.post("/api/slots/chat/pin", b"{" + b" " * 3_000_000 + b"}",
                     content_type="application/json"), 413, "api.too_large"),
        (client.post("/api/slots/chat/pin", fields.encode(),
                     content_type="multipart/form-data; boundary=b"), 400, "api.bad_request"),
        (client.post("/api/slots/chat/pin", b"x=1", content_type="multipart/form-data"),
         400, "api.bad_request"),
        (client.get("/api/slots/chat/pin"), 405, "api.method_not_allowed"),
        (client.get("/api/no-such-thing/"), 404, "api.not_found"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.content[:200]
        assert response["Content-Type"] == "application/json", response.content[:200]
        assert response.json()["error"]["code"] == code
    assert not Slot.objects.get(name="chat").pinned  # none of them did anything
