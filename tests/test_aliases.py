"""OpenAI model-name aliases (HAL0_MODEL_ALIASES) and what a token lists (`--list`): the
parts that need no running gateway. tests/test_clients.py drives both through real clients."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from slots import aliases, tokens
from slots.models import ApiToken
from tests.test_settings import settings_in


def test_the_default_map_covers_openais_common_names():
    parsed = aliases.parse(None)
    assert parsed["tts-1"] == parsed["tts-1-hd"] == "tts"
    assert parsed["whisper-1"] == "stt"
    assert parsed["text-embedding-3-small"] == parsed["text-embedding-ada-002"] == "embed"
    assert parsed["gpt-4o-mini"] == parsed["gpt-3.5-turbo"] == "chat"
    assert parsed["dall-e-3"] == parsed["gpt-image-1"] == "img"


def test_entries_add_change_and_drop_aliases():
    parsed = aliases.parse(" gpt-4o = writer, my-embed=embed2 ,tts-1=, ")
    assert parsed["gpt-4o"] == "writer" and parsed["my-embed"] == "embed2"
    assert "tts-1" not in parsed and parsed["tts-1-hd"] == "tts"
    assert aliases.parse("none,GPT-4o=writer") == {"gpt-4o": "writer"}
    assert aliases.parse("none") == {}


@pytest.mark.parametrize("raw", ["gpt-4o", "=chat", "a b=chat", "x=y z", "gpt-4o=>chat"])
def test_a_malformed_entry_is_refused(raw):
    with pytest.raises(ValueError, match="name=target"):
        aliases.parse(raw)


def test_a_malformed_setting_stops_hal0_at_startup(tmp_path):
    proc = settings_in({"HAL0_MODEL_ALIASES": "gpt-4o"}, tmp_path)
    assert proc.returncode != 0 and "HAL0_MODEL_ALIASES: 'gpt-4o'" in proc.stderr
    proc = settings_in({"HAL0_MODEL_ALIASES": "none,x=chat"}, tmp_path, "s.HAL0_MODEL_ALIASES")
    assert proc.stdout.strip() == "{'x': 'chat'}", proc.stderr


def test_names_for_a_slot():
    table = {"gpt-4o": "chat", "tts-1": "tts", "mine": "writer"}
    assert aliases.names_for(table, {"chat", "writer"}) == ["gpt-4o", "mine"]
    assert aliases.names_for(table, {"img"}) == []


def test_cors_is_off_unless_origins_are_given(tmp_path):
    proc = settings_in({}, tmp_path, "'corsheaders.middleware.CorsMiddleware' in s.MIDDLEWARE")
    assert proc.stdout.strip() == "False", proc.stderr
    proc = settings_in({"HAL0_CORS_ORIGINS": "http://a.example:3000, *"}, tmp_path,
                       "s.CORS_ALLOWED_ORIGINS, s.CORS_ALLOW_ALL_ORIGINS, "
                       "s.CORS_ALLOW_CREDENTIALS, s.MIDDLEWARE[0]")
    assert proc.stdout.strip() == ("(['http://a.example:3000'], True, False, "
                                   "'corsheaders.middleware.CorsMiddleware')"), proc.stderr


# --- what a token lists ------------------------------------------------------------------------

def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("tokens", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_a_token_lists_capabilities_and_slots_it_may_use(db, make_slot):
    make_slot("writer")
    _, raw = tokens.create_token("picker", listed="chat")
    principal = tokens.verify(raw)[0]
    assert principal.lists_slot("chat", "chat") and principal.lists_slot("writer", "chat")
    assert not principal.lists_slot("embed", "embed") and principal.allows_slot("embed")
    _, raw = tokens.create_token("scoped", slots="writer,embed", listed="chat,embed")
    scoped = tokens.verify(raw)[0]
    assert scoped.lists_slot("writer", "chat") and not scoped.lists_slot("chat", "chat")
    assert scoped.lists_slot("embed", "embed")


def test_tokens_create_list_from_the_cli(db):
    out, err = run("create", "open-webui", "--list", "chat, tts")
    assert out.startswith("hal0_") and "listing chat,tts" in err
    assert ApiToken.objects.get(name="open-webui").listed == "chat,tts"
    listing, _ = run("list", "--json")
    assert '"listed": "chat,tts"' in listing
    with pytest.raises(CommandError, match="No slot or capability named 'gpt'"):
        run("create", "bad", "--list", "gpt")
    assert not ApiToken.objects.filter(name="bad").exists()


def test_the_tokens_page_creates_a_listing_token(admin_client):
    response = admin_client.post("/tokens/", {"name": "owui", "listed": "chat"})
    assert response.status_code == 200 and b"Token owui created" in response.content
    assert ApiToken.objects.get(name="owui").listed == "chat"
    response = admin_client.post("/tokens/", {"name": "owui2", "listed": "nope"})
    assert b"No slot or capability named" in response.content
    assert not ApiToken.objects.filter(name="owui2").exists()


def test_the_admin_validates_what_a_token_lists(admin_client):
    response = admin_client.post("/admin/slots/apitoken/add/",
                                 {"name": "adm", "slots": "", "listed": "nope"})
    assert response.status_code == 200 and b"No slot or capability named" in response.content
    response = admin_client.post("/admin/slots/apitoken/add/",
                                 {"name": "adm", "slots": "", "listed": "embed"})
    assert response.status_code == 302
    assert ApiToken.objects.get(name="adm").listed == "embed"
