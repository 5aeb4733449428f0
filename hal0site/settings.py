"""hal0 settings: everything comes from the environment (twelve-factor).

The embedded defaults run on a fresh machine with nothing else installed: SQLite under
`var/`, the in-memory channel layer, lemond on 127.0.0.1:13305. Production (HAL0_DEBUG
unset or false and not the demo) refuses to start without HAL0_SECRET_KEY, or with one
shorter than 50 characters.
"""

import os
import secrets
import sys
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("HAL0_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None


TESTING = "pytest" in sys.modules or (len(sys.argv) > 1 and sys.argv[1] == "test")
DEBUG = env_bool("HAL0_DEBUG", default=False)
# Production is declared by saying HAL0_DEBUG=0 (the installer's env file does). Left
# unset, hal0 runs as the embedded demo: same code, but it may invent its own secret.
PRODUCTION = os.environ.get("HAL0_DEBUG", "") != "" and not DEBUG


def _demo_secret_key() -> str:
    """A random per-checkout key kept in var/, so a demo's sessions survive restarts
    without anyone shipping a well-known key."""
    path = VAR_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race; use its key
            return path.read_text().strip()
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        return key


SECRET_KEY = os.environ.get("HAL0_SECRET_KEY", "")
if not SECRET_KEY:
    if PRODUCTION:
        raise ImproperlyConfigured(
            "HAL0_SECRET_KEY is not set and HAL0_DEBUG=0 says this is production. Set it, "
            "e.g. HAL0_SECRET_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(50))')"
        )
    SECRET_KEY = _demo_secret_key()
# Django's own deploy check wants 50 characters; a short key (HAL0_SECRET_KEY=abc) signs
# sessions and password-reset links that can be forged offline, so production refuses it.
MIN_SECRET_KEY_LENGTH = 50
if PRODUCTION and len(SECRET_KEY) < MIN_SECRET_KEY_LENGTH:
    raise ImproperlyConfigured(
        f"HAL0_SECRET_KEY is {len(SECRET_KEY)} characters long; production needs at least "
        f"{MIN_SECRET_KEY_LENGTH}. Generate one: "
        "python -c 'import secrets; print(secrets.token_urlsafe(50))'"
    )

ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get("HAL0_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")
    if h.strip()
]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("HAL0_CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "template_partials",
    "hal0site",
    "providers",
    "slots",
    "installer",
    "axes",
]
# Daphne's app only replaces `runserver` (hal0 runs under `manage.py serve`, which starts
# Daphne itself), and importing it installs Twisted's reactor with TLS: ~0.5 s of CPU on
# every management command, the tests' hundreds of them included.
if sys.argv[1:2] == ["runserver"]:
    INSTALLED_APPS.insert(0, "daphne")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "slots.api.JsonErrorsMiddleware",  # /api/* answers JSON whatever went wrong inside
    "hal0site.security.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "hal0site.urls"
ASGI_APPLICATION = "hal0site.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'hal0.sqlite3'}",
        conn_max_age=0,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several async tasks (reconciler, gateway, views) share one SQLite file: wait for
    # the write lock instead of failing with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].setdefault("timeout", 20)
    DATABASES["default"]["OPTIONS"].setdefault(
        "init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
    )
    DATABASES["default"]["OPTIONS"].setdefault("transaction_mode", "IMMEDIATE")
    # A file (not :memory:) so worker threads in tests share it with normal locking; one per
    # test process so two test runs in one checkout don't trample each other.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-hal0-{os.getpid()}.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
# several hal0 installs (or test runs) may share one Redis: channel names and the gateway's
# rate-limit windows start with this
HAL0_REDIS_PREFIX = os.environ.get("HAL0_REDIS_PREFIX", "asgi")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py >= 6 reads with a 5 s socket timeout by default, the same 5 s a
            # consumer blocks in BZPOPMIN waiting for a message: an idle dashboard socket
            # then died with "Timeout reading from redis" (1011). Read longer than that.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
                       "prefix": HAL0_REDIS_PREFIX},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Login throttling (django-axes): after HAL0_LOGIN_FAILURE_LIMIT wrong passwords for one
# username from one address, that pair is refused (429, even with the right password) for
# HAL0_LOGIN_COOLOFF_S seconds. Attempts live in the database (AccessAttempt), so every
# hal0 process on SQLite or PostgreSQL shares them. Admins see and clear lockouts in
# /admin/axes/ or with `manage.py axes_reset`.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = int(env_float("HAL0_LOGIN_FAILURE_LIMIT", 10))
AXES_COOLOFF_TIME = timedelta(seconds=env_float("HAL0_LOGIN_COOLOFF_S", 900.0))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_HTTP_RESPONSE_CODE = 429
AXES_VERBOSE = False  # its own startup banner; failures are still logged at WARNING
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("HAL0_TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.environ.get("HAL0_STATIC_ROOT", VAR_DIR / "staticfiles"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if PRODUCTION
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}
# The demo serves straight from static/; production serves what `collectstatic` gathered.
WHITENOISE_USE_FINDERS = not PRODUCTION
if not PRODUCTION:
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# Security headers: on by default; HTTPS-only ones follow HAL0_HTTPS because most
# installs are plain HTTP on a LAN behind no proxy.
HTTPS = env_bool("HAL0_HTTPS", default=False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS and env_bool("HAL0_SSL_REDIRECT", default=True)
SECURE_HSTS_SECONDS = 31536000 if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
# `check --deploy` warns about HSTS (W004), the https redirect (W008) and Secure cookies
# (W012, W016). Over plain HTTP on a LAN (HAL0_HTTPS=0, the home-install default) those
# settings cannot be on: a Secure cookie never comes back over http, so nobody could log in.
# They are silenced exactly then, and nothing else is; docs/operations.md recommends TLS at a
# reverse proxy + HAL0_HTTPS=1, where all four are on and the check is clean without this.
# With HAL0_HTTPS=1 HAL0_SSL_REDIRECT=0 the proxy itself redirects http to https.
if not HTTPS:
    SILENCED_SYSTEM_CHECKS = ["security.W004", "security.W008", "security.W012", "security.W016"]
elif not SECURE_SSL_REDIRECT:
    SILENCED_SYSTEM_CHECKS = ["security.W008"]
# Served on every Django response (hal0site.security). Scripts only from our own static
# files (htmx runs with allowEval=false, see base.html); `<style>` only from static files,
# but style *attributes* are allowed (a card group's `--cards` width, the admin's state
# badges): with img-src/font-src/connect-src limited to 'self' an injected style attribute
# cannot reach another origin. connect-src 'self' covers the same-origin ws:/wss: socket.
# media-src blob: plays the "Try it" panel's speech, which arrives by POST (static/js/try.js).
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "style-src-attr 'unsafe-inline'",
    "img-src 'self' data:",
    "media-src 'self' blob:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

# --- lemond -------------------------------------------------------------------
HAL0_LEMONADE_URL = os.environ.get("HAL0_LEMONADE_URL", "http://127.0.0.1:13305").rstrip("/")
HAL0_LEMONADE_API_KEY = os.environ.get("HAL0_LEMONADE_API_KEY", "")
HAL0_LEMONADE_ADMIN_API_KEY = os.environ.get("HAL0_LEMONADE_ADMIN_API_KEY", "")
# Plain calls are quick; loads and pulls can take minutes (download + lemond's own
# global_timeout of 300-600 s), so they get their own budget.
HAL0_LEMONADE_TIMEOUT = env_float("HAL0_LEMONADE_TIMEOUT", 5.0)
HAL0_LEMONADE_LOAD_TIMEOUT = env_float("HAL0_LEMONADE_LOAD_TIMEOUT", 900.0)

# Reconciler poll periods (seconds): fast while a dashboard is open, slow otherwise.
HAL0_POLL_ACTIVE_S = env_float("HAL0_POLL_ACTIVE_S", 1.0)
HAL0_POLL_IDLE_S = env_float("HAL0_POLL_IDLE_S", 10.0)

LOG_LEVEL = os.environ.get("HAL0_LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "hal0": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "django": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}


# --- gateway ------------------------------------------------------------------
# How long a gateway request waits for its slot to load before answering 503 + Retry-After
# (the load itself goes on; the dashboard shows it).
HAL0_GATEWAY_LOAD_WAIT_S = env_float("HAL0_GATEWAY_LOAD_WAIT_S", 300.0)
HAL0_GATEWAY_CONNECT_TIMEOUT_S = env_float("HAL0_GATEWAY_CONNECT_TIMEOUT_S", 5.0)
# Between two bytes from lemond (a long prefill sends nothing for a while).
HAL0_GATEWAY_READ_TIMEOUT_S = env_float("HAL0_GATEWAY_READ_TIMEOUT_S", 600.0)
HAL0_GATEWAY_RETRY_AFTER_S = int(env_float("HAL0_GATEWAY_RETRY_AFTER_S", 5))
# The slot routing table is cached this long per process (edits show up within it).
HAL0_GATEWAY_ROUTE_CACHE_S = env_float("HAL0_GATEWAY_ROUTE_CACHE_S", 1.0)
# GET /models/sse sends a `: ping` comment after this long without an event (proxies and
# clients keep the stream open; a revoked key's stream ends at the next one).
HAL0_GATEWAY_SSE_PING_S = max(0.1, env_float("HAL0_GATEWAY_SSE_PING_S", 15.0))
# A slot goes serving -> ready this long after its last in-flight request ends, so
# back-to-back requests do not write the state twice each.
HAL0_SERVING_LINGER_S = env_float("HAL0_SERVING_LINGER_S", 0.5)
# With several gateway processes: a process's "I am serving this slot" claim lives this
# long unless renewed (every third of it), so one that died mid-request stops holding
# its slots at serving after this.
HAL0_SERVING_CLAIM_TTL_S = env_float("HAL0_SERVING_CLAIM_TTL_S", 30.0)
# On SIGTERM, `serve` and `reconcile` wait this long for actions still waiting on lemond
# (a load can take minutes); the rest are recorded as interrupted and the process exits
# without them (lemond finishes them; the next poll adopts what got loaded).
HAL0_SHUTDOWN_GRACE_S = env_float("HAL0_SHUTDOWN_GRACE_S", 5.0)
# Verified API tokens are cached this long: revocation elsewhere takes effect within it.
HAL0_TOKEN_CACHE_S = env_float("HAL0_TOKEN_CACHE_S", 10.0)
# Request metrics: kept this many hours, written in batches every few seconds.
HAL0_METRICS_RETENTION_H = env_float("HAL0_METRICS_RETENTION_H", 24.0)
HAL0_METRICS_FLUSH_S = env_float("HAL0_METRICS_FLUSH_S", 0.5)


def _model_aliases() -> dict[str, str]:
    # a cycle breaker: settings load before any app; slots.aliases is plain Python
    from slots import aliases  # noqa: PLC0415

    try:
        return aliases.parse(os.environ.get("HAL0_MODEL_ALIASES"))
    except ValueError as exc:
        raise ImproperlyConfigured(f"HAL0_MODEL_ALIASES: {exc}") from None


# OpenAI's model names (gpt-4o-mini, whisper-1, tts-1, …) -> a slot or a capability
# (slots/aliases.py has the default map and the syntax).
HAL0_MODEL_ALIASES = _model_aliases()

# CORS for browser-side OpenAI clients (Open WebUI's Direct Connections, in-browser chat
# UIs): off unless HAL0_CORS_ORIGINS lists origins (`*` = any), and only for the gateway's
# paths. Credentials are never allowed: the gateway takes bearer tokens, and a cookie must
# never carry a dashboard session across origins.
HAL0_CORS_ORIGINS = [o.strip() for o in os.environ.get("HAL0_CORS_ORIGINS", "").split(",")
                     if o.strip()]
CORS_ALLOW_ALL_ORIGINS = "*" in HAL0_CORS_ORIGINS
CORS_ALLOWED_ORIGINS = [o for o in HAL0_CORS_ORIGINS if o != "*"]
CORS_URLS_REGEX = r"^/(v1|models)(/.*)?$"
CORS_ALLOW_CREDENTIALS = False
CORS_EXPOSE_HEADERS = ["Retry-After"]
if HAL0_CORS_ORIGINS:
    INSTALLED_APPS.append("corsheaders")  # its system checks reject a malformed origin
    MIDDLEWARE.insert(0, "corsheaders.middleware.CorsMiddleware")

# --- dashboard and reconciler --------------------------------------------------
# (HAL0_POLL_ACTIVE_S / HAL0_POLL_IDLE_S above set how often the reconciler polls.)
# A node's whole poll (health + stats) must answer within this, or it counts as unreachable.
HAL0_RECONCILE_TIMEOUT_S = env_float("HAL0_RECONCILE_TIMEOUT_S", 3.0)
# CPU/RAM/VRAM and tokens/s are read at most this often (health is read every poll).
HAL0_STATS_EVERY_S = env_float("HAL0_STATS_EVERY_S", 5.0)
# lemond moves a model's last_use on every request; hal0 writes it (and a node's last_seen)
# only when it moved by more than this, so a busy box is not a database write per poll.
HAL0_OBSERVE_RESOLUTION_S = env_float("HAL0_OBSERVE_RESOLUTION_S", 15.0)
# With several reconcilers, one holds each node's lease; a dead holder's lease is taken over
# after this many seconds (docs/scaleout.md).
HAL0_LEASE_TTL_S = env_float("HAL0_LEASE_TTL_S", 10.0)
# Reloading an evicted keep-loaded slot backs off from this, doubling up to the max.
HAL0_RESTORE_BACKOFF_S = env_float("HAL0_RESTORE_BACKOFF_S", 5.0)
HAL0_RESTORE_BACKOFF_MAX_S = env_float("HAL0_RESTORE_BACKOFF_MAX_S", 300.0)
# Worker threads for actions started from the dashboard (they return before the load ends).
HAL0_BACKGROUND_WORKERS = int(env_float("HAL0_BACKGROUND_WORKERS", 4))
# Reads the pages make from lemond (model picker, raw model entry) give up after this.
HAL0_PAGE_LEMOND_TIMEOUT_S = env_float("HAL0_PAGE_LEMOND_TIMEOUT_S", 3.0)
# Request bodies are refused (413) past these sizes before they are read (hal0site.bodylimit):
# every request, and speech-to-text uploads (/v1/audio/transcriptions).
HAL0_MAX_BODY_MB = env_float("HAL0_MAX_BODY_MB", 32.0)
HAL0_MAX_UPLOAD_MB = env_float("HAL0_MAX_UPLOAD_MB", 200.0)
# At most this many slots (creations and imports refuse more): 20,000 imported slots made a
# 21.7 MB dashboard that took 12 s to render.
HAL0_MAX_SLOTS = int(env_float("HAL0_MAX_SLOTS", 200))
