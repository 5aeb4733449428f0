"""Logging in: django-axes locks a username from one address after too many wrong
passwords (even the right one is refused until the cool-off ends), and passwords pass
Django's validators beyond a minimum length."""

from __future__ import annotations

import httpx
import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.test import Client, override_settings

from tests.harness import PASSWORD, Stack


def _form_post(client: httpx.Client, password: str) -> httpx.Response:
    if "csrftoken" not in client.cookies:
        client.get("/accounts/login/")
    return client.post("/accounts/login/", data={
        "username": "admin", "password": password,
        "csrfmiddlewaretoken": client.cookies["csrftoken"]})


@pytest.mark.e2e
def test_a_password_guesser_is_locked_out_of_a_real_serve(tmp_path, lemond_sim):
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=lemond_sim.url, HAL0_LOG_LEVEL="WARNING",
                  HAL0_LOGIN_FAILURE_LIMIT="5")
    try:
        stack.setup()
        url = stack.serve()
        with httpx.Client(base_url=url, timeout=30) as guesser:
            statuses = [_form_post(guesser, f"guess-{i}").status_code for i in range(30)]
            # the first four are the login form again; from the fifth on, locked out
            assert statuses[:4] == [200] * 4, statuses
            assert statuses[4:] == [429] * 26, statuses
            locked = _form_post(guesser, PASSWORD)
            assert locked.status_code == 429
            assert "Too many failed logins" in locked.text
            assert "sessionid" not in guesser.cookies
            assert guesser.get("/").status_code == 302  # still not logged in
    finally:
        stack.stop()


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_user("operator", "", "a-long-operator-password")


def _login(client: Client, password: str, **extra) -> int:
    return client.post("/accounts/login/", {"username": "operator", "password": password},
                       **extra).status_code


# A low limit keeps these quick: each wrong password costs a full password hash.
@pytest.mark.django_db
@override_settings(AXES_FAILURE_LIMIT=3)
def test_the_right_password_works_again_after_the_cooloff(operator):
    client = Client()
    limit = settings.AXES_FAILURE_LIMIT
    assert [_login(client, "wrong") for _ in range(limit)][-1] == 429
    assert _login(client, "a-long-operator-password") == 429
    # the cool-off passes (the attempts are dated back rather than the test sleeping)
    AccessAttempt.objects.update(
        attempt_time=AccessAttempt.objects.get().attempt_time - settings.AXES_COOLOFF_TIME)
    assert _login(client, "a-long-operator-password") == 302


@pytest.mark.django_db
@override_settings(AXES_FAILURE_LIMIT=3)
def test_a_lockout_is_per_username_and_address(operator, django_user_model):
    django_user_model.objects.create_user("other", "", "another-long-password")
    guesser = Client(REMOTE_ADDR="10.0.0.66")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        _login(guesser, "wrong")
    assert _login(guesser, "a-long-operator-password") == 429
    # the operator at their own desk, and another user from the guesser's address, get in
    assert _login(Client(REMOTE_ADDR="10.0.0.7"), "a-long-operator-password") == 302
    assert guesser.post("/accounts/login/", {"username": "other",
                                             "password": "another-long-password"}).status_code == 302


@pytest.mark.django_db
@override_settings(AXES_FAILURE_LIMIT=3)
def test_a_successful_login_clears_the_failures(operator):
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _login(client, "wrong") == 200
    assert _login(client, "a-long-operator-password") == 302
    client.logout()
    assert _login(client, "wrong") == 200  # counting starts again


@pytest.mark.django_db
@override_settings(AXES_FAILURE_LIMIT=2)
def test_the_admin_login_is_throttled_too(admin_user):
    client = Client()
    for _ in range(2):
        client.post("/admin/login/", {"username": "boss", "password": "wrong"})
    response = client.post("/admin/login/", {"username": "boss",
                                             "password": "correct-horse-battery"})
    assert response.status_code == 429


@pytest.mark.django_db
@pytest.mark.parametrize("password, message", [
    ("password123", "This password is too common."),
    ("83749201938", "This password is entirely numeric."),
    ("operator1", "The password is too similar to the username."),
    ("short", "This password is too short."),
])
def test_weak_new_passwords_are_refused(operator, password, message):
    client = Client()
    client.force_login(operator)
    response = client.post("/accounts/password_change/", {
        "old_password": "a-long-operator-password", "new_password1": password,
        "new_password2": password})
    assert response.status_code == 200
    assert message in response.content.decode()
    operator.refresh_from_db()
    assert operator.check_password("a-long-operator-password")
