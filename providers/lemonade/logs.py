"""lemond's log stream: where it is (by version), how to follow it, and its entries read as
untrusted input.

lemond streams its log as server-sent events up to 10.0 and as a websocket from 10.1
(`versions.Capabilities.logs_url` says where). Websocket messages are
`{"type": "logs.snapshot", "entries": [...]}`, `{"type": "logs.entry", "entry": {...}}` and
`{"type": "error", "error": {...}}`; an entry is `{"seq", "timestamp", "severity", "tag",
"line"}`. Every entry that comes out of here is a dict with exactly those keys, `seq` an int
or None and the rest valid strings, whatever lemond sent: one odd entry (a numeric
`severity`, a lone surrogate) is repaired or dropped, never allowed to stop the relay.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import connect

from . import untrusted, versions
from .client import LemonadeClient
from .errors import LemonadeError

LEVELS = ("trace", "debug", "info", "warning", "error", "fatal")
SNAPSHOT_LINES = 200  # of a (re)connect's snapshot, the newest lines kept
MAX_MESSAGE = 16 * 2**20

Status = Callable[[str], Awaitable[None]]


class LogStreamError(LemonadeError):
    """lemond's log stream said it failed (an `error` message)."""


def _field(raw: dict, key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return untrusted.clean_str(value)
    untrusted.warn_once(f"log entry field {key!r}", value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(untrusted.clean_number(value) or "")
    return ""


def parse_entry(raw: Any) -> dict | None:
    """A log entry as the relay shows it, or None when `raw` is not an entry at all."""
    if not isinstance(raw, dict):
        return None
    raw = untrusted.clean(raw)
    return {
        "seq": untrusted.int_or_none(raw.get("seq")),
        "timestamp": _field(raw, "timestamp"),
        "severity": _field(raw, "severity") or "info",
        "tag": _field(raw, "tag"),
        "line": _field(raw, "line"),
    }


def entry_from_line(text: str) -> dict:
    """An entry for a raw log line (the SSE stream of lemond <= 10.0 sends only lines)."""
    text = untrusted.clean_str(text)
    severity = next((lv for lv in LEVELS if f"[{lv}]" in text.lower()), "info")
    return {"seq": None, "timestamp": "", "severity": severity, "tag": "", "line": text}


def parse_message(text: str | bytes) -> list[dict]:
    """The entries one websocket message carries ([] for anything else); raises
    `LogStreamError` when lemond reports an error on the stream."""
    try:
        message = untrusted.loads(text)
    except ValueError:
        return []
    if not isinstance(message, dict):
        return []
    kind = message.get("type")
    if kind == "logs.snapshot":
        listed = message.get("entries")
        raws = listed[-SNAPSHOT_LINES:] if isinstance(listed, list) else []
    elif kind == "logs.entry":
        raws = [message.get("entry")]
    elif kind == "error":
        error = message.get("error")
        detail = error.get("message") if isinstance(error, dict) else error
        raise LogStreamError(f"lemond's log stream failed: {detail}" if
                             isinstance(detail, str) and detail else "lemond's log stream failed")
    else:
        return []
    return [entry for entry in map(parse_entry, raws) if entry is not None]


async def follow(client: LemonadeClient, after: int | None,
                 status: Status) -> AsyncIterator[list[dict]]:
    """Batches of entries from the node's log, after entry `after` where lemond supports
    it, until the stream ends. Asks lemond's health first for its version and log port."""
    health = await client.health()
    caps = versions.for_version(health.version)
    url = caps.logs_url(client.base_url, health.websocket_port)
    if caps.log_transport == "sse":
        await status("Following lemond's log (server-sent events, lemond <= 10.0).")
        async for line in client.stream_lines(urlsplit(url).path):
            if line.startswith("data:"):
                yield [entry_from_line(line[5:].strip())]
        return
    async for entries in follow_websocket(url, client.api_key, after, status):
        yield entries


async def follow_websocket(url: str, api_key: str, after: int | None,
                           status: Status) -> AsyncIterator[list[dict]]:
    """Batches of entries from a lemond log websocket at `url`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with connect(url, additional_headers=headers, open_timeout=5,
                       max_size=MAX_MESSAGE) as socket:
        await socket.send(json.dumps({"type": "logs.subscribe", "after_seq": after}))
        await status(f"Following lemond's log at {url}.")
        async for raw in socket:
            entries = parse_message(raw)
            if entries:
                yield entries


__all__ = ["LEVELS", "LogStreamError", "entry_from_line", "follow", "follow_websocket",
           "parse_entry", "parse_message"]
