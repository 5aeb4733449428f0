"""The gateway's fast path: `/v1/...` served next to Django's ASGI handler, not through it.

Django's ASGIHandler runs every request in a fresh `ThreadSensitiveContext` and calls sync
code at least twice per request (the `request_started` receivers and `response.close()`
with `request_finished`): each request starts and joins a thread. On a 2-core box that
alone costs more than the whole bare Daphne + httpx passthrough (docs/benchmarks.md).
The gateway's views never need that thread (tokens and the routing table are cached; the
database is read on a miss, on asgiref's shared sync thread), so this module serves them
directly: it builds Django's own `ASGIRequest`, awaits the same async views that
`slots.gateway_urls` routes, and sends the response, cancelling the view (and with it the
upstream request) when the client disconnects.

Wire it in `hal0site/asgi.py`:  `"http": gateway_asgi.wrap(django_asgi_app)`.
Everything that is not a gateway path goes to Django unchanged; `/metrics` stays in
Django (it accepts a session login). Responses get the security headers Django's middleware
would have added (`hal0site.security.gateway_headers`); there is no http->https redirect
here: a client that sent its token over plain http has already sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile

from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponse

from hal0site.security import gateway_headers

log = logging.getLogger("hal0.gateway")

MODELS_PREFIX = "/v1/models/"
_views: dict | None = None
_cors = None


def handles(path: str) -> bool:
    """Every path under /v1/ is the gateway's (unknown ones answer OpenAI-shaped JSON), and
    so is /models, where a client whose base URL lacks its /v1 lands."""
    return path.startswith(("/v1/", "/models/")) or path in ("/v1", "/models")


def views() -> dict:
    global _views
    if _views is None:
        from . import gateway

        built = {f"/v1/{e}": gateway.gateway_view(e) for e in gateway.ENDPOINTS}
        built["/v1/models"] = gateway.models
        built["/v1/audio/voices"] = gateway.audio_voices
        built["/v1/audio/models"] = gateway.audio_models
        _views = built
    return _views


def cors():
    """django-cors-headers' middleware around the fast path's dispatch, when
    HAL0_CORS_ORIGINS allows any origin (the same settings as Django's stack); else None."""
    global _cors
    if _cors is None:
        if settings.HAL0_CORS_ORIGINS:
            from corsheaders.middleware import CorsMiddleware

            _cors = CorsMiddleware(_dispatch)
        else:
            _cors = False
    return _cors or None


class _Disconnected(Exception):
    pass


async def _read_body(receive) -> tempfile.SpooledTemporaryFile:
    body = tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE,
                                         mode="w+b")
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            body.close()
            raise _Disconnected
        body.write(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body.seek(0)
    return body


async def _listen_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _headers(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    headers = [(k.encode("latin1"), str(v).encode("latin1")) for k, v in response.items()]
    for cookie in response.cookies.values():
        headers.append((b"set-cookie", cookie.output(header="").strip().encode("latin1")))
    return headers


async def _send(response: HttpResponse, send, secure: bool = False) -> None:
    # Django's middleware never sees these responses: add the headers it would have.
    for name, value in gateway_headers(secure):
        response.headers.setdefault(name, value)
    if response.streaming:
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": _headers(response)})
        async with contextlib.aclosing(aiter(response)) as chunks:
            async for chunk in chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = response.content
    if not response.has_header("Content-Length"):
        response["Content-Length"] = str(len(body))
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": _headers(response)})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str, code: str) -> HttpResponse:
    from .gateway import openai_error

    return openai_error(status, message, code=code)


async def _dispatch(request):
    path = request.path_info
    table = views()
    if path.startswith(MODELS_PREFIX):
        return await table["/v1/models"](request, path[len(MODELS_PREFIX):])
    view = table.get(path)
    if view is None:
        from .gateway import not_served

        return await not_served(request, path.removeprefix("/v1").removeprefix("/"))
    return await view(request)


async def _call_view(request):
    try:
        request.get_host()  # ALLOWED_HOSTS, as Django's CommonMiddleware would check
    except DisallowedHost:
        return _error(400, "Invalid Host header.", "bad_host")
    middleware = cors()
    return await (middleware or _dispatch)(request)


async def _respond(request, send) -> None:
    await _send(await _call_view(request), send, secure=request.is_secure())


async def serve(scope, receive, send) -> None:
    """Serve one gateway request (an ASGI application for the gateway's paths)."""
    try:
        body = await _read_body(receive)
    except _Disconnected:
        return
    try:
        try:
            request = ASGIRequest(scope, body)
        except (UnicodeDecodeError, RequestDataTooBig):
            await _send(_error(400, "Bad request.", "bad_request"), send)
            return
        if "CONTENT_LENGTH" not in request.META:
            # A chunked upload (Open WebUI's recordings) has no Content-Length, and Django's
            # multipart parser reads a missing one as 0: an empty form. The whole body is
            # read by now, so its length is known.
            request.META["CONTENT_LENGTH"] = str(body.seek(0, 2))
            body.seek(0)
        started = []

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                started.append(True)
            await send(message)

        # Like Django's handler: a client that goes away cancels the view or the stream,
        # and with it the upstream request to lemond.
        work = asyncio.ensure_future(_respond(request, tracked_send))
        watch = asyncio.ensure_future(_listen_for_disconnect(receive))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, watch):
                if not task.done():
                    task.cancel()
            results = await asyncio.gather(work, watch, return_exceptions=True)
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, asyncio.CancelledError):
            log.error("gateway request failed: %s", request.path_info, exc_info=error)
            # A view or its response failed. Finish the response, or the client waits for
            # its own timeout: Daphne answers only for an app that raises itself, and has
            # no request timeout here.
            from .gateway import internal_error

            with contextlib.suppress(Exception):
                if not started:
                    await _send(internal_error(), send)
                else:
                    await send({"type": "http.response.body", "body": b"",
                                "more_body": False})
    finally:
        body.close()


def wrap(django_app):
    """An ASGI app: gateway paths served here, everything else by `django_app`."""

    async def app(scope, receive, send):
        if scope["type"] == "http" and handles(scope["path"]):
            await serve(scope, receive, send)
        else:
            await django_app(scope, receive, send)

    return app


def _application():
    from hal0site.asgi import application as django_application

    return wrap(django_application)


class _Lazy:
    """`daphne slots.gateway_asgi:application` (benchmarks, tests) before asgi.py wires it."""

    def __init__(self):
        self.app = None

    async def __call__(self, scope, receive, send):
        if self.app is None:
            self.app = _application()
        await self.app(scope, receive, send)


application = _Lazy()
