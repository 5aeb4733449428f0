"""The provider: the /v1/load body for every device and capability, unload idempotence,
status, inspection helpers — against the real simulator over HTTP."""

import httpx
import pytest

import providers
from providers.lemonade.errors import LemonadeUnavailable
from providers.lemonade.provider import device_to_backend
from slots.models import Slot

pytestmark = pytest.mark.django_db


@pytest.fixture
def provider():
    return providers.get("lemonade")


def test_registry():
    assert providers.get("lemonade") is providers.get()
    with pytest.raises(LookupError, match="no provider named 'ollama'; known: lemonade"):
        providers.get("ollama")


@pytest.mark.parametrize("device,expected", [
    ("gpu-rocm", (None, "rocm")), ("gpu-vulkan", (None, "vulkan")), ("cpu", (None, "cpu")),
    ("npu", ("flm", None))])
def test_device_to_backend(device, expected):
    assert device_to_backend(device) == expected


@pytest.mark.parametrize("device,body", [
    ("gpu-rocm", {"llamacpp_backend": "rocm"}),
    ("gpu-vulkan", {"llamacpp_backend": "vulkan"}),
    ("cpu", {"llamacpp_backend": "cpu"}),
    ("npu", {"recipe": "flm"}),
])
def test_load_body_per_device(provider, make_slot, device, body):
    slot = make_slot("s1", device=device)
    assert provider.load_body(slot) == {"model_name": "Qwen3-0.6B-GGUF", **body}
    assert None not in provider.load_body(slot).values()


def test_load_body_options(provider, make_slot):
    slot = make_slot("s1", device="gpu-vulkan", ctx_size=8192,
                     extra_args="  --threads 4 --alias 'my model'  ")
    assert provider.load_body(slot) == {
        "model_name": "Qwen3-0.6B-GGUF", "llamacpp_backend": "vulkan", "ctx_size": 8192,
        "llamacpp_args": "--threads 4 --alias 'my model'"}
    npu = make_slot("s2", device="npu", extra_args="--asr 1")
    assert provider.load_body(npu) == {"model_name": "Qwen3-0.6B-GGUF", "recipe": "flm",
                                       "flm_args": "--asr 1"}


def test_load_body_other_recipes(provider):
    slots = {s.name: s for s in Slot.objects.select_related("node")}
    assert provider.load_body(slots["stt"]) == {"model_name": "Whisper-Large-v3-Turbo",
                                                "whispercpp_backend": "cpu"}
    assert provider.load_body(slots["img"]) == {"model_name": "SD-Turbo", "sd-cpp_backend": "rocm"}
    assert provider.load_body(slots["tts"]) == {"model_name": "kokoro-v1"}


def test_pinned_sent_only_to_lemond_that_knows_pins(provider, make_slot):
    slot = make_slot("p", pinned=True)
    slot.node.version = "10.6.0"
    assert "pinned" not in provider.load_body(slot)
    slot.node.version = "10.8.0"
    assert provider.load_body(slot)["pinned"] is True


def test_environment_and_image(provider):
    stt = Slot.objects.get(name="stt")
    env = provider.environment(stt)
    assert env["HAL0_SLOT_NAME"] == "stt" and env["HAL0_DEVICE"] == "cpu"
    assert env["HAL0_PROVIDER"] == "lemonade" and env["HAL0_LEMONADE_RECIPE"] == "whispercpp"
    assert env["HAL0_LEMONADE_BACKEND"] == "cpu"
    assert "KEY" not in " ".join(env)  # never a key in the identity block
    assert provider.image_ref(stt) == "lemonade://whispercpp/cpu"
    assert provider.image_ref(Slot.objects.get(name="chat")) == "lemonade://llamacpp/rocm"
    assert provider.image_ref(Slot.objects.get(name="tts")) == "lemonade://recipe/kokoro"


def test_npu_image_ref(provider, make_slot):
    assert provider.image_ref(make_slot("n", device="npu")) == "lemonade://recipe/flm"


def test_load_reaches_lemond_with_the_right_options(provider, node, sim, make_slot):
    slot = make_slot("s1", device="gpu-vulkan", ctx_size=8192, extra_args="--threads 3")
    result = provider.load(slot)
    assert result["status"] == "success" and result["model_name"] == "Qwen3-0.6B-GGUF"
    entry = httpx.get(f"{sim.url}/v1/health").json()["all_models_loaded"][0]
    assert entry["recipe_options"] == {"ctx_size": 8192, "llamacpp_backend": "vulkan",
                                       "llamacpp_args": "--threads 3"}
    assert provider.status(slot).entry.model_name == "Qwen3-0.6B-GGUF"


def test_unload_is_idempotent(provider, node, sim, make_slot):
    slot = make_slot("s1")
    provider.load(slot)
    assert provider.unload(slot)["ok"] is True
    again = provider.unload(slot)
    assert again == {"ok": True, "noop": "Qwen3-0.6B-GGUF was not loaded"}
    assert sim.state()["loaded_names"] == []


def test_unload_without_a_model_does_not_touch_the_network(provider, dead_node):
    slot = Slot(name="x", capability="chat", device="cpu", model_name="", node=dead_node)
    assert provider.unload(slot) == {"ok": True, "noop": "no model to unload"}


def test_status_never_raises(provider, dead_node):
    slot = Slot.objects.select_related("node").get(name="chat")
    status = provider.status(slot)
    assert status.reachable is False and status.entry is None
    assert "cannot reach lemond" in status.error
    with pytest.raises(LemonadeUnavailable):
        provider.load(slot)


def test_status_survives_garbage(provider, node, sim):
    sim.fault("malformed_json")
    status = provider.status(Slot.objects.select_related("node").get(name="chat"))
    assert status.reachable is False and "not JSON" in status.error


def test_lru_eviction_shows_on_next_status(provider, node, sim, make_slot):
    a = make_slot("a", model_name="Qwen3-0.6B-GGUF")
    b = make_slot("b", model_name="Qwen3-4B-Instruct-2507-GGUF")
    provider.load(a)
    assert provider.status(a).entry is not None
    provider.load(b)  # max_loaded_models=1: lemond evicts a (same llm pool)
    assert provider.status(a).entry is None
    assert provider.status(b).entry is not None

