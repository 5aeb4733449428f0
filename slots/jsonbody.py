"""Client JSON, parsed one way everywhere a client sends a JSON object: the gateway's
bodies, the JSON API's action bodies and the dashboard's websocket messages."""

from __future__ import annotations

import json


class NotAJsonObject(ValueError):
    """The body is not a JSON object; the message says why, in words a client can act on."""


def json_object(raw: bytes | str | None, *, empty_ok: bool = False) -> dict:
    """The JSON object in `raw`. An empty body is `{}` when `empty_ok`, else refused.

    RecursionError is caught with ValueError: absurdly deep nesting is bad input too, not a
    crash."""
    if not raw:
        if empty_ok:
            return {}
        raise NotAJsonObject("The request body must be a JSON object.")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise NotAJsonObject("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise NotAJsonObject("The request body must be a JSON object.")
    return data
