"""Security: every URL needs a login (and CSRF for anything that writes), websockets refuse
strangers, tokens are scoped, production settings pass `check --deploy`, secrets never
reach a page or a log, and the security headers are set (also on the gateway's fast path).

The URL walks enumerate Django's resolver, admin included, so a new view is covered the
day it is added: a path parameter the walk has no value for fails the test by name.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import subprocess
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from channels.testing import WebsocketCommunicator
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Group, User
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from slots import portability, tokens
from slots.models import ApiToken, Node, Slot, SlotEvent, State
from tests.harness import CHROMIUM, HAVE_CHROMIUM, Stack, login

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1:8000"
ORIGIN = f"http://{HOST}"
# distinctive, so a hit in a page or a log can only be a leak
API_KEY = "lemondkey-" + "A7q" * 8
ADMIN_KEY = "lemondadmin-" + "Zx9" * 8


# --- walking the URL map ---------------------------------------------------------------------

def walk(patterns=None, prefix: str = "", namespace: str = ""):
    """(route, qualified name, pattern) for every URL, resolvers followed recursively."""
    for p in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(p, URLResolver):
            ns = f"{namespace}{p.namespace}:" if p.namespace else namespace
            yield from walk(p.url_patterns, prefix + str(p.pattern), ns)
        elif isinstance(p, URLPattern):
            yield prefix + str(p.pattern), f"{namespace}{p.name or ''}", p


def param_value(param: str, route: str, world: dict) -> str:
    """A real value for a path parameter: a seeded slot, an existing row's pk, ..."""
    admin = re.match(r"admin/(\w+)/(\w+)/", route)
    if param == "object_id" and admin:
        from django.apps import apps

        model = apps.get_model(admin.group(1), admin.group(2))
        obj = model.objects.order_by("pk").first()
        assert obj is not None, f"seed a {model.__name__} for {route}"
        return str(obj.pk)
    if param == "name" and route.startswith("nodes/"):
        return world["node"].name
    values = {
        "name": "chat", "action": "pin", "model_id": "chat", "app_label": "slots",
        "url": "no-such-page/", "id": str(world["user"].pk), "uidb64": "MQ",
        "token": "set-password", "content_type_id": str(ContentType.objects.get_for_model(Slot).pk),
        "object_id": str(Slot.objects.get(name="chat").pk),
        # the nodes pages (by pk or by name)
        "pk": str(world["node"].pk), "node_id": str(world["node"].pk),
        "node_pk": str(world["node"].pk), "node": world["node"].name,
        "node_name": world["node"].name, "slot": "chat", "slot_name": "chat",
        "endpoint": "chat/completions",  # a slot page's "Try it" panel
    }
    if param not in values:
        pytest.fail(f"the URL walk has no value for <{param}> in {route!r}: add one to "
                    "param_value() in tests/test_security.py")
    return values[param]


def concrete(route: str, world: dict) -> str:
    """`slots/<str:name>/do/<str:action>/` -> `/slots/chat/do/pin/`; regexes likewise."""
    path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: param_value(m.group(1), route, world), route)
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: param_value(m.group(1), route, world), path)
    return "/" + path.replace("^", "").replace("$", "").replace("\\", "")


def urls(world: dict) -> list[tuple[str, str, str]]:
    """(path, qualified name, route) for every URL, deduplicated by path."""
    seen, out = set(), []
    for route, name, _ in walk():
        path = concrete(route, world)
        if path not in seen:
            seen.add(path)
            out.append((path, name, route))
    return out


# public by design: logging in and out, the bare health check, the favicon (a redirect to
# a static file)
PUBLIC = {"login", "logout", "admin:login", "admin:logout", "slots:api-health", "favicon"}


def kind(route: str, name: str) -> str:
    if route.startswith(("v1/", "models/")) or route in ("models", "metrics"):
        return "token"  # the gateway (and llama.cpp's /models API): bearer tokens, no CSRF
    if name in PUBLIC:
        return "public"
    if route.startswith("api/"):
        return "api"
    return "page"


POST_DATA = {  # what a forged form would carry: if anything got through, it would show
    "name": "forged", "model": "Forged-1B-GGUF", "model_name": "Forged-1B-GGUF",
    "capability": "chat", "device": "cpu", "enabled": "on", "base_url": "http://10.6.6.6/",
    "api_key": "forged", "username": "forged", "password1": "forged-pw-123456",
    "password2": "forged-pw-123456", "action": "delete_selected", "post": "yes",
    "_selected_action": "1", "slots": "chat",
}


@pytest.fixture
def world(dead_node, admin_user):
    """One row of everything the admin lists, a node with keys, a scoped token."""
    dead_node.api_key, dead_node.admin_api_key = API_KEY, ADMIN_KEY
    dead_node.save()
    Group.objects.create(name="operators")
    SlotEvent.objects.create(slot=Slot.objects.get(name="chat"), slot_name="chat",
                             action="load", actor="boss", message="seed event")
    token, raw = tokens.create_token("scoped", slots="chat")
    seen = {"username": "guesser", "ip_address": "10.0.0.66", "user_agent": "",
            "http_accept": "", "path_info": "/accounts/login/"}  # django-axes' admin pages
    AccessAttempt.objects.create(**seen, get_data="", post_data="", failures_since_start=1)
    AccessLog.objects.create(**seen)
    AccessFailureLog.objects.create(**seen, locked_out=False)
    return {"node": dead_node, "user": admin_user, "token": token, "raw_token": raw}


def snapshot() -> tuple:
    """Everything a forged request could change."""
    return (
        portability.export_json(),
        list(SlotEvent.objects.order_by("pk").values_list("pk", flat=True)),
        list(Node.objects.order_by("pk").values("name", "base_url", "api_key",
                                                "admin_api_key", "enabled")),
        list(ApiToken.objects.order_by("pk").values("name", "key_hash", "slots", "revoked_at",
                                                     "expires_at")),
        list(User.objects.order_by("pk").values("username", "password", "is_active",
                                                "is_staff", "is_superuser")),
        list(Group.objects.values_list("name", flat=True)),
        LogEntry.objects.count(),
    )


def is_login_redirect(response) -> bool:
    return response.status_code == 302 and re.match(
        r"^/(accounts|admin)/login/\?next=", response["Location"]) is not None


# --- pages, API and gateway ------------------------------------------------------------------

@pytest.mark.django_db
def test_the_walk_covers_every_part_of_the_site(world):
    routes = {route for _, _, route in urls(world)}
    for expected in ("", "new-slot/", "api/slots/<str:name>/<str:action>", "v1/chat/completions",
                     "admin/slots/node/<path:object_id>/change/", "metrics"):
        assert expected in routes
    assert len(routes) > 60


@pytest.mark.django_db
def test_anonymous_requests_get_a_login_redirect_or_401(world):
    client = Client()
    for path, name, route in urls(world):
        for method in ("get", "post"):
            response = getattr(client, method)(path, POST_DATA if method == "post" else None)
            status = response.status_code
            where = f"anonymous {method.upper()} {path} ({name or route})"
            assert status < 500, f"{where}: {status}"
            k = kind(route, name)
            if k == "public":
                if name == "slots:api-health" and status == 200:
                    assert "nodes" not in response.json(), where
                continue
            if k in ("api", "token"):
                assert status in (401, 405), f"{where}: {status}"
                if status == 401:  # with a message saying what to send
                    if response["Content-Type"].startswith("application/json"):
                        assert response.json()["error"]["message"], where
                    else:
                        assert b"token" in response.content, where
            else:
                assert is_login_redirect(response) or status == 405, f"{where}: {status}"


@pytest.mark.django_db
def test_logged_in_posts_without_a_csrf_token_are_refused_and_change_nothing(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world["user"])
    before = snapshot()
    for path, name, route in urls(world):
        response = client.post(path, POST_DATA)
        where = f"POST {path} ({name or route}) with a session and no CSRF token"
        if kind(route, name) == "token":
            if route == "metrics":  # read-only Prometheus text; a staff session may read it
                assert response.status_code == 200, where
            else:  # cookies do not authenticate the gateway: no token, no service
                assert response.status_code in (401, 405), f"{where}: {response.status_code}"
        else:
            # 405: a read-only API view that refuses POST before looking at anything
            assert response.status_code in (403, 405), f"{where}: {response.status_code}"
        for content_type in ("application/json", "text/plain"):
            if kind(route, name) != "token":
                response = client.post(path, json.dumps({"model": "Forged-1B-GGUF"}),
                                       content_type=content_type)
                assert response.status_code in (403, 405), f"{where} ({content_type})"
    assert snapshot() == before


@pytest.mark.django_db
def test_gateway_ignores_session_cookies(world):
    client = Client()
    client.force_login(world["user"])
    for path, name, route in urls(world):
        if kind(route, name) != "token" or route == "metrics":
            continue
        method = client.get if route.startswith(("v1/models", "models")) else client.post
        response = method(path, json.dumps({"model": "chat"}), content_type="application/json") \
            if method == client.post else method(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_only_token_authenticated_views_are_csrf_exempt(world):
    """Views that skip Django's CSRF middleware: the gateway (tokens only, llama.cpp's
    /models API at the root included) and the JSON API (which checks CSRF itself for
    sessions: see the walk above). Nothing else."""
    exempt = {route for route, _, p in walk() if getattr(p.callback, "csrf_exempt", False)}
    assert exempt, "the gateway should be CSRF-exempt"
    for route in exempt:
        assert route.startswith(("v1/", "api/", "models/")) \
            or route in ("metrics", "models"), route


@pytest.mark.django_db(transaction=True)  # actions run on a worker thread
def test_a_valid_csrf_token_from_a_foreign_origin_is_refused(node, admin_user):
    client = Client(enforce_csrf_checks=True, HTTP_HOST=HOST)
    client.force_login(admin_user)
    client.get("/")
    csrf = client.cookies["csrftoken"].value
    for origin, expected in (("http://evil.example", 403), (ORIGIN, 200)):
        response = client.post("/api/slots/chat/pin", HTTP_ORIGIN=origin, HTTP_X_CSRFTOKEN=csrf)
        assert response.status_code == expected, (origin, response.content[:300])
    assert Slot.objects.get(name="chat").pinned  # the same-origin one went through
    response = client.post("/slots/chat/do/unpin/", HTTP_ORIGIN="http://evil.example",
                           HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 403
    assert Slot.objects.get(name="chat").pinned


# --- tokens ------------------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)  # actions run on a worker thread
def test_scoped_token_on_the_json_api(node):
    _, raw = tokens.create_token("chat-only", slots="chat")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert [s["name"] for s in client.get("/api/slots/").json()["slots"]] == ["chat"]
    assert client.get("/api/slots/chat/").status_code == 200
    assert client.get("/api/slots/embed/").status_code == 403
    events = SlotEvent.objects.count()
    for action in ("load", "unload", "restart", "pin", "unpin", "swap"):
        response = client.post(f"/api/slots/embed/{action}", {"model": "x"},
                               content_type="application/json")
        assert response.status_code == 403, action
        assert response.json()["error"]["code"] == "auth.forbidden"
    assert SlotEvent.objects.count() == events
    assert client.post("/api/slots/chat/pin").status_code == 200  # its own slot works
    # a token is not a login: pages stay closed, forms refuse
    assert is_login_redirect(client.get("/"))
    assert client.post("/slots/chat/do/unpin/").status_code in (302, 403)
    assert Slot.objects.get(name="chat").pinned


@pytest.mark.django_db
def test_a_scoped_token_sees_only_its_slots_on_metrics_and_health(dead_node, admin_user,
                                                                  django_user_model,
                                                                  monkeypatch):
    from slots import metrics, runtime

    dead_node.last_error = "lemond answered 500"
    dead_node.save()
    far = Node.objects.create(name="far", base_url="http://10.9.9.9:13305",
                              last_error="lemond answered 500")
    Slot.objects.create(name="faraway", capability="chat", device="cpu",
                        model_name="Qwen3-0.6B-GGUF", node=far)
    for slot in ("chat", "embed"):
        runtime.current().metrics.record(metrics.RequestSample(
            slot_name=slot, endpoint="chat/completions", status=200,
            started_at=timezone.now(), latency_ms=3.0, tokens_in=1, tokens_out=2, ttft_ms=1.0))
    _, raw = tokens.create_token("chat-only", slots="chat")
    scoped = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    text = scoped.get("/metrics").content.decode()
    assert 'hal0_slot_loaded{slot="chat"}' in text and 'node="local"' in text
    assert 'hal0_gateway_requests_total{slot="chat"' in text
    for other in ('slot="embed"', 'slot="faraway"', 'node="far"'):
        assert other not in text, other
    nodes = scoped.get("/api/health").json()["nodes"]
    assert [n["name"] for n in nodes] == ["local"]
    assert "url" not in nodes[0] and "last_error" not in nodes[0]
    # an unscoped token sees every slot and node, but no URLs or errors either
    _, everything = tokens.create_token("all")
    text = Client(HTTP_AUTHORIZATION=f"Bearer {everything}").get("/metrics").content.decode()
    assert 'slot="embed"' in text and 'node="far"' in text
    nodes = Client(HTTP_AUTHORIZATION=f"Bearer {everything}").get("/api/health").json()["nodes"]
    assert {n["name"] for n in nodes} == {"local", "far"}
    assert not any("url" in n or "last_error" in n for n in nodes)
    # a logged-in operator who is not staff: reachability, no URLs or errors
    operator = Client()
    operator.force_login(django_user_model.objects.create_user("op", "", "op-password-1"))
    nodes = operator.get("/api/health").json()["nodes"]
    assert not any("url" in n or "last_error" in n for n in nodes)
    # staff see where lemond lives and what went wrong
    staff = Client()
    staff.force_login(admin_user)
    nodes = {n["name"]: n for n in staff.get("/api/health").json()["nodes"]}
    assert nodes["far"]["url"] == "http://10.9.9.9:13305"
    assert nodes["far"]["last_error"] == "lemond answered 500"


@pytest.mark.django_db(transaction=True)  # the API runs actions on a worker thread
def test_a_scoped_token_cannot_unload_another_slots_model(node, sim):
    """`chat`-only token: swap chat to embed's model, then unload chat. lemond must keep the
    model `embed` serves (it used to drop it, and embed's card said "unloaded outside hal0")."""
    from slots.actions import lifecycle

    embed_model = Slot.objects.get(name="embed").model_name
    lifecycle.do_load_slot("embed", actor="cli")
    _, raw = tokens.create_token("chat-only", slots="chat")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    swapped = client.post("/api/slots/chat/swap", {"model": embed_model},
                          content_type="application/json")
    assert swapped.status_code == 200, swapped.content
    unload = client.post("/api/slots/chat/unload")
    assert unload.status_code == 409
    assert unload.json()["error"]["code"] == "slot.model_shared"
    assert "'embed'" in unload.json()["error"]["message"]
    assert embed_model in sim.state()["loaded_names"]
    assert Slot.objects.get(name="embed").state == State.READY
    assert Slot.objects.get(name="chat").state == State.READY  # nothing changed
    assert not SlotEvent.objects.filter(slot_name="chat", action="unload").exists()


@pytest.mark.django_db
def test_revoked_and_expired_tokens_are_refused(node):
    _, revoked = tokens.create_token("old")
    tokens.revoke_token("old")
    _, expired = tokens.create_token("late", expires_at=timezone.now() - timedelta(seconds=1))
    for raw in (revoked, expired, "hal0_" + secrets.token_urlsafe(32), ""):
        client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
        assert client.get("/api/slots/").status_code == 401
        assert client.post("/api/slots/chat/load").status_code == 401
        response = client.post("/v1/chat/completions", {"model": "chat"},
                               content_type="application/json")
        assert response.status_code == 401


def asgi_client() -> httpx.AsyncClient:
    """The real ASGI application, gateway fast path included, without a server."""
    from hal0site.asgi import application

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application),
                             base_url=ORIGIN, timeout=10)


@pytest.mark.django_db(transaction=True)
async def test_scoped_token_on_the_gateway(dead_node):
    from asgiref.sync import sync_to_async

    _, raw = await sync_to_async(tokens.create_token)("chat-only-gw", slots="chat")
    headers = {"Authorization": f"Bearer {raw}"}
    async with asgi_client() as client:
        models = (await client.get("/v1/models", headers=headers)).json()
        assert [m["id"] for m in models["data"]] == ["chat"]
        assert (await client.get("/v1/models/embed", headers=headers)).status_code == 404
        for endpoint, model in (("embeddings", "embed"), ("rerank", "rerank"),
                                ("images/generations", "img"), ("audio/speech", "tts"),
                                ("embeddings", "Qwen3-Embedding-0.6B-GGUF")):
            response = await client.post(f"/v1/{endpoint}", json={"model": model},
                                         headers=headers)
            assert response.status_code in (403, 404), (endpoint, model, response.text)
            if response.status_code == 403:
                assert response.json()["error"]["code"] == "slot_not_allowed"
        # nothing was loaded on the token's behalf
        assert not await SlotEvent.objects.filter(action="load").aexists()


# --- websockets --------------------------------------------------------------------------------

def ws_paths() -> list[str]:
    from slots.routing import websocket_urlpatterns

    return ["/" + str(p.pattern) for p in websocket_urlpatterns]


async def ws_connect(path: str, *headers) -> tuple[bool, WebsocketCommunicator]:
    from hal0site.asgi import application

    comm = WebsocketCommunicator(application, path, headers=[(b"host", HOST.encode()), *headers])
    connected, _ = await comm.connect(timeout=5)
    return connected, comm


@pytest.mark.django_db(transaction=True)
async def test_websockets_refuse_anonymous_and_foreign_origins(dead_node, admin_user):
    from asgiref.sync import sync_to_async

    def session() -> bytes:
        client = Client()
        client.force_login(admin_user)
        return f"sessionid={client.cookies['sessionid'].value}".encode()

    cookie = (b"cookie", await sync_to_async(session)())
    good_origin = (b"origin", ORIGIN.encode())
    assert ws_paths()
    for path in ws_paths():
        for headers, ok in (
            ((good_origin,), False),                                   # anonymous
            (((b"origin", b"http://evil.example"), cookie), False),    # foreign page
            (((b"origin", b"http://127.0.0.1.evil.example"), cookie), False),
            ((cookie,), False),                                        # no Origin at all
            ((good_origin, (b"cookie", b"sessionid=forged")), False),  # made-up session
            ((good_origin, cookie), True),                             # the dashboard
        ):
            connected, comm = await ws_connect(path, *headers)
            assert connected is ok, (path, headers)
            await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("origin, host, extra, ok", [
    ("http://127.0.0.1:8000", HOST, {}, True),  # the dashboard's own page
    ("http://localhost:3000", HOST, {}, False),  # another local web app
    ("http://127.0.0.1:9999", HOST, {}, False),  # same host name, another port
    ("http://localhost:8000", HOST, {}, False),  # another host name, same port
    ("https://127.0.0.1:8000", HOST, {}, False),  # another scheme
    ("http://127.0.0.1", HOST, {}, False),  # the default port is another port
    ("http://evil.example:8000", "evil.example:8000", {}, False),  # host not allowed
    # behind a TLS proxy: the proxy's header says the page is https
    ("https://hal0.lan", "hal0.lan", {"x-forwarded-proto": "https"}, True),
    ("http://hal0.lan", "hal0.lan", {"x-forwarded-proto": "https"}, False),
    # HAL0_CSRF_TRUSTED_ORIGINS: exact, or a subdomain pattern
    ("https://dash.example.org", HOST, {}, True),
    ("https://dash.example.org:444", HOST, {}, False),
    ("https://a.lan.example", HOST, {}, True),
    ("http://a.lan.example", HOST, {}, False),
])
async def test_websocket_origins_are_compared_like_csrf(dead_node, admin_user, settings,
                                                       origin, host, extra, ok):
    from asgiref.sync import sync_to_async

    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost", "hal0.lan"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://dash.example.org", "https://*.lan.example"]
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

    def session() -> bytes:
        client = Client()
        client.force_login(admin_user)
        return f"sessionid={client.cookies['sessionid'].value}".encode()

    from hal0site.asgi import application

    headers = [(b"host", host.encode()), (b"origin", origin.encode()),
               (b"cookie", await sync_to_async(session)()),
               *((k.encode(), v.encode()) for k, v in extra.items())]
    for path in ws_paths():
        comm = WebsocketCommunicator(application, path, headers=headers)
        connected, _ = await comm.connect(timeout=5)
        assert connected is ok, (path, origin, host)
        await comm.disconnect()


@pytest.mark.e2e
def test_a_real_serve_refuses_websockets_from_other_origins(tmp_path, lemond_sim):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    stack = Stack(tmp_path, HAL0_LEMONADE_URL=lemond_sim.url, HAL0_LOG_LEVEL="WARNING")
    try:
        stack.setup()
        url = stack.serve()
        browser = login(url)
        cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
        port = url.rsplit(":", 1)[1]
        for path in ("/ws/slots/", "/ws/logs/"):
            ws_url = url.replace("http://", "ws://", 1) + path
            for origin in ("http://localhost:3000", "http://127.0.0.1:9999",
                           f"https://127.0.0.1:{port}", f"http://localhost:{port}"):
                with pytest.raises(InvalidStatus) as refused:
                    connect(ws_url, additional_headers={"Cookie": cookie, "Origin": origin},
                            open_timeout=10).close()
                assert refused.value.response.status_code == 403, origin
            with connect(ws_url, additional_headers={"Cookie": cookie, "Origin": url},
                         open_timeout=10) as socket:
                assert socket.recv(timeout=10)  # the page's first sync
    finally:
        stack.stop()


# --- roles --------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_operators_use_slots_while_staff_manage_them(dead_node, django_user_model):
    """Every operator loads, unloads, swaps, pins and edits models; extra_args, node moves,
    deleting slots and lemond's logs need staff or the permission slots.manage_slots."""
    from django.contrib.auth.models import Permission

    far = Node.objects.create(name="far", base_url="http://127.0.0.1:9")
    Slot.objects.create(name="spare", capability="chat", device="cpu",
                        model_name="Qwen3-0.6B-GGUF", node=dead_node)
    user = django_user_model.objects.create_user("op", "", "op-password-1")
    operator = Client()
    operator.force_login(user)
    edit = {"name": "spare", "capability": "chat", "device": "cpu",
            "model_name": "Qwen3-1.7B-GGUF", "idle_timeout_s": "300", "enabled": "on",
            "extra_args": "--override-kv evil", "node": str(far.pk)}
    assert operator.post("/slots/spare/", edit).status_code == 200
    spare = Slot.objects.get(name="spare")
    assert spare.model_name == "Qwen3-1.7B-GGUF"  # an operator's edit
    assert (spare.extra_args, spare.node_id) == ("", dead_node.pk)  # not theirs to change
    created = operator.post("/new-slot/", {**edit, "name": "mine"})
    assert created.status_code == 302
    mine = Slot.objects.get(name="mine")
    assert (mine.extra_args, mine.node_id) == ("", dead_node.pk)
    assert operator.post("/slots/spare/delete/").status_code == 403
    assert Slot.objects.filter(name="spare").exists()
    assert operator.get("/logs/").status_code == 403
    assert operator.post("/slots/spare/do/pin/").status_code in (200, 302)  # not 403
    # the permission lifts all of it
    user.user_permissions.add(Permission.objects.get(codename="manage_slots"))
    manager = Client()
    manager.force_login(django_user_model.objects.get(pk=user.pk))
    assert manager.post("/slots/spare/", edit).status_code in (200, 302)
    spare = Slot.objects.get(name="spare")
    assert (spare.extra_args, spare.node_id) == ("--override-kv evil", far.pk)
    assert manager.get("/logs/").status_code == 200
    assert manager.post("/slots/mine/delete/").status_code == 302
    assert not Slot.objects.filter(name="mine").exists()


@pytest.mark.django_db(transaction=True)
async def test_the_lemond_log_socket_is_for_managers_only(dead_node, django_user_model):
    from asgiref.sync import sync_to_async

    def session() -> bytes:
        client = Client()
        client.force_login(django_user_model.objects.create_user("op", "", "op-password-1"))
        return f"sessionid={client.cookies['sessionid'].value}".encode()

    cookie = (b"cookie", await sync_to_async(session)())
    connected, comm = await ws_connect("/ws/logs/", (b"origin", ORIGIN.encode()), cookie)
    assert not connected
    await comm.disconnect()


# --- caps -----------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_the_number_of_slots_is_capped(dead_node, admin_client, settings):
    import json as json_

    from slots.portability import ImportProblem, import_json

    assert settings.HAL0_MAX_SLOTS == 200  # the documented default
    settings.HAL0_MAX_SLOTS = Slot.objects.count() + 1
    form = {"capability": "chat", "device": "cpu", "model_name": "Qwen3-0.6B-GGUF",
            "idle_timeout_s": "300", "enabled": "on"}
    assert admin_client.post("/new-slot/", {**form, "name": "one"}).status_code == 302
    refused = admin_client.post("/new-slot/", {**form, "name": "two"})
    assert refused.status_code == 200 and "HAL0_MAX_SLOTS" in refused.content.decode()
    assert not Slot.objects.filter(name="two").exists()
    before = Slot.objects.count()
    many = {"slots": [{"name": f"imp{i}", "capability": "chat", "device": "cpu",
                       "model_name": "Qwen3-0.6B-GGUF"} for i in range(20_000)]}
    with pytest.raises(ImportProblem, match="HAL0_MAX_SLOTS"):
        import_json(json_.dumps(many))
    assert Slot.objects.count() == before


# --- node URLs and what a failing node shows -----------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21/", "ftps://127.0.0.1/", "file:///etc/passwd",
                                 "gopher://127.0.0.1/"])
def test_node_urls_are_http_or_https_only(admin_client, dead_node, url):
    response = admin_client.post("/nodes/", {"name": "odd", "base_url": url, "enabled": "on"})
    assert response.status_code == 400
    assert not Node.objects.filter(name="odd").exists()
    response = admin_client.post(f"/nodes/{dead_node.name}/", {
        "name": dead_node.name, "base_url": url, "enabled": "on"})
    assert response.status_code == 400
    assert Node.objects.get(pk=dead_node.pk).base_url == dead_node.base_url
    node = Node(name="odd", base_url=url)
    with pytest.raises(ValidationError) as refused:
        node.full_clean()
    assert "http:// or https://" in str(refused.value)


@pytest.fixture
def leaky_service():
    """Another internal service where a node points: every answer is a 500 whose body
    holds a secret."""
    import http.server
    import threading

    class Leaky(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = b'{"error": {"message": "denied for token=INTERNAL-SECRET-42", "code": "x"}}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Leaky)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.django_db
def test_a_failing_node_shows_its_status_never_the_body(admin_client, dead_node, leaky_service):
    from asgiref.sync import async_to_sync

    from slots.reconciler import Reconciler

    dead_node.base_url = leaky_service
    dead_node.save()
    async_to_sync(Reconciler().poll_once)()
    dead_node.refresh_from_db()
    assert not dead_node.reachable
    assert dead_node.last_error == "lemond answered 500 (x)"
    health = admin_client.get("/api/health").content.decode()
    page = admin_client.get("/").content.decode()
    assert "lemond answered 500" in page
    for text in (health, page):
        assert "INTERNAL-SECRET-42" not in text


# --- body limits --------------------------------------------------------------------------------

def _raw_post(url: str, path: str, head: dict[str, str], body_chunks) -> bytes:
    """POST over a raw socket, sending `body_chunks` until the server answers; returns the
    start of the answer (b"" when it only closed)."""
    import socket as socket_
    from urllib.parse import urlsplit

    where = urlsplit(url)
    with socket_.create_connection((where.hostname, where.port), timeout=10) as conn:
        lines = [f"POST {path} HTTP/1.1", f"Host: {where.netloc}",
                 *(f"{k}: {v}" for k, v in head.items()), "", ""]
        conn.sendall("\r\n".join(lines).encode())
        conn.setblocking(False)
        answer = b""
        for chunk in body_chunks:
            try:
                answer += conn.recv(65536)
            except BlockingIOError:
                pass
            except OSError:
                break
            if answer:
                break
            try:
                conn.setblocking(True)
                conn.sendall(chunk)
                conn.setblocking(False)
            except OSError:
                break
        conn.setblocking(True)
        try:
            while b"\r\n\r\n" not in answer:
                more = conn.recv(65536)
                if not more:
                    break
                answer += more
        except OSError:
            pass
        return answer


@pytest.mark.e2e
def test_a_real_serve_refuses_oversized_bodies_before_reading_them(tmp_path, lemond_sim):
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=lemond_sim.url, HAL0_LOG_LEVEL="WARNING",
                  HAL0_MAX_BODY_MB="1", HAL0_MAX_UPLOAD_MB="3")
    try:
        stack.setup()
        url = stack.serve()
        # a declared 1.5 GB body, without credentials, is refused from its headers alone
        for path in ("/v1/chat/completions", "/api/slots/chat/load", "/accounts/login/"):
            answer = _raw_post(url, path, {"Content-Length": str(1_500_000_000),
                                           "Content-Type": "application/json"}, [b"{"])
            assert answer.startswith(b"HTTP/1.1 413"), (path, answer[:200])
        # a chunked body is cut off as soon as it passes the cap
        piece = b"40000\r\n" + b"x" * 0x40000 + b"\r\n"
        answer = _raw_post(url, "/v1/embeddings", {"Transfer-Encoding": "chunked",
                                                   "Content-Type": "application/json"},
                           [piece] * 64)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # uploads get their own cap: 2 MB reach the gateway (401: no token), 4 MB do not
        audio = httpx.post(f"{url}/v1/audio/transcriptions", timeout=30,
                           files={"file": ("a.wav", b"\0" * 2_000_000, "audio/wav")})
        assert audio.status_code == 401
        answer = _raw_post(url, "/v1/audio/transcriptions",
                           {"Content-Length": str(4 * 1024 * 1024),
                            "Content-Type": "multipart/form-data; boundary=b"}, [b"--b"])
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # the slot page's Try-it upload has the same cap as the endpoint it posts to
        audio = httpx.post(f"{url}/slots/stt/try/audio/transcriptions", timeout=30,
                           files={"file": ("a.wav", b"\0" * 2_000_000, "audio/wav")})
        assert audio.status_code == 403  # reached hal0, which wants a CSRF token (and a login)
        answer = _raw_post(url, "/slots/stt/try/audio/transcriptions",
                           {"Content-Length": str(4 * 1024 * 1024),
                            "Content-Type": "multipart/form-data; boundary=b"}, [b"--b"])
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        answer = _raw_post(url, "/slots/chat/try/chat/completions",
                           {"Content-Length": str(2 * 1024 * 1024),
                            "Content-Type": "application/json"}, [b"{"])
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]  # the other panels: 1 MB
        # and serve is fine: small requests work, logins too
        assert httpx.get(f"{url}/api/health", timeout=10).status_code == 200
        assert login(url).get("/api/slots/").status_code == 200
    finally:
        stack.stop()


# --- check --deploy ----------------------------------------------------------------------------

def manage_check(tmp_path, **env) -> subprocess.CompletedProcess:
    stack = Stack(tmp_path, **{"HAL0_DEBUG": "0", "HAL0_SECRET_KEY": secrets.token_urlsafe(50),
                               **env})
    return stack.manage("check", "--deploy", "--fail-level", "WARNING", check=False)


@pytest.mark.e2e
@pytest.mark.parametrize("env", [{"HAL0_HTTPS": "0"}, {"HAL0_HTTPS": "1"},
                                 {"HAL0_HTTPS": "1", "HAL0_SSL_REDIRECT": "0"}, {}])
def test_check_deploy_is_clean_with_production_settings(tmp_path, env):
    proc = manage_check(tmp_path, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no issues" in proc.stdout


@pytest.mark.e2e
def test_check_deploy_silences_only_the_https_warnings(tmp_path):
    """Over plain HTTP the four HTTPS-only warnings are silenced, nothing else: a weak
    secret key still fails the check."""
    proc = manage_check(tmp_path, HAL0_HTTPS="0", HAL0_SECRET_KEY="x" * 60)
    assert proc.returncode != 0 and "security.W009" in proc.stderr, proc.stderr
    assert "security.W004" not in proc.stderr


# --- secrets: never in a page, never in a log ---------------------------------------------------

@pytest.fixture
def keyed_sim(lemond_sim_factory):
    """A simulator that demands the keys, so pages that ask lemond send them."""
    return lemond_sim_factory(api_key=API_KEY, admin_api_key=ADMIN_KEY)


@pytest.fixture
def all_logs(caplog):
    """caplog at DEBUG for hal0, django and the root logger (hal0 and django do not
    propagate, so its handler is attached to them too)."""
    caplog.set_level(logging.DEBUG)
    attached = []
    for name in ("hal0", "django", "httpx", "httpcore"):
        logger = logging.getLogger(name)
        attached.append((logger, logger.level))
        logger.setLevel(logging.DEBUG)
        logger.addHandler(caplog.handler)
    yield caplog
    for logger, level in attached:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)


INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*type=\"application/json\")[^>]*>",
                           re.I)
INLINE_HANDLER = re.compile(r"<[^>]+\s(on[a-z]+)\s*=", re.I)


@pytest.mark.django_db(transaction=True)  # actions run on a worker thread
def test_keys_and_tokens_never_appear_in_pages_or_logs(world, keyed_sim, all_logs):
    node = world["node"]
    node.base_url = keyed_sim.url
    node.save()
    Node.objects.create(name="far", base_url="http://127.0.0.1:9", api_key=API_KEY + "far",
                        admin_api_key=ADMIN_KEY + "far")
    raw = world["raw_token"]
    secrets_ = (API_KEY, ADMIN_KEY, raw)
    client = Client(HTTP_HOST=HOST)
    client.force_login(world["user"])
    csrf_client = Client(HTTP_HOST=HOST)
    csrf_client.force_login(world["user"])

    rendered = 0
    for path, name, route in urls(world):
        if kind(route, name) == "token" and route != "metrics":
            continue
        for headers in ({}, {"HTTP_HX_REQUEST": "true"}):
            response = client.get(path, **headers)
            assert response.status_code < 500, path
            body = response.content.decode(errors="replace")
            for secret in secrets_:
                assert secret not in body, f"a secret in GET {path}"
            if response.get("Content-Type", "").startswith("text/html"):
                rendered += 1
                assert not INLINE_SCRIPT.search(body), f"inline <script> in {path}"
                assert not INLINE_HANDLER.search(body), f"inline event handler in {path}"
                assert "javascript:" not in body.lower(), path
                assert "<style" not in body.lower(), f"<style> in {path}"
    assert rendered > 40
    # actions, the gateway and failures log things: none of it may carry a secret
    assert csrf_client.post("/api/slots/chat/load").status_code == 200
    # (the gateway is exercised over real HTTP in the `serve` test below)
    assert Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/api/slots/chat/").status_code == 200
    Client(HTTP_AUTHORIZATION=f"Bearer {raw}x").get("/api/slots/")
    Slot.objects.create(name="faraway", capability="chat", device="cpu",
                        model_name="Qwen3-0.6B-GGUF", node=Node.objects.get(name="far"))
    assert csrf_client.post("/api/slots/faraway/load").status_code == 503
    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in all_logs.records)
    assert all_logs.records, "nothing was logged: the capture is not working"
    for secret in secrets_:
        assert secret not in logs


@pytest.mark.e2e
def test_keys_and_tokens_never_appear_in_a_real_serve_log(tmp_path, lemond_sim_factory):
    """One real `serve` at DEBUG with the keys in its environment: pages, actions, the
    gateway and the admin; its whole output is searched."""
    sim = lemond_sim_factory(api_key=API_KEY, admin_api_key=ADMIN_KEY)
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=sim.url, HAL0_LEMONADE_API_KEY=API_KEY,
                  HAL0_LEMONADE_ADMIN_API_KEY=ADMIN_KEY, HAL0_LOG_LEVEL="DEBUG")
    try:
        stack.setup()
        raw = stack.manage("tokens", "create", "sec", "--slots", "chat").stdout.strip()
        assert raw.startswith("hal0_")
        url = stack.serve()
        browser = login(url)
        pages = ["/", "/slots/chat/", "/slots/chat/models/", "/slots/chat/lemond/", "/logs/",
                 "/admin/slots/node/", "/admin/slots/node/1/change/", "/admin/slots/apitoken/",
                 "/api/slots/", "/api/health", "/metrics"]
        for page in pages:
            response = browser.get(page)
            assert response.status_code == 200, page
            for secret in (API_KEY, ADMIN_KEY, raw):
                assert secret not in response.text, page
        assert browser.post("/api/slots/chat/load").status_code == 200  # the sim wants the key
        gateway = httpx.Client(base_url=url, timeout=30,
                               headers={"Authorization": f"Bearer {raw}"})
        answer = gateway.post("/v1/chat/completions", json={
            "model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text
        assert gateway.post("/v1/embeddings", json={"model": "embed"}).status_code == 403
        httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {raw}x"})
    finally:
        stack.stop()
    output = stack.logs()
    assert output.strip(), "serve printed nothing at DEBUG"
    for secret in (API_KEY, ADMIN_KEY, raw):
        assert secret not in output


# --- headers ---------------------------------------------------------------------------------------

BASIC_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def assert_security_headers(headers, where: str) -> None:
    for name, value in BASIC_HEADERS.items():
        assert headers.get(name) == value, f"{where}: {name}={headers.get(name)!r}"
    csp = headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in csp, where
    assert "unsafe-eval" not in csp and "script-src 'unsafe-inline'" not in csp, where


@pytest.mark.django_db
def test_security_headers_on_pages_and_the_api(admin_user, dead_node):
    anonymous, client = Client(), Client()
    client.force_login(admin_user)
    for c, path in ((anonymous, "/accounts/login/"), (client, "/"), (client, "/slots/chat/"),
                    (client, "/api/slots/"), (anonymous, "/api/slots/"), (client, "/admin/"),
                    (anonymous, "/api/health"), (client, "/metrics")):
        response = c.get(path)
        assert_security_headers(response.headers, path)
    csp = client.get("/").headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    assert "object-src 'none'" in csp and "base-uri 'none'" in csp


def test_htmx_runs_without_eval(admin_client, dead_node):
    """What lets the CSP go without 'unsafe-eval' and 'unsafe-inline' scripts."""
    html = admin_client.get("/").content.decode()
    config = re.search(r"<meta name=\"htmx-config\" content='([^']*)'>", html)
    assert config is not None
    assert json.loads(config.group(1)) == {"allowEval": False, "allowScriptTags": False,
                                           "includeIndicatorStyles": False}
    assert "js:" not in html and "hx-on" not in html


@pytest.mark.django_db(transaction=True)
async def test_security_headers_on_the_gateway_fast_path(dead_node):
    from asgiref.sync import sync_to_async

    _, raw = await sync_to_async(tokens.create_token)("headers")
    async with asgi_client() as client:
        for response in (
            await client.get("/v1/models"),  # 401
            await client.get("/v1/models", headers={"Authorization": f"Bearer {raw}"}),
            await client.post("/v1/chat/completions", content=b"{not json",
                              headers={"Authorization": f"Bearer {raw}"}),
            await client.post("/v1/chat/completions", content=b"[" * 100_000,  # 400, not 500
                              headers={"Authorization": f"Bearer {raw}"}),
        ):
            assert response.status_code in (200, 400, 401), response.text[:200]
            assert_security_headers(response.headers, f"gateway {response.status_code}")
            assert response.headers["Content-Security-Policy"] == \
                "default-src 'none'; frame-ancestors 'none'"


@pytest.mark.e2e
@pytest.mark.browser
@pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"{CHROMIUM} is missing")
def test_the_csp_breaks_nothing_in_a_real_browser(tmp_path, lemond_sim_factory):
    """Chromium enforces the policy: no violation on any page, and htmx still works (a
    button posts, the websocket pushes the new card, the swap dialog opens)."""
    from playwright.sync_api import expect

    from tests.harness import PASSWORD, chromium

    sim = lemond_sim_factory()
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=sim.url, HAL0_LOG_LEVEL="WARNING")
    violations: list[str] = []
    try:
        stack.setup()
        url = stack.serve()
        with chromium() as browser:
            page = browser.new_page()
            page.on("console", lambda m: violations.append(m.text)
                    if "Content Security Policy" in m.text else None)
            page.goto(f"{url}/")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/")
            page.wait_for_selector("#live-status.on", timeout=10_000)  # ws under CSP
            card = page.locator("#slot-chat")
            card.get_by_role("button", name="Pin chat", exact=True).click()
            expect(card.get_by_role("button", name="Unpin chat", exact=True)).to_be_visible(
                timeout=5_000)
            card.get_by_role("button", name="Swap chat").click()
            expect(page.locator("#modal")).to_contain_text("Qwen3", timeout=5_000)
            for path in ("/slots/chat/", "/new-slot/", "/logs/", "/admin/",
                         "/admin/slots/slot/", "/admin/slots/node/1/change/"):
                page.goto(f"{url}{path}")
                page.wait_for_load_state("networkidle")
    finally:
        stack.stop()
    assert violations == []
