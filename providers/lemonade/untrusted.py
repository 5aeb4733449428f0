"""Everything lemond sends is untrusted input: this is where it is made safe to keep.

The client passes every JSON body (answers, error bodies, pull events, log messages)
through `loads()`/`clean()` once, at the boundary, so nothing behind it has to care:

* strings become valid UTF-8: a lone UTF-16 surrogate (`"\\ud800"` is legal JSON) would
  make every later `.encode()` fail (a 500 on a page, a dead websocket), and NUL cannot
  be stored in a PostgreSQL `jsonb` or `text` column; both become U+FFFD;
* numbers are finite or None: `NaN`, `Infinity` and overflowing literals such as `1e999`
  would fail the database's JSON check on every poll;
* nesting deeper than `MAX_DEPTH` is cut off (None) instead of blowing the stack later.

Fields of the wrong type are the parsers' concern (`client.parse_health`, `logs`): they
ignore them and report them through `warn_once()`, which logs each distinct complaint once
per process so a misbehaving node cannot flood the log every poll.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

log = logging.getLogger("hal0.lemond")

MAX_DEPTH = 64
_BAD_CHARS_RE = re.compile(r"[\x00\ud800-\udfff]")
_WARNED: set[str] = set()  # a cache of complaints already logged (bounded below)
_WARNED_MAX = 1000


def clean_str(value: str) -> str:
    """`value` with lone surrogates and NUL replaced by U+FFFD."""
    return _BAD_CHARS_RE.sub("\ufffd", value)


def clean_number(value: Any) -> int | float | None:
    """A finite int/float, or None for NaN, ±Infinity and anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean(value: Any, _depth: int = 0) -> Any:
    """A copy of decoded JSON that is safe to render, store and re-encode."""
    if isinstance(value, str):
        return clean_str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int)):
        return value
    if _depth >= MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {clean_str(str(k)): clean(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v, _depth + 1) for v in value]
    return None  # not a JSON type: nothing lemond's JSON can produce


def loads(text: str | bytes) -> Any:
    """`json.loads` for lemond's bodies: NaN/Infinity become None, then `clean()`.
    Raises ValueError for anything that is not JSON (too deep included)."""
    try:
        data = json.loads(text, parse_constant=lambda _name: None)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    return clean(data)


def str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def warn_once(what: str, value: Any) -> None:
    """Log that lemond sent `what` with an unusable value, once per distinct complaint."""
    key = f"{what}: {type(value).__name__}"
    if key in _WARNED:
        return
    if len(_WARNED) >= _WARNED_MAX:
        _WARNED.clear()
    _WARNED.add(key)
    log.warning("lemond sent %s of type %s; ignored", what, type(value).__name__)


__all__ = ["MAX_DEPTH", "clean", "clean_number", "clean_str", "int_or_none", "loads",
           "str_or_none", "warn_once"]
