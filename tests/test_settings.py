"""Settings come from the environment with embedded defaults; production is loud."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings_in(env: dict, tmp_path, expr: str = "") -> subprocess.CompletedProcess:
    code = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
            "'hal0site.settings'); django.setup(); from django.conf import settings as s; "
            f"print(repr(({expr or repr('ok')})))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HAL0_", "DATABASE_URL",
                                                                      "REDIS_URL"))}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**clean, "HAL0_VAR_DIR": str(tmp_path), **env})


@pytest.mark.e2e
def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    proc = settings_in({"HAL0_DEBUG": "0"}, tmp_path)
    assert proc.returncode != 0
    assert "HAL0_SECRET_KEY is not set" in proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("key", ["abc", "x" * 49])
def test_production_refuses_a_short_secret_key(tmp_path, key):
    proc = settings_in({"HAL0_DEBUG": "0", "HAL0_SECRET_KEY": key}, tmp_path)
    assert proc.returncode != 0
    assert f"HAL0_SECRET_KEY is {len(key)} characters long; production needs at least 50" \
        in proc.stderr


@pytest.mark.e2e
def test_a_short_secret_key_is_fine_for_the_demo(tmp_path):
    proc = settings_in({"HAL0_SECRET_KEY": "abc"}, tmp_path, "s.SECRET_KEY")
    assert proc.stdout.strip() == "'abc'", proc.stderr


@pytest.mark.e2e
def test_production_with_a_key(tmp_path):
    proc = settings_in({"HAL0_DEBUG": "0", "HAL0_SECRET_KEY": "x" * 50}, tmp_path,
                       "s.DEBUG, s.SECRET_KEY == 'x' * 50, s.PRODUCTION")
    assert proc.stdout.strip() == "(False, True, True)", proc.stderr


@pytest.mark.e2e
def test_demo_defaults(tmp_path):
    proc = settings_in({}, tmp_path, "s.DATABASES['default']['ENGINE'], "
                       "s.CHANNEL_LAYERS['default']['BACKEND'], s.HAL0_LEMONADE_URL, s.DEBUG")
    assert proc.stdout.strip() == ("('django.db.backends.sqlite3', "
                                   "'channels.layers.InMemoryChannelLayer', "
                                   "'http://127.0.0.1:13305', False)"), proc.stderr
    key = (tmp_path / "secret_key").read_text()
    assert len(key) > 40
    assert oct((tmp_path / "secret_key").stat().st_mode & 0o777) == "0o600"
    # the same key on the next start: sessions survive restarts
    again = settings_in({}, tmp_path, "s.SECRET_KEY")
    assert again.stdout.strip() == repr(key)


@pytest.mark.e2e
def test_database_and_redis_urls(tmp_path):
    proc = settings_in({"DATABASE_URL": "postgres://hal0@127.0.0.1:5432/test",
                        "REDIS_URL": "redis://127.0.0.1:6379/0",
                        "HAL0_LEMONADE_URL": "http://10.0.0.5:13305/",
                        "HAL0_REDIS_PREFIX": "hal0-box2"}, tmp_path,
                       "s.DATABASES['default']['ENGINE'], s.CHANNEL_LAYERS['default']['BACKEND'],"
                       " s.HAL0_LEMONADE_URL, s.CHANNEL_LAYERS['default']['CONFIG']['prefix']")
    assert proc.stdout.strip() == ("('django.db.backends.postgresql', "
                                   "'channels_redis.core.RedisChannelLayer', "
                                   "'http://10.0.0.5:13305', 'hal0-box2')"), proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("value", ["maybe", "2"])
def test_bad_boolean_is_named(tmp_path, value):
    proc = settings_in({"HAL0_DEBUG": value}, tmp_path)
    assert proc.returncode != 0 and f"HAL0_DEBUG={value!r} is not a boolean" in proc.stderr


def test_asgi_routes_websockets_through_auth_and_origin_checks():
    from hal0site.asgi import application
    from hal0site.security import WebsocketOriginValidator

    ws = application.application_mapping["websocket"]
    assert isinstance(ws, WebsocketOriginValidator)
