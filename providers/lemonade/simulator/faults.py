"""The simulator-only `/__sim__/` control surface: state, faults, reset, configure."""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import fields

from providers.lemonade.simulator.config import SimOptions
from providers.lemonade.simulator.wire import ApiError, Request, Response, json_response


class FaultControl:
    async def apply_faults(self) -> None:
        started = time.monotonic()
        # Re-read the fault each tick so `clear` releases requests that are already hanging.
        while self.faults.get("hang"):
            if time.monotonic() - started >= float(self.faults["hang"]):
                break
            await asyncio.sleep(0.05)

    # ---- /__sim__/ control routes ------------------------------------------------------

    def sim_state(self) -> dict:
        state = self.state
        return {
            "simulated": True,
            "version": self.version,
            "version_shape": self.opts.version_shape,
            "generation": self.generation,
            "loaded": [{"model_name": m.name, "type": m.type, "status": m.status,
                        "pinned": m.pinned, "busy": m.busy, "streaming": m.streaming,
                        "device": m.device, "recipe": m.recipe, "options": m.options,
                        "last_use": m.last_use, "pid": m.pid}
                       for m in state.loaded.values()],
            "loaded_names": [m.name for m in self.ready_models()],
            "load_calls": dict(self.load_calls),
            "load_calls_total": sum(self.load_calls.values()),
            "load_requests": dict(self.load_requests),
            "load_requests_total": sum(self.load_requests.values()),
            "max_open_load_requests": dict(self.max_open_load_requests),
            "load_failures": dict(self.load_failures),
            "evictions": list(self.evictions),
            "in_flight_loads": list(state.in_flight_loads),
            "queued_loads": state.queued_loads,
            "in_flight_requests": state.in_flight_requests,
            "downloaded": sorted(self.downloaded),
            "active_pulls": [dict(p) for p in self.pulls.values()],
            "websocket_port": self.websocket_port,
            "cancelled_pulls": list(self.cancelled_pulls),
            "faults": {**self.faults,
                       "fail_next_load": [dict(f) for f in state.fail_next],
                       "fail_models": sorted(state.fail_models)},
            "stats": {**state.stats, **state.totals},
            "options": {f.name: getattr(self.opts, f.name) for f in fields(self.opts)},
            "config": self.config(),
            "persisted_config": copy.deepcopy(self.persisted_config),  # config.json
            "log_seq": self.logs.seq,
        }

    async def sim_control(self, req: Request) -> Response:
        action = req.path[len("/__sim__/"):].strip("/")
        if action == "state" and req.method in ("GET", "HEAD"):
            return json_response(self.sim_state())
        if req.method != "POST" or action not in ("fault", "reset", "configure"):
            raise ApiError(404, {"error": {"message": "Unknown simulator control route",
                                           "type": "not_found", "path": req.path}})
        body = req.json_or_none() or {}
        if not isinstance(body, dict):
            raise ApiError(400, {"error": "body must be a JSON object"})
        if action == "reset":
            self._reset_everything()
            self.log("Info", "Simulator", "Reset to the startup state")
            return json_response({"status": "ok", "state": self.sim_state()})
        if action == "configure":
            try:
                merged = {f.name: getattr(self.opts, f.name) for f in fields(self.opts)}
                merged.update(body)
                self.opts = SimOptions.build(**merged)
            except (TypeError, ValueError) as exc:
                raise ApiError(400, {"error": str(exc)}) from None
            if "max_loaded_models" in body:
                self.persisted_config["max_loaded_models"] = self.opts.max_loaded_models
                self.state.runtime_config.pop("max_loaded_models", None)
            if "fail_models" in body:
                self.state.fail_models = set(self.opts.fail_models)
            if "downloaded" in body:
                self.downloaded = {n for n in self.opts.downloaded if n in self.catalog}
            self.logs.echo = self.opts.verbose
            return json_response({"status": "ok", "state": self.sim_state()})
        return json_response(await self.fault(body))

    async def fault(self, body: dict) -> dict:
        kind = body.get("kind")
        if kind == "fail_next_load":
            count = body.get("count", 1)
            self.state.fail_next.append({"model": body.get("model"), "message":
                                         body.get("message"), "count": int(count),
                                         "transient": body.get("transient") is True})
        elif kind == "evict_all":
            await self.evict_all("fault", wait_busy=False)
        elif kind == "hang":
            seconds = body.get("seconds", 30)
            if not isinstance(seconds, (int, float)) or seconds < 0:
                raise ApiError(400, {"error": "hang needs a non-negative 'seconds'"})
            self.faults["hang"] = float(seconds)
        elif kind in ("malformed_json", "html_error", "error_500"):
            self.faults[kind] = True
        elif kind == "restart":
            self._restart()
        elif kind == "clear":
            self.faults.clear()
            self.state.fail_next.clear()
        else:
            raise ApiError(400, {"error": f"unknown fault kind {kind!r}; known: fail_next_load, "
                                          "evict_all, hang, malformed_json, html_error, "
                                          "error_500, restart, clear"})
        self.log("Info", "Simulator", f"Fault injected: {kind}")
        return {"status": "ok", "kind": kind, "faults": self.sim_state()["faults"]}


