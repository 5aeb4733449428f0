"""Property-based tests (hypothesis): whatever an operator or a script sends — the slot
forms, the JSON API, `slots import` — hal0 answers 2xx or 4xx with a message, never a 500
or an exception, and a refusal changes nothing (`slots export` byte-identical, no new
audit rows).

The database is not rolled back between examples, so every example compares against a
snapshot taken just before it; accepted inputs accumulate like a long-lived install's.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

import pytest
from django.core.management import CommandError, call_command
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from slots import portability
from slots.models import SUPPORTED_DEVICES, Capability, Device, Slot, SlotEvent

# `make test` (and CI) runs a fixed set of examples, so a red run is reproducible and never
# a coin toss; `make fuzz` explores new ones (HAL0_PROPERTY_EXPLORE=1, more examples).
PROPERTIES = settings(max_examples=int(os.environ.get("HAL0_PROPERTY_EXAMPLES", "100")),
                      deadline=None,
                      derandomize=os.environ.get("HAL0_PROPERTY_EXPLORE") != "1",
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow,
                                             HealthCheck.data_too_large])

SEEDED = ["chat", "embed", "rerank", "stt", "tts", "img"]
MODELS = ["Qwen3-0.6B-GGUF", "Qwen3-4B-Instruct-2507-GGUF", "Whisper-Tiny", "kokoro-v1",
          "nomic-embed-text-v1-GGUF", "No-Such-Model-GGUF", "has space", "ünïcode-GGUF"]
BOOL_FIELDS = ("pinned", "keep_loaded", "enabled", "is_default")

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def state() -> tuple[str, int]:
    """What a refusal must leave alone: the definitions and the audit log."""
    return portability.export_json(), SlotEvent.objects.count()


# --- the slot forms ---------------------------------------------------------------------------

def form_value(field: str) -> st.SearchStrategy[str]:
    """Any value for a form field, valid or not."""
    valid = {
        "name": st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
        | st.sampled_from(SEEDED),
        "capability": st.sampled_from(Capability.values),
        "device": st.sampled_from(Device.values),
        "model_name": st.sampled_from(MODELS),
        "ctx_size": st.just("") | st.integers(-10, 2_000_000).map(str),
        "extra_args": st.sampled_from(["", "--threads 4", "-m x", "--ctx-size=9", "'open",
                                       "--temp 0.7", "a\nb", "x" * 1200]),
        "idle_timeout_s": st.integers(-5, 10**20).map(str),
        "max_concurrency": st.just("") | st.integers(-2, 20_000).map(str),
        "queue_timeout_s": st.just("") | st.integers(-5, 10**6).map(str),
        "node": st.sampled_from(["", "NODE", "999999", "local"]),
        **{f: st.sampled_from(["on", "", "true", "false", "0"]) for f in BOOL_FIELDS},
    }[field]
    junk = st.text(max_size=40) | st.integers().map(str) | st.just("\x00")
    return valid | junk


def mostly(valid: st.SearchStrategy, junk: st.SearchStrategy) -> st.SearchStrategy:
    """Valid three times in four: enough inputs get through to reach the writes."""
    return st.integers(0, 3).flatmap(lambda i: junk if i == 0 else valid)


@st.composite
def good_slot(draw) -> dict:
    """A slot definition that passes every rule (its name may clash with an existing one)."""
    capability = draw(st.sampled_from(Capability.values))
    device = draw(st.sampled_from(sorted(SUPPORTED_DEVICES[Capability(capability)])))
    ctx_ok = capability in ("chat", "embed", "rerank") or device == "npu"
    return {
        "name": draw(st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)),
        "capability": capability, "device": device,
        "model_name": draw(st.sampled_from(MODELS[:6])),
        "ctx_size": draw(st.sampled_from([None, 4096, 128]) if ctx_ok else st.none()),
        "extra_args": "" if capability == "tts" else draw(st.sampled_from(["", "--threads 4"])),
        "idle_timeout_s": draw(st.integers(0, 3600)),
        "max_concurrency": draw(st.sampled_from([None, 1, 4])),
        "queue_timeout_s": draw(st.integers(0, 3600)),
        **{f: draw(st.booleans()) for f in ("pinned", "keep_loaded", "enabled")},
        "is_default": False,
    }


@st.composite
def form_data(draw) -> dict:
    """A good slot as a form would post it, with zero to three fields made bad or left out."""
    slot = draw(good_slot())
    data = {k: ("on" if v else "") if isinstance(v, bool) else ("" if v is None else str(v))
            for k, v in slot.items()}
    data["node"] = draw(st.sampled_from(["", "NODE"]))
    for field in draw(st.lists(st.sampled_from(FORM_FIELDS), max_size=3, unique=True)):
        if draw(st.booleans()):
            del data[field]
        else:
            data[field] = draw(form_value(field))
    return {k: v for k, v in data.items() if not (k in BOOL_FIELDS and v == "")}


FORM_FIELDS = [*Slot.DESIRED_FIELDS, "node"]


@pytest.mark.django_db
@PROPERTIES
@given(data=form_data(), target=st.sampled_from(["new", "chat", "tts", "made"]),
       htmx=st.booleans())
def test_slot_forms_never_fail_and_refusals_change_nothing(admin_client, dead_node, data,
                                                           target, htmx):
    if not Slot.objects.filter(name="made").exists():
        Slot.objects.create(name="made", capability="chat", device="cpu",
                            model_name="Qwen3-0.6B-GGUF", node=dead_node)
    data = {k: (str(dead_node.pk) if v == "NODE" else v) for k, v in data.items()}
    url = "/new-slot/" if target == "new" else f"/slots/{target}/"
    before = state()
    headers = {"HTTP_HX_REQUEST": "true"} if htmx else {}
    response = admin_client.post(url, data, **headers)
    assert response.status_code in (200, 302), response.status_code
    body = response.content.decode()
    refused = 'role="alert"' in body
    accepted = response.status_code == 302 or response.has_header("HX-Redirect")
    event(f"{target}: {'accepted' if accepted else 'refused' if refused else 'shown'}")
    if refused:
        assert not accepted
        assert state() == before  # refused: said why, changed nothing
    elif not accepted and target == "new":
        # no redirect means nothing was created (an empty POST just shows the form again)
        assert state() == before


# --- the JSON API --------------------------------------------------------------------------------

CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data",
                 "multipart/form-data; boundary=zzz", "", "application/octet-stream"]
bodies = (json_values.map(lambda v: json.dumps(v).encode())
          | st.fixed_dictionaries({"model": st.sampled_from(MODELS) | json_values})
          .map(lambda v: json.dumps(v).encode())
          | st.binary(max_size=64)
          | st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")))
names = mostly(st.sampled_from([*SEEDED, "nope"]), st.text(min_size=1, max_size=24))
actions = mostly(st.sampled_from(["load", "unload", "restart", "pin", "unpin", "swap"]),
                 st.sampled_from(["delete", "LOAD", ""]) | st.text(max_size=10))


@pytest.mark.django_db(transaction=True)  # actions run on a worker thread
@PROPERTIES
@given(name=names, action=actions, body=bodies, content_type=st.sampled_from(CONTENT_TYPES))
@example(name="chat", action="swap", body=b"[" * 100_000, content_type="application/json")
@example(name="chat", action="swap", body=b"--zzz\r\nContent-Disposition: form-data\r\n\r\n",
         content_type="multipart/form-data; boundary=zzz")
@example(name="chat", action="swap", body=b"model=%ff%fe", content_type="application/x-www-form-urlencoded")
@example(name="chat\x00", action="load", body=b"", content_type="")
def test_json_api_never_fails_and_refusals_change_nothing(admin_client, node, name, action,
                                                          body, content_type):
    before_export, before_events = state()
    url = f"/api/slots/{quote(name, safe='')}/{quote(action, safe='')}"
    response = admin_client.generic("POST", url, body, content_type=content_type)
    status = response.status_code
    event(f"status {status}")
    assert status < 500 and status >= 200, (status, response.content[:300])
    if status >= 400:
        if response.get("Content-Type", "").startswith("application/json"):
            assert response.json()["error"]["message"]
        elif status == 405:
            assert response["Allow"]  # e.g. /api/slots/chat/ with an empty action: GET only
        else:
            assert response.content.strip()  # Django's own 404 page
        assert portability.export_json() == before_export
        # An action that reached lemond and failed (e.g. a swap to a model lemond does not
        # know: 400) is audited as a failed attempt; nothing else may leave a row.
        new = SlotEvent.objects.order_by("pk")[before_events:]
        assert all(not e.ok and e.action == action for e in new), list(new)
        if response.get("Content-Type", "").startswith("application/json"):
            code = response.json()["error"]["code"]
            if not code.startswith("slot.config_error") or action != "swap":
                assert not new, (code, list(new))


# --- slots import -----------------------------------------------------------------------------------

def import_value(field: str) -> st.SearchStrategy:
    valid = {
        "name": st.sampled_from([*SEEDED, "new-a", "new_b"]),
        "capability": st.sampled_from(Capability.values),
        "device": st.sampled_from(Device.values),
        "model_name": st.sampled_from(MODELS),
        "ctx_size": st.none() | st.integers(0, 2_000_000),
        "extra_args": st.sampled_from(["", "--threads 4", "-c 4096", "'open", "--temp 0.7"]),
        "idle_timeout_s": st.integers(-1, 10**6),
        "max_concurrency": st.none() | st.integers(-1, 20_000),
        "queue_timeout_s": st.integers(-1, 10**6),
        "node": st.sampled_from(["local", "nowhere"]),
        **{f: st.booleans() for f in BOOL_FIELDS},
    }[field]
    return valid | json_scalars | st.lists(json_scalars, max_size=2) | st.dictionaries(
        st.text(max_size=4), json_scalars, max_size=2)


@st.composite
def entries(draw) -> dict:
    """An export entry: a good slot (new, or a seeded one's name), then zero to three fields
    made bad, dropped, or an unknown one added."""
    entry = draw(good_slot())
    entry["name"] = draw(st.sampled_from([*SEEDED, "new-a", "new_b", entry["name"]]))
    entry["node"] = "local"
    for field in draw(st.lists(st.sampled_from([*entry, "surprise"]), max_size=3, unique=True)):
        choice = draw(st.integers(0, 2))
        if choice == 0 and field != "surprise":
            del entry[field]
        elif field == "surprise" or field == "name":
            entry[field] = draw(json_scalars | st.sampled_from(["Bad Name", "x" * 40]))
        else:
            entry[field] = draw(import_value(field))
    return entry


documents = mostly(
    st.fixed_dictionaries({"hal0_slots": st.just(1), "slots": st.lists(entries(), max_size=3)})
    | st.lists(entries(), max_size=3),
    json_values,
)
texts = mostly(documents.map(lambda d: json.dumps(d)), st.text(max_size=60))


def exported_document_with(changes: dict) -> str:
    data = portability.export_data()
    for entry in data["slots"]:
        entry.update(changes.get(entry["name"], {}))
    return json.dumps(data)


@pytest.mark.django_db
@PROPERTIES
@given(text=texts, dry_run=st.booleans())
@example(text="[" * 100_000, dry_run=False)
@example(text="[{\"name\": \"chat\", \"ctx_size\": 1e400}]", dry_run=False)
@example(text="[{\"name\": \"chat\", \"extra_args\": null}]", dry_run=False)
@example(text="{\"slots\": [{\"name\": \"chat\", \"ctx_size\": NaN}]}", dry_run=False)
@example(text="[{\"name\": \"new-a\", \"capability\": \"chat\", \"device\": \"cpu\", "
              "\"model_name\": \"Qwen3-0.6B-GGUF\", \"is_default\": true}]", dry_run=False)
def test_import_json_never_fails_and_refusals_change_nothing(dead_node, text, dry_run):
    before = state()
    try:
        plan = portability.import_json(text, dry_run=dry_run)
    except portability.ImportProblem as exc:
        event("refused: " + str(exc).split(":")[0][:20])
        assert str(exc)
        assert state() == before
        return
    event(f"accepted, {plan.change_count} change(s)")
    if dry_run or not plan.change_count:
        assert state() == before
    else:  # accepted: exporting and re-importing is a no-op
        again = portability.import_json(portability.export_json(), dry_run=True)
        assert again.change_count == 0


@pytest.mark.django_db
@settings(PROPERTIES, max_examples=40)
@given(text=texts)
def test_slots_import_command_never_crashes(dead_node, tmp_path_factory, text):
    path = tmp_path_factory.mktemp("import") / "slots.json"
    path.write_text(text, encoding="utf-8")
    before = state()
    try:
        call_command("slots", "import", str(path), "--dry-run")
    except CommandError as exc:
        assert str(path) in str(exc)
    assert state() == before  # a dry run never writes
    try:
        call_command("slots", "import", str(path))
    except CommandError as exc:
        assert str(exc)
        assert state() == before


@pytest.mark.django_db
def test_import_refusal_names_the_entry_and_field(dead_node):
    before = state()
    bad = exported_document_with({"img": {"device": "npu"}, "chat": {"ctx_size": 64}})
    with pytest.raises(portability.ImportProblem, match=r"slots\[\d\] \('chat'\)\.ctx_size"):
        portability.import_json(bad)
    assert state() == before
