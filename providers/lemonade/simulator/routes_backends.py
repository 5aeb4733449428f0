"""Handlers: system info and the backend installer (`/v1/install`, `/v1/uninstall`).

The simulator installs nothing: it validates a request as lemond does, records the new
state (what `/v1/system-info` reports) and succeeds."""

from __future__ import annotations

import asyncio

from providers.lemonade.simulator.constants import (
    DISK_TOTAL_BYTES,
    GTT_TOTAL_GB,
    MEM_TOTAL_GB,
    VRAM_TOTAL_GB,
)
from providers.lemonade.simulator.wire import (
    ApiError,
    Request,
    Response,
    json_response,
    parse_required_json,
    sse,
)

GPU = ["Radeon 8060S Graphics (simulated)"]

# recipe → (modality, default backend, {backend: (devices, initial state)})
RECIPES = {
    "llamacpp": ("llm", "vulkan", {
        "vulkan": (GPU, "installed"), "rocm": (GPU, "installed"), "cpu": (["cpu"], "installed"),
        "metal": ([], "unsupported"), "cuda": ([], "unsupported")}),
    "whispercpp": ("transcription", "cpu", {
        "cpu": (["cpu"], "installed"), "vulkan": (GPU, "installable"),
        "npu": (["npu"], "installable")}),
    "sd-cpp": ("image", "vulkan", {
        "vulkan": (GPU, "installed"), "rocm": (GPU, "installable"),
        "cpu": (["cpu"], "installed")}),
    "kokoro": ("tts", "cpu", {"cpu": (["cpu"], "installed")}),
    "flm": ("llm", "npu", {"npu": (["npu"], "installable")}),
    "ryzenai-llm": ("llm", "npu", {"npu": (["npu"], "unsupported")}),
    "vllm": ("llm", "rocm", {"rocm": (GPU, "installable")}),
}

# BackendManager::get_release_url: the GitHub release each backend version comes from
# (versions as pinned in v10.6.0's backend_versions.json).
RELEASES = {
    ("llamacpp", "vulkan"): "ggml-org/llama.cpp/releases/tag/b9253",
    ("llamacpp", "cpu"): "ggml-org/llama.cpp/releases/tag/b9253",
    ("llamacpp", "metal"): "ggml-org/llama.cpp/releases/tag/b9253",
    ("llamacpp", "rocm"): "lemonade-sdk/llamacpp-rocm/releases/tag/b9247",
    ("whispercpp", "cpu"): "ggml-org/whisper.cpp/releases/tag/v1.8.4",
    ("whispercpp", "vulkan"): "ggml-org/whisper.cpp/releases/tag/v1.8.4",
    ("whispercpp", "npu"): "ggml-org/whisper.cpp/releases/tag/v1.8.4",
    ("sd-cpp", "cpu"): "leejet/stable-diffusion.cpp/releases/tag/master-616-cde20d5",
    ("sd-cpp", "vulkan"): "leejet/stable-diffusion.cpp/releases/tag/master-616-cde20d5",
    ("sd-cpp", "rocm"): "leejet/stable-diffusion.cpp/releases/tag/master-616-cde20d5",
}


class BackendsMixin:
    backend_states: dict[tuple[str, str], str]

    def reset_backends(self) -> None:
        self.backend_states = {(recipe, backend): state
                               for recipe, (_, _, backends) in RECIPES.items()
                               for backend, (_, state) in backends.items()}

    def recipes_json(self) -> dict:
        recipes = {}
        for name, (modality, default, backends) in RECIPES.items():
            shown = {}
            for backend, (devices, _) in backends.items():
                state = self.backend_states[(name, backend)]
                info = {"devices": devices, "state": state, "message": "",
                        "action": "" if state == "installed"
                        else f"lemonade backends install {name}:{backend}",
                        "version": "sim" if state == "installed" else ""}
                if (name, backend) in RELEASES:
                    info["release_url"] = "https://github.com/" + RELEASES[(name, backend)]
                    info["download_filename"] = f"{name}-{backend}-sim.zip"
                shown[backend] = info
            recipes[name] = {"default_backend": default, "display_name": name,
                             "modality": modality, "experimental": False, "options": [],
                             "backends": shown}
        return recipes

    async def h_system_info(self, req: Request) -> Response:
        """SystemInfoCache + handle_system_info: `Physical Memory` is MemTotal as
        "%.2f GB"; each AMD GPU carries its VRAM and GTT totals (`vram_gb`,
        `virtual_mem_gb`), `integrated` from v11.0; `model_storage` (the models' disk)
        arrives in v10.9."""
        gpu = {"name": GPU[0], "available": True}
        if self.since(11, 0):
            gpu["integrated"] = True
        gpu.update({"vram_gb": VRAM_TOTAL_GB, "virtual_mem_gb": GTT_TOTAL_GB,
                    "family": "gfx1151"})
        info: dict = {
            "OS Version": "Linux-6.14.0-sim-x86_64-with-glibc2.41",
            "Processor": "AMD RYZEN AI MAX+ 395 w/ Radeon 8060S (simulated)",
            "Physical Memory": f"{MEM_TOTAL_GB:.2f} GB",
            "devices": {
                "cpu": {"name": "AMD RYZEN AI MAX+ 395 (simulated)", "cores": 16,
                        "threads": 32, "available": True, "family": "x86_64"},
                "amd_gpu": [gpu],
                "nvidia_gpu": [],
                "amd_npu": {"name": "AMD XDNA 2 NPU (simulated)", "power_mode": "default",
                            "available": True, "family": "XDNA2"},
            },
            "recipes": self.recipes_json(),
        }
        if self.since(10, 6):
            info["no_fetch_executables"] = bool(self.config().get("no_fetch_executables"))
        if self.since(10, 9):
            used = int(sum(self.size_gb(c) for c in self.downloaded) * 1024 ** 3)
            info["model_storage"] = {
                "path": "/var/cache/huggingface/hub", "used_bytes": used,
                "total_bytes": DISK_TOTAL_BYTES, "free_bytes": DISK_TOTAL_BYTES - used}
        return json_response(info)

    @staticmethod
    def backend_request(body: object) -> tuple[str, str]:
        recipe = body.get("recipe") if isinstance(body, dict) else None
        backend = body.get("backend") if isinstance(body, dict) else None
        if not isinstance(recipe, str) or not recipe or not isinstance(backend, str) \
                or not backend:
            raise ApiError(400, {"error": "Both 'recipe' and 'backend' are required"})
        return recipe, backend

    async def h_install(self, req: Request) -> Response:
        """Server::handle_install: refuse what this system cannot run, else "install"."""
        body = parse_required_json(req.body)
        recipe, backend = self.backend_request(body)
        state = self.backend_states.get((recipe, backend))
        if state is None:
            raise ApiError(500, {"error": f"Unknown backend {recipe}:{backend}"})
        if state == "unsupported" and body.get("force") is not True:
            raise ApiError(400, {"error": f"Cannot install {recipe}:{backend} on this system: "
                                          "Backend is not supported on this system.",
                                 "recipe": recipe, "backend": backend})
        self.log("Info", "Server", f"Installing backend: {recipe}:{backend}")
        stream = body.get("stream") is True
        if not stream:
            if state != "installed":
                await asyncio.sleep(self.opts.pull_delay)
            self.backend_states[(recipe, backend)] = "installed"
            return json_response({"status": "success", "recipe": recipe, "backend": backend})

        async def events():
            if self.backend_states[(recipe, backend)] != "installed":
                name = f"{recipe}-{backend}-sim.zip"
                size = 50 * 1024 * 1024
                for step in range(1, 5):
                    await asyncio.sleep(self.opts.pull_delay / 4)
                    yield sse("progress", {
                        "file": name, "file_index": 1, "total_files": 1,
                        "bytes_downloaded": size * step // 4, "bytes_total": size,
                        "total_download_size": size, "bytes_previously_downloaded": 0,
                        "percent": 25 * step})
                self.backend_states[(recipe, backend)] = "installed"
            yield sse("complete", {"status": "ok"})
        return Response(200, content_type="text/event-stream", stream=events())

    async def h_uninstall(self, req: Request) -> Response:
        """Server::handle_uninstall: unload the models running on it, then "remove" it
        (uninstalling what is not installed succeeds too)."""
        recipe, backend = self.backend_request(parse_required_json(req.body))
        key = f"{recipe}_backend"
        for model in list(self.ready_models()):
            if model.recipe == recipe and model.options.get(key, backend) == backend:
                await self.evict(model, "unload")
        if self.backend_states.get((recipe, backend)) == "installed":
            self.backend_states[(recipe, backend)] = "installable"
        self.log("Info", "Server", f"Uninstalling backend: {recipe}:{backend}")
        return json_response({"status": "success", "recipe": recipe, "backend": backend})
