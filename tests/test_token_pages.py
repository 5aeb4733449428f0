"""The tokens page: staff create (shown once), list and revoke API tokens; bad input changes
nothing."""

import pytest
from django.test import Client

from slots import tokens
from slots.models import ApiToken

pytestmark = pytest.mark.django_db


def test_anonymous_and_non_staff_are_refused(client, django_user_model):
    assert client.get("/tokens/").status_code == 302
    user = django_user_model.objects.create_user("viewer", password="x" * 12)
    viewer = Client()
    viewer.force_login(user)
    assert viewer.get("/tokens/").status_code == 403
    assert viewer.post("/tokens/", {"name": "sneaky"}).status_code == 403
    assert not ApiToken.objects.exists()


def test_create_shows_the_token_once_and_it_works(admin_client):
    response = admin_client.post("/tokens/", {"name": "open-webui", "slots": "chat, embed",
                                              "expires_days": "30"})
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    page = response.content.decode()
    row = ApiToken.objects.get(name="open-webui")
    raw = page.split('<code class="token">')[1].split("</code>")[0]
    assert raw.startswith(tokens.PREFIX) and tokens.hash_token(raw) == row.key_hash
    assert row.allowed_slots == ["chat", "embed"] and row.expires_at is not None
    assert row.created_by == "boss"
    principal = tokens.authenticate(raw)
    assert principal.allows_slot("chat") and not principal.allows_slot("img")
    # never again: the list shows only the prefix
    later = admin_client.get("/tokens/").content.decode()
    assert raw not in later and row.prefix in later


def test_may_manage_is_set_in_the_form_and_shown_in_the_list(admin_client):
    admin_client.post("/tokens/", {"name": "reader"})
    response = admin_client.post("/tokens/", {"name": "webui", "may_manage": "on"})
    raw = response.content.decode().split('<code class="token">')[1].split("</code>")[0]
    assert tokens.authenticate(raw).may_manage is True
    assert ApiToken.objects.get(name="reader").may_manage is False
    page = admin_client.get("/tokens/").content.decode()
    assert "May load and unload" in page  # the form's checkbox
    row = page.split('id="token-webui"')[1].split("</tr>")[0]
    other = page.split('id="token-reader"')[1].split("</tr>")[0]
    assert '<td data-label="loads/unloads">yes</td>' in row
    assert '<td data-label="loads/unloads">no</td>' in other


@pytest.mark.parametrize("data,message", [
    ({"name": "bad name!"}, "Enter a valid"),
    ({"name": "t", "slots": "chat,nope"}, "No slot named &#x27;nope&#x27;."),
    ({"name": "t", "expires_days": "0"}, "greater than or equal to 1"),
    ({"name": ""}, "This field is required."),
])
def test_bad_input_is_explained_and_creates_nothing(admin_client, data, message):
    response = admin_client.post("/tokens/", data)
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not ApiToken.objects.exists()


def test_duplicate_name(admin_client):
    tokens.create_token("ci")
    response = admin_client.post("/tokens/", {"name": "ci"})
    assert "A token named &#x27;ci&#x27; exists already." in response.content.decode()
    assert ApiToken.objects.count() == 1


def test_revoke(admin_client):
    _, raw = tokens.create_token("old")
    assert tokens.authenticate(raw) is not None
    response = admin_client.post("/tokens/old/revoke/")
    assert response.status_code == 302
    assert ApiToken.objects.get(name="old").revoked_at is not None
    assert tokens.authenticate(raw) is None
    assert admin_client.post("/tokens/nope/revoke/").status_code == 404
    assert admin_client.get("/tokens/old/revoke/").status_code == 405
