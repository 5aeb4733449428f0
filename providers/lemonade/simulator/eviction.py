"""The eviction engine (lemond v10.8+, `eviction_engine.cpp`): auto-eviction under VRAM
pressure, and idle downsize / idle eviction of models that opted in.

A model takes part when `auto_evict` is on for it: its own load option, else the global
config key (default off). Pinned models never take part. Every evaluation looks at each
such model's idle time: past `evict_idle_timeout` seconds (default 300) it is evicted,
past `downsize_idle_timeout` (default 60) a ready model is downsized (it stays resident;
its next request restores it first). Under VRAM pressure (a reading at or above
`auto_evict_threshold_pct`, default 0.90) the model with the highest
`idle_ms / (load_ms * evict_weight_factor)` is evicted: cheap-to-reload, long-idle models
go first, a large weight factor protects a model.

lemond evaluates every 5 s, and `POST /internal/simulate-vram-pressure {"pct": p}` runs one
evaluation synchronously (p = -1: the idle checks only). The simulator has no VRAM to
measure, so pressure only ever comes from that endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from providers.lemonade.simulator.wire import ApiError, Request, Response, json_response

if TYPE_CHECKING:
    from providers.lemonade.simulator.residency import LoadedModel

EVALUATION_INTERVAL = 5.0  # EvictionEngine::start(5000)
DEFAULT_THRESHOLD = 0.90
# Per-model load options (`/v1/load`, saved options), with lemond's defaults.
EVICTION_OPTION_DEFAULTS = {"auto_evict": None, "evict_idle_timeout": 300,
                            "downsize_idle_timeout": 60, "evict_weight_factor": 1.0}
# Global config keys lemond accepts without listing them in its defaults.
EVICTION_CONFIG_KEYS = ("auto_evict", "auto_evict_threshold_pct")


def eviction_config_problem(key: str, value: Any) -> str | None:
    """RuntimeConfig::validate for the eviction keys."""
    if key == "auto_evict" and not isinstance(value, bool):
        return "'auto_evict' must be a boolean"
    if key == "auto_evict_threshold_pct":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "'auto_evict_threshold_pct' must be a number"
        if not 0.0 < value <= 1.0:
            return "'auto_evict_threshold_pct' must be between 0.0 and 1.0"
    return None


class EvictionMixin:
    """Runs in the Simulator (a mixin); needs the residency mixin's state and evict()."""

    _eviction_task: asyncio.Task | None = None

    def has_eviction_engine(self) -> bool:
        return self.since(10, 8)

    # ---- options ----------------------------------------------------------------------

    def eviction_options(self, cid: str, request: dict) -> dict:
        """The eviction options a load sets explicitly (request, else saved, else the
        catalogue's): lemond keeps only what was set, the rest falls back at evaluation."""
        saved = self.saved_options.get(cid, {})
        builtin = self.catalog[cid].get("recipe_options") or {}
        chosen = {}
        for key in EVICTION_OPTION_DEFAULTS:
            for layer in (request, saved, builtin):
                if key in layer:
                    if layer[key] is not None:
                        chosen[key] = layer[key]
                    break
        return chosen

    def resolve_options(self, cid: str, request: dict) -> dict:
        options = super().resolve_options(cid, request)
        if self.has_eviction_engine():
            options.update(self.eviction_options(cid, request))
        return options

    def _model_eviction_settings(self, model: LoadedModel) -> tuple[bool, float, float, float]:
        opts = model.options
        auto_evict = opts.get("auto_evict")
        if not isinstance(auto_evict, bool):
            auto_evict = bool(self.config().get("auto_evict", False))

        def whole(key: str) -> float:
            value = opts.get(key)
            ok = isinstance(value, int) and not isinstance(value, bool)
            return float(value if ok else EVICTION_OPTION_DEFAULTS[key])

        weight = opts.get("evict_weight_factor")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            weight = 1.0
        return auto_evict, whole("evict_idle_timeout"), whole("downsize_idle_timeout"), \
            float(weight)

    def threshold(self) -> float:
        value = self.config().get("auto_evict_threshold_pct", DEFAULT_THRESHOLD)
        return float(value)

    # ---- the engine -------------------------------------------------------------------

    async def evaluate_eviction(self, vram_pct: float) -> None:
        """EvictionEngine::evaluate_servers: at most one eviction, any number of downsizes."""
        now = time.monotonic()
        pressure = vram_pct >= self.threshold()
        victim, best = None, -1.0
        downsize = []
        for model in list(self.state.loaded.values()):
            if model.pinned or model.status == "loading":
                continue
            auto_evict, evict_after, downsize_after, weight = \
                self._model_eviction_settings(model)
            if not auto_evict:
                continue
            idle_ms = (now - model.last_access) * 1000.0
            score = idle_ms / (max(model.load_ms, 1.0) * weight)
            in_use = model.busy > 0
            if idle_ms >= evict_after * 1000 and not in_use and model.status != "evicting":
                self.log("Info", "EvictionEngine", f"Model {model.name} reached evict idle "
                                                   f"timeout ({evict_after:.0f}s). Evicting.")
                victim, pressure = model, True
                break
            if idle_ms >= downsize_after * 1000 and model.status == "ready" and not in_use:
                downsize.append(model)
            if pressure and not in_use and model.status != "evicting" and score > best:
                victim, best = model, score
        for model in downsize:
            await self.downsize(model)
        if pressure and victim is not None and self.state.loaded.get(victim.name) is victim:
            victim.status = "evicting"
            self.log("Info", "EvictionEngine", f"Eviction Engine unloading model: "
                                               f"{victim.name} due to score/pressure/idle.")
            await self.evict(victim, "auto_evict")

    async def downsize(self, model: LoadedModel) -> None:
        """A maintenance downsize: the backend stays resident with its memory released."""
        if model.busy or model.status != "ready":
            return
        model.status = "downsizing"
        await asyncio.sleep(0)
        if model.status == "downsizing":
            model.status = "downsized"
            self.log("Info", "EvictionEngine", f"Model {model.name} downsized.")

    async def restore_downsized(self, model: LoadedModel) -> None:
        """acquire_for_inference: a downsized model is restored before it serves again."""
        if model.status != "downsized":
            return
        model.status = "loading"
        self.log("Info", "Router", f"Restoring downsized model {model.name}")
        await asyncio.sleep(self.opts.load_delay / 2)
        if model.status == "loading":
            model.status = "ready"

    async def load(self, name: str, request: dict, pinned: bool | None, explicit: bool):
        model = await super().load(name, request, pinned, explicit)
        await self.restore_downsized(model)
        self.start_eviction_loop()
        return model

    def start_eviction_loop(self) -> None:
        if not self.has_eviction_engine():
            return
        task = self._eviction_task
        if task is None or task.done():
            self._eviction_task = asyncio.ensure_future(self._eviction_loop())

    async def _eviction_loop(self) -> None:
        """EvictionEngine::evaluation_loop: the idle checks every 5 s while models are
        loaded (the simulator's loop sleeps once nothing is loaded)."""
        while self.state.loaded:
            await asyncio.sleep(EVALUATION_INTERVAL)
            with contextlib.suppress(Exception):
                await self.evaluate_eviction(-1.0)

    # ---- route --------------------------------------------------------------------------

    async def h_simulate_vram_pressure(self, req: Request) -> Response:
        """Server::handle_simulate_vram_pressure: one synchronous evaluation. At or above
        the threshold it may evict; -1 runs the idle checks only; below, nothing."""
        body = req.json_or_none()
        if not isinstance(body, dict):
            raise ApiError(400, {"error": "Request body must be a JSON object"})
        pct = body.get("pct", 0.0)
        if not isinstance(pct, (int, float)) or isinstance(pct, bool):
            raise ApiError(400, {"error": "'pct' must be a number"})
        if pct == -1.0 or pct >= self.threshold():
            await self.evaluate_eviction(float(pct))
        return json_response({"status": "ok"})
