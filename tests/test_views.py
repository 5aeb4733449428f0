"""Pages and buttons: login, the dashboard, the slot page's form, create/delete, actions,
the swap picker and downloads."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from slots import runtime, views
from slots.actions import lifecycle, pulls
from slots.models import Slot, SlotEvent, State
from tests.harness import async_wait_for

HTMX = {"HX-Request": "true"}
NOT_DOWNLOADED_LLM = "Llama-3.2-1B-Instruct-GGUF"


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/", "/slots/chat/", "/new-slot/", "/logs/",
                                  "/slots/chat/delete/", "/slots/chat/models/"])
def test_pages_need_a_login(client, path):
    response = client.get(path)
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


@pytest.mark.django_db
def test_login_page_and_logging_in(client, admin_user):
    assert b"Log in to hal0" in client.get("/accounts/login/").content
    response = client.post("/accounts/login/", {"username": "boss",
                                                "password": "correct-horse-battery"})
    assert response.status_code == 302 and response["Location"] == "/"


def external_urls(html: str) -> list[str]:
    """Every `src`/`href` in the page that points at another host (a CDN, a font service):
    an appliance page must load nothing from outside the box."""
    from html.parser import HTMLParser
    from urllib.parse import urlsplit

    found: list[str] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(value for name, value in attrs
                         if name in ("src", "href") and value and urlsplit(value.strip()).netloc)

    Links().feed(html)
    return found


@pytest.mark.django_db
def test_dashboard_groups_cards_by_capability_with_node_headers(admin_client, node,
                                                                django_assert_max_num_queries,
                                                                monkeypatch):
    # a CSRF token that spells "cdn" (a random one does about once in a thousand pages)
    # is no external resource
    import django.middleware.csrf

    monkeypatch.setattr(django.middleware.csrf, "_get_new_csrf_string",
                        lambda: ("cdn" * 11)[:32])
    with django_assert_max_num_queries(10):
        response = admin_client.get("/")
    html = response.content.decode()
    assert "cdn" in html.lower()  # the token above is in the page
    for name in ("chat", "embed", "rerank", "stt", "tts", "img"):
        assert f'id="slot-{name}"' in html and f'id="group-{name}"' in html
    assert 'id="node-local"' in html
    assert 'ws-connect="/ws/slots/"' in html
    assert 'src="/static/' in html  # the scripts are hal0's own …
    assert external_urls(html) == []  # … and nothing comes from elsewhere


def test_external_urls_finds_what_a_page_would_load_from_elsewhere():
    html = ('<script src="https://cdn.example/htmx.js"></script><link href="//fonts.example/a">'
            '<a href="/slots/chat/">chat</a><img src="/static/x.png"><a href="#top">top</a>'
            '<body hx-headers=\'{"X-CSRFToken": "cdncdn"}\'>')
    assert external_urls(html) == ["https://cdn.example/htmx.js", "//fonts.example/a"]


def _grow_slots(make_slot, start: int, stop: int) -> None:
    """Extra slots in every kind of state a card can show: loaded (with lemond's entry and
    a model estimate), pinned, keep-loaded, loading, in error, with load history."""
    from slots.models import SlotEvent

    states = ("ready", "offline", "loading", "error", "serving")
    for i in range(start, stop):
        state = states[i % len(states)]
        made = make_slot(f"extra{i}", capability=("chat", "embed", "rerank")[i % 3],
                         pinned=i % 4 == 0, keep_loaded=i % 5 == 0)
        loaded = made.model_name if state in ("ready", "serving") else ""
        Slot.objects.filter(pk=made.pk).update(
            state=state, loaded_model=loaded, last_load_ms=1000 + i,
            lemond_entry={"model_name": loaded, "recipe_options": {"ctx_size": 4096}}
            if loaded else {})
        SlotEvent.objects.create(slot=made, slot_name=made.name, action="load",
                                 duration_ms=900 + i, to_state="ready")


def _queries(client, path: str) -> list[str]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get(path)  # the first request of a session may write it: not what is counted
    with CaptureQueriesContext(connection) as captured:
        assert client.get(path).status_code == 200
    return [q["sql"] for q in captured.captured_queries]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/", "/slots/chat/", "/activity/"])
def test_page_query_counts_stay_flat_as_slots_grow(admin_client, node, make_slot, path):
    """The page budget (docs/benchmarks.md): the same queries for 3 extra slots as for 30,
    whatever state they are in. An N+1 (a card asking for its node, its events or its
    stats) shows here as a count that grows with the slots."""
    lifecycle.do_load_slot("chat", actor="cli")  # the slot page: a load chart and events
    _grow_slots(make_slot, 0, 3)
    few = _queries(admin_client, path)
    _grow_slots(make_slot, 3, 30)
    many = _queries(admin_client, path)
    assert len(many) == len(few), "\n".join(many)
    assert len(many) <= 10


@pytest.mark.django_db
def test_slot_page_shows_form_history_chart_and_raw_entry(admin_client, node):
    lifecycle.do_load_slot("chat", actor="cli")
    lifecycle.do_load_slot("chat", actor="cli")  # joins nothing: already loaded, a second load event
    Slot.objects.filter(name="chat").update(lemond_entry={"model_name": "X", "pid": 4242})
    html = admin_client.get("/slots/chat/").content.decode()
    assert 'id="slot-form"' in html and 'name="model_name"' in html
    assert "<svg class=\"chart\"" in html and "<rect" in html
    assert "loaded Qwen3-4B-Instruct-2507-GGUF" in html  # the audit history
    assert "&quot;pid&quot;: 4242" in html
    assert 'ws-connect="/ws/slots/?slot=chat"' in html


@pytest.mark.django_db
def test_edit_errors_come_back_inline_as_the_form_partial(admin_client, node):
    response = admin_client.post("/slots/chat/", {
        "name": "chat", "capability": "chat", "device": "gpu-rocm", "model_name": "M",
        "ctx_size": "5", "idle_timeout_s": "300", "enabled": "on"}, headers=HTMX)
    html = response.content.decode()
    assert response.status_code == 200
    assert html.lstrip().startswith("<form id=\"slot-form\"")
    assert "Context size must be between" in html and "field-error" in html
    assert Slot.objects.get(name="chat").model_name != "M"


@pytest.mark.django_db
def test_edit_saves_through_the_action(admin_client, node):
    response = admin_client.post("/slots/embed/", {
        "name": "embed", "capability": "embed", "device": "cpu",
        "model_name": "nomic-embed-text-v1-GGUF", "idle_timeout_s": "60", "enabled": "on",
        "is_default": "on", "keep_loaded": "on"}, headers=HTMX)
    assert "Saved." in response.content.decode()
    embed = Slot.objects.get(name="embed")
    assert (embed.device, embed.idle_timeout_s, embed.keep_loaded) == ("cpu", 60, True)
    event = SlotEvent.objects.filter(slot_name="embed").first()
    assert event.action == "update" and event.actor == "boss"


@pytest.mark.django_db
def test_create_and_delete_a_slot(admin_client, node):
    response = admin_client.post("/new-slot/", {
        "name": "coder", "capability": "chat", "device": "gpu-vulkan",
        "model_name": "Qwen3-0.6B-GGUF", "idle_timeout_s": "300", "enabled": "on"},
        headers=HTMX)
    assert response["HX-Redirect"] == "/slots/coder/"
    assert Slot.objects.get(name="coder").node.name == "local"
    assert b"Delete coder?" in admin_client.get("/slots/coder/delete/").content
    response = admin_client.post("/slots/coder/delete/")
    assert response.status_code == 302 and not Slot.objects.filter(name="coder").exists()


@pytest.mark.django_db
def test_create_shows_validation_errors(admin_client, node):
    response = admin_client.post("/new-slot/", {
        "name": "Bad Name", "capability": "tts", "device": "gpu-rocm", "model_name": "k",
        "idle_timeout_s": "300"}, headers=HTMX)
    html = response.content.decode()
    assert "Slot names are 1-32 characters" in html and "cannot run on gpu-rocm" in html
    assert not Slot.objects.filter(name="Bad Name").exists()


@pytest.mark.django_db
def test_seeded_slots_cannot_be_deleted(admin_client, node):
    page = admin_client.get("/slots/chat/delete/").content.decode()
    content = page.split('<main id="main" tabindex="-1">')[1].split("</main>")[0]
    assert "cannot be deleted" in page and "<button" not in content
    response = admin_client.post("/slots/chat/delete/")
    assert response.status_code == 409 and b"seeded" in response.content
    assert Slot.objects.filter(name="chat").exists()


@pytest.mark.django_db(transaction=True)
async def test_a_button_answers_before_the_load_finishes(node, sim, admin_user):
    sim.configure(load_delay=3.0)
    client = AsyncClient()
    await sync_to_async(client.force_login)(admin_user)
    response = await client.post("/slots/chat/do/load/", headers=HTMX)
    # answered while the 3 s load still runs (a clock here would also time the machine)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="slot-chat"' not in html  # unfinished: the push brings the card
    assert (await Slot.objects.aget(name="chat")).state == State.LOADING
    async def ready():
        return (await Slot.objects.aget(name="chat")).state == State.READY

    await async_wait_for(ready, timeout=5)


@pytest.mark.django_db(transaction=True)
async def test_a_quick_action_answers_with_its_card_and_a_refusal_with_a_message(
        node, sim, admin_user, monkeypatch):
    # A pin takes a few ms, but a busy CI machine can stretch that past the view's 0.25 s
    # wait, and then the answer rightly has no card: give this test's quick action room.
    monkeypatch.setattr(views, "ACTION_WAIT_S", 5.0)
    client = AsyncClient()
    await sync_to_async(client.force_login)(admin_user)
    response = await client.post("/slots/chat/do/pin/", headers=HTMX)
    html = response.content.decode()
    assert 'id="slot-chat"' in html and "pinned" in html
    # the toast that says so (hal0.js shows it; screen readers announce it)
    assert json.loads(response["HX-Trigger"]) == {
        "hal0:toast": {"level": "success", "message": "chat is pinned.",
                       "target": "body"}}
    await Slot.objects.filter(name="embed").aupdate(enabled=False)
    response = await client.post("/slots/embed/do/load/", headers=HTMX)
    toast = json.loads(response["HX-Trigger"])["hal0:toast"]
    assert toast["level"] == "error" and "disabled" in toast["message"]
    response = await client.post("/slots/chat/do/fly/", headers=HTMX)
    assert response.status_code == 404
    response = await client.get("/slots/chat/do/load/")
    assert response.status_code == 405


@pytest.mark.django_db(transaction=True)  # the action runs on a worker: it must see the rows
def test_without_htmx_a_button_redirects_back(admin_client, node, sim, hal0_runtime):
    Slot.objects.filter(name="tts").update(enabled=False)  # refused at once: nothing loads
    response = admin_client.post("/slots/tts/do/load/", {"next": "/slots/tts/"})
    assert response.status_code == 302 and response["Location"] == "/slots/tts/"
    response = admin_client.post("/slots/tts/do/load/", {"next": "https://evil.example/"})
    assert response["Location"] == "/"
    assert hal0_runtime.wait_idle(10)
    assert Slot.objects.get(name="tts").state == State.OFFLINE
    assert sim.state()["load_calls_total"] == 0


@pytest.mark.django_db
def test_swap_picker_lists_models_of_the_slots_type(admin_client, node):
    html = admin_client.get("/slots/embed/models/").content.decode()
    assert "nomic-embed-text-v1-GGUF" in html and "current" in html
    assert "Qwen3-0.6B-GGUF" not in html  # an llm is no embedding model
    rows = admin_client.get("/slots/chat/models/?q=llama-3.2-1b", headers=HTMX).content.decode()
    assert rows.lstrip().startswith('<ul id="picker-rows"')
    assert NOT_DOWNLOADED_LLM in rows and "Download" in rows


def test_picker_rows_skip_what_a_confused_lemond_sends():
    """Ill-typed rows (a user's registry edit, a future lemond) are skipped or read
    leniently; the picker still lists the rows it can read."""
    from slots.views import model_rows

    rows = [{"id": "Good-GGUF", "labels": ["embeddings"], "recipe": "llamacpp", "size": 0.3},
            {"id": "Odd-Labels-GGUF", "labels": 5, "recipe": 7, "size": "big"},
            {"id": "Odd-Items-GGUF", "labels": [{}, None, "embeddings"], "recipe": None},
            {"id": 42, "labels": ["embeddings"]}, "not a row", None, {"labels": ["embeddings"]}]
    listed = model_rows(rows, "embed", "", "Good-GGUF")
    assert [r["id"] for r in listed] == ["Good-GGUF", "Odd-Items-GGUF"]
    assert listed[1]["recipe"] == "" and listed[1]["size"] is None
    assert model_rows({"data": "nope"}, "embed", "", "") == []
    assert [r["id"] for r in model_rows(rows, "chat", "", "")] == ["Odd-Labels-GGUF"]


@pytest.mark.django_db
def test_lemond_reads_render_an_error_when_lemond_is_down(admin_client, dead_node):
    html = admin_client.get("/slots/chat/models/").content.decode()
    assert "Cannot list lemond&#x27;s models" in html
    html = admin_client.get("/slots/chat/lemond/").content.decode()
    assert "Cannot ask lemond about" in html


@pytest.mark.django_db
def test_lemond_model_entry(admin_client, node):
    html = admin_client.get("/slots/chat/lemond/").content.decode()
    assert "&quot;recipe&quot;: &quot;llamacpp&quot;" in html


@pytest.mark.django_db(transaction=True)
async def test_download_runs_with_progress_and_is_recorded(node, sim, admin_user, monkeypatch):
    pushed: list[str] = []
    monkeypatch.setattr(runtime.current().live, "send", pushed.append)
    client = AsyncClient()
    await sync_to_async(client.force_login)(admin_user)
    response = await client.post("/slots/chat/pull/", {"model": NOT_DOWNLOADED_LLM},
                                 headers=HTMX)
    assert "<progress" in response.content.decode()
    assert pulls.pull_running(node.pk, NOT_DOWNLOADED_LLM)
    for _ in range(100):
        if not pulls.pull_running(node.pk, NOT_DOWNLOADED_LLM):
            break
        await __import__("asyncio").sleep(0.05)
    assert any("Swap to this" in html and "downloaded" in html for html in pushed)
    assert NOT_DOWNLOADED_LLM in sim.state()["downloaded"]
    event = await SlotEvent.objects.filter(slot_name="chat", action="pull").afirst()
    assert event.ok and event.model == NOT_DOWNLOADED_LLM


@pytest.mark.django_db
def test_the_model_field_picker_offers_download_and_load_on_a_slots_page(admin_client, node):
    """On a slot's page the Model field's picker shares the Swap dialog's rows: each with
    its fit, and "Download & load" (which fills the field too) for a model not downloaded;
    on the new-slot page (no slot yet) and for another node or capability, only "Use
    this"."""
    page = admin_client.get("/slots/chat/").content.decode()
    assert 'hx-vals=\'{"slot": "chat"}\'' in page  # Browse… says which slot
    query = {"capability": "chat", "node": node.pk, "model_name": "Qwen3-4B-Instruct-2507-GGUF",
             "q": "llama-3.2-1b"}
    html = admin_client.get("/catalogue/", {**query, "slot": "chat"}).content.decode()
    row = html[html.index(NOT_DOWNLOADED_LLM):]
    assert f'data-pick-model="{NOT_DOWNLOADED_LLM}"' in row  # "Use this" stays
    assert "Download &amp; load" in row and '"then": "load"' in row
    assert f'data-fill-model="{NOT_DOWNLOADED_LLM}"' in row
    assert 'data-testid="fit-verdict"' in row and "needs ~" in row
    assert "Swap to this" not in html
    for other in ({}, {"slot": "chat", "capability": "embed", "q": ""},
                  {"slot": "nosuch"}):
        plain = admin_client.get("/catalogue/", {**query, **other}).content.decode()
        assert "Download &amp; load" not in plain and "fit-verdict" not in plain
        assert "data-pick-model" in plain


@pytest.mark.django_db
def test_the_swap_and_field_pickers_render_one_row_markup(admin_client, node):
    """One partial (`_model_row.html`) for both pickers: the same row says the same
    things (size, downloaded or not, labels) in either."""
    swap = admin_client.get("/slots/chat/models/", {"q": "qwen3-0.6b"}).content.decode()
    pick = admin_client.get("/catalogue/", {"capability": "chat", "node": node.pk,
                                            "q": "qwen3-0.6b"}).content.decode()

    def about(html: str) -> str:
        start = html.index('<span class="model-id">Qwen3-0.6B-GGUF</span>')
        return html[start:html.index("</span>", html.index('class="muted"', start)) + 7]

    assert about(swap) == about(pick)
    assert "0.38 GB · downloaded" in about(pick)


@pytest.mark.django_db(transaction=True)
async def test_download_can_be_cancelled(node, sim, admin_user, monkeypatch):
    import asyncio

    monkeypatch.setattr(runtime.current().live, "send", lambda html: None)
    sim.configure(pull_delay=5.0)
    client = AsyncClient()
    await sync_to_async(client.force_login)(admin_user)
    await client.post("/slots/chat/pull/", {"model": NOT_DOWNLOADED_LLM}, headers=HTMX)
    await asyncio.sleep(0.3)
    response = await client.post("/slots/chat/pull/cancel/", {"model": NOT_DOWNLOADED_LLM},
                                 headers=HTMX)
    assert "cancelling" in response.content.decode()
    for _ in range(50):
        if not pulls.pull_running(node.pk, NOT_DOWNLOADED_LLM):
            break
        await asyncio.sleep(0.05)
    event = await SlotEvent.objects.filter(slot_name="chat", action="pull").afirst()
    assert not event.ok and event.error_code == "pull.cancelled"
    assert NOT_DOWNLOADED_LLM not in sim.state()["downloaded"]


@pytest.mark.django_db
def test_logs_page(admin_client, node):
    html = admin_client.get("/logs/").content.decode()
    assert 'ws-connect="/ws/logs/?node=local"' in html
    assert 'id="log-lines"' in html and 'name="level"' in html and "Pause" in html
