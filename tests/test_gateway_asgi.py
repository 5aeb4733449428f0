"""The gateway's ASGI fast path in-process: what it forwards, and how it answers when one of
its own views fails. The upstream here is a tiny loopback HTTP server that echoes what it
receives (the simulator does not echo request bodies); the gateway talks real HTTP to it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from asgiref.sync import async_to_sync

from slots import tokens
from slots.gateway import asgi as gateway_asgi
from slots.gateway import routes, views
from slots.models import Node, Slot, State


class Echo(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reply = json.dumps({"path": self.path, "content_type": self.headers["Content-Type"],
                            "body": body.decode("latin1")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def _call(method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request through gateway_asgi.serve; returns (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1"),
                         (b"content-length", str(len(body)).encode())]
             + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent: list[dict] = []
    request_done = asyncio.Event()

    async def receive():
        if not request_done.is_set():
            request_done.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(gateway_asgi.serve(scope, receive, send), 10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    # the response ended: a client would otherwise wait for its own timeout
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body"), sent
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), content


@pytest.mark.django_db(transaction=True)
def test_repeated_multipart_fields_reach_lemond_with_every_value(echo):
    node = Node.objects.create(name="echo", base_url=echo)
    Slot.objects.create(name="ears", capability="stt", device="cpu", model_name="Whisper-Tiny",
                        node=node, state=State.READY, loaded_model="Whisper-Tiny")
    routes.invalidate_routes()
    raw = tokens.create_token("t")[1]
    parts = [("model", "ears"), ("timestamp_granularities[]", "word"),
             ("timestamp_granularities[]", "segment")]
    form = b"".join(f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in parts)
    form += (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
             b"Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--b--\r\n")
    status, _, content = async_to_sync(_call)(
        "POST", "/v1/audio/transcriptions", form,
        {"Authorization": f"Bearer {raw}", "Content-Type": "multipart/form-data; boundary=b"})
    assert status == 200, content
    upstream = json.loads(content)
    assert upstream["path"] == "/v1/audio/transcriptions"
    forwarded = upstream["body"]
    assert forwarded.count('name="timestamp_granularities[]"') == 2
    assert "\r\n\r\nword\r\n" in forwarded and "\r\n\r\nsegment\r\n" in forwarded
    assert "\r\n\r\nWhisper-Tiny\r\n" in forwarded  # the slot's model, substituted
    assert 'filename="a.wav"' in forwarded and "RIFF....WAVE" in forwarded


@pytest.mark.django_db(transaction=True)
def test_a_failing_view_is_an_openai_500_not_a_hung_request(monkeypatch, caplog):
    async def broken(request, model_id=None):
        raise RuntimeError("database went away")

    monkeypatch.setitem(views.VIEWS, "/v1/models", broken)
    monkeypatch.setattr(logging.getLogger("hal0"), "propagate", True)  # into caplog
    status, headers, content = async_to_sync(_call)("GET", "/v1/models")
    assert status == 500
    assert headers[b"Content-Type"] == b"application/json", headers
    error = json.loads(content)["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "see its log" in error["message"]
    assert "database went away" in caplog.text  # the operator finds the cause in the log


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("failure", ["before the headers", "mid-stream"])
def test_a_response_that_fails_to_send_still_ends(monkeypatch, failure):
    """An error while sending (a view bug that returns no response, a stream that breaks)
    must still end the response: a 500 before the headers went out, the end of the body
    after."""
    from django.http import StreamingHttpResponse

    async def view(request, model_id=None):
        if failure == "before the headers":
            return None  # fails in _send, before http.response.start

        async def chunks():
            yield b"data: one\n\n"
            raise RuntimeError("upstream broke")

        return StreamingHttpResponse(chunks(), content_type="text/event-stream")

    monkeypatch.setitem(views.VIEWS, "/v1/models", view)
    status, _, content = async_to_sync(_call)("GET", "/v1/models")
    if failure == "before the headers":
        assert status == 500 and json.loads(content)["error"]["code"] == "internal_error"
    else:
        assert status == 200 and content == b"data: one\n\n"


# --- bodies: the token before the body, the cap under any ASGI server -------------------------

def _scope(path: str, headers: dict) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "root_path": "", "query_string": b"", "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "headers": [(b"host", b"127.0.0.1")]
            + [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


async def _call_endless(path: str, headers: dict, chunk: bytes = b""):
    """A client that sends its headers, then either nothing more (`chunk` empty: its body
    never comes) or `chunk` after `chunk` forever. Returns (status, error, receives)."""
    sent: list[dict] = []
    receives = [0]

    async def receive():
        receives[0] += 1
        if not chunk:
            await asyncio.sleep(3600)  # the body never arrives
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    # a hang is the failure this guards against: the old fast path waited for the body
    await asyncio.wait_for(gateway_asgi.serve(_scope(path, headers), receive, send), 10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(content)["error"], receives[0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Basic YTpi"])
def test_an_unauthenticated_body_is_never_read(authorization):
    """#14 Medium 2: a chunked POST without a valid token whose body never ends is answered
    401 from its headers; the body is not read at all (not even its first chunk)."""
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    if authorization:
        headers["Authorization"] = authorization
    for path in ("/v1/chat/completions", "/v1/audio/transcriptions", "/v1/models",
                 "/v1/nothing/here"):
        status, error, receives = async_to_sync(_call_endless)(path, headers)
        assert status in (401, 405), (path, status)  # /v1/models takes GET: 405 unread
        assert receives == 0, path
        if path != "/v1/models":
            assert (status, error["code"]) == (401, "invalid_api_key"), path


@pytest.mark.django_db(transaction=True)
def test_a_body_past_the_cap_is_413_under_any_asgi_server(settings):
    """Outside `serve`'s Daphne (uvicorn, hypercorn, …) the fast path bounds the body by
    the same caps: a declared length over it is refused unread, a chunked body as soon as
    it passes it, in OpenAI's error shape."""
    settings.HAL0_MAX_BODY_MB = 0.0625  # 64 KiB
    raw = tokens.create_token("t")[1]
    auth = {"Authorization": f"Bearer {raw}", "Content-Type": "application/json"}
    status, error, receives = async_to_sync(_call_endless)(
        "/v1/chat/completions", {**auth, "Content-Length": str(1_500_000_000)})
    assert (status, error["code"], receives) == (413, "request.too_large", 0)
    assert "HAL0_MAX_BODY_MB" in error["message"] and error["type"] == "invalid_request_error"
    status, error, receives = async_to_sync(_call_endless)(
        "/v1/embeddings", {**auth, "Transfer-Encoding": "chunked"}, chunk=b"x" * 4096)
    assert (status, error["code"]) == (413, "request.too_large")
    assert receives == 64 // 4 + 1  # read one chunk past the cap, then no more
    # uploads have their own, larger cap
    settings.HAL0_MAX_UPLOAD_MB = 0.125
    status, error, receives = async_to_sync(_call_endless)(
        "/v1/audio/transcriptions", {**auth, "Transfer-Encoding": "chunked"}, chunk=b"x" * 4096)
    assert (status, receives) == (413, 128 // 4 + 1)


@pytest.mark.django_db(transaction=True)
def test_the_gateway_view_reads_at_most_the_cap_through_django_too(settings, client):
    """Through Django's own handler (runserver, or Django's ASGI app without the fast path)
    the gateway's `request.read()` used to take any body whole, past
    DATA_UPLOAD_MAX_MEMORY_SIZE: it is bounded by the same cap."""
    settings.HAL0_MAX_BODY_MB = 0.0625
    settings.HAL0_MAX_UPLOAD_MB = 0.0625
    raw = tokens.create_token("t")[1]
    body = json.dumps({"model": "chat", "messages": [], "pad": "x" * 70_000})
    response = client.post("/v1/chat/completions", body, content_type="application/json",
                           headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request.too_large"
    audio = client.post("/v1/audio/transcriptions", {"model": "stt", "file": io.BytesIO(
        b"\0" * 70_000)}, headers={"Authorization": f"Bearer {raw}"})
    assert audio.status_code == 413 and audio.json()["error"]["code"] == "request.too_large"


@pytest.mark.django_db(transaction=True)
def test_requests_that_find_the_route_cache_expired_share_one_load(monkeypatch):
    node = Node.objects.create(name="n", base_url="http://127.0.0.1:9")
    Slot.objects.create(name="talk", capability="chat", device="cpu", model_name="M", node=node)
    loads = []
    load = routes._load_routes
    monkeypatch.setattr(routes, "_load_routes", lambda: (loads.append(1), load())[1])
    routes.invalidate_routes()

    async def many():
        first = await asyncio.gather(*(routes.route_table() for _ in range(16)))
        routes.invalidate_routes()  # a change: the next request loads afresh
        return first, await routes.route_table()

    first, after = async_to_sync(many)()
    assert len(loads) == 2  # 16 at once: one load; after the invalidation: one more
    assert all(table is first[0] for table in first) and "talk" in after.by_name


@pytest.mark.django_db(transaction=True)
def test_the_fast_path_verifies_the_token_once_per_request(echo, monkeypatch):
    node = Node.objects.create(name="echo", base_url=echo)
    Slot.objects.create(name="talk", capability="chat", device="cpu", model_name="M",
                        node=node, state=State.READY, loaded_model="M")
    routes.invalidate_routes()
    raw = tokens.create_token("once")[1]
    hashed = []
    hash_token = tokens.hash_token
    monkeypatch.setattr(tokens, "hash_token", lambda value: (hashed.append(value),
                                                             hash_token(value))[1])
    status, _, content = async_to_sync(_call)(
        "POST", "/v1/chat/completions", json.dumps({"model": "talk"}).encode(),
        {"Authorization": f"Bearer {raw}", "Content-Type": "application/json"})
    assert status == 200, content
    assert hashed == [raw]
