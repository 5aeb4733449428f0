"""Slot validation (shared by admin, forms, API, CLI), seeding, and the audit log."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from slots.models import Node, Slot, SlotEvent, parse_version

pytestmark = pytest.mark.django_db


def errors_for(**fields) -> dict:
    base = {"name": "x1", "capability": "chat", "device": "gpu-vulkan",
            "model_name": "Qwen3-0.6B-GGUF", "node": Node.local()}
    slot = Slot(**{**base, **fields})
    with pytest.raises(ValidationError) as exc:
        slot.full_clean()
    return exc.value.message_dict


def test_seeded_slots_one_default_per_capability():
    slots = {s.name: s for s in Slot.objects.all()}
    assert set(slots) == {"chat", "embed", "rerank", "stt", "tts", "img"}
    assert all(s.seeded and s.is_default and s.enabled for s in slots.values())
    assert {s.capability for s in slots.values()} == {"chat", "embed", "rerank", "stt", "tts", "img"}
    assert slots["chat"].node.name == "local"
    # every seeded model is in lemond v10.6.0's own catalogue, with the matching type
    from providers.lemonade import catalog
    for slot in slots.values():
        entry = catalog.get(slot.model_name)
        assert entry is not None, slot.model_name
        assert catalog.model_type(entry) == slot.lemond_type


@pytest.mark.parametrize("name", ["", "Chat", "-x", "a" * 33, "a b", "ä", "x/y"])
def test_bad_names(name):
    assert ("Slot names are 1-32 characters: lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit.") in errors_for(name=name)["name"]


@pytest.mark.parametrize("name", ["a", "chat-2", "x_y", "9lives", "a" * 32])
def test_good_names(name):
    Slot(name=name, capability="chat", device="cpu", model_name="m", node=Node.local()).full_clean()


def test_unknown_capability_and_device():
    errs = errors_for(capability="video", device="tpu")
    assert "Unknown capability 'video'; choose one of chat, embed, rerank, stt, tts, img." in errs["capability"]
    assert "Unknown device 'tpu'; choose one of gpu-rocm, gpu-vulkan, cpu, npu." in errs["device"]


def test_device_must_suit_capability():
    assert errors_for(capability="tts", device="gpu-rocm", model_name="kokoro-v1")["device"] == [
        "A tts slot cannot run on gpu-rocm; supported: cpu."]
    assert errors_for(capability="img", device="npu", model_name="SD-Turbo")["device"] == [
        "A img slot cannot run on npu; supported: gpu-rocm, gpu-vulkan, cpu."]


@pytest.mark.parametrize("ctx", [0, 1, 127, 1_048_577])
def test_ctx_size_range(ctx):
    messages = errors_for(ctx_size=ctx)["ctx_size"]
    assert "Context size must be between 128 and 1,048,576 (or empty for lemond's default)." in messages


@pytest.mark.parametrize("ctx", [None, 128, 4096, 1_048_576])
def test_ctx_size_ok(ctx):
    Slot(name="c", capability="chat", device="cpu", model_name="m", ctx_size=ctx,
         node=Node.local()).full_clean()


def test_ctx_size_only_where_lemond_takes_it():
    assert errors_for(capability="stt", device="cpu", model_name="Whisper-Tiny",
                      ctx_size=4096)["ctx_size"] == [
        "A stt slot has no context size; leave it empty."]


@pytest.mark.parametrize("flag", ["-m", "--model", "--port", "--ctx-size", "-c", "-ngl",
                                  "--jinja", "--mmproj", "--embeddings", "--reranking"])
def test_forbidden_flags_named(flag):
    assert errors_for(extra_args=f"--threads 4 {flag} 9")["extra_args"] == [
        f"extra_args may not contain {flag}: lemond sets it itself."]


def test_forbidden_flag_with_equals():
    assert errors_for(extra_args="--port=9")["extra_args"] == [
        "extra_args may not contain --port: lemond sets it itself."]


@pytest.mark.parametrize("bad", ["--threads 4\n--port 1", "a\tb", "x\x00", "\r"])
def test_control_characters_rejected(bad):
    assert errors_for(extra_args=bad)["extra_args"] == [
        "extra_args must be one line: newlines and control characters are not allowed."]


def test_unbalanced_quotes_rejected():
    assert errors_for(extra_args='--alias "oops')["extra_args"] == [
        "extra_args cannot be parsed: No closing quotation."]


def test_allowed_args_pass():
    Slot(name="ok", capability="chat", device="cpu", model_name="m", node=Node.local(),
         extra_args="--threads 4 --flash-attn on --cache-type-k q8_0").full_clean()


def test_tts_takes_no_args():
    assert errors_for(capability="tts", device="cpu", model_name="kokoro-v1",
                      extra_args="--x")["extra_args"] == [
        "Text-to-speech (kokoro) takes no extra args; leave it empty."]


def test_one_default_per_capability_in_clean_and_database():
    assert errors_for(is_default=True)["is_default"] == [
        "Slot 'chat' is already the default chat slot."]
    with pytest.raises(IntegrityError), transaction.atomic():
        Slot.objects.create(name="chat2", capability="chat", device="cpu", model_name="m",
                            node=Node.local(), is_default=True)


def test_empty_model():
    assert errors_for(model_name="  ")["model_name"] == ["A slot needs a model."]


@pytest.mark.parametrize("model", ["has space", "tab\there", "nul\x00", "bell\x07"])
def test_model_names_without_spaces_or_control_characters(model):
    assert errors_for(model_name=model)["model_name"] == [
        "Model names cannot contain spaces or control characters."]


def test_node_local_is_created_from_settings(settings):
    Slot.objects.all().delete()
    Node.objects.all().delete()
    settings.HAL0_LEMONADE_URL = "http://127.0.0.1:14444"
    settings.HAL0_LEMONADE_API_KEY = "k1"
    node = Node.local()
    assert (node.name, node.base_url, node.api_key) == ("local", "http://127.0.0.1:14444", "k1")
    assert Node.local().pk == node.pk  # created once


@pytest.mark.parametrize("text,expected", [("10.6.0", (10, 6, 0)), ("10.6.0-sim", (10, 6, 0)),
                                           ("11.7.0+g1", (11, 7, 0)), ("", ()), ("dev", ())])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_pin_support_by_version():
    node = Node(name="n", base_url="http://127.0.0.1:1")
    for version, pins, stt in [("10.6.0", False, "transcription"), ("10.8.0", True, "transcription"),
                               ("10.4.1", False, "audio"), ("11.7.0-sim", True, "transcription")]:
        node.version = version
        assert node.supports_pinning is pins
        assert node.transcription_type == stt


def test_events_newest_first():
    slot = Slot.objects.get(name="chat")
    for action in ("load", "unload", "pin"):
        SlotEvent.objects.create(slot=slot, slot_name="chat", action=action)
    assert [e.action for e in slot.events.all()] == ["pin", "unload", "load"]


def test_legal_actions_by_state():
    slot = Slot.objects.get(name="chat")
    slot.state = "loading"
    assert slot.actions == {"load": False, "unload": False, "restart": False, "swap": False,
                            "pin": True, "unpin": True}
    slot.state = "ready"
    assert slot.actions["unload"] and slot.actions["swap"] and slot.actions["load"]
    slot.enabled = False
    assert not slot.actions["load"] and slot.actions["unload"]
