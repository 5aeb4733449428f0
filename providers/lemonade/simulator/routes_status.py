"""Handlers: liveness, health, models, stats, system info, metrics."""

from __future__ import annotations

from typing import Any

from providers.lemonade.simulator.metrics import prometheus_text
from providers.lemonade.simulator.wire import Request, Response, json_response


class StatusRoutes:
    # ---- handlers: status --------------------------------------------------------------

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
        models = self.ready_models()
        busy = sum(m.busy for m in models)
        on_gpu = [m for m in models if "gpu" in m.device]
        on_npu = [m for m in models if "npu" in m.device]
        return json_response({
            "cpu_percent": round(3.0 + 11.0 * busy, 1),
            "memory_gb": round(6.2 + sum(self.size_gb(m.name) for m in models
                                         if m.device == "cpu"), 2),
            "gpu_percent": round(min(99.0, 1.0 + 45.0 * sum(m.busy for m in on_gpu)), 1),
            "vram_gb": round(0.4 + sum(self.size_gb(m.name) * 1.1 for m in on_gpu), 2),
            "npu_percent": (round(min(99.0, 30.0 * sum(m.busy for m in on_npu)), 1)
                            if on_npu else None),
        })

    async def h_system_info(self, req: Request) -> Response:
        used = int(sum(self.size_gb(c) for c in self.downloaded) * 1024 ** 3)
        total = 2 * 1024 ** 4

        def backend(devices, state="installed", version="sim"):
            return {"devices": devices, "state": state, "message": "",
                    "action": "" if state == "installed" else
                    "lemonade backends install {recipe}:{backend}",
                    "version": version if state == "installed" else "",
                    "release_url": "", "download_filename": ""}

        def recipe(display, modality, default, backends):
            for name, info in backends.items():
                info["action"] = info["action"].format(recipe=display, backend=name)
            return {"default_backend": default, "display_name": display,
                    "modality": modality, "experimental": False, "options": [],
                    "backends": backends}

        gpu = ["Radeon 8060S Graphics (simulated)"]
        return json_response({
            "OS Version": "Linux-6.14.0-sim-x86_64-with-glibc2.41",
            "Processor": "AMD RYZEN AI MAX+ 395 w/ Radeon 8060S (simulated)",
            "Physical Memory": "128.0 GB",
            "model_storage": {"path": "/var/cache/huggingface/hub", "used_bytes": used,
                              "total_bytes": total, "free_bytes": total - used},
            "devices": {
                "cpu": {"name": "AMD RYZEN AI MAX+ 395 (simulated)", "cores": 16,
                        "threads": 32, "available": True, "family": "x86_64"},
                "amd_gpu": [{"name": gpu[0], "vram_gb": 96.0, "available": True,
                             "family": "gfx1151"}],
                "nvidia_gpu": [],
                "amd_npu": {"name": "AMD XDNA 2 NPU (simulated)", "power_mode": "default",
                            "available": True, "family": "XDNA2"},
            },
            "recipes": {
                "llamacpp": recipe("llamacpp", "llm", "vulkan", {
                    "vulkan": backend(gpu), "rocm": backend(gpu), "cpu": backend(["cpu"]),
                    "metal": backend([], "unsupported"), "cuda": backend([], "unsupported")}),
                "whispercpp": recipe("whispercpp", "transcription", "cpu", {
                    "cpu": backend(["cpu"]), "vulkan": backend(gpu, "installable"),
                    "npu": backend(["npu"], "installable")}),
                "sd-cpp": recipe("sd-cpp", "image", "vulkan", {
                    "vulkan": backend(gpu), "rocm": backend(gpu, "installable"),
                    "cpu": backend(["cpu"])}),
                "kokoro": recipe("kokoro", "tts", "cpu", {"cpu": backend(["cpu"])}),
                "flm": recipe("flm", "llm", "npu", {"npu": backend(["npu"], "installable")}),
                "ryzenai-llm": recipe("ryzenai-llm", "llm", "npu", {
                    "npu": backend(["npu"], "unsupported")}),
                "vllm": recipe("vllm", "llm", "rocm", {"rocm": backend(gpu, "installable")}),
            },
        })

    async def h_metrics(self, req: Request) -> Response:
        return Response(200, prometheus_text(self).encode(), "text/plain; version=0.0.4")

