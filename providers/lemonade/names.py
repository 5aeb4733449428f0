"""lemond model names: which strings hal0 accepts as one, and how lemond publishes them.

lemond itself accepts almost any string as a model name: routes match `/v1/models/(.+)`
after URL-decoding, built-ins include names with spaces ("Lite Collection"), and models
found in `extra_models_dir` are named after files. Its only rules are about the source
prefixes (`canonical_id.h`, v11.7.0; the same checks in v10.6.0 server.cpp `handle_pull`):
`user.X` is registered, `extra.X` imported from disk, `builtin.X` shipped; `extra.` and
`builtin.` (also as `user.extra.` / `user.builtin.`) cannot be registered by `/pull`.

hal0 puts a model name into URL paths (`/v1/models/{name}`) with the node's keys, so it
adds one rule: **a model name is one path segment**. No `/` or `\\`, not `.` or `..`, no
`%` (nothing that a proxy or lemond could decode into a separator), no `?` or `#`, no
control characters, no leading or trailing whitespace, at most 200 characters. The client
refuses such names before sending anything, and quotes every name it puts in a path anyway;
`slots` validates a slot's model with the same function.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import LemonadeError

MAX_LENGTH = 200  # Slot.model_name's column
USER, EXTRA, BUILTIN = "user.", "extra.", "builtin."
_FORBIDDEN_RE = re.compile(r"[/\\%?#\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class InvalidModelName(LemonadeError, ValueError):
    """A model name hal0 will not send to lemond (see the module docstring)."""


def model_name_problem(name: object) -> str:
    """Why `name` is not a usable lemond model name, or "" when it is."""
    if not isinstance(name, str) or not name:
        return "A model name cannot be empty."
    if len(name) > MAX_LENGTH:
        return f"A model name has at most {MAX_LENGTH} characters."
    if name != name.strip():
        return "A model name cannot start or end with whitespace."
    if name in (".", ".."):
        return "A model name cannot be '.' or '..'."
    bad = _FORBIDDEN_RE.search(name)
    if bad:
        shown = bad.group() if bad.group().isprintable() else f"U+{ord(bad.group()):04X}"
        return (f"A model name is one path segment: {shown!r} is not allowed "
                "(no '/', '\\', '%', '?', '#' or control characters).")
    return ""


def validate_model_name(name: object) -> str:
    """Return `name` if it is a usable model name, else raise `InvalidModelName`."""
    problem = model_name_problem(name)
    if problem:
        raise InvalidModelName(problem)
    return name  # type: ignore[return-value]


def registration_problem(name: str) -> str:
    """Why lemond's `/pull` would refuse to register `name` as a new model, or ""."""
    problem = model_name_problem(name)
    if problem:
        return problem
    for prefix in (EXTRA, BUILTIN):
        if name.startswith(prefix) or name.startswith(USER + prefix):
            return (f"Names starting with {prefix!r} (or user.{prefix}) are reserved by "
                    "lemond; register custom models as 'user.<name>'.")
    return ""


def bare_name(name: str) -> str:
    """`user.X`, `extra.X`, `builtin.X` -> `X`; anything else unchanged."""
    for prefix in (USER, EXTRA, BUILTIN):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def published_forms(name: str) -> tuple[str, ...]:
    """The names under which lemond may list the model hal0 calls `name`, best first.

    lemond publishes the winner of a bare name (user > extra > builtin) bare, and a
    shadowed one with its prefix (`builtin.X` once a `user.X` exists); a user collection
    keeps its `user.` prefix. So `user.X` is listed as `X` (or `user.X`), `builtin.X` as
    `builtin.X` (or `X` when nothing shadows it), a bare `X` as `X` (or `user.X`).
    (v10.6.0 test_021e/test_021f, canonical_id.h.)"""
    for prefix in (USER, EXTRA, BUILTIN):
        if name.startswith(prefix):
            return (name, name[len(prefix):])
    return (name, USER + name)


def resolution_forms(name: str) -> tuple[str, ...]:
    """The model names that `name` may refer to, in lemond's own resolution order: a bare
    `X` is the user model, else the imported one, else the built-in (canonical_id.h
    precedence); a prefixed name also answers to its bare form."""
    for prefix in (USER, EXTRA, BUILTIN):
        if name.startswith(prefix):
            return (name, name[len(prefix):])
    return (name, USER + name, EXTRA + name, BUILTIN + name)


def find_published(name: str, published: Iterable[str]) -> str | None:
    """Which of lemond's `published` names is the model hal0 calls `name`, or None."""
    listed = set(published)
    return next((form for form in published_forms(name) if form in listed), None)


__all__ = [
    "MAX_LENGTH",
    "InvalidModelName",
    "bare_name",
    "find_published",
    "model_name_problem",
    "published_forms",
    "registration_problem",
    "resolution_forms",
    "validate_model_name",
]
