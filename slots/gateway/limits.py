"""The gateway's side of per-token rate limits (`slots.ratelimits`) and per-slot fair queues
(`slots.admission`): what a request is told, in OpenAI's shapes.

* A token with `rpm_limit` or `tpm_limit` gets OpenAI's headers on every answer:
  `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`,
  `x-ratelimit-reset-requests` (a duration such as `1s`, `6m0s`, `20ms`) and the same three
  for `-tokens`. Past a limit the answer is 429 `rate_limit_exceeded` (type `requests` or
  `tokens`, as OpenAI's) with `Retry-After` and the same headers.
* A slot with `max_concurrency` admits that many requests at once; a request that waits past
  `queue_timeout_s` gets 429 `slot_busy` with `Retry-After`.

Tokens and slots without limits never call into this module (proxy.py checks first).
If Redis is unreachable the limits are not enforced (logged): the gateway keeps serving.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from django.http import HttpResponse, JsonResponse

from .. import runtime
from ..admission import Gate, QueueTimeout
from ..ratelimits import Verdict, Window
from ..tokens import Principal
from .routes import Route

log = logging.getLogger("hal0.gateway")

_UNITS = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)"}


def duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it (Go's style): `20ms`, `1s`, `6m0s`."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes:
        hours, minutes = divmod(int(minutes), 60)
        text = f"{minutes}m{text}"
        if hours:
            text = f"{hours}h{text}"
    return text


# each kind's three header names, as Django's header mapping keys them (lower case)
_NAMES = {kind: tuple(f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset"))
          for kind in _UNITS}


def stamp(response: HttpResponse, verdict: Verdict | None) -> HttpResponse:
    """Add the token's x-ratelimit-* headers to a response. They go straight into the
    response's header dict (Django's `ResponseHeaders._store`, name -> (name, value)):
    its `__setitem__` checks each name and value for encodings and line breaks, which cost
    more than the rest of a limited request's accounting, and these are digits and
    durations hal0 wrote itself."""
    if verdict is None:
        return response
    now = time.time()
    store = response.headers._store  # type: ignore[attr-defined]
    for window in verdict.windows:
        limit, remaining, reset = _NAMES[window.kind]
        store[limit] = (limit, str(window.limit))
        store[remaining] = (remaining, str(max(0, window.remaining)))
        store[reset] = (reset, duration(window.reset_in(now)))
    return response


def _error(status: int, message: str, type_: str, code: str, retry_after: int) -> JsonResponse:
    # the shape of proxy.openai_error (not imported: proxy imports this module)
    response = JsonResponse(
        {"error": {"message": message, "type": type_, "param": None, "code": code}},
        status=status)
    response["Retry-After"] = str(retry_after)
    return response


def _refusal(principal: Principal, verdict: Verdict, refused: Window) -> HttpResponse:
    wait = refused.retry_after()
    used = refused.limit - max(0, refused.remaining)
    message = (f"Rate limit reached for API key {principal.name!r} on "
               f"{_UNITS[refused.kind]}: Limit {refused.limit}, Used {used}"
               + (", Requested 1" if refused.kind == "requests" else "")
               + f". Please try again in {duration(refused.reset_in())}.")
    return stamp(_error(429, message, refused.kind, "rate_limit_exceeded", wait), verdict)


async def admit(principal: Principal) -> tuple[Verdict | None, HttpResponse | None]:
    """Count the request against a limited token: (verdict for the headers, None) or
    (verdict, the 429 to answer)."""
    try:
        verdict = await runtime.current().rate_limits.admit(
            principal.id, principal.rpm_limit, principal.tpm_limit)
    except Exception as exc:  # Redis down: serve unlimited rather than not at all
        log.warning("rate limits not enforced for token %s: %s", principal.name,
                    exc.__class__.__name__)
        return None, None
    if verdict.refused is not None:
        return verdict, _refusal(principal, verdict, verdict.refused)
    return verdict, None


def token_charger(principal: Principal) -> Callable[[int], None] | None:
    """What the request's Flight calls with the response's input + output tokens."""
    if not principal.tpm_limit:
        return None
    return functools.partial(_charge, principal.id, principal.tpm_limit, principal.name)


def _charge(token_id: int, tpm: int, name: str, used: int) -> None:
    try:
        runtime.current().rate_limits.charge(token_id, tpm, used)
    except Exception as exc:
        log.warning("could not count %d tokens for token %s: %s", used, name,
                    exc.__class__.__name__)


async def wait_for_place(route: Route, principal: Principal) -> tuple[Gate, float] | JsonResponse:
    """Wait for one of the slot's `max_concurrency` places (fair across tokens): (the gate,
    when granted) to give back when the response ends, or the 429 after queue_timeout_s."""
    limit = route.max_concurrency
    assert limit is not None  # the proxy queues only slots that have a limit
    gate = runtime.current().admission.gate(route.pk, route.name)
    try:
        granted = await gate.enter(principal.id, limit, route.queue_timeout_s)
    except QueueTimeout as exc:
        return _error(429, f"Slot {route.name!r} is busy: it serves at most "
                           f"{route.max_concurrency} request(s) at once and this one waited "
                           f"{exc.waited:.0f} s in its queue. Try again later.",
                      "rate_limit_error", "slot_busy", exc.retry_after)
    return gate, granted
