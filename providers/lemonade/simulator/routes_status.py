"""Handlers: liveness, health, models, stats, system info, metrics."""

from __future__ import annotations

from typing import Any

from providers.lemonade.simulator.constants import (
    BASE_RAM_USED_GB,
    BASE_VRAM_USED_GB,
    MEM_TOTAL_GB,
)
from providers.lemonade.simulator.metrics import prometheus_text
from providers.lemonade.simulator.wire import Request, Response, json_response


class StatusRoutes:
    # ---- handlers: status --------------------------------------------------------------

    async def h_web_app(self, req: Request) -> Response:
        """lemond serves its web app at `/`; the simulator a page that says what it is."""
        return Response(200, (f"<!doctype html><html><head><title>Lemonade Server "
                              f"(simulated {self.version})</title></head><body><h1>lemond "
                              "simulator</h1><p>No web app: this is a test double.</p>"
                              "</body></html>").encode(), "text/html")

    async def h_live(self, req: Request) -> Response:
        return json_response({"status": "ok"})

    async def h_health(self, req: Request) -> Response:
        return json_response(self.health(req.port))

    async def h_models(self, req: Request) -> Response:
        show_all = req.query.get("show_all", [""])[0] == "true"  # exact string, as lemond
        ids = [cid for cid in sorted(self.catalog)
               if self.supported(cid) and (show_all or cid in self.downloaded)]
        return json_response({"object": "list", "data": [self.model_json(c) for c in ids]})

    async def h_model(self, req: Request, model_id: str) -> Response:
        cid = self.resolve_name(model_id)
        if cid is None:
            raise self.not_found(model_id)
        self.require_supported(cid, model_id)
        return json_response(self.model_json(cid))

    async def h_stats(self, req: Request) -> Response:
        if self.since(10, 1) and not self.since(10, 7):
            # Router::get_stats: the most recently used backend's telemetry, no totals
            # (they arrive in v10.7); with nothing loaded a 200 carrying an error object.
            model = self.most_recent()
            if model is None:
                return json_response({"error": {"message": "No model loaded",
                                                "type": "model_not_loaded"}})
            s = model.telemetry
            return json_response({
                "input_tokens": s.get("input_tokens", 0),
                "output_tokens": s.get("output_tokens", 0),
                "time_to_first_token": s.get("time_to_first_token", 0.0),
                "tokens_per_second": s.get("tokens_per_second", 0.0),
                "decode_token_times": s.get("decode_token_times", []),
                "prompt_tokens": s.get("prompt_tokens", 0)})
        s = self.state.stats
        body: dict[str, Any] = {
            "time_to_first_token": s.get("time_to_first_token"),
            "tokens_per_second": s.get("tokens_per_second"),
            "input_tokens": s.get("input_tokens"),
            "output_tokens": s.get("output_tokens"),
        }
        if not self.since(10, 1):
            body["decode_token_times"] = s.get("decode_token_times", [])
            return json_response(body)
        body["prompt_tokens"] = s.get("prompt_tokens")
        body["cache_tokens"] = s.get("cache_tokens")
        body.update(self.state.totals)
        if self.since(11, 7):
            body["routing_decisions_total"] = 0
            body["routing_switches_total"] = 0
        return json_response(body)

    async def h_system_stats(self, req: Request) -> Response:
        """handle_system_stats: `memory_gb` is RAM in use (MemTotal - MemAvailable, one
        decimal); `vram_gb` is the busiest AMD GPU's memory in use, on an APU VRAM + GTT
        (sysfs mem_info_*_used), null without one."""
        models = self.ready_models()
        busy = sum(m.busy for m in models)
        on_gpu = [m for m in models if "gpu" in m.device]
        on_npu = [m for m in models if "npu" in m.device]
        in_ram = [m for m in models if "gpu" not in m.device]
        return json_response({
            "cpu_percent": round(3.0 + 11.0 * busy, 1),
            "memory_gb": round(min(MEM_TOTAL_GB, BASE_RAM_USED_GB + sum(
                self.resident_gb(m) for m in in_ram)), 1),
            "gpu_percent": round(min(99.0, 1.0 + 45.0 * sum(m.busy for m in on_gpu)), 1),
            "vram_gb": round(BASE_VRAM_USED_GB + sum(self.resident_gb(m) for m in on_gpu), 2),
            "npu_percent": (round(min(99.0, 30.0 * sum(m.busy for m in on_npu)), 1)
                            if on_npu else None),
        })

    def resident_gb(self, model: Any) -> float:
        """What one backend holds: its weights plus, for a text model, an f16 KV cache of
        its context (~0.11 MB per token for the catalogue's small GGUFs)."""
        ctx = model.shown_options().get("ctx_size")
        kv = 0.11 * ctx / 1024 if model.type in ("llm", "embedding", "reranking") and \
            isinstance(ctx, int) and ctx > 0 else 0.0
        return self.size_gb(model.name) + kv

    async def h_metrics(self, req: Request) -> Response:
        return Response(200, prometheus_text(self).encode(), "text/plain; version=0.0.4")

