"""The gateway's upstream pool with its cheaper idle-connection check (slots.gateway.pool):
it still notices a connection lemond has closed, and the gateway's client uses it."""

from __future__ import annotations

import asyncio
import logging
import socket

import httpx
from asgiref.sync import async_to_sync

from slots.gateway import pool, proxy

REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def test_a_socket_is_readable_once_the_peer_sent_or_closed():
    ours, theirs = socket.socketpair()
    try:
        assert not pool.readable(ours)  # idle: a pooled connection stays in the pool
        theirs.sendall(b"x")
        assert pool.readable(ours)
        ours.recv(1)
        theirs.close()
        assert pool.readable(ours)  # closed by the peer: the pool drops it
    finally:
        ours.close()
    assert pool.readable(ours)  # gone altogether counts as closed
    assert pool.readable(None)


async def _two_requests_across_a_server_close() -> list[int]:
    """Two requests on one client; the server closes the kept-alive connection between
    them without saying so (no `Connection: close`), as a restarted lemond does."""
    connections: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(REPLY)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # the connection stays pooled on the client's side

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = pool.wrap(httpx.AsyncHTTPTransport(trust_env=False))
    statuses = []
    async with server, httpx.AsyncClient(transport=transport, trust_env=False) as client:
        for _ in range(2):
            statuses.append((await client.get(f"http://127.0.0.1:{port}/")).status_code)
            await asyncio.sleep(0.3)  # the server has closed its side by now
    assert len(connections) == 2  # the closed connection was not reused
    return statuses


def test_a_connection_the_server_closed_is_not_reused():
    assert async_to_sync(_two_requests_across_a_server_close)() == [200, 200]


def test_the_gateway_client_checks_its_idle_connections_cheaply():
    async def backend():
        transport = proxy.http_client()._transport
        return type(transport._pool._network_backend)  # type: ignore[attr-defined]

    assert async_to_sync(backend)() is pool._Backend


async def _after_a_burst(requests: int, keepalive: int, inspect) -> tuple[list[int], object]:
    """`requests` at once through a wrapped transport keeping `keepalive` idle connections,
    against a server that holds each answer until all have arrived (so the pool needs a
    connection per request), then one more request (a walk of the pool, as the next
    gateway request makes); returns the statuses and `inspect(pool)`, called before the
    client closes."""
    arrived = asyncio.Event()
    waiting = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                waiting.append(writer)
                if len(waiting) >= requests:
                    arrived.set()
                await arrived.wait()
                writer.write(REPLY)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = pool.wrap(httpx.AsyncHTTPTransport(
        trust_env=False, limits=httpx.Limits(max_connections=64,
                                             max_keepalive_connections=keepalive)))
    async with server, httpx.AsyncClient(transport=transport, trust_env=False) as client:
        answers = await asyncio.gather(*(client.get(f"http://127.0.0.1:{port}/")
                                         for _ in range(requests)))
        answers.append(await client.get(f"http://127.0.0.1:{port}/"))
        return [a.status_code for a in answers], inspect(transport._pool)  # type: ignore[attr-defined]


def test_the_pool_keeps_httpcores_keepalive_limit():
    statuses, kept = async_to_sync(_after_a_burst)(
        8, 3, lambda p: (type(p), len(p.connections)))
    assert statuses == [200] * 9
    # httpcore closes idle connections past the limit: 8 were open, at most 3 stay
    assert kept[0] is pool._Pool and kept[1] <= 3


def test_the_pools_walk_asks_each_connection_once_whether_it_is_idle(monkeypatch):
    """httpcore 1.0 counts the pool's connections once per idle connection, calling
    is_idle() on every one: n² calls per walk. The gateway's pool walks in n."""
    calls = []

    def walk(kept) -> int:
        cls = type(kept.connections[0])
        original = cls.is_idle
        monkeypatch.setattr(cls, "is_idle",
                            lambda self: (calls.append(1), original(self))[1])
        kept._assign_requests_to_connections()
        return len(kept.connections)

    statuses, connections = async_to_sync(_after_a_burst)(16, 64, walk)
    assert statuses == [200] * 17 and connections == 16
    assert 16 <= len(calls) <= 2 * 16, len(calls)  # httpcore's own walk: 16 + 16 × 16


def test_the_pools_walk_is_httpcores_own_apart_from_the_count():
    """`_Pool` copies httpcore 1.0.9's walk. An httpcore whose walk differs (a new
    version may change it, or fix the count) fails this: then compare the two again and
    update `_Pool`, or drop it, and record the new source's hash here."""
    import hashlib
    import inspect

    import httpcore
    source = inspect.getsource(httpcore.AsyncConnectionPool._assign_requests_to_connections)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == "ea1547e78a655633", (
        f"httpcore {httpcore.__version__} changed its pool's walk: re-check "
        "slots.gateway.pool._Pool against AsyncConnectionPool._assign_requests_to_connections")


def test_a_pool_class_of_httpxs_own_keeps_its_walk(caplog, monkeypatch):
    """Should httpx hand over a pool subclass of its own, the gateway still gets the cheap
    idle check, keeps that class's walk and says so, instead of failing every request."""
    import httpcore

    class Theirs(httpcore.AsyncConnectionPool):
        pass

    transport = httpx.AsyncHTTPTransport(trust_env=False)
    transport._pool.__class__ = Theirs  # type: ignore[attr-defined]
    monkeypatch.setattr(logging.getLogger("hal0"), "propagate", True)  # into caplog
    with caplog.at_level("WARNING", logger="hal0.gateway"):
        pool.wrap(transport)
    assert type(transport._pool) is Theirs  # type: ignore[attr-defined]
    assert isinstance(transport._pool._network_backend, pool._Backend)  # type: ignore[attr-defined]
    assert "Theirs" in caplog.text
