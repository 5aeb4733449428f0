"""Residency: loading, LRU and pinned eviction, the failure blast radius, health."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from providers.lemonade import catalog
from providers.lemonade.simulator.constants import FILE_NOT_FOUND_MARKERS, RECIPE_BINARIES
from providers.lemonade.simulator.processes import spawn_backend, stop_backend
from providers.lemonade.simulator.wire import model_error, now_ms, steady_ms

if TYPE_CHECKING:
    from providers.lemonade.simulator.app import Simulator

# --------------------------------------------------------------------------------------
# state


@dataclass
class LoadedModel:
    """One backend process lemond would be running."""

    name: str
    entry: dict
    type: str
    recipe: str
    checkpoint: str
    options: dict  # resolved options as compared by /load (ctx_size -1 stays -1)
    device: str
    backend_port: int
    pid: int
    pinned: bool = False
    status: str = "loading"
    last_use: int = field(default_factory=steady_ms)
    lru: int = 0  # monotonic order; ms timestamps tie in fast tests
    busy: int = 0
    streaming: int = 0
    idle: asyncio.Event | None = None
    # For the eviction engine (v10.8+): how long the load took, and when it was last used
    # (steady clock, like lemond's idle timers).
    load_ms: float = 1000.0
    last_access: float = field(default_factory=time.monotonic)
    process: Any = None  # the real child process whose pid is reported (processes.py)
    telemetry: dict = field(default_factory=dict)  # its last request's (v10.6 /v1/stats)

    def shown_options(self) -> dict:
        # v11.7 resolves every option to compare loads, but reports only those some layer
        # set (ResolvedOptions.shown); older shapes report what they resolved.
        shown = dict(getattr(self.options, "shown", self.options))
        if shown.get("ctx_size") == -1:
            # ctx_size -1 means "auto-size from memory" (v10.8+); report what a box would pick.
            shown["ctx_size"] = 32768 if self.type == "llm" else 8192
        return shown



class State:
    """Everything a lemond restart forgets (plus the simulator's own counters)."""

    def __init__(self, sim: Simulator):
        opts = sim.opts
        self.loaded: dict[str, LoadedModel] = {}
        self.runtime_config: dict = {}  # POST /v1/params: applied, not persisted
        self.stats: dict[str, Any] = {"time_to_first_token": 0.0, "tokens_per_second": 0.0,
                                      "input_tokens": 0, "output_tokens": 0,
                                      "prompt_tokens": 0, "cache_tokens": 0,
                                      "decode_token_times": []}
        self.totals = {"request_count_total": 0, "input_tokens_total": 0,
                       "output_tokens_total": 0, "prompt_tokens_total": 0,
                       "cache_tokens_total": 0}
        self.in_flight_loads: list[str] = []
        self.queued_loads = 0
        self.in_flight_requests = 0
        self.fail_next: list[dict] = []
        self.fail_models = set(opts.fail_models)



class ResidencyMixin:
    # ---- residency ---------------------------------------------------------------------

    def touch(self, model: LoadedModel) -> None:
        self.lru_counter += 1
        model.lru = self.lru_counter
        model.last_use = steady_ms()
        model.last_access = time.monotonic()

    def ready_models(self) -> list[LoadedModel]:
        """Loaded models lemond reports. With its watchdog (v10.8+) lemond leaves out a
        backend whose process died; v10.6 keeps listing it: it only checks the pid it
        started."""
        return [m for m in self.state.loaded.values() if m.status != "loading"
                and (not self.since(10, 8) or self.backend_alive(m))]

    def most_recent(self) -> LoadedModel | None:
        ready = self.ready_models()
        return max(ready, key=lambda m: m.lru) if ready else None

    async def evict(self, model: LoadedModel, reason: str, wait_busy: bool = True) -> None:
        """Stop one backend. lemond waits for in-flight requests before tearing it down."""
        if wait_busy and model.busy and model.idle is not None:
            self.log("Info", "Router", f"Waiting for {model.busy} in-flight request(s) on "
                                       f"{model.name} before unloading")
            await model.idle.wait()
        if self.state.loaded.get(model.name) is model:
            del self.state.loaded[model.name]
        stop_backend(model.process)
        self.evictions.append({"model": model.name, "reason": reason, "at": now_ms()})
        verb = "Unloaded" if reason == "unload" else f"Evicted ({reason})"
        self.log("Info", "Router", f"{verb} {model.name} (pid {model.pid})")

    async def evict_all(self, reason: str, wait_busy: bool = True) -> None:
        # A model still loading is not resident yet; its (serialized) load finishes on its own.
        for model in self.ready_models():
            await self.evict(model, reason, wait_busy)

    def should_fail(self, cid: str) -> dict | None:
        if cid in self.state.fail_models:
            return {"message": None}
        for i, fault in enumerate(self.state.fail_next):
            if fault.get("model") in (None, cid):
                fault["count"] -= 1
                if fault["count"] <= 0:
                    self.state.fail_next.pop(i)
                return fault
        return None

    async def load(self, name: str, request: dict, pinned: bool | None, explicit: bool
                   ) -> LoadedModel:
        """Load (or reuse) a model. Runs as its own task so a client that gives up does not
        abort the load half-way (lemond keeps loading when the caller disconnects)."""
        cid = self.resolve_name(name)
        if cid is None:
            raise self.not_found(name)
        if not explicit:
            model = self.state.loaded.get(cid)
            if model is not None and model.status != "loading" and (
                    self.backend_alive(model) or not self.since(10, 8)):
                self.touch(model)  # auto-load never reloads for option changes (§3.7)
                return model
        task = asyncio.ensure_future(self._load_serialized(cid, request, pinned, explicit))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def _load_serialized(self, cid: str, request: dict, pinned: bool | None,
                               explicit: bool) -> LoadedModel:
        state = self.state
        state.queued_loads += 1
        try:
            await self.load_lock.acquire()
        finally:
            state.queued_loads -= 1
        try:
            entry = self.catalog.get(cid)
            if entry is None:  # deleted while we queued
                raise self.not_found(cid)
            if entry.get("recipe") == "collection.omni":
                model = None
                for component in entry.get("components") or []:
                    comp = self.resolve_name(component)
                    if comp is None:
                        raise self.not_found(component)
                    model = await self._load_locked(comp, {}, pinned, explicit)
                self.downloaded.add(cid)
                return model
            return await self._load_locked(cid, request, pinned, explicit)
        finally:
            self.load_lock.release()

    def _check_generation(self, generation: int, cid: str) -> None:
        if generation != self.generation:
            raise model_error("model_load_error",
                              f"Failed to load model '{cid}': lemond restarted during the load",
                              cid)

    async def _load_locked(self, cid: str, request: dict, pinned: bool | None, explicit: bool
                           ) -> LoadedModel:
        generation = self.generation
        state = self.state
        entry = self.catalog[cid]
        recipe = entry.get("recipe", "")
        kind = catalog.model_type(entry)
        pinned = self._pin_for_load(cid, pinned)
        options = self.resolve_options(cid, request)
        reused, pinned = await self._existing_load(cid, options, pinned, explicit)
        if reused is not None:
            return reused
        await self._download_for_load(cid, generation)

        device = self.device_for(cid, recipe, options)
        await self._make_room(cid, kind, recipe, device)

        self.port_counter += 1
        self.pid_counter += 1
        process = spawn_backend()
        model = LoadedModel(name=cid, entry=entry, type=kind, recipe=recipe,
                            checkpoint=catalog.checkpoint(entry), options=options,
                            device=device, backend_port=self.port_counter,
                            pid=process.pid if process else self.pid_counter,
                            pinned=bool(pinned), idle=asyncio.Event(), process=process)
        model.idle.set()
        self.touch(model)
        state.loaded[cid] = model
        state.in_flight_loads.append(cid)
        binary = RECIPE_BINARIES.get(recipe, recipe)
        self.log("Info", "Router", f"Loading {cid} ({recipe}, {device}) with {options}")
        try:
            fault = self.should_fail(cid)
            refusal = self.backend_start_problem(recipe, options)
            if refusal is not None:
                fault = {"message": refusal}  # persistent: the retry fails the same way
            if fault is not None:
                await self._fail_load(cid, binary, fault, generation)
            await asyncio.sleep(self.opts.load_delay)
            self._check_generation(generation, cid)
        except BaseException:
            if state.loaded.get(cid) is model:
                del state.loaded[cid]
            stop_backend(model.process)
            raise
        finally:
            if cid in state.in_flight_loads:
                state.in_flight_loads.remove(cid)
        model.status = "ready"
        model.load_ms = max(1.0, (time.monotonic() - model.last_access) * 1000.0)
        self.touch(model)
        self.load_calls[cid] = self.load_calls.get(cid, 0) + 1
        self.log("Info", "Router", f"{binary} for {cid} is ready on port {model.backend_port} "
                                   f"(pid {model.pid})")
        return model

    def _pin_for_load(self, cid: str, pinned: bool | None) -> bool | None:
        """The pin a load asks for: the request's, else the saved option's (None: keep)."""
        if not self.since(10, 8):
            return None  # `pinned` in the body exists since v10.8; older lemond ignores it
        if pinned is None and isinstance(self.saved_options.get(cid, {}).get("pinned"), bool):
            return self.saved_options[cid]["pinned"]
        return pinned

    async def _existing_load(self, cid: str, options: dict, pinned: bool | None,
                             explicit: bool) -> tuple[LoadedModel | None, bool | None]:
        """What a model already loaded as `cid` means for this load: (the model to answer
        with, or None to load; the pin). A crashed backend is evicted first, and so is a
        model an explicit load asks for with other options (a reload)."""
        existing = self.state.loaded.get(cid)
        if existing is not None and self.since(10, 8) and not self.backend_alive(existing):
            # The watchdog: a dead backend is evicted and loaded again, keeping its pin.
            if pinned is None:
                pinned = existing.pinned
            self.log("Warning", "Router", f"Existing backend for {cid} is unavailable "
                                          "(state=crashed), evicting before reload")
            await self.evict(existing, "crashed", wait_busy=False)
            existing = None
        if existing is not None and existing.status != "loading":
            if not explicit or existing.options == options:
                self.touch(existing)
                if pinned is not None:
                    existing.pinned = pinned
                self.log("Info", "Router", f"{cid} is already loaded with the same options")
                return existing, pinned
            if pinned is None:
                pinned = existing.pinned  # an omitted pin keeps the existing state
            self.log("Info", "Router", f"Options changed for {cid}; reloading")
            await self.evict(existing, "reload")
        return None, pinned

    async def _download_for_load(self, cid: str, generation: int) -> None:
        """A load of a model not downloaded yet downloads it first (unless offline)."""
        if cid in self.downloaded:
            return
        if self.config().get("offline"):
            raise model_error("model_load_error",
                              f"Model '{cid}' is not downloaded and lemond is offline", cid)
        self.log("Info", "ModelManager", f"Downloading {cid} before loading it")
        await asyncio.sleep(self.opts.pull_delay)
        self._check_generation(generation, cid)
        self.downloaded.add(cid)

    async def _make_room(self, cid: str, kind: str, recipe: str, device: str) -> None:
        state = self.state
        # NPU exclusivity (§3.5), simplified: ryzenai-llm and whisper-on-NPU own the NPU.
        exclusive = recipe == "ryzenai-llm" or (recipe == "whispercpp" and device == "npu")
        if "npu" in device:
            for other in list(state.loaded.values()):
                other_exclusive = other.recipe == "ryzenai-llm" or (
                    other.recipe == "whispercpp" and "npu" in other.device)
                if other.name != cid and "npu" in other.device and (exclusive or other_exclusive):
                    await self.evict(other, "npu_exclusive")
        capacity = self.max_loaded
        if capacity == -1:
            return
        while True:
            pool = [m for m in state.loaded.values() if m.type == kind]
            if len(pool) < capacity:
                return
            candidates = [m for m in pool if not m.pinned and m.status != "loading"]
            if not candidates:
                raise model_error(
                    "slots_pinned_error",
                    f"All loaded models of type standard/{self.type_name(kind)} are pinned. "
                    "Unload a model first.", cid)
            await self.evict(min(candidates, key=lambda m: m.lru), "lru")

    async def _fail_load(self, cid: str, binary: str, fault: dict, generation: int) -> None:
        """A failed backend start, handled like Router::load_model (lemond-api.md §3.6).

        An error that looks like file-not-found fails the load at once and leaves every
        other model loaded. Any other error evicts every loaded model (waiting for their
        in-flight requests, like any eviction), then retries once: a `transient` fault lets
        the retry succeed (this returns and the load goes on); otherwise the fault is a
        persistent condition, the retry fails the same way, and its error is the answer
        (500 `model_load_error`)."""
        message = fault.get("message") or f"{binary} failed to start"
        failed = model_error("model_load_error", f"Failed to load model '{cid}': {message}", cid)
        self.load_failures[cid] = self.load_failures.get(cid, 0) + 1
        await asyncio.sleep(self.opts.load_delay / 2)
        self._check_generation(generation, cid)
        self.log("Error", "Router", f"Backend load failed: {message}")
        if any(marker in message for marker in FILE_NOT_FOUND_MARKERS):
            self.log("Error", "Router", "File not found error, NOT evicting other models")
            raise failed
        self.log("Warning", "Router", "Load failed with non-file-not-found error, evicting "
                                      "all models and retrying...")
        for other in list(self.state.loaded.values()):
            if other.name != cid:
                await self.evict(other, "load_failure")
        self._check_generation(generation, cid)
        self.log("Debug", "Router", "Retrying backend load...")
        if fault.get("transient"):
            return
        await asyncio.sleep(self.opts.load_delay / 2)
        self._check_generation(generation, cid)
        self.log("Error", "Router", f"Retry also failed: {message}")
        raise failed

    @contextlib.asynccontextmanager
    async def using(self, model: LoadedModel, streaming: bool = False):
        """Mark a backend busy for the length of one inference request."""
        model.busy += 1
        model.streaming += int(streaming)
        model.idle.clear()
        self.state.in_flight_requests += 1
        self.touch(model)
        try:
            yield
        finally:
            model.busy -= 1
            model.streaming -= int(streaming)
            self.state.in_flight_requests -= 1
            self.touch(model)
            if model.busy == 0:
                model.idle.set()

    # ---- health ------------------------------------------------------------------------

    def loaded_json(self, model: LoadedModel, port: int) -> dict:
        kind = self.type_name(model.type)
        item: dict[str, Any] = {"model_name": self.public_name(model.name),
                                "checkpoint": model.checkpoint,
                                "type": kind}
        if self.since(11, 5):
            item["residency_class"] = "standard"
            item["slot_pool"] = f"standard/{kind}"
        item["device"] = model.device
        item["backend_url"] = f"http://127.0.0.1:{model.backend_port}/v1"
        if self.since(10, 4):
            item["pid"] = model.pid
        if self.since(10, 8):
            loading = model.status == "loading"
            item["status"] = ("loading" if loading else "in_use" if model.busy
                              else model.status)  # ready, or the eviction engine's states
            item["backend_alive"] = True
            item["backend_health"] = "busy" if (model.busy or loading) else "ready"
            item["loaded"] = not loading
            item["watchdog_reset"] = False
            item["pinned"] = model.pinned
        item["recipe"] = model.recipe
        item["recipe_options"] = model.shown_options()
        if self.since(11, 5):
            item["is_busy"] = model.busy > 0
            item["is_streaming"] = model.streaming > 0
        if self.since(10, 8) and model.type == "llm" and "ctx_size" in model.options:
            item["max_context_window"] = 40960
        item["last_use"] = model.last_use
        return item

    def health(self, port: int) -> dict:
        # Before v10.8 a model shows up in health only once its backend is up.
        shown = ([m for m in self.state.loaded.values()
                  if m.status == "loading" or m in self.ready_models()]
                 if self.since(10, 8) else self.ready_models())
        recent = self.most_recent()
        limit = self.max_loaded
        body: dict[str, Any] = {"status": "ok", "version": self.version}
        if self.since(10, 9):
            body["telemetry"] = {"enabled": False}
        body["model_loaded"] = self.public_name(recent.name) if recent else None
        body["all_models_loaded"] = [self.loaded_json(m, port) for m in shown]
        body["max_models"] = dict.fromkeys(self.type_keys(), limit)
        if self.since(10, 8):
            pinned = dict.fromkeys(self.type_keys(), 0)
            for m in self.state.loaded.values():
                if m.pinned:
                    key = self.type_name(m.type)
                    pinned[key] = pinned.get(key, 0) + 1
            body["pinned_models"] = pinned
        if self.since(11, 5):
            body["pinned_helper_models"] = dict.fromkeys(self.type_keys(), 0)
        if self.since(10, 1):
            # The separate websocket server (`websocket_port` "auto": a random free port).
            # v10.1-v10.7 serve the log stream only there; v10.8+ also on the main port.
            body["websocket_port"] = self.websocket_port or port
        else:
            body["log_streaming"] = {"sse": True, "websocket": False}
        if self.since(10, 9):
            body["update_check_done"] = True
        body["simulated"] = True
        return body

