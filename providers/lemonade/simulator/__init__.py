"""A lemond (Lemonade Server) simulator: a test double that never does inference.

It owns a faithful fake of lemond's HTTP API (docs: the shared `lemond-api.md`; §7 is its
checklist) for hal0's tests and `make demo`: the quad route prefixes, lemond's auth and its
several error shapes, the health shapes of v10.0 / v10.6 / v11.7, per-type LRU residency with
pins, serialized slow loads, the "nuclear" evict-everything-and-retry-once policy, pulls with
SSE progress and (v10.7+) server-owned download jobs, deterministic fake inference (chat,
completions, embeddings, rerank, audio, images), and the log stream (SSE up to v10.0; a
websocket on the separate `websocket_port` from v10.1, also on the main port from v10.8 — the
10.0 shape opens no websocket listener at all). Where lemond's docs and code disagree it
follows the code.

One known difference: `/internal/set` (and `POST /v1/params`) accept and store `port` and
`host` and answer `{"status":"success","updated":{...}}` like lemond, but where lemond
rebinds its listener the simulator keeps listening where it was started; the effective
config (`GET /internal/config`, `/v1/params`) reports the host and port it listens on (the
command-line layer sits above config.json, lemond-api.md §4.2).

On top of lemond's API it serves `/__sim__/*` (never authenticated, never faulted), the
simulator-only control surface tests use: inject faults, read internal counters, reset.

It is a raw ASGI application (no framework) served by Daphne: `run()` or
`python -m providers.lemonade.simulator` / `python manage.py lemond_sim`.

The package, by concern (the `Simulator` class in `app` is assembled from one mixin per area):

* `constants`: version shapes, prefixes, recipe tables; `wire`: requests, responses and
  lemond's error shapes; `media`: deterministic fake payloads;
* `config`: options, defaults, config layering and validation;
* `registry`: model names and catalogue entries, load options;
* `residency`: loads, LRU/pinned eviction, the failure blast radius, health;
* `downloads`: pulls and download jobs;
* `routes_status`, `routes_lifecycle`, `routes_config`, `routes_inference`: handlers by area;
* `logs`: the log ring and its SSE/websocket streams; `faults`: the `/__sim__/` controls;
* `app`: ASGI, routing, auth; `server`: Daphne and the command line.

It imports nothing from `slots` or `providers.lemonade.client`: it must stay able to catch
hal0's mistakes, so it never shares hal0's idea of lemond.
"""

from providers.lemonade.simulator.app import Simulator
from providers.lemonade.simulator.config import SimOptions
from providers.lemonade.simulator.constants import SHAPES
from providers.lemonade.simulator.server import add_arguments, main, options_from_args, run

__all__ = ["SHAPES", "SimOptions", "Simulator", "add_arguments", "main", "options_from_args",
           "run"]
