"""Request body caps for `serve`, enforced where Daphne receives the bytes.

Daphne calls the application only once the whole body has arrived: Twisted spools it to a
temporary file, then Daphne queues all of it for the app in one go. A cap in Django
(`DATA_UPLOAD_MAX_MEMORY_SIZE`) or in the gateway comes too late: one unauthenticated
1.5 GB POST grew `serve` from 79 MiB to 1.59 GiB before any 401. So the cap lives in the
request object Daphne builds: a `Content-Length` over it, or a body that grows past it
(chunked uploads), is answered 413 at once, the connection is closed and the application
never runs.

The caps: `HAL0_MAX_BODY_MB` (default 32) for every request, `HAL0_MAX_UPLOAD_MB` (default
200) for `/v1/audio/transcriptions`, which carries audio files.
"""

from __future__ import annotations

import json

from daphne.http_protocol import HTTPFactory, WebRequest

from slots.gateway.endpoints import body_cap, too_large_message


def cap_for(path: bytes) -> int:
    """The largest body (bytes) a request to `path` may carry."""
    return body_cap(path.split(b"?", 1)[0].decode("latin1"))


def _too_large(cap: int) -> bytes:
    body = json.dumps({"error": {
        "code": "request.too_large", "type": "invalid_request_error", "param": None,
        "message": too_large_message(cap)}}).encode()
    return (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)


class LimitedRequest(WebRequest):
    """Daphne's request, refusing a body past its path's cap as soon as that is known."""

    refused = False
    received = 0
    cap = 0

    def gotLength(self, length):
        self.cap = cap_for(getattr(self.channel, "_path", b"") or b"")
        if length is not None and length > self.cap:
            self._refuse()
            length = 0  # nothing of it is kept
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.received += len(data)
        if self.received > self.cap:
            self._refuse()
            return
        super().handleContentChunk(data)

    def process(self):
        if not self.refused:
            super().process()

    def _refuse(self) -> None:
        self.refused = True
        transport = self.channel.transport
        transport.write(_too_large(self.cap))
        transport.loseConnection()


class LimitedHTTPFactory(HTTPFactory):
    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = LimitedRequest
        return protocol
