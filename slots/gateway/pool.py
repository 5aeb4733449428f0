"""The gateway's pool of connections to lemond, made cheaper in two places: its check of
idle connections, and its walk over them.

httpcore's pool walks every connection it holds each time a request starts or ends (about
five times per request), and asks each idle one whether lemond has closed it: is its
socket readable? Through anyio that question first builds a dict of the socket's
attributes (a `getpeername` call among them) to find the socket, then polls it: about
6.6 µs per idle connection, where the poll itself is 0.9 µs. With 16 clients the pool holds
about as many connections, and these checks took a large share of the gateway's CPU per
request (docs/benchmarks.md). `wrap(transport)` gives the transport's pool a network
backend whose streams keep their socket at hand and poll it directly; everything else
(connecting, TLS, reading, writing, timeouts) is still httpcore's and anyio's.

The pool's walk itself is quadratic in httpcore 1.0: for every idle connection it counts
the pool's connections by calling `is_idle()` on each of them (the count is only compared
with `max_keepalive_connections`). With 16 connections that is a few hundred calls per
request, and the more connections a busy moment left open, the more every later request
pays. `wrap` also gives the pool `_Pool`'s walk: the same decisions in the same order,
with the count taken once.
"""

from __future__ import annotations

import logging
import select
import socket
import typing

import httpcore
import httpx

log = logging.getLogger("hal0.gateway")


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


class _Pool(httpcore.AsyncConnectionPool):
    """httpcore's pool with a linear walk (see the module docstring). `_assign_requests_to_
    connections` is httpcore 1.0's, line for line, except the surplus-idle rule:
    httpcore writes `len([connection.is_idle() for connection in self._connections])`,
    which is the number of connections, computed with a call per connection."""

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing_connections = []
        # Close and drop connections that are closed, expired, or idle past the keep-alive
        # limit.
        for connection in list(self._connections):
            if connection.is_closed():
                self._connections.remove(connection)
            elif connection.has_expired():
                self._connections.remove(connection)
                closing_connections.append(connection)
            elif (connection.is_idle()
                  and len(self._connections) > self._max_keepalive_connections):
                self._connections.remove(connection)
                closing_connections.append(connection)

        # Assign queued requests to connections.
        queued_requests = [request for request in self._requests if request.is_queued()]
        for pool_request in queued_requests:
            origin = pool_request.request.url.origin
            available_connections = [
                connection for connection in self._connections
                if connection.can_handle_request(origin) and connection.is_available()]
            idle_connections = [
                connection for connection in self._connections if connection.is_idle()]
            if available_connections:  # reuse an existing connection
                connection = available_connections[0]
                pool_request.assign_to_connection(connection)
            elif len(self._connections) < self._max_connections:  # a new connection
                connection = self.create_connection(origin)
                self._connections.append(connection)
                pool_request.assign_to_connection(connection)
            elif idle_connections:  # close an idle connection, then a new one
                connection = idle_connections[0]
                self._connections.remove(connection)
                closing_connections.append(connection)
                connection = self.create_connection(origin)
                self._connections.append(connection)
                pool_request.assign_to_connection(connection)
        return closing_connections


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
    """The transport, its pool's backend wrapped and its walk linear (before it opens any
    connection). httpx takes no network backend or pool class of its own, so this reaches
    its pool (`_pool`, there since httpx 0.18) and makes it a `_Pool` (a subclass that
    adds no state); `tests/test_gateway_pool.py` checks both still hold."""
    pool = transport._pool
    if not isinstance(pool, httpcore.AsyncConnectionPool):
        raise TypeError(f"unexpected httpx pool {type(pool).__name__}")
    if type(pool) is httpcore.AsyncConnectionPool:
        pool.__class__ = _Pool
    else:  # a pool class of httpx's own: keep its walk (slower, not wrong)
        log.warning("httpx's pool is a %s: its walk stays httpcore's", type(pool).__name__)
    pool._network_backend = _Backend(pool._network_backend)
    return transport
