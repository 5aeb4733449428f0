"""API tokens: creation (CLI, admin, function), hashing, verification with its cache,
expiry, revocation, per-token slots, and the JSON API's bearer path."""

from __future__ import annotations

import io
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from slots import tokens
from slots.models import ApiToken


@pytest.fixture(autouse=True)
def _fresh_cache():
    tokens.clear_cache()
    yield
    tokens.clear_cache()


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("tokens", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_only_a_hash_is_stored(db):
    token, raw = tokens.create_token("ci")
    assert raw.startswith("hal0_") and len(raw) > 40
    assert token.key_hash == tokens.hash_token(raw) and raw not in token.key_hash
    assert raw.startswith(token.prefix) and len(token.prefix) < 16
    assert not ApiToken.objects.filter(key_hash=raw).exists()


def test_verify_accepts_the_token_and_refuses_others(db):
    _, raw = tokens.create_token("ci", slots="chat, embed")
    principal, why = tokens.verify(raw)
    assert why == "" and principal.name == "ci"
    assert principal.allows_slot("chat") and principal.allows_slot("embed")
    assert not principal.allows_slot("img")
    assert tokens.verify(raw + "x") == (None, "invalid")
    assert tokens.verify("") == (None, "missing")
    assert tokens.authenticate(raw).name == "ci"
    assert tokens.authenticate("nope") is None


def test_expired_token_is_refused_even_from_the_cache(db):
    token, raw = tokens.create_token("short", expires_at=timezone.now() + timedelta(seconds=1))
    assert tokens.verify(raw)[0] is not None  # cached now
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    tokens.clear_cache()
    assert tokens.verify(raw) == (None, "expired")
    _, old = tokens.create_token("old", expires_days=-1)
    assert tokens.verify(old) == (None, "expired")


def test_revocation_here_is_immediate(db):
    _, raw = tokens.create_token("ci")
    assert tokens.authenticate(raw)
    tokens.revoke_token("ci")
    assert tokens.verify(raw) == (None, "invalid")


def test_revocation_elsewhere_takes_effect_within_the_cache_ttl(db, settings):
    settings.HAL0_TOKEN_CACHE_S = 0.3
    token, raw = tokens.create_token("ci")
    assert tokens.authenticate(raw)
    # another process revokes it: this process's cache does not know yet
    ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
    assert tokens.authenticate(raw)
    time.sleep(0.35)
    assert tokens.authenticate(raw) is None


@pytest.fixture
def primed(db):
    """A token verified once (so it is cached), from the test's own thread."""
    _, raw = tokens.create_token("ci")
    assert tokens.verify(raw)[0] is not None
    return raw


async def test_a_cached_token_is_verified_without_the_database(primed, monkeypatch):
    def no_database(key_hash):
        raise AssertionError("a cache hit must not query")

    monkeypatch.setattr(tokens, "_lookup", no_database)
    principal, why = await tokens.averify(primed)
    assert principal is not None and why == ""
    assert await tokens.averify("") == (None, "missing")


def test_last_used_is_stamped_off_the_request_path(db, hal0_runtime):
    stamps = hal0_runtime.token_stamps
    token, raw = tokens.create_token("ci")
    tokens.verify(raw, stamps)
    token.refresh_from_db()
    assert token.last_used_at is None  # verifying writes nothing
    assert stamps.flush() == 1
    token.refresh_from_db()
    assert token.last_used_at is not None
    tokens.verify(raw, stamps)
    assert stamps.flush() == 0  # at most once a minute per token


# --- manage.py tokens ------------------------------------------------------------------------

def test_cli_create_prints_only_the_token_on_stdout(db):
    out, err = run("create", "ci", "--slots", "chat,embed", "--expires-days", "3")
    raw = out.strip()
    assert raw.startswith("hal0_") and "\n" not in raw
    assert "shown only now" in err and raw not in err
    token = ApiToken.objects.get(name="ci")
    assert token.key_hash == tokens.hash_token(raw)
    assert token.allowed_slots == ["chat", "embed"]
    assert timedelta(days=2.9) < token.expires_at - timezone.now() < timedelta(days=3.1)
    assert tokens.authenticate(raw).name == "ci"


def test_cli_may_manage_is_off_unless_asked(db):
    plain = run("create", "reader")[0].strip()
    raw, err = run("create", "webui", "--slots", "chat", "--may-manage")
    assert "may load and unload" in err
    assert tokens.authenticate(plain).may_manage is False
    assert tokens.authenticate(raw.strip()).may_manage is True
    out, _ = run("list")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert "MANAGES" in out.splitlines()[0]
    assert rows["webui"][4] == "yes" and rows["reader"][4] == "no"
    import json

    listed = {r["name"]: r["may_manage"] for r in json.loads(run("list", "--json")[0])}
    assert listed == {"reader": False, "webui": True}


def test_cli_refuses_unknown_slots_and_duplicate_names(db):
    with pytest.raises(CommandError, match="no slot named nope"):
        run("create", "ci", "--slots", "chat,nope")
    run("create", "ci")
    with pytest.raises(CommandError, match="exists already"):
        run("create", "ci")
    with pytest.raises(CommandError, match="--expires-days must be"):
        run("create", "ci2", "--expires-days", "0")


def test_cli_list_and_revoke(db):
    raw = run("create", "ci", "--slots", "chat")[0].strip()
    run("create", "later", "--expires-days", "1")
    out, _ = run("list")
    assert "ci" in out and "later" in out and "active" in out and raw not in out
    out, _ = run("revoke", "ci")
    assert "revoked" in out
    assert tokens.authenticate(raw) is None
    import json

    rows = {r["name"]: r for r in json.loads(run("list", "--json")[0])}
    assert rows["ci"]["status"] == "revoked" and rows["later"]["status"] == "active"
    with pytest.raises(CommandError, match="no token named"):
        run("revoke", "ghost")


# --- the JSON API's bearer path and the admin ----------------------------------------------------

def test_json_api_accepts_a_token_limited_to_its_slots(client, db):
    _, raw = tokens.create_token("script", slots="chat")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    response = client.get("/api/slots/", **auth)
    assert response.status_code == 200
    assert [s["name"] for s in response.json()["slots"]] == ["chat"]
    assert client.get("/api/slots/embed/", **auth).status_code == 403
    assert client.get("/api/slots/", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401


def test_admin_add_shows_the_token_once(admin_client):
    response = admin_client.post("/admin/slots/apitoken/add/",
                                 {"name": "webui", "slots": "chat", "expires_at_0": "",
                                  "expires_at_1": ""}, follow=True)
    assert response.status_code == 200
    token = ApiToken.objects.get(name="webui")
    assert token.created_by == "boss"
    page = response.content.decode()
    start = page.index(token.prefix)
    raw = page[start:start + 48].split("<")[0]
    assert tokens.authenticate(raw).name == "webui"
    again = admin_client.get(f"/admin/slots/apitoken/{token.pk}/change/").content.decode()
    assert raw not in again


def test_admin_sets_and_edits_may_manage(admin_client):
    admin_client.post("/admin/slots/apitoken/add/",
                      {"name": "webui", "may_manage": "on", "expires_at_0": "",
                       "expires_at_1": ""})
    token = ApiToken.objects.get(name="webui")
    assert token.may_manage is True
    listing = admin_client.get("/admin/slots/apitoken/?may_manage__exact=1").content.decode()
    assert "webui" in listing
    raw = tokens.create_token("agent")[1]
    assert tokens.authenticate(raw).may_manage is False
    agent = ApiToken.objects.get(name="agent")
    response = admin_client.post(f"/admin/slots/apitoken/{agent.pk}/change/",
                                 {"name": "agent", "may_manage": "on", "expires_at_0": "",
                                  "expires_at_1": ""})
    assert response.status_code == 302
    assert tokens.authenticate(raw).may_manage is True  # the cache was cleared at once


def test_admin_refuses_unknown_slots(admin_client):
    response = admin_client.post("/admin/slots/apitoken/add/", {"name": "x", "slots": "nope"})
    assert response.status_code == 200 and b"No slot named nope" in response.content
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("days", ["0", "-1", "nan", "inf", "1e9", "3651"])
def test_tokens_create_refuses_impossible_lifetimes(days):
    from io import StringIO

    from django.core.management import CommandError, call_command

    from slots.models import ApiToken

    with pytest.raises(CommandError, match="--expires-days must be"):
        call_command("tokens", "create", "x", "--expires-days", days, stdout=StringIO())
    assert not ApiToken.objects.exists()
