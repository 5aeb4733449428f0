"""The lemond client: health of every version, every error shape → a typed error, pull
progress, keys — real HTTP to the simulator; MockTransport only for shapes it cannot make."""

import time

import httpx
import pytest

from providers.lemonade.client import LemonadeClient, SyncLemonadeClient, parse_health
from providers.lemonade.errors import (
    LemonadeBadResponse,
    LemonadeConflict,
    LemonadeHTTPError,
    LemonadeLoadError,
    LemonadeNotFound,
    LemonadeNotLoaded,
    LemonadeTimeout,
    LemonadeUnavailable,
)
from providers.lemonade.names import InvalidModelName
from tests.harness import free_port, in_a_worker_after_the_loop_stopped


def sync(url, **kw):
    return SyncLemonadeClient(url, **kw)


@pytest.mark.parametrize("shape,version,stt_type,has_pid,has_pins", [
    ("10.0", "10.0.0-sim", "transcription", False, False),
    ("10.6", "10.6.0-sim", "transcription", True, False),
    ("11", "11.7.0-sim", "transcription", True, True),
])
def test_health_of_every_version(lemond_sim_factory, shape, version, stt_type, has_pid, has_pins):
    sim = lemond_sim_factory(version_shape=shape)
    client = sync(sim.url)
    if shape == "10.0":
        # v10.0 only serves /api/v*; the client falls back to it
        pass
    client.load({"model_name": "Whisper-Tiny", "whispercpp_backend": "cpu"})
    client.load({"model_name": "Qwen3-0.6B-GGUF", "llamacpp_backend": "vulkan"})
    raw_type = httpx.get(f"{sim.url}/{'api/' if shape == '10.0' else ''}v1/health").json()
    health = client.health()
    assert health.version == version and health.simulated
    assert {e.model_name for e in health.loaded} == {"Whisper-Tiny", "Qwen3-0.6B-GGUF"}
    whisper = health.find("Whisper-Tiny")
    assert whisper.type == stt_type  # v10.0 says "audio"; normalised
    if shape == "10.0":
        assert raw_type["all_models_loaded"][0]["type"] in ("audio", "llm")
    assert (whisper.pid is not None) is has_pid
    assert (whisper.pinned is not None) is has_pins
    assert health.find("Qwen3-0.6B-GGUF").recipe_options["llamacpp_backend"] == "vulkan"
    assert health.find("Qwen3-0.6B-GGUF").device == ("gpu",)
    assert health.max_models.get("transcription") == 1
    assert health.model_loaded == "Qwen3-0.6B-GGUF"
    # steady-clock milliseconds (time since boot; the simulator shares this machine's clock)
    assert whisper.last_use_ms is not None
    assert abs(whisper.last_use_ms - time.monotonic() * 1000) < 60_000


def test_health_variants_the_simulator_does_not_send():
    # documented (not coded) variants: float seconds, space-separated devices, `loaded[]`
    h = parse_health({"status": "ok", "version": "9.1.0", "loaded": [
        {"model_name": "A", "type": "audio", "device": "gpu npu", "last_use": 1732123456.789}]})
    entry = h.loaded[0]
    assert entry.type == "transcription" and entry.device == ("gpu", "npu")
    assert entry.last_use_ms == 1732123456.789 and entry.pid is None and entry.pinned is None
    # integer milliseconds, pipe-joined device, missing fields
    h = parse_health({"all_models_loaded": [{"model_name": "B", "device": "gpu|npu",
                                             "last_use": 1755858000123}]})
    assert h.loaded[0].device == ("gpu", "npu") and h.loaded[0].last_use_ms == 1755858000123
    assert h.version == "" and h.status == "ok" and not h.simulated
    # v8 Python server
    h = parse_health({"status": "ok", "checkpoint_loaded": "x/y", "model_loaded": "C"})
    assert [e.model_name for e in h.loaded] == ["C"]
    # nothing loaded, and junk entries ignored
    assert parse_health({"model_loaded": None, "all_models_loaded": [None, {}, 3]}).loaded == ()
    with pytest.raises(LemonadeBadResponse):
        parse_health(["not", "an", "object"])


def test_load_errors_are_typed(sim):
    client = sync(sim.url)
    with pytest.raises(LemonadeNotFound) as exc:
        client.load({"model_name": "No-Such-Model"})
    assert exc.value.status == 404 and exc.value.code == "model_not_found"
    assert "No-Such-Model" in exc.value.message
    sim.fault("fail_next_load")
    with pytest.raises(LemonadeLoadError) as exc:
        client.load({"model_name": "Qwen3-0.6B-GGUF"})
    assert exc.value.status == 500 and exc.value.code == "model_load_error"
    with pytest.raises(InvalidModelName):  # refused before anything is sent
        client.load({})


def test_conflict_when_the_pool_is_pinned(lemond_sim_factory):
    sim = lemond_sim_factory(version_shape="11")
    client = sync(sim.url)
    client.load({"model_name": "Qwen3-0.6B-GGUF", "pinned": True})
    with pytest.raises(LemonadeConflict) as exc:
        client.load({"model_name": "Qwen3-4B-Instruct-2507-GGUF"})
    assert exc.value.status == 409 and exc.value.code == "slots_pinned_error"
    assert client.pin("Qwen3-0.6B-GGUF", False)["pinned"] is False
    with pytest.raises(LemonadeNotLoaded):
        client.pin("Qwen3-4B-Instruct-2507-GGUF", True)


def test_flat_error_shapes(sim):
    client = sync(sim.url)
    with pytest.raises(LemonadeNotLoaded) as exc:
        client.unload("Qwen3-0.6B-GGUF")
    assert exc.value.status == 404 and exc.value.message == "Model not loaded: Qwen3-0.6B-GGUF"


def test_unload_all(sim):
    client = sync(sim.url)
    client.load({"model_name": "Qwen3-0.6B-GGUF"})
    client.load({"model_name": "nomic-embed-text-v1-GGUF"})
    assert client.unload()["message"] == "All models unloaded successfully"
    assert client.health().loaded == ()


def test_keys(lemond_sim_factory):
    sim = lemond_sim_factory(version_shape="11", api_key="user-key", admin_api_key="admin-key")
    with pytest.raises(LemonadeHTTPError) as exc:
        sync(sim.url).health()
    assert exc.value.status == 401 and exc.value.message == "Invalid or missing API key"
    user = sync(sim.url, api_key="user-key")
    assert user.health().status == "ok"
    user.load({"model_name": "Qwen3-0.6B-GGUF"})
    # /internal/* takes the admin key
    with pytest.raises(LemonadeHTTPError) as exc:
        sync(sim.url, api_key="user-key", admin_api_key="wrong").pin("Qwen3-0.6B-GGUF")
    assert exc.value.message == "Invalid or missing admin API key"
    admin = sync(sim.url, api_key="user-key", admin_api_key="admin-key")
    assert admin.pin("Qwen3-0.6B-GGUF")["pinned"] is True


@pytest.mark.parametrize("fault,error,text", [
    ("html_error", LemonadeHTTPError, "Bad Gateway"),
    ("error_500", LemonadeHTTPError, "Internal server error"),
    ("malformed_json", LemonadeBadResponse, "not JSON"),
])
def test_garbage_answers(sim, fault, error, text):
    sim.fault(fault)
    with pytest.raises(error) as exc:
        sync(sim.url).health()
    assert text in str(exc.value)


def test_unreachable_and_timeout(sim, dead_port):
    with pytest.raises(LemonadeUnavailable, match="cannot reach lemond"):
        sync(f"http://127.0.0.1:{dead_port}").health()
    sim.fault("hang", seconds=3)
    with pytest.raises(LemonadeTimeout, match="did not answer"):
        sync(sim.url, timeout=0.5).health()


def test_a_worker_thread_call_does_not_need_the_server_loop(sim):
    """Actions call lemond from worker threads; at shutdown the server's loop stops under
    them, and a call that hopped onto it would never return (the process would not exit)."""
    health, took = in_a_worker_after_the_loop_stopped(sync(sim.url).health)
    assert health.status == "ok" and took < 5


def test_stats_system_and_params(sim):
    client = sync(sim.url)
    # lemond v10.6.0: nothing loaded is a 200 carrying an error object: no telemetry
    assert client.stats() == {}
    client.load({"model_name": "Qwen3-0.6B-GGUF"})
    assert "tokens_per_second" in client.stats()
    assert "memory_gb" in client.system_stats()
    assert isinstance(client.models(), list)
    all_models = client.models(show_all=True)
    assert len(all_models) > len(client.models())
    assert {"id", "recipe", "downloaded"} <= set(all_models[0])


async def test_pull_progress_and_cancel(sim):
    async with LemonadeClient(sim.url) as client:
        events = [e async for e in client.pull("Qwen3-1.7B-GGUF")]
    assert events[-1].event == "complete"
    percents = [e.percent for e in events if e.event == "progress"]
    assert percents == sorted(percents) and len(percents) >= 2
    assert "Qwen3-1.7B-GGUF" in sim.state()["downloaded"]
    # leaving the loop early closes the stream: lemond cancels the download
    async with LemonadeClient(sim.url) as client:
        async for event in client.pull("Qwen3-8B-GGUF"):
            if event.event == "progress":
                break
    import asyncio
    await asyncio.sleep(0.3)
    assert "Qwen3-8B-GGUF" not in sim.state()["downloaded"]


async def test_pull_of_unknown_model_reports_an_error_event(sim):
    async with LemonadeClient(sim.url) as client:
        events = [e async for e in client.pull("No-Such-Model")]
    assert events[-1].event == "error" and events[-1].data.get("error")


async def test_redirects_and_shapes_via_mock_transport():
    """Shapes no simulator fault produces: an empty error body, a dict `message`."""
    def handler(request):
        if request.url.path == "/v1/health":
            return httpx.Response(503, text="")
        return httpx.Response(500, json={"status": "error", "message": "Model not found: X"})

    async with LemonadeClient("http://127.0.0.1:1", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(LemonadeHTTPError) as exc:
            await c.health()
        assert exc.value.status == 503 and exc.value.message == "empty response body"
        with pytest.raises(LemonadeHTTPError) as exc:
            await c.unload("X")
        assert exc.value.message == "Model not found: X"


@pytest.fixture
def dead_port():
    return free_port()


async def test_stats_with_nothing_loaded_on_lemond_10_6():
    """v10.6.0 answers /v1/stats with a 200 carrying an error object while nothing ran."""
    body = b'{"error": {"message": "No model loaded", "type": "model_not_loaded"}}'
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    async with LemonadeClient("http://127.0.0.1:1", transport=transport) as client:
        assert await client.stats() == {}
