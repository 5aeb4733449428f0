"""hal0 against what real lemond does (issue #10 part 3): published model names, steady-clock
`last_use`, restarts seen as new backend pids, evict-all after a failed load, a failed swap.

Against the simulator where it behaves like lemond; where it cannot (yet) send a shape,
the reconciler's database pass is fed the health lemond sends (`apply()` with a reading),
with the real database."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from providers.lemonade.client import parse_health
from slots.actions import errors, lifecycle
from slots.models import Node, Slot, SlotEvent, State
from slots.reconciler import NodeMemory, NodeReading, Reconciler
from tests.test_reconciler import poll

CHAT_MODEL = "Qwen3-4B-Instruct-2507-GGUF"
EMBED_MODEL = "nomic-embed-text-v1-GGUF"

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast(settings):
    settings.HAL0_STATS_EVERY_S = 0
    settings.HAL0_RECONCILE_TIMEOUT_S = 1.0
    settings.HAL0_RESTORE_BACKOFF_S = 0.2


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)


def _feed(reconciler: Reconciler, node: Node, entries: list[dict], **health) -> None:
    """One poll whose /v1/health lists `entries` (lemond 10.6 shape unless told)."""
    memory = reconciler.nodes.setdefault(node.pk, NodeMemory())
    data = {"status": "ok", "version": "10.6.0", "websocket_port": 9001,
            "max_models": {"llm": 1, "embedding": 1}, "all_models_loaded": entries, **health}
    reconciler.apply(node, memory, NodeReading(health=parse_health(data),
                                               started_at=timezone.now()))


def _ready(name: str, model: str, **fields) -> Slot:
    Slot.objects.filter(name=name).update(model_name=model, loaded_model=model,
                                          state=State.READY, **fields)
    return Slot.objects.get(name=name)


def _entry(name: str, kind: str = "llm", pid: int = 100, last_use: int = 5_000_000) -> dict:
    return {"model_name": name, "type": kind, "pid": pid, "last_use": last_use,
            "recipe": "llamacpp"}


# --- published names ---------------------------------------------------------------------------

@pytest.mark.parametrize("configured,published", [
    ("user.My-Model", "My-Model"),                    # lemond lists user.X as X
    ("builtin.Qwen3-0.6B-GGUF", "Qwen3-0.6B-GGUF"),   # a built-in nothing shadows
    ("builtin.Qwen3-0.6B-GGUF", "builtin.Qwen3-0.6B-GGUF"),  # a shadowed one
    ("My-Model", "My-Model"),
])
def test_a_slot_is_matched_by_the_name_lemond_publishes(node, configured, published):
    _ready("chat", configured)
    reconciler = Reconciler()
    for _ in range(3):
        _feed(reconciler, node, [_entry(published)])
    chat = Slot.objects.get(name="chat")
    assert chat.state == State.READY and chat.loaded_model == configured
    assert not SlotEvent.objects.filter(slot_name="chat", action="evicted").exists()
    assert chat.lemond_entry["model_name"] == published


def test_a_user_model_lemond_serves_is_adopted_once(node):
    Slot.objects.filter(name="chat").update(model_name="user.My-Model", state=State.OFFLINE)
    reconciler = Reconciler()
    for _ in range(3):
        _feed(reconciler, node, [_entry("My-Model")])
    chat = Slot.objects.get(name="chat")
    assert chat.state == State.READY and chat.loaded_model == "user.My-Model"
    assert list(SlotEvent.objects.filter(slot_name="chat").values_list("action", flat=True)) \
        == ["adopted"]


def test_a_custom_model_pulled_as_user_x_can_be_a_slots_model(node, sim):
    """Registered with /pull as user.X, lemond publishes it as X: the slot loads it, stays
    ready across polls, and is never restored in a loop."""
    import httpx

    response = httpx.post(f"{sim.url}/v1/pull", timeout=10, json={
        "model_name": "user.Tiny-Chat", "checkpoint": "unsloth/Qwen3-0.6B-GGUF:Q4_0",
        "recipe": "llamacpp"})
    assert response.status_code == 200, response.text
    Slot.objects.filter(name="chat").update(model_name="user.Tiny-Chat", keep_loaded=True)
    lifecycle.do_load_slot("chat", actor="cli")
    reconciler = Reconciler()
    for _ in range(3):
        poll(reconciler)
    chat = Slot.objects.get(name="chat")
    assert chat.state == State.READY and chat.loaded_model == "user.Tiny-Chat"
    actions = list(SlotEvent.objects.filter(slot_name="chat").values_list("action", flat=True))
    assert actions == ["load"]


# --- last_use is lemond's steady clock ---------------------------------------------------------

def test_last_use_is_compared_only_with_lemonds_own_earlier_values(node):
    """lemond's last_use is milliseconds of a steady clock (time since boot), not a date."""
    an_hour_ago = timezone.now() - timedelta(hours=1)
    _ready("chat", CHAT_MODEL, last_use_at=an_hour_ago)
    reconciler = Reconciler()
    _feed(reconciler, node, [_entry(CHAT_MODEL, last_use=5_000_000)])
    _feed(reconciler, node, [_entry(CHAT_MODEL, last_use=5_000_000)])
    assert Slot.objects.get(name="chat").last_use_at == an_hour_ago  # unused: unchanged
    before = timezone.now()
    _feed(reconciler, node, [_entry(CHAT_MODEL, last_use=5_060_000)])  # used since
    assert Slot.objects.get(name="chat").last_use_at >= before
    # a new backend (pid) starts a new comparison: a lower value is not "used"
    Slot.objects.filter(name="chat").update(last_use_at=an_hour_ago)
    _feed(reconciler, node, [_entry(CHAT_MODEL, pid=200, last_use=10)])
    _feed(reconciler, node, [_entry(CHAT_MODEL, pid=200, last_use=10)])
    assert Slot.objects.get(name="chat").last_use_at == an_hour_ago


def test_idle_unload_never_reads_last_use_as_a_date(node):
    from slots import idle

    past = timezone.now() - timedelta(hours=2)
    Slot.objects.filter(name="embed").update(
        state=State.READY, loaded_model=EMBED_MODEL, idle_timeout_s=60, state_changed_at=past,
        last_use_at=past, lemond_entry={"last_use": int(timezone.now().timestamp() * 1000)})
    # an epoch-looking value is still a steady-clock reading: the slot is idle
    assert [s.name for s in idle.find_idle_slots()] == ["embed"]


# --- restarts --------------------------------------------------------------------------------

def test_a_new_backend_pid_means_lemond_restarted(node):
    """lemond 10.6 has no request totals and keeps its log port across a quick restart;
    a model listed again under a new pid is the sign."""
    _ready("chat", CHAT_MODEL)
    _ready("embed", EMBED_MODEL)
    reconciler = Reconciler()
    _feed(reconciler, node, [_entry(CHAT_MODEL, pid=10), _entry(EMBED_MODEL, "embedding", 11)])
    _feed(reconciler, node, [_entry(CHAT_MODEL, pid=90)])  # restarted; chat reloaded by a client
    embed = Slot.objects.get(name="embed")
    assert embed.state == State.OFFLINE
    assert embed.state_message == f"{EMBED_MODEL} is gone: lemond restarted"


def test_request_totals_count_only_where_lemond_has_them(node):
    from slots.reconciler import _rounded_requests

    _ready("chat", CHAT_MODEL)
    _ready("embed", EMBED_MODEL)
    reconciler = Reconciler()
    memory = reconciler.nodes.setdefault(node.pk, NodeMemory())

    def feed(entries, total):
        data = {"status": "ok", "version": "10.6.0", "websocket_port": 9001,
                "max_models": {"llm": 1, "embedding": 1}, "all_models_loaded": entries}
        reconciler.apply(node, memory, NodeReading(
            health=parse_health(data), started_at=timezone.now(),
            request_stats=_rounded_requests({"request_count_total": total})))

    both = [_entry(CHAT_MODEL, pid=10), _entry(EMBED_MODEL, "embedding", 11)]
    feed(both, 50)
    feed([_entry(CHAT_MODEL, pid=10)], 3)  # a field 10.6 does not have: not a restart sign
    assert Slot.objects.get(name="embed").state_message == \
        f"{EMBED_MODEL} unloaded outside hal0 (a direct /v1/unload or another client)"


# --- a failed load empties the node ------------------------------------------------------------

def test_a_failed_swap_reloads_the_old_model(node, sim):
    lifecycle.do_load_slot("chat", actor="cli")
    sim.fault("fail_next_load", model="Qwen3-0.6B-GGUF", message="bad backend arg")
    with pytest.raises(errors.SlotError):
        lifecycle.do_swap_slot("chat", "Qwen3-0.6B-GGUF", actor="cli")
    chat = Slot.objects.get(name="chat")
    assert chat.state == State.READY and chat.loaded_model == CHAT_MODEL
    assert chat.model_name == CHAT_MODEL and "bad backend arg" in chat.state_message
    assert sim.state()["loaded_names"] == [CHAT_MODEL]
    swap = SlotEvent.objects.filter(slot_name="chat", action="swap").first()
    assert not swap.ok and swap.model == "Qwen3-0.6B-GGUF" and swap.to_state == State.READY


@pytest.mark.django_db(transaction=True)
def test_an_evict_all_during_a_failing_load_is_attributed_to_it(node, sim):
    Slot.objects.filter(name="embed").update(keep_loaded=True)
    lifecycle.do_load_slot("chat", actor="cli")
    lifecycle.do_load_slot("embed", actor="cli")
    reconciler = Reconciler()
    poll(reconciler)
    sim.configure(load_delay=3.0)  # the failure answers after lemond evicted and retried
    sim.fault("fail_next_load", model="Qwen3-0.6B-GGUF", message="bad backend arg")
    outcome: list[BaseException] = []

    def swap_it():
        try:
            lifecycle.do_swap_slot("chat", "Qwen3-0.6B-GGUF", actor="cli")
        except BaseException as exc:  # the swap's own error is the expected outcome
            outcome.append(exc)

    swap = threading.Thread(target=swap_it)
    swap.start()
    try:
        wait_for(lambda: EMBED_MODEL not in sim.state()["loaded_names"], timeout=10)
        poll(reconciler)  # the swap is still running: its failure is not recorded yet
        evicted = SlotEvent.objects.get(slot_name="embed", action="evicted")
        assert evicted.message.startswith(
            f"{EMBED_MODEL} evicted while slot 'chat' was loading: lemond drops every model "
            "when a load fails")  # (+ " — hal0 reloads it": embed is keep-loaded)
    finally:
        swap.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], errors.SlotError)
    sim.configure(load_delay=0.1)
    # once the embed slot is restored (keep-loaded), its card says nothing any more
    wait_for(lambda: (poll(reconciler), Slot.objects.get(name="embed").state)[1]
             == State.READY, timeout=15)
    assert Slot.objects.get(name="embed").state_message == ""


# --- the gateway ---------------------------------------------------------------------------


@pytest.mark.parametrize("version,route", [("", "reranking"), ("10.6.0-sim", "reranking"),
                                           ("11.6.0", "rerank"), ("11.7.0-sim", "rerank")])
def test_rerank_goes_to_the_route_the_nodes_version_serves(node, version, route):
    from slots.gateway import routes as gateway

    Node.objects.filter(pk=node.pk).update(version=version)
    gateway.invalidate_routes()
    routes = gateway._load_routes().by_name
    assert routes["rerank"].upstream_url("rerank") == f"{node.base_url}/v1/{route}"
    assert routes["chat"].upstream_url("chat/completions") == \
        f"{node.base_url}/v1/chat/completions"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("shape", ["10.6", "11"])
def test_a_rerank_request_is_served_by_every_version(client, node, lemond_sim_factory, shape):
    """lemond 10.6 answers 404 to /v1/rerank (it serves only `reranking`)."""
    import json

    from slots import tokens
    from slots.gateway import routes as gateway

    sim = lemond_sim_factory(version_shape=shape)
    Node.objects.filter(pk=node.pk).update(base_url=sim.url, version="")
    poll(Reconciler())
    gateway.invalidate_routes()
    _, raw = tokens.create_token("reranker")
    response = client.post(
        "/v1/rerank", content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {raw}",
        data=json.dumps({"model": "rerank", "query": "what is hal0?",
                         "documents": ["a control plane", "a cake"]}))
    assert response.status_code == 200, response.content
    assert len(json.loads(b"".join(response.streaming_content) if response.streaming
                          else response.content)["results"]) == 2


PINGS = b": ping\n\n: ping\n\n"
FIRST = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
REST = (b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
        b"data: [DONE]\n\n")


@pytest.fixture
def pinging_lemond():
    """A lemond backend on loopback that keeps a stream alive with SSE comments during a
    0.4 s prefill (lemond after 11.7 sends `: ping` about once a second)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(PINGS)
            self.wfile.flush()
            time.sleep(0.4)  # the prefill: what lemond is doing, not the test waiting
            self.wfile.write(FIRST)
            self.wfile.write(REST)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.django_db(transaction=True)
async def test_sse_comments_pass_through_and_are_not_the_first_token(node, pinging_lemond):
    import json

    from asgiref.sync import sync_to_async
    from django.test import AsyncClient

    from slots import metrics, runtime, tokens
    from slots.gateway import routes as gateway

    await Node.objects.filter(pk=node.pk).aupdate(base_url=pinging_lemond, version="11.7.0")
    await sync_to_async(_ready)("chat", CHAT_MODEL)
    gateway.invalidate_routes()
    _, raw = await sync_to_async(tokens.create_token)("streamer")
    response = await AsyncClient().post(
        "/v1/chat/completions", content_type="application/json",
        headers={"Authorization": f"Bearer {raw}"},
        data=json.dumps({"model": "chat", "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]}))
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.streaming_content])
    assert body == PINGS + FIRST + REST  # untouched
    stats = await sync_to_async(metrics.slot_stats)("chat", runtime.current().metrics.pending())
    assert stats["ttft_p50_ms"] >= 350  # the first data, not a ping


# --- backend args are checked against the node's version before anything is saved -------------


@pytest.mark.parametrize("version,args,refused", [
    ("10.6.0", "--gpu-layers 20", "--gpu-layers"),   # an alias of -ngl: lemond 10.6 sets it
    ("10.6.0", "-dev Vulkan0", "-dev"),
    ("10.6.0", "--no-jinja", "--no-jinja"),
    ("", "-hf org/repo", "-hf"),                     # never polled: the pinned 10.6 rules
    ("11.7.0", "-ngl 40", None),                     # 10.8 stopped setting -ngl
    ("11.7.0", "--metrics", "--metrics"),
])
def test_slot_args_are_checked_against_the_nodes_lemond(node, make_slot, version, args,
                                                        refused):
    from django.core.exceptions import ValidationError

    Node.objects.filter(pk=node.pk).update(version=version)
    if refused is None:
        assert make_slot("coder", extra_args=args).extra_args == args
        return
    with pytest.raises(ValidationError) as exc:
        make_slot("coder", extra_args=args)
    assert exc.value.message_dict["extra_args"] == [
        f"extra_args may not contain {refused}: lemond sets it itself."]
    assert not Slot.objects.filter(name="coder").exists()


def test_a_speech_slot_may_use_flags_only_llama_server_reserves(node, make_slot):
    assert make_slot("ears", capability="stt", model_name="Whisper-Tiny", device="cpu",
                     extra_args="-ngl 1").extra_args == "-ngl 1"


def test_a_request_may_name_a_user_model_as_lemond_lists_it(node):
    from slots.gateway import routes as gateway

    Slot.objects.filter(name="chat").update(model_name="user.My-Model")
    Slot.objects.filter(name="embed").update(model_name="builtin.nomic-embed-text-v1-GGUF")
    gateway.invalidate_routes()
    table = gateway._load_routes()
    assert table.resolve("My-Model", "chat").name == "chat"
    assert table.resolve("user.My-Model", "chat").name == "chat"
    assert table.resolve("nomic-embed-text-v1-GGUF", "embed").name == "embed"
    assert table.resolve("Other-Model", "chat") is None
