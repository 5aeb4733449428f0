"""The bare passthrough the gateway benchmark compares hal0 with: forward with httpx, no
auth, no routing, no Django (run under Daphne: `daphne bench.passthrough:app`)."""

import os

import httpx

_client = None


async def app(scope, receive, send):
    global _client
    if scope["type"] != "http":
        return
    _client = _client or httpx.AsyncClient(base_url=os.environ["PASSTHROUGH_UPSTREAM"],
                                           timeout=None, trust_env=False)
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    upstream = await _client.send(_client.build_request(
        scope["method"], scope["path"], content=body,
        headers={"content-type": "application/json"}), stream=True)
    await send({"type": "http.response.start", "status": upstream.status_code,
                "headers": [(b"content-type", upstream.headers["content-type"].encode())]})
    async for chunk in upstream.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    await upstream.aclose()
