"""The gateway's fast path: `/v1/...` served next to Django's ASGI handler, not through it.

Django's ASGIHandler runs every request in a fresh `ThreadSensitiveContext` and calls sync
code at least twice per request (the `request_started` receivers and `response.close()`
with `request_finished`): each request starts and joins a thread. On a 2-core box that
alone costs more than the whole bare Daphne + httpx passthrough (docs/benchmarks.md).
The gateway's views never need that thread (tokens and the routing table are cached; the
database is read on a miss, on asgiref's shared sync thread), so this module serves them
directly: it builds Django's own `ASGIRequest`, awaits the same async views that
`slots.gateway.views` routes, and sends the response, cancelling the view (and with it the
upstream request) when the client disconnects.

`hal0site/asgi.py` wires it: `"http": wrap(django_asgi_app, headers=gateway_headers)`.
Everything that is not a gateway path goes to Django unchanged; `/metrics` stays in
Django (it accepts a session login).

Every gateway view needs a bearer token, so a request without a valid one is answered
(401, by its view) from its headers alone: its body is never read. Other bodies are read
up to the path's cap (`endpoints.body_cap`: HAL0_MAX_BODY_MB, HAL0_MAX_UPLOAD_MB for
uploads) and answered 413 as soon as they pass it, under any ASGI server. (Under `serve`,
Daphne has refused an oversized body before this runs: hal0site.bodylimit.) Responses get the security headers Django's
middleware would have added (`headers(secure)`, passed in by the site); there is no
http->https redirect here: a client that sent its token over plain http has already sent
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterable
from functools import cache

from corsheaders.middleware import CorsMiddleware
from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponse

from .. import tokens
from . import views
from .endpoints import (
    MODELS_PREFIX,
    ROOT_MODELS_PREFIX,
    body_cap,
    handles,
    too_large_message,
)
from .proxy import VERIFIED, bearer_token, internal_error, openai_error

log = logging.getLogger("hal0.gateway")

Headers = Callable[[bool], Iterable[tuple[str, str]]]  # secure -> (name, value) pairs


@cache
def cors() -> CorsMiddleware | None:
    """django-cors-headers' middleware around the fast path's dispatch, when
    HAL0_CORS_ORIGINS allows any origin (the same settings as Django's stack); else None.
    Built once per process (a cache)."""
    return CorsMiddleware(_dispatch) if settings.HAL0_CORS_ORIGINS else None


class _Disconnected(Exception):
    pass


class _TooLarge(Exception):
    def __init__(self, cap: int):
        super().__init__(cap)
        self.cap = cap


def _header(scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin1")
    return ""


async def _read_body(scope, receive) -> tempfile.SpooledTemporaryFile:
    """The request body, at most the path's cap: a declared length over it is refused
    before anything is read, a chunked body as soon as it grows past it (`_TooLarge`)."""
    cap = body_cap(scope["path"])
    declared = _header(scope, b"content-length")
    if declared.strip().isdigit() and int(declared) > cap:
        raise _TooLarge(cap)
    body = tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE,
                                         mode="w+b")
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            body.close()
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            body.close()
            raise _TooLarge(cap)
        body.write(chunk)
        if not message.get("more_body", False):
            break
    body.seek(0)
    return body


async def _verify(scope) -> tuple[tokens.Principal | None, str] | None:
    """The request's bearer token, verified (`tokens.averify`), or None when that failed
    (the database, on a cache miss: the view verifies again, fails and says so). A cache
    hit never leaves the event loop. The view takes this answer over from the request
    (`proxy.VERIFIED`) instead of hashing and looking the token up a second time."""
    try:
        return await tokens.averify(bearer_token(_header(scope, b"authorization")))
    except Exception:
        return None


def _headers(response: HttpResponse, extra: Iterable[tuple[str, str]] = (),
             length: int | None = None) -> list[tuple[bytes, bytes]]:
    """The response's headers as ASGI sends them, then those of `extra` (the security
    headers) it has not set itself, and `Content-Length: length` unless it has one. Built
    here rather than set on the response first: Django's header mapping checks and
    converts every name and value it is given, which took longer than the sending."""
    headers = [(k.encode("latin1"), str(v).encode("latin1")) for k, v in response.items()]
    names = {name.lower() for name, _ in headers}
    for name, value in extra:
        key = name.encode("latin1")
        if key.lower() not in names:
            headers.append((key, value.encode("latin1")))
    if length is not None and b"content-length" not in names:
        headers.append((b"Content-Length", str(length).encode("latin1")))
    for cookie in response.cookies.values():
        headers.append((b"set-cookie", cookie.output(header="").strip().encode("latin1")))
    return headers


async def _send(response: HttpResponse, send, secure: bool = False,
                headers: Headers | None = None) -> None:
    # Django's middleware never sees these responses: add the headers it would have.
    extra = headers(secure) if headers is not None else ()
    if response.streaming:
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": _headers(response, extra)})
        async with contextlib.aclosing(aiter(response)) as chunks:  # type: ignore[arg-type,var-annotated]
            async for chunk in chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = response.content
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": _headers(response, extra, len(body))})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str, code: str) -> HttpResponse:
    return openai_error(status, message, code=code)


async def _dispatch(request):
    path = request.path_info
    view = views.VIEWS.get(path)
    if view is not None:
        return await view(request)
    for prefix in (MODELS_PREFIX, ROOT_MODELS_PREFIX):  # /v1/models/<id>, /models/<id>
        if path.startswith(prefix):
            return await views.models(request, path[len(prefix):])
    return await views.not_served(request, path.removeprefix("/v1").removeprefix("/"))


async def _call_view(request):
    try:
        request.get_host()  # ALLOWED_HOSTS, as Django's CommonMiddleware would check
    except DisallowedHost:
        return _error(400, "Invalid Host header.", "bad_host")
    middleware = cors()
    # CorsMiddleware is async-capable around an async handler (django-stubs type it sync)
    return await (middleware or _dispatch)(request)  # type: ignore[misc]


async def _respond(request, send, headers: Headers | None) -> None:
    await _send(await _call_view(request), send, secure=request.is_secure(), headers=headers)


async def serve(scope, receive, send, headers: Headers | None = None) -> None:
    """Serve one gateway request (an ASGI application for the gateway's paths)."""
    verified = await _verify(scope)
    if verified is None or verified[0] is None:
        # its view answers 401 (405, or a CORS preflight) from the headers: the body,
        # however large or slow, is never read
        request = await _request(scope, io.BytesIO(), send, headers)
        if request is not None:
            await _run(request, send, headers)
        return
    try:
        body = await _read_body(scope, receive)
    except _Disconnected:
        return
    except _TooLarge as exc:
        await _send(_error(413, too_large_message(exc.cap), "request.too_large"), send,
                    headers=headers)
        return
    try:
        request = await _request(scope, body, send, headers)
        if request is None:
            return
        setattr(request, VERIFIED, verified)
        if "CONTENT_LENGTH" not in request.META:
            # A chunked upload (Open WebUI's recordings) has no Content-Length, and Django's
            # multipart parser reads a missing one as 0: an empty form. The whole body is
            # read by now, so its length is known.
            request.META["CONTENT_LENGTH"] = str(body.seek(0, 2))
            body.seek(0)
        await _run(request, send, headers, receive)
    finally:
        body.close()


async def _request(scope, body, send, headers: Headers | None) -> ASGIRequest | None:
    """Django's request for the scope, or None after answering 400 for a broken one."""
    try:
        return ASGIRequest(scope, body)
    except (UnicodeDecodeError, RequestDataTooBig):
        await _send(_error(400, "Bad request.", "bad_request"), send, headers=headers)
        return None


async def _cancel_on_disconnect(receive, task: asyncio.Task) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()


async def _run(request, send, headers: Headers | None, receive=None) -> None:
    """Run the view and send its response. With `receive` (the body has been read), a
    client that goes away cancels the view or the stream, and with it the upstream
    request to lemond, like Django's handler.

    The view runs in the server's task for the request, not in one of its own: a task
    more per request, and waiting on both, took a measurable share of the fast path's
    CPU (docs/benchmarks.md). Only the disconnect listener is a task; it cancels this
    one, and a cancellation it did not cause (the server shutting down) goes on up."""
    started = []

    async def tracked_send(message):
        if message["type"] == "http.response.start":
            started.append(True)
        await send(message)

    this = asyncio.current_task()
    listener = None
    if receive is not None and this is not None:
        listener = asyncio.ensure_future(_cancel_on_disconnect(receive, this))
    try:
        await _respond(request, tracked_send, headers)
    except asyncio.CancelledError:
        if not _disconnected(listener):
            raise
        # the client left: nothing to answer
    except Exception as error:
        log.error("gateway request failed: %s", request.path_info, exc_info=error)
        # A view or its response failed. Finish the response, or the client waits for
        # its own timeout: Daphne answers only for an app that raises itself, and has
        # no request timeout here.
        with contextlib.suppress(Exception):
            if not started:
                await _send(internal_error(), send, headers=headers)
            else:
                await send({"type": "http.response.body", "body": b"",
                            "more_body": False})
    finally:
        if listener is not None:
            if not listener.done():
                listener.cancel()
            elif _disconnected(listener):
                this.uncancel()  # type: ignore[union-attr]  # its cancel has been delivered


def _disconnected(listener: asyncio.Task | None) -> bool:
    """Whether the disconnect listener has cancelled the request's task."""
    if listener is None or not listener.done() or listener.cancelled():
        return False
    return listener.exception() is None  # (a failed receive is retrieved here, not logged)


def wrap(django_app, *, headers: Headers | None = None):
    """An ASGI app: gateway paths served here, everything else by `django_app`; `headers`
    gives the security headers the site's middleware would add (secure -> pairs)."""

    async def app(scope, receive, send):
        if scope["type"] == "http" and handles(scope["path"]):
            await serve(scope, receive, send, headers)
        else:
            await django_app(scope, receive, send)

    return app
