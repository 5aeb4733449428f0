"""llama.cpp's router API in-process, through the gateway's fast path in front of the real
simulator: who may load and unload which slots, how refusals read, and what `/models/sse`
streams. The real clients (the `openai` package, an httpx router client against `serve`)
are in tests/test_clients.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import async_to_sync

from slots import live, tokens
from slots.gateway import routes
from slots.models import Slot, SlotEvent, State
from tests.test_gateway_asgi import _call

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def keys(node, settings):
    settings.HAL0_GATEWAY_SSE_PING_S = 0.2
    tokens.clear_cache()
    routes.invalidate_routes()
    return {"manager": tokens.create_token("manager", may_manage=True)[1],
            "reader": tokens.create_token("reader")[1],
            "embedder": tokens.create_token("embedder", slots="embed", may_manage=True)[1]}


def post(path: str, body, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, content = async_to_sync(_call)("POST", path, raw, headers)
    return status, json.loads(content)


def loaded(sim) -> list[str]:
    return sim.state()["loaded_names"]


# --- load and unload -----------------------------------------------------------------------------

def test_load_and_unload_run_hal0s_actions_as_the_token(keys, sim):
    assert post("/models/load", {"model": "chat"}, keys["manager"]) == (200, {"success": True})
    chat = Slot.objects.get(name="chat")
    assert chat.state == State.READY and loaded(sim) == [chat.model_name]
    # the same path under /v1/, and a model's name resolves like any gateway `model`
    assert post("/v1/models/unload", {"model": chat.model_name}, keys["manager"])[0] == 200
    assert Slot.objects.get(name="chat").state == State.OFFLINE and loaded(sim) == []
    actors = list(SlotEvent.objects.filter(slot_name="chat").order_by("id")
                  .values_list("action", "actor"))
    assert actors == [("load", "token:manager"), ("unload", "token:manager")]


@pytest.mark.parametrize("path,body,key,status,code", [
    ("/models/load", {"model": "chat"}, None, 401, "invalid_api_key"),
    ("/models/load", {"model": "chat"}, "reader", 403, "manage_not_allowed"),
    ("/v1/models/unload", {"model": "chat"}, "reader", 403, "manage_not_allowed"),
    ("/models/load", {"model": "chat"}, "embedder", 403, "slot_not_allowed"),
    ("/models/load", {"model": "nope"}, "manager", 404, "model_not_found"),
    ("/models/load", {}, "manager", 400, None),
    ("/models/load", {"model": 7}, "manager", 400, None),
    ("/models/load", b"not json", "manager", 400, None),
])
def test_refusals_are_openai_errors_and_change_nothing(keys, sim, path, body, key, status,
                                                        code):
    got, answer = post(path, body, keys.get(key) if key else None)
    assert got == status, answer
    assert answer["error"]["message"] and answer["error"]["code"] == code
    assert loaded(sim) == [] and not SlotEvent.objects.filter(action="load").exists()


def test_a_scoped_manager_loads_its_own_slot(keys, sim):
    assert post("/models/load", {"model": "embed"}, keys["embedder"])[0] == 200
    assert Slot.objects.get(name="embed").state == State.READY


def test_get_is_a_405(keys):
    status, _, content = async_to_sync(_call)(
        "GET", "/models/load", b"", {"Authorization": f"Bearer {keys['manager']}"})
    assert status == 405 and json.loads(content)["error"]["code"] == "method_not_allowed"


def test_a_pinned_or_keep_loaded_slot_is_not_unloaded_by_a_client(keys, sim):
    post("/models/load", {"model": "chat"}, keys["manager"])
    for flag in ("pinned", "keep_loaded"):
        Slot.objects.filter(name="chat").update(**{flag: True})
        status, answer = post("/models/unload", {"model": "chat"}, keys["manager"])
        assert status == 409 and answer["error"]["code"] == "slot_pinned", answer
        assert "unpin" in answer["error"]["message"].lower()
        assert Slot.objects.get(name="chat").state == State.READY and loaded(sim)
        Slot.objects.filter(name="chat").update(**{flag: False})


def test_the_actions_own_refusals_are_409s(keys, sim):
    chat = Slot.objects.get(name="chat")
    post("/models/load", {"model": "chat"}, keys["manager"])
    # another slot serves the same model: unloading it for `chat` would take `twin` down
    Slot.objects.create(name="twin", capability="chat", device=chat.device,
                        model_name=chat.model_name, node=chat.node, state=State.READY,
                        loaded_model=chat.model_name)
    status, answer = post("/models/unload", {"model": "chat"}, keys["manager"])
    assert status == 409 and answer["error"]["code"] == "slot_model_shared", answer
    assert loaded(sim) == [chat.model_name]
    Slot.objects.filter(name="embed").update(enabled=False)
    status, answer = post("/models/load", {"model": "embed"}, keys["manager"])
    assert status == 409 and answer["error"]["code"] == "slot_disabled"


def test_a_load_longer_than_the_wait_is_a_503_and_goes_on(keys, sim, settings, hal0_runtime):
    settings.HAL0_GATEWAY_LOAD_WAIT_S = 0.05
    sim.configure(load_delay=1.0)
    status, answer = post("/models/load", {"model": "chat"}, keys["manager"])
    assert status == 503 and answer["error"]["code"] == "slot_loading", answer
    assert hal0_runtime.wait_idle(10)  # the load went on and finished
    assert Slot.objects.get(name="chat").state == State.READY


def test_a_failed_load_is_the_gateways_502_and_listed_as_failed(keys, sim):
    sim.fault("fail_next_load", model=Slot.objects.get(name="chat").model_name,
              message="llama-server crashed: OOM")
    status, answer = post("/models/load", {"model": "chat"}, keys["manager"])
    assert status == 502 and answer["error"]["code"] == "model_load_error", answer
    routes.invalidate_routes()
    status, _, content = async_to_sync(_call)(
        "GET", "/models", b"", {"Authorization": f"Bearer {keys['manager']}"})
    entries = {m["id"]: m for m in json.loads(content)["data"]}
    assert status == 200
    chat = entries["chat"]["status"]
    assert chat["value"] == "failed" and chat["failed"] is True and chat["message"]
    assert entries["embed"]["status"] == {"value": "unloaded"}


# --- GET /models/sse -----------------------------------------------------------------------------

class Stream:
    """One streaming request through the fast path, read as it arrives; `close()` is the
    client hanging up."""

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        self.messages: asyncio.Queue = asyncio.Queue()
        self.left = asyncio.Event()
        self.buffer = b""

    async def open(self) -> dict:
        from slots.gateway import asgi as gateway_asgi

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": self.path,
                 "raw_path": self.path.encode(), "root_path": "", "query_string": b"",
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
                 "headers": [(b"host", b"127.0.0.1"),
                             (b"authorization", f"Bearer {self.key}".encode())]}
        asked = []

        async def receive():
            if not asked:
                asked.append(True)
                return {"type": "http.request", "body": b"", "more_body": False}
            await self.left.wait()
            return {"type": "http.disconnect"}

        self.task = asyncio.ensure_future(gateway_asgi.serve(scope, receive,
                                                             self.messages.put))
        return await asyncio.wait_for(self.messages.get(), 10)

    async def frame(self) -> bytes:
        while b"\n\n" not in self.buffer:
            message = await asyncio.wait_for(self.messages.get(), 10)
            assert message.get("more_body"), message  # the stream never ends by itself
            self.buffer += message["body"]
        frame, self.buffer = self.buffer.split(b"\n\n", 1)
        return frame

    async def event(self) -> dict:
        """The next data event (pings are skipped)."""
        while True:
            frame = await self.frame()
            if frame.startswith(b"data: "):
                return json.loads(frame[6:])

    async def close(self) -> None:
        self.left.set()
        await asyncio.wait_for(self.task, 10)


def test_sse_snapshot_then_one_event_per_change_for_the_tokens_slots(keys, sim, hal0_runtime):
    names = set(Slot.objects.values_list("name", flat=True))

    async def scenario():
        everything, embedder = Stream("/models/sse", keys["manager"]), \
            Stream("/v1/models/sse", keys["embedder"])
        start = await everything.open()
        assert start["status"] == 200
        assert dict(start["headers"])[b"Content-Type"] == b"text/event-stream"
        await embedder.open()
        snapshot = [await everything.event() for _ in names]
        assert {e["model"] for e in snapshot} == names
        assert snapshot[0] == {"model": snapshot[0]["model"], "event": "model_status",
                               "data": {"status": "unloaded"}}
        assert await embedder.event() == {"model": "embed", "event": "model_status",
                                          "data": {"status": "unloaded"}}
        status, _, _ = await _call("POST", "/models/load", b'{"model": "chat"}',
                                   {"Authorization": f"Bearer {keys['manager']}"})
        assert status == 200
        assert [await everything.event() for _ in range(2)] == [
            {"model": "chat", "event": "model_status", "data": {"status": status}}
            for status in ("loading", "loaded")]
        # the embed-only token heard nothing of chat: its next frame is a ping
        assert await embedder.frame() == b": ping"
        assert hal0_runtime.live._watchers == 2
        await everything.close()
        await embedder.close()
        assert hal0_runtime.live._watchers == 0

    async_to_sync(scenario)()


def test_sse_ends_when_the_key_is_revoked_and_needs_one(keys, hal0_runtime):
    async def scenario():
        status, _, content = await _call("GET", "/models/sse")
        assert status == 401 and json.loads(content)["error"]["code"] == "invalid_api_key"
        stream = Stream("/models/sse", keys["reader"])  # listening needs no may_manage
        await stream.open()
        await stream.event()
        await asyncio.get_running_loop().run_in_executor(None, tokens.revoke_token, "reader")
        while (await asyncio.wait_for(stream.messages.get(), 10)).get("more_body"):
            pass  # pings and the rest of the snapshot, until the stream ends
        await stream.close()
        assert hal0_runtime.live._watchers == 0

    async_to_sync(scenario)()


def test_no_listener_no_extra_push(node, hal0_runtime, monkeypatch):
    """With the in-memory layer and nobody on /models/sse, a card push is one group send,
    as before; with a listener, the slot's state goes to the models group in the same hop."""
    pages = hal0_runtime.live
    sent: list[list[tuple[str, dict]]] = []
    monkeypatch.setattr(pages, "_publish", sent.append)
    chat = Slot.objects.get(name="chat")
    pages.broadcast_slot(chat.pk)
    assert [[group for group, _ in hop] for hop in sent] == [[live.GROUP]]
    pages.watcher_joined()
    pages.broadcast_slot(chat.pk)
    groups, message = [group for group, _ in sent[-1]], sent[-1][-1][1]
    assert groups == [live.GROUP, live.MODELS_GROUP]
    assert message == {"type": "slot.status", "slot": "chat", "state": chat.state,
                       "message": chat.state_message}
    pages.watcher_left()
