"""What a token limit and a slot's max_concurrency add to a gateway request, in-process.

    .venv/bin/python bench/limits_cost.py [--n 20000]

On a loaded machine the gateway benchmark's p50 difference between `hal0-limited` and
`hal0` swings by milliseconds between runs, far more than the few microseconds the limits
cost. This measures the work itself on the event loop: for each request what
`slots.gateway.limits` does for a token with rpm and tpm limits (admit: the token window's
stats, a hit on the request window and its stats; the six x-ratelimit-* headers; the token
charge after the response) and for a slot with max_concurrency (taking a free place and
giving it back), with the in-memory windows that `serve` uses without REDIS_URL. Prints
microseconds per request (median of 5 runs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0site.settings")

import django  # noqa: E402

django.setup()

from django.http import HttpResponse  # noqa: E402

from slots.admission import Admission  # noqa: E402
from slots.gateway import limits  # noqa: E402
from slots.ratelimits import RateLimits  # noqa: E402
from slots.tokens import Principal  # noqa: E402

UNREACHABLE = 10**9


async def run(n: int) -> tuple[float, float]:
    """(µs per request for the token limits, µs per request for the slot's place)."""
    windows = RateLimits()
    admission = Admission()
    principal = Principal(id=1, name="bench", allowed=(), expires_at=None,
                          rpm_limit=UNREACHABLE, tpm_limit=UNREACHABLE)
    response = HttpResponse(b"{}", content_type="application/json")

    start = time.perf_counter()
    for _ in range(n):
        verdict = await windows.admit(principal.id, principal.rpm_limit, principal.tpm_limit)
        limits.stamp(response, verdict)
        windows.charge(principal.id, UNREACHABLE, 12)
    token_us = (time.perf_counter() - start) / n * 1e6

    gate = admission.gate(1, "chat")
    start = time.perf_counter()
    for _ in range(n):
        granted = await gate.enter(principal.id, 10_000, 30)
        gate.leave(granted)
    slot_us = (time.perf_counter() - start) / n * 1e6
    return token_us, slot_us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    runs = [asyncio.run(run(args.n)) for _ in range(5)]
    token_us = statistics.median(r[0] for r in runs)
    slot_us = statistics.median(r[1] for r in runs)
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load}: token rpm+tpm limits "
          f"{token_us:.1f} µs per request, slot max_concurrency place {slot_us:.1f} µs, "
          f"together {token_us + slot_us:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
