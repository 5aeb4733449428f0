"""The OpenAI gateway end to end: a real hal0 under Daphne (the `slots.gateway.asgi` fast
path in front of Django, plus once `manage.py serve`), a real lemond simulator, real HTTP.

hal0 runs as a subprocess with its own SQLite file; tests read that file directly
(read-only) to see events, states and metrics, and drive state changes through the JSON
API, as an operator's script would.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import threading
import time
import wave
from pathlib import Path

import httpx
import pytest

from tests.harness import Stack, free_port, wait_for
from tests.sim_fixtures import start_simulator

pytestmark = pytest.mark.e2e

CHAT_MODEL = "Qwen3-4B-Instruct-2507-GGUF"
WRITER_MODEL = "Qwen3-0.6B-GGUF"

SETUP = r"""
import json
from datetime import timedelta
from django.utils import timezone
from slots import tokens
from slots.actions import config
from slots.models import Node

Node.objects.create(name="dead", base_url="http://127.0.0.1:%(dead_port)d")
config.do_create_slot({"name": "writer", "capability": "chat", "device": "cpu",
                      "model_name": "Qwen3-0.6B-GGUF"}, actor="cli")
config.do_create_slot({"name": "ghost", "capability": "chat", "device": "cpu",
                      "model_name": "Ghost-1B-GGUF", "node": "dead"}, actor="cli")
config.do_create_slot({"name": "off", "capability": "chat", "device": "cpu",
                      "model_name": "Off-1B-GGUF", "enabled": False}, actor="cli")
out = {}
for name, options in {"all": {}, "chatonly": {"slots": "chat,writer"},
                      "expired": {"expires_at": timezone.now() - timedelta(minutes=1)}}.items():
    out[name] = tokens.create_token(name, **options)[1]
print("TOKENS=" + json.dumps(out))
"""


class Hal0:
    """A hal0 process: base URL, tokens, its database, its log."""

    def __init__(self, stack: Stack, url: str):
        self.stack, self.url, self.process = stack, url, stack.procs[-1]
        self.tokens = json.loads((stack.tmp_path / "tokens.json").read_text())
        self.db = stack.tmp_path / "hal0.sqlite3"
        self.log = Path(self.process.log_path)

    def manage(self, *args: str) -> str:
        """A management command against this hal0's database, as an operator runs it."""
        return self.stack.manage(*args).stdout

    def set_model(self, slot: str, model: str) -> None:
        data = json.dumps([{"name": slot, "model_name": model}])
        path = self.db.parent / f"set-{slot}.json"
        path.write_text(data)
        self.manage("slots", "import", str(path))
        time.sleep(0.2)  # HAL0_GATEWAY_ROUTE_CACHE_S is 0.1 s

    def headers(self, token: str = "all") -> dict:
        return {"Authorization": f"Bearer {self.tokens[token]}"}

    def post(self, endpoint: str, token: str = "all", **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/{endpoint}", headers=self.headers(token),
                          timeout=30, **kwargs)

    def query(self, sql: str, *params) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True,
                                                timeout=10)) as conn:
            return conn.execute(sql, params).fetchall()

    def state(self, slot: str) -> str:
        return self.query("SELECT state FROM slots_slot WHERE name = ?", slot)[0][0]

    def events(self, slot: str) -> list[tuple]:
        return self.query("SELECT action, actor, from_state, to_state, ok, message "
                          "FROM slots_slotevent WHERE slot_name = ? ORDER BY id", slot)

    def api(self, path: str, method: str = "POST") -> httpx.Response:
        return httpx.request(method, f"{self.url}/api/{path}", headers=self.headers(),
                             timeout=30)


@pytest.fixture(scope="module")
def gw_sim():
    handle = start_simulator(load_delay=0.1, token_delay=0.005)
    yield handle
    handle.stop()


def _start_hal0(stack: Stack, *extra: str, app: str | None = None, **extra_env: str) -> Hal0:
    """`manage.py serve --no-reconciler` (or Daphne on `app`) on the suite's database."""
    if app is None:
        extra = ("--no-reconciler", *extra)
    return Hal0(stack, stack.serve(*extra, app=app, **extra_env))


def _stop(hal0: Hal0) -> None:
    hal0.stack.terminate(hal0.process)


@pytest.fixture(scope="module")
def gw_stack(tmp_path_factory, gw_sim):
    """The suite's database (migrated, with extra slots and tokens) and its processes."""
    stack = Stack(tmp_path_factory.mktemp("hal0-gateway"), HAL0_LEMONADE_URL=gw_sim.url,
                  HAL0_SERVING_LINGER_S="0.2", HAL0_METRICS_FLUSH_S="0.2",
                  HAL0_GATEWAY_ROUTE_CACHE_S="0.1", HAL0_TOKEN_CACHE_S="0.5",
                  HAL0_GATEWAY_LOAD_WAIT_S="20")
    stack.manage("migrate", "-v0")
    out = stack.manage("shell", "-c", SETUP % {"dead_port": free_port()}).stdout
    (stack.tmp_path / "tokens.json").write_text(out.split("TOKENS=", 1)[1])
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def hal0_server(gw_stack):
    server = _start_hal0(gw_stack, app="hal0site.asgi:application")
    yield server
    _stop(server)


@pytest.fixture
def hal0(hal0_server, gw_sim):
    gw_sim.reset()
    gw_sim.configure(max_loaded_models=-1)  # one model per slot: no LRU surprises
    return hal0_server


def chat_body(model: str = "chat", stream: bool = False, **extra) -> dict:
    return {"model": model, "stream": stream, **extra,
            "messages": [{"role": "user", "content": "Say hello to the gateway."}]}


def wav_bytes() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\0\0" * 8000)
    return buffer.getvalue()


# --- routing ---------------------------------------------------------------------------------

ENDPOINT_CASES = {
    # endpoint: (slot, capability alias, lemond model, request body, response check)
    "chat/completions": ("writer", "llm", "Qwen3-0.6B-GGUF", chat_body(),
                         lambda r, model: r.json()["model"] == model),
    "completions": ("writer", "chat", "Qwen3-0.6B-GGUF", {"prompt": "Once upon"},
                    lambda r, model: r.json()["model"] == model),
    "embeddings": ("embed", "embedding", "nomic-embed-text-v1-GGUF", {"input": "hello"},
                   lambda r, model: r.json()["model"] == model),
    "rerank": ("rerank", "reranking", "bge-reranker-v2-m3-GGUF",
               {"query": "q", "documents": ["a", "b"]},
               lambda r, model: r.json()["model"] == model),
    "audio/speech": ("tts", "speech", "kokoro-v1", {"input": "hello there"},
                     lambda r, model: r.headers["content-type"] == "audio/mpeg"
                     and len(r.content) > 100),
    "images/generations": ("img", "image", "SD-Turbo", {"prompt": "a cat", "size": "64x64"},
                           lambda r, model: r.json()["data"][0]["b64_json"]),
}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT_CASES))
@pytest.mark.parametrize("way", ["slot", "capability", "model"])
def test_routes_by_slot_capability_and_model(hal0, gw_sim, endpoint, way):
    slot, alias, model, body, check = ENDPOINT_CASES[endpoint]
    if way == "capability":
        slot = "chat" if alias in ("llm", "chat") else slot  # the capability's default slot
        model = CHAT_MODEL if slot == "chat" else model
    name = {"slot": slot, "capability": alias, "model": model}[way]
    response = hal0.post(endpoint, json={**body, "model": name})
    assert response.status_code == 200, response.text
    assert check(response, model)
    assert model in gw_sim.state()["loaded_names"]


@pytest.mark.parametrize("way", ["stt", "transcription", "Whisper-Large-v3-Turbo"])
def test_transcription_multipart_passes_through_with_the_model_substituted(hal0, gw_sim, way):
    response = hal0.post("audio/transcriptions", data={"model": way, "language": "en"},
                         files={"file": ("hello.wav", wav_bytes(), "audio/wav")})
    assert response.status_code == 200, response.text
    assert response.json()["text"].startswith("Simulated transcription of 0.5 seconds")
    assert gw_sim.state()["loaded_names"] == ["Whisper-Large-v3-Turbo"]


def test_a_model_file_part_is_refused_and_one_model_is_forwarded(hal0, gw_sim):
    """A multipart *file* named `model` used to travel next to hal0's substituted field:
    an stt-only token made lemond load a model no slot serves."""
    response = hal0.post("audio/transcriptions", data={"model": "stt"}, files=[
        ("file", ("hello.wav", wav_bytes(), "audio/wav")),
        ("model", ("model.txt", b"Qwen3-0.6B-GGUF", "text/plain"))])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model"
    assert gw_sim.state()["loaded_names"] == []
    # two `model` fields: hal0 routes by one and forwards only its own model name
    response = hal0.post("audio/transcriptions", data={"model": ["Qwen3-0.6B-GGUF", "stt"]},
                         files={"file": ("hello.wav", wav_bytes(), "audio/wav")})
    assert response.status_code == 200, response.text
    assert gw_sim.state()["loaded_names"] == ["Whisper-Large-v3-Turbo"]


def test_no_model_means_the_endpoints_default_slot(hal0):
    response = hal0.post("embeddings", json={"input": "hello"})
    assert response.status_code == 200
    assert response.json()["model"] == "nomic-embed-text-v1-GGUF"


def test_unknown_model_is_an_openai_404(hal0):
    response = hal0.post("chat/completions", json=chat_body("gpt-17"))
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert error["param"] == "model" and "gpt-17" in error["message"]


def test_wrong_capability_for_the_endpoint_is_a_400(hal0):
    response = hal0.post("chat/completions", json=chat_body("embed"))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported"


def test_models_lists_slots_with_models_and_states(hal0):
    response = httpx.get(f"{hal0.url}/v1/models", headers=hal0.headers())
    assert response.status_code == 200
    data = {m["id"]: m for m in response.json()["data"]}
    assert {"chat", "embed", "rerank", "stt", "tts", "img", "writer", "ghost", "off"} <= set(data)
    assert data["chat"]["model"] == CHAT_MODEL and data["chat"]["capability"] == "chat"
    assert data["chat"]["object"] == "model" and data["chat"]["owned_by"] == "hal0"
    assert data["off"]["enabled"] is False
    assert all(m["slot_state"] in ("offline", "ready", "serving", "loading", "error")
               for m in data.values())
    assert all(m["state"] in ("loaded", "not-loaded") for m in data.values())
    one = httpx.get(f"{hal0.url}/v1/models/embed", headers=hal0.headers()).json()
    assert one["id"] == "embed" and one["model"] == "nomic-embed-text-v1-GGUF"
    scoped = httpx.get(f"{hal0.url}/v1/models", headers=hal0.headers("chatonly")).json()
    assert sorted(m["id"] for m in scoped["data"]) == ["chat", "writer"]


# --- on-demand load, serving, streaming --------------------------------------------------------

def test_on_demand_load_is_an_action_with_events(hal0, gw_sim):
    assert hal0.api("slots/writer/unload").status_code == 200
    assert hal0.state("writer") == "offline"
    before = len(hal0.events("writer"))
    response = hal0.post("chat/completions", json=chat_body("writer"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("Simulated reply")
    events = hal0.events("writer")[before:]
    assert [(e[0], e[1], e[2], e[3], e[4]) for e in events] == \
        [("load", "gateway", "offline", "ready", 1)]
    assert gw_sim.state()["load_calls"].get(WRITER_MODEL) == 1  # hal0 loaded it, via /v1/load
    wait_for(lambda: hal0.state("writer") == "ready")


def test_concurrent_requests_share_one_load(hal0, gw_sim):
    assert hal0.api("slots/writer/unload").status_code == 200
    gw_sim.configure(load_delay=0.5)
    results = []

    def call():
        results.append(hal0.post("chat/completions", json=chat_body("writer")).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: hal0.state("writer") == "loading", timeout=3)
    for thread in threads:
        thread.join()
    assert results == [200] * 4
    assert gw_sim.state()["load_requests"].get(WRITER_MODEL) == 1


def _stream(hal0: Hal0, model: str = "chat", token: str = "all"):
    return httpx.stream("POST", f"{hal0.url}/v1/chat/completions", headers=hal0.headers(token),
                        json=chat_body(model, stream=True), timeout=30)


def test_streaming_chunks_arrive_before_upstream_finishes_and_in_order(hal0, gw_sim):
    assert hal0.post("chat/completions", json=chat_body()).status_code == 200  # loaded
    whole = hal0.post("chat/completions", json=chat_body()).json()
    gw_sim.configure(token_delay=0.05)
    arrivals, pieces = [], []
    start = time.monotonic()
    with _stream(hal0) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        buffer = b""
        for chunk in response.iter_raw():
            arrivals.append(time.monotonic() - start)
            buffer += chunk
        events = [line[6:] for line in buffer.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            pieces.append(choice["delta"].get("content") or "")
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    total = arrivals[-1]
    assert total > 0.5  # ~15 tokens, 50 ms apart
    assert len(arrivals) >= 5  # not buffered into one body
    # the first chunk arrives while upstream still has most of its ~15 x 50 ms to go (a
    # buffered relay would deliver everything at the end); measured from the first chunk,
    # so a slow start on a loaded machine does not count against the relay
    assert total - arrivals[0] >= 0.4, (arrivals[0], total)


def test_disconnect_cancels_the_upstream_request(hal0, gw_sim):
    assert hal0.post("chat/completions", json=chat_body()).status_code == 200
    gw_sim.configure(token_delay=0.4)  # a ~6 s stream
    with _stream(hal0) as response:
        chunks = response.iter_raw()  # keep it: a dropped iterator closes the response
        next(chunks)
        time.sleep(0.2)
        assert gw_sim.state()["in_flight_requests"] == 1
        started = time.monotonic()
    # the client is gone: hal0 must close its upstream request, lemond sees it end long
    # before the stream would have
    wait_for(lambda: gw_sim.state()["in_flight_requests"] == 0, timeout=3)
    assert time.monotonic() - started < 3
    metrics = httpx.get(f"{hal0.url}/metrics", headers=hal0.headers()).text
    assert 'hal0_slot_in_flight_requests{slot="chat"} 0' in metrics
    assert 'hal0_gateway_requests_total{slot="chat",endpoint="chat/completions",status="499"}' \
        in metrics


def test_slot_shows_serving_while_requests_are_in_flight(hal0, gw_sim):
    assert hal0.post("chat/completions", json=chat_body()).status_code == 200
    wait_for(lambda: hal0.state("chat") == "ready")
    # Long streams and wide gaps, so a busy CI machine cannot end the first stream before
    # /metrics is read, nor the last one before "still serving" is checked.
    gw_sim.configure(token_delay=0.25)  # ~4 s per stream
    done = []

    def consume(delay):
        time.sleep(delay)
        with _stream(hal0) as response:
            for _ in response.iter_raw():
                pass
        done.append(time.monotonic())

    threads = [threading.Thread(target=consume, args=(d,)) for d in (0, 0.5, 2.0)]
    for thread in threads:
        thread.start()
    wait_for(lambda: gw_sim.state()["in_flight_requests"] == 3, timeout=6)
    wait_for(lambda: hal0.state("chat") == "serving")
    metrics = httpx.get(f"{hal0.url}/metrics", headers=hal0.headers()).text
    assert 'hal0_slot_in_flight_requests{slot="chat"} 3' in metrics
    # the first stream ends: two still in flight, the slot keeps serving
    wait_for(lambda: len(done) == 1, timeout=8)
    time.sleep(0.3)  # longer than the serving linger
    assert hal0.state("chat") == "serving"
    for thread in threads:
        thread.join()
    wait_for(lambda: hal0.state("chat") == "ready", timeout=5)


def test_serving_is_counted_across_gateway_processes(gw_stack, gw_sim, hal0):
    """Two gateway processes on one database: a short request finishing in one does not
    turn the slot ready while the other still streams from it."""
    other = _start_hal0(gw_stack)
    try:
        assert hal0.post("chat/completions", json=chat_body()).status_code == 200
        wait_for(lambda: hal0.state("chat") == "ready")
        # a ~6 s stream: long enough to outlast the steps below on a busy, slow machine
        gw_sim.configure(token_delay=0.15, reply_length=40)
        with _stream(hal0) as response:
            chunks = response.iter_raw()
            next(chunks)
            wait_for(lambda: hal0.state("chat") == "serving")
            short = other.post("chat/completions", json=chat_body(max_tokens=1))
            assert short.status_code == 200, short.text
            time.sleep(0.6)  # past the other process's serving linger (0.2 s)
            assert hal0.state("chat") == "serving"  # the stream is still running
            for _ in chunks:
                pass
        wait_for(lambda: hal0.state("chat") == "ready", timeout=3)
        assert hal0.query("SELECT COUNT(*) FROM slots_lease WHERE name LIKE 'serving:%'") \
            == [(0,)]  # both processes gave their claims back
    finally:
        _stop(other)


def test_a_stopped_gateway_process_gives_its_serving_claims_back(gw_stack, gw_sim, hal0):
    """SIGTERM mid-stream (a restart): the process's claim goes with it and the slot is
    ready again, instead of held at serving for HAL0_SERVING_CLAIM_TTL_S."""
    other = _start_hal0(gw_stack)
    try:
        assert other.post("chat/completions", json=chat_body()).status_code == 200
        wait_for(lambda: hal0.state("chat") == "ready")
        # a 30 s stream, cut short by the SIGTERM: it outlasts a serving write that a busy
        # machine's SQLite lock holds up for seconds (a 3 s stream once ended before it)
        gw_sim.configure(token_delay=0.2, reply_length=150)
        with _stream(other) as response:
            next(response.iter_raw())
            wait_for(lambda: hal0.state("chat") == "serving", timeout=20)
            claims = "SELECT COUNT(*) FROM slots_lease WHERE name LIKE 'serving:%'"
            assert hal0.query(claims) == [(1,)]
            other.process.terminate()
        # the client is gone too; Daphne may wait up to application_close_timeout (10 s)
        other.process.wait(timeout=30)
        assert hal0.query(claims) == [(0,)]
        assert hal0.state("chat") == "ready"
    finally:
        _stop(other)


# --- auth ----------------------------------------------------------------------------------------

def test_missing_wrong_and_expired_tokens_get_an_openai_401(hal0):
    url = f"{hal0.url}/v1/chat/completions"
    cases = {
        "missing": {},
        "wrong": {"Authorization": "Bearer hal0_not-a-real-token"},
        "expired": hal0.headers("expired"),
    }
    for case, headers in cases.items():
        response = httpx.post(url, headers=headers, json=chat_body(), timeout=10)
        assert response.status_code == 401, case
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key", case
        assert error["type"] == "invalid_request_error" and "message" in error
    assert "expired" in httpx.post(url, headers=cases["expired"], json=chat_body()) \
        .json()["error"]["message"]
    assert httpx.get(f"{hal0.url}/v1/models").status_code == 401
    assert httpx.get(f"{hal0.url}/metrics").status_code == 401


def test_token_may_only_use_its_slots(hal0):
    assert hal0.post("chat/completions", token="chatonly", json=chat_body()).status_code == 200
    response = hal0.post("embeddings", token="chatonly", json={"model": "embed", "input": "x"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "slot_not_allowed"


def test_a_slot_edited_to_another_model_is_loaded_before_serving(hal0, gw_sim):
    """The old model is still up after an edit: forwarding would make lemond load the new
    one by itself, without the slot's options. The gateway runs the load action instead."""
    assert hal0.post("chat/completions", json=chat_body("writer")).status_code == 200
    wait_for(lambda: hal0.state("writer") == "ready")
    before = len(hal0.events("writer"))
    hal0.set_model("writer", "Qwen3-1.7B-GGUF")
    try:
        response = hal0.post("chat/completions", json=chat_body("writer"))
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "Qwen3-1.7B-GGUF"
        actions = [(e[0], e[1], e[4]) for e in hal0.events("writer")[before:]]
        assert ("load", "gateway", 1) in actions, actions
        assert gw_sim.state()["load_calls"].get("Qwen3-1.7B-GGUF") == 1  # via /v1/load
        wait_for(lambda: hal0.query("SELECT loaded_model FROM slots_slot WHERE name = ?",
                                    "writer")[0][0] == "Qwen3-1.7B-GGUF")
    finally:
        hal0.set_model("writer", WRITER_MODEL)


def test_capability_name_follows_the_declared_default(hal0, gw_sim):
    """The seeded `embed` slot cannot be renamed: once another slot is the default,
    "embed" means that slot; the seeded one is still reachable by its model's name."""
    path = hal0.db.parent / "embed2.json"
    path.write_text(json.dumps([
        {"name": "embed", "is_default": False},
        {"name": "embed2", "capability": "embed", "device": "cpu",
         "model_name": "Qwen3-Embedding-0.6B-GGUF", "is_default": True}]))
    hal0.manage("slots", "import", str(path))
    time.sleep(0.2)
    try:
        for name in ("embed", "embedding", None):
            body = {"input": "hello"} | ({"model": name} if name else {})
            response = hal0.post("embeddings", json=body)
            assert response.status_code == 200, (name, response.text)
            assert response.json()["model"] == "Qwen3-Embedding-0.6B-GGUF", name
        seeded = hal0.post("embeddings", json={"model": "nomic-embed-text-v1-GGUF",
                                               "input": "x"})
        assert seeded.json()["model"] == "nomic-embed-text-v1-GGUF"
        assert hal0.post("embeddings", json={"model": "embed2", "input": "x"}) \
            .json()["model"] == "Qwen3-Embedding-0.6B-GGUF"
        # ids in /v1/models are slot names: each listed id can be fetched as itself
        one = httpx.get(f"{hal0.url}/v1/models/embed", headers=hal0.headers()).json()
        assert one["id"] == "embed" and one["model"] == "nomic-embed-text-v1-GGUF"
        # a key scoped to the seeded slot still reaches it by its name
        scoped = hal0.manage("tokens", "create", "embedonly", "--slots", "embed").strip()
        response = httpx.post(f"{hal0.url}/v1/embeddings", timeout=30,
                              headers={"Authorization": f"Bearer {scoped}"},
                              json={"model": "embed", "input": "x"})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "nomic-embed-text-v1-GGUF"
    finally:
        path.write_text(json.dumps([{"name": "embed2", "is_default": False},
                                    {"name": "embed", "is_default": True}]))
        hal0.manage("slots", "import", str(path))
        time.sleep(0.2)


# --- errors --------------------------------------------------------------------------------------

def test_unreachable_lemond_is_a_503_with_retry_after(hal0):
    response = hal0.post("chat/completions", json=chat_body("ghost"))
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert response.json()["error"]["type"] == "server_error"


def test_load_failure_is_a_502_with_lemonds_message(hal0, gw_sim):
    assert hal0.api("slots/writer/unload").status_code == 200
    gw_sim.fault("fail_next_load", model=WRITER_MODEL, message="llama-server crashed: boom")
    response = hal0.post("chat/completions", json=chat_body("writer"))
    assert response.status_code == 502
    error = response.json()["error"]
    assert "boom" in error["message"] and error["code"] == "model_load_error"
    assert hal0.state("writer") == "error"


def test_a_load_longer_than_the_wait_is_a_503_and_goes_on(gw_stack, gw_sim, hal0):
    """A client does not wait past HAL0_GATEWAY_LOAD_WAIT_S: 503 `slot_loading` with
    Retry-After; the load itself goes on and the next request is served."""
    server = _start_hal0(gw_stack,
                         HAL0_GATEWAY_LOAD_WAIT_S="0.3")
    try:
        assert server.api("slots/writer/unload").status_code == 200
        gw_sim.configure(load_delay=1.5)
        response = server.post("chat/completions", json=chat_body("writer"))
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "slot_loading"
        assert int(response.headers["Retry-After"]) > 0
        wait_for(lambda: server.state("writer") == "ready", timeout=5)
        assert server.post("chat/completions", json=chat_body("writer")).status_code == 200
        assert gw_sim.state()["load_requests"].get(WRITER_MODEL) == 1
    finally:
        _stop(server)


def test_lemond_too_slow_for_a_loaded_slot_is_a_504(gw_stack, gw_sim, hal0):
    server = _start_hal0(gw_stack,
                         HAL0_GATEWAY_READ_TIMEOUT_S="0.5")
    try:
        assert server.post("chat/completions", json=chat_body("writer")).status_code == 200
        gw_sim.fault("hang", seconds=3)
        try:
            response = server.post("chat/completions", json=chat_body("writer"))
        finally:
            gw_sim.fault("clear")
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "lemond_timeout"
        assert response.json()["error"]["type"] == "server_error"
    finally:
        _stop(server)


def test_disabled_slot_is_a_409(hal0):
    response = hal0.post("chat/completions", json=chat_body("off"))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "slot_disabled"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"model": 7}'])
def test_bad_bodies_are_400s_not_500s(hal0, body):
    response = httpx.post(f"{hal0.url}/v1/chat/completions", content=body,
                          headers={**hal0.headers(), "Content-Type": "application/json"})
    assert response.status_code == 400
    assert "error" in response.json()


def test_get_on_a_post_endpoint_is_a_405(hal0):
    response = httpx.get(f"{hal0.url}/v1/chat/completions", headers=hal0.headers())
    assert response.status_code == 405 and response.json()["error"]["message"]


# --- metrics -------------------------------------------------------------------------------------

def test_requests_are_measured_and_written_in_the_background(hal0):
    before = hal0.query("SELECT COUNT(*) FROM slots_requestmetric WHERE slot_name='chat'")[0][0]
    assert hal0.post("chat/completions", json=chat_body()).status_code == 200
    with _stream(hal0) as response:
        for _ in response.iter_raw():
            pass
    def written():
        rows = hal0.query("SELECT status, latency_ms, ttft_ms, tokens_in, tokens_out, "
                          "tokens_per_s, stream FROM slots_requestmetric "
                          "WHERE slot_name='chat' ORDER BY id")
        return rows if len(rows) >= before + 2 else None

    rows, _ = wait_for(written, timeout=3)
    plain, streamed = rows[-2], rows[-1]
    assert plain[0] == 200 and plain[3] > 0 and plain[4] > 0 and plain[5] > 0 and not plain[6]
    assert streamed[0] == 200 and streamed[2] is not None and streamed[6]
    assert streamed[4] > 0 and streamed[5] > 0
    text = httpx.get(f"{hal0.url}/metrics", headers=hal0.headers()).text
    assert "# TYPE hal0_gateway_request_duration_seconds histogram" in text
    assert 'hal0_slot_state{slot="chat",state=' in text


def test_tokens_never_reach_the_log(hal0):
    hal0.post("chat/completions", json=chat_body())
    httpx.post(f"{hal0.url}/v1/chat/completions", json=chat_body(),
               headers={"Authorization": "Bearer hal0_wrong-secret-value"})
    log = hal0.log.read_text(errors="replace")
    assert all(token not in log for token in hal0.tokens.values())
    assert "wrong-secret-value" not in log


# --- through Django's own handler (manage.py serve, as hal0site/asgi.py wires it today) ------------

def test_served_by_manage_py_serve_too(gw_stack, gw_sim, hal0):
    server = _start_hal0(gw_stack)
    try:
        assert server.post("embeddings", json={"model": "embed", "input": "x"}) \
            .status_code == 200
        # chat loaded first: the timing below is the stream's, not the on-demand load's
        assert server.post("chat/completions", json=chat_body()).status_code == 200
        gw_sim.configure(token_delay=0.05)
        start, arrivals = time.monotonic(), []
        with _stream(server) as response:
            for _ in response.iter_raw():
                arrivals.append(time.monotonic() - start)
        # streamed, not buffered: the chunks arrive spread over the tokens' 50 ms apart (a
        # slow start on a busy machine delays the first one, not the spread)
        assert len(arrivals) >= 5, arrivals
        assert arrivals[-1] - arrivals[0] >= 0.5 * 0.05 * (len(arrivals) - 2), arrivals
        assert httpx.post(f"{server.url}/v1/embeddings", json={"input": "x"}).status_code == 401
    finally:
        _stop(server)


def test_the_openai_sdk_streams_from_an_offline_slot(gw_stack, gw_sim, hal0):
    """The issue's "done when", as a user does it: the official OpenAI SDK pointed at
    `manage.py serve`'s /v1 with a token streams a chat from model="chat" while the slot
    goes loading → serving → ready."""
    import openai

    gw_sim.configure(load_delay=0.5, token_delay=0.03)
    server = _start_hal0(gw_stack)
    try:
        server.api("slots/chat/unload")
        assert server.state("chat") == "offline"
        seen: list[str] = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                state = server.state("chat")
                if not seen or seen[-1] != state:
                    seen.append(state)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.tokens["all"],
                               max_retries=0, timeout=30)
        stream = client.chat.completions.create(
            model="chat", stream=True,
            messages=[{"role": "user", "content": "Say hello to the gateway."}])
        text = "".join(chunk.choices[0].delta.content or ""
                       for chunk in stream if chunk.choices)
        wait_for(lambda: server.state("chat") == "ready", timeout=5)
        stop.set()
        watcher.join()
        if seen[-1] != "ready":  # the watcher stopped before its next sample
            seen.append("ready")
        assert text.strip()
        assert seen[0] == "offline" and seen[-1] == "ready"
        assert "loading" in seen and "serving" in seen
        assert seen.index("loading") < seen.index("serving") < len(seen) - 1
        models = {m.id for m in client.models.list()}
        assert {"chat", "embed"} <= models
    finally:
        _stop(server)


def test_an_unreadable_multipart_body_is_a_400(hal0):
    """Daphne itself refuses malformed multipart; Django's limits (here: more fields than
    DATA_UPLOAD_MAX_NUMBER_FIELDS) must give an OpenAI-style 400, not a 500."""
    fields = "".join(f'--b\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n'
                     for i in range(1200)) + "--b--\r\n"
    response = httpx.post(f"{hal0.url}/v1/audio/transcriptions", headers={
        **hal0.headers(), "Content-Type": "multipart/form-data; boundary=b"},
        content=fields.encode())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("The multipart body cannot be read")
