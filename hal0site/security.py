"""Security headers Django 5.2's SecurityMiddleware does not set, the basic ones for the
gateway's fast path (`slots.gateway.asgi`), whose responses skip Django's middleware, and
the websocket Origin check.

The policy string lives in settings (`CONTENT_SECURITY_POLICY`, with the reasoning).
"""

from __future__ import annotations

from functools import cache
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http.request import is_same_domain, split_domain_port, validate_host
from django.utils.deprecation import MiddlewareMixin


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    """Adds `Content-Security-Policy` to every response unless the view set its own.
    (MiddlewareMixin makes it work in sync and async stacks alike.)"""

    def process_response(self, request, response):
        policy = getattr(settings, "CONTENT_SECURITY_POLICY", "")
        if policy:
            response.headers.setdefault("Content-Security-Policy", policy)
        return response


# The gateway answers JSON, SSE and audio: nothing there should ever be framed, sniffed as
# HTML or run as a document, so its policy is the strictest one.
GATEWAY_CSP = "default-src 'none'; frame-ancestors 'none'"


@cache
def gateway_headers(secure: bool = False) -> tuple[tuple[str, str], ...]:
    """What SecurityMiddleware, XFrameOptionsMiddleware and the CSP middleware would add.
    A cache (one answer per `secure`, cleared when a test changes settings): it is asked on
    every gateway response."""
    headers = []
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append(("X-Content-Type-Options", "nosniff"))
    if settings.X_FRAME_OPTIONS:
        headers.append(("X-Frame-Options", settings.X_FRAME_OPTIONS))
    if settings.SECURE_REFERRER_POLICY:
        headers.append(("Referrer-Policy", settings.SECURE_REFERRER_POLICY))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append(("Cross-Origin-Opener-Policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY))
    headers.append(("Content-Security-Policy", GATEWAY_CSP))
    if secure and settings.SECURE_HSTS_SECONDS:
        hsts = f"max-age={settings.SECURE_HSTS_SECONDS}"
        if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
            hsts += "; includeSubDomains"
        if settings.SECURE_HSTS_PRELOAD:
            hsts += "; preload"
        headers.append(("Strict-Transport-Security", hsts))
    return tuple(headers)


@receiver(setting_changed)
def _settings_changed(**kwargs) -> None:
    gateway_headers.cache_clear()


# --- websockets ------------------------------------------------------------------------------
def _is_secure(scope: dict, headers: dict[str, str]) -> bool:
    """`request.is_secure()` for a websocket: the proxy's header when SECURE_PROXY_SSL_HEADER
    names one and it is present, else the socket's own scheme."""
    if settings.SECURE_PROXY_SSL_HEADER:
        meta_name, secure_value = settings.SECURE_PROXY_SSL_HEADER
        name = meta_name.removeprefix("HTTP_").replace("_", "-").lower()
        if name in headers:
            return headers[name].split(",", 1)[0].strip() == secure_value
    return scope.get("scheme") == "wss"


def websocket_origin_allowed(scope: dict) -> bool:
    """Is this websocket's Origin one CSRF would accept for a POST? The same rules as
    Django's CsrfViewMiddleware: exactly the page's own origin (scheme, host and port, the
    host in ALLOWED_HOSTS), or one of CSRF_TRUSTED_ORIGINS (`https://*.example.com` for
    subdomains). Channels' AllowedHostsOriginValidator compares the host name only, so
    http://localhost:3000 could open a socket with the operator's cookie."""
    headers = {name.decode("latin1").lower(): value.decode("latin1")
               for name, value in scope.get("headers", [])}
    origin = headers.get("origin")
    if not origin:
        return False
    host = headers.get("host", "")
    domain, _ = split_domain_port(host)
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:  # what Django's get_host() allows then
        allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]
    if domain and validate_host(domain, allowed_hosts):
        scheme = "https" if _is_secure(scope, headers) else "http"
        if origin == f"{scheme}://{host}":
            return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in trusted:
        return True
    parsed = urlsplit(origin)
    for pattern in (urlsplit(o) for o in trusted if "*" in o):
        if pattern.scheme == parsed.scheme and parsed.netloc and \
                is_same_domain(parsed.netloc, pattern.netloc.lstrip("*")):
            return True
    return False


class WebsocketOriginValidator:
    """ASGI middleware for the websocket stack: refuses (closes) a socket whose Origin
    `websocket_origin_allowed` rejects, before authentication or routing see it."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            raise ValueError("WebsocketOriginValidator only guards websocket connections")
        if websocket_origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)
