"""`manage.py slots`: list, show, export → import identity, all-or-nothing import."""

import json

import pytest
from django.core.management import CommandError, call_command

from slots.models import Slot, SlotEvent

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    from io import StringIO

    out = StringIO()
    call_command("slots", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def snapshot():
    return [s.export_dict() for s in Slot.objects.select_related("node").order_by("name")]


def test_list_json_has_the_six_seeded_slots():
    data = json.loads(run("list", "--json"))
    assert [s["name"] for s in data] == ["chat", "embed", "img", "rerank", "stt", "tts"]
    assert all(s["state"] == "offline" and s["seeded"] for s in data)


def test_list_table():
    out = run("list")
    assert "Qwen3-4B-Instruct-2507-GGUF" in out and "default" in out


def test_show_includes_load_body_environment_and_image():
    data = json.loads(run("show", "chat", "--json"))
    assert data["load_body"] == {"model_name": "Qwen3-4B-Instruct-2507-GGUF",
                                 "llamacpp_backend": "rocm", "ctx_size": 16384}
    assert data["environment"]["HAL0_SLOT_NAME"] == "chat"
    assert data["environment"]["HAL0_PROVIDER"] == "lemonade"
    assert data["environment"]["HAL0_LEMONADE_BACKEND"] == "rocm"
    assert data["image"] == "lemonade://llamacpp/rocm"
    text = run("show", "chat")
    assert "HAL0_DEVICE=gpu-rocm" in text and "lemonade://llamacpp/rocm" in text


def test_show_unknown_slot():
    with pytest.raises(CommandError, match="No slot named 'nope'"):
        run("show", "nope")


def test_export_import_is_identity(tmp_path, make_slot):
    make_slot("coder", extra_args="--threads 4", ctx_size=8192, pinned=True)
    before = snapshot()
    path = tmp_path / "slots.json"
    run("export", "-o", str(path))
    text = path.read_text()
    assert text == run("export")  # stable, same bytes every time
    out = run("import", str(path))
    assert "changed 0 slot(s); 7 unchanged" in out
    assert snapshot() == before


def test_import_creates_and_updates(tmp_path):
    data = json.loads(run("export"))
    data["slots"][0]["model_name"] = "Qwen3-0.6B-GGUF"  # chat
    data["slots"].append({"name": "chat-small", "capability": "chat", "device": "cpu",
                          "model_name": "Qwen3-0.6B-GGUF"})
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    dry = run("import", str(path), "--dry-run")
    assert "create chat-small" in dry and "update chat: model_name" in dry
    assert "dry run" in dry
    assert not Slot.objects.filter(name="chat-small").exists()
    run("import", str(path))
    assert Slot.objects.get(name="chat").model_name == "Qwen3-0.6B-GGUF"
    assert Slot.objects.get(name="chat-small").node.name == "local"
    assert SlotEvent.objects.filter(slot_name="chat-small", action="create").exists()


def test_import_can_move_the_default(tmp_path, make_slot):
    make_slot("chat2")
    data = json.loads(run("export"))
    for s in data["slots"]:
        if s["name"] == "chat":
            s["is_default"] = False
        if s["name"] == "chat2":
            s["is_default"] = True
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    run("import", str(path))
    assert Slot.objects.get(is_default=True, capability="chat").name == "chat2"


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["slots"][0].update(capability="video"), "slots[0] ('chat').capability"),
    (lambda d: d["slots"].append({"name": "c2", "capability": "chat", "device": "cpu",
                                  "model_name": "m", "is_default": True}),
     "is_default: both 'c2' and 'chat' would be the default chat slot"),
    (lambda d: d["slots"][0].update(extra_args="--port 1"),
     "slots[0] ('chat').extra_args: extra_args may not contain --port"),
    (lambda d: d["slots"][0].update(ctx_size="big"), "slots[0] ('chat').ctx_size"),
    (lambda d: d["slots"][0].update(colour="red"), "slots[0] ('chat').colour: unknown field"),
    (lambda d: d["slots"][0].update(extra_args=None),
     "slots[0] ('chat').extra_args: may not be null (use \"\" for none)"),
    (lambda d: d["slots"][1].update(pinned=None), "slots[1] ('embed').pinned: may not be null"),
    (lambda d: d["slots"].append(dict(d["slots"][1])), "appears twice"),
    (lambda d: d["slots"][1].update(node="mars"), "slots[1] ('embed').node: no node named 'mars'"),
    (lambda d: d["slots"].append({"name": "new", "capability": "chat"}),
     "slots[6] ('new').device: required for a new slot"),
])
def test_bad_import_names_the_problem_and_changes_nothing(tmp_path, mutate, message):
    data = json.loads(run("export"))
    data["slots"][2]["model_name"] = "SD-Turbo-GGUF"  # a valid change that must not land
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    before, events = snapshot(), SlotEvent.objects.count()
    with pytest.raises(CommandError) as exc:
        run("import", str(path))
    assert message in str(exc.value)
    assert snapshot() == before
    assert SlotEvent.objects.count() == events


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ('{"other": []}', 'expected an object with a "slots" list'),
    ('{"slots": {}}', '"slots" must be a list'),
    ('{"slots": [1]}', "slots[0]: each slot must be a JSON object"),
    ('[{"capability": "chat"}]', "slots[0].name: every slot needs a name"),
])
def test_malformed_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(CommandError, match=r"bad\.json") as exc:
        run("import", str(path))
    assert message in str(exc.value)


def test_missing_file():
    with pytest.raises(CommandError, match=r"cannot read /nonexistent\.json"):
        run("import", "/nonexistent.json")


@pytest.mark.e2e
def test_import_exit_code_from_the_shell(tmp_path):
    """As an operator runs it: exit 1, the field named on stderr, the database unchanged."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HAL0_VAR_DIR": str(tmp_path), "DATABASE_URL": ""}

    def manage(*args):
        return subprocess.run([sys.executable, "manage.py", *args], capture_output=True,
                              text=True, env=env, timeout=60)

    assert manage("migrate", "-v0").returncode == 0
    before = manage("slots", "export").stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"slots": [{"name": "chat", "device": "tpu"}]}))
    proc = manage("slots", "import", str(bad))
    assert proc.returncode == 1
    assert "slots[0] ('chat').device" in proc.stderr
    assert manage("slots", "export").stdout == before


def test_import_of_a_binary_file_and_export_to_a_missing_dir(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CommandError, match="is not UTF-8 text"):
        run("import", str(bad))
    with pytest.raises(CommandError, match="cannot write"):
        run("export", "-o", str(tmp_path / "no" / "such" / "dir.json"))
