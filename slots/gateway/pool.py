"""A cheaper idle-connection check for the gateway's pool of connections to lemond.

httpcore's pool walks every connection it holds each time a request starts or ends (about
five times per request), and asks each idle one whether lemond has closed it: is its
socket readable? Through anyio that question first builds a dict of the socket's
attributes (a `getpeername` call among them) to find the socket, then polls it: about
6.6 µs per idle connection, where the poll itself is 0.9 µs. With 16 clients the pool holds
about as many connections, and these checks took a large share of the gateway's CPU per
request (docs/benchmarks.md). `wrap(transport)` gives the transport's pool a network
backend whose streams keep their socket at hand and poll it directly; everything else
(connecting, TLS, reading, writing, timeouts) is still httpcore's and anyio's.
"""

from __future__ import annotations

import select
import socket
import typing

import httpcore
import httpx


def readable(sock: socket.socket | None) -> bool:
    """Whether a read would not block: data, or the peer closed the connection (what
    httpcore's own check answers; a socket that is gone counts as closed)."""
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))


class _Stream(httpcore.AsyncNetworkStream):
    """A connection's stream, answering `is_readable` from the socket it keeps."""

    def __init__(self, stream: httpcore.AsyncNetworkStream):
        self._stream = stream
        self._socket = stream.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable" and self._socket is not None:
            return readable(self._socket)
        return self._stream.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    """The pool's own backend, its streams wrapped in `_Stream`."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend):
        self._backend = backend

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._backend.connect_tcp(
            host, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._backend.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def wrap(transport: httpx.AsyncHTTPTransport) -> httpx.AsyncHTTPTransport:
    """The transport, its pool's backend wrapped (before it opens any connection). httpx
    takes no network backend of its own, so this reaches its pool (`_pool`), which has
    been there since httpx 0.18; `tests/test_gateway_pool.py` checks it still is."""
    pool = transport._pool
    if not isinstance(pool, httpcore.AsyncConnectionPool):
        raise TypeError(f"unexpected httpx pool {type(pool).__name__}")
    pool._network_backend = _Backend(pool._network_backend)
    return transport
