"""Typed errors for everything that can go wrong talking to lemond.

lemond's error bodies are not uniform (lemond-api.md §1 "Error body shapes"): model errors
are `{"error": {"message", "type", "code", ...}}`, lifecycle routes answer a flat
`{"error": "..."}`, OpenAI-style routes `{"error": {"message", "type"}}`, and a proxy or a
crash may answer HTML. `error_from_response` accepts all of them.
"""

from __future__ import annotations

import re

from . import untrusted


class LemonadeError(Exception):
    """Base class; `str()` is a message fit for an operator."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class LemonadeUnavailable(LemonadeError):
    """lemond could not be reached (refused, DNS, connect timeout, connection dropped)."""


class LemonadeTimeout(LemonadeError):
    """lemond accepted the request but did not answer in time."""


class LemonadeHTTPError(LemonadeError):
    """lemond answered with an error status (or a body that is not what it should be)."""

    def __init__(self, status: int, message: str, code: str | None = None, body: str = "",
                 error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = body
        self.error_type = error_type

    def __str__(self) -> str:
        return f"lemond answered {self.status}: {self.message}"


class LemonadeNotFound(LemonadeHTTPError):
    """404 model_not_found / model_not_supported: lemond does not know the model."""


class LemonadeNotLoaded(LemonadeHTTPError):
    """404 "Model not loaded: X" from /unload, 400 from /internal/pin."""


class LemonadeConflict(LemonadeHTTPError):
    """409 slots_pinned_error / router_residency_conflict: every pool member is pinned."""


class LemonadeLoadError(LemonadeHTTPError):
    """500 model_load_error: the backend process failed to start."""


class LemonadeBadResponse(LemonadeHTTPError):
    """A 2xx whose body is not the JSON lemond always sends (a proxy, a crash, garbage)."""


_TAG_RE = re.compile(r"<[^>]+>")
_SPACE_RE = re.compile(r"\s+")


def _text_of(body: str) -> str:
    """A short readable excerpt of a non-JSON body (HTML error pages included)."""
    text = _SPACE_RE.sub(" ", _TAG_RE.sub(" ", body)).strip()
    return (text[:200] + "…") if len(text) > 200 else text


def _code(value: object) -> str | None:
    """An error code as text: lemond sends strings, an odd proxy numbers; else None."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return None
    return str(value)


def parse_error_body(body: str) -> tuple[str, str | None, str | None]:
    """(message, code, type) from any of lemond's error shapes."""
    body = untrusted.clean_str(body)
    try:
        data = untrusted.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data.get("message"))
        if isinstance(err, dict):
            text = err.get("message") or err.get("type")
            message = text if isinstance(text, str) and text else "error"
            code = err.get("code") or err.get("type")
            kind = err.get("type")
            return message, _code(code), kind if isinstance(kind, str) else None
        if isinstance(err, str):
            code = data.get("code")
            return err, _code(code), None
        if data.get("status") == "error" and isinstance(data.get("message"), str) \
                and data["message"]:
            return data["message"], None, None
    excerpt = _text_of(body)
    return (excerpt or "empty response body"), None, None


def error_from_response(status: int, body: str) -> LemonadeHTTPError:
    body = untrusted.clean_str(body)
    message, code, error_type = parse_error_body(body)
    kwargs = {"code": code, "body": body, "error_type": error_type}
    if status == 409 or code in ("slots_pinned_error", "router_residency_conflict"):
        return LemonadeConflict(status, message, **kwargs)
    if code == "model_load_error":
        return LemonadeLoadError(status, message, **kwargs)
    if message.startswith("Model not loaded"):
        return LemonadeNotLoaded(status, message, **{**kwargs, "code": code or "model_not_loaded"})
    if status == 404 and code in ("model_not_found", "model_not_supported"):
        return LemonadeNotFound(status, message, **kwargs)
    return LemonadeHTTPError(status, message, **kwargs)
