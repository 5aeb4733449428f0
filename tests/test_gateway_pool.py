"""The gateway's upstream pool with its cheaper idle-connection check (slots.gateway.pool):
it still notices a connection lemond has closed, and the gateway's client uses it."""

from __future__ import annotations

import asyncio
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
