"""The model registry: names, catalogue entries, load options."""

from __future__ import annotations

from typing import Any

from providers.lemonade import catalog
from providers.lemonade.simulator.config import (
    backend_problem,
    ctx_size_problem,
    llamacpp_args_problem,
)
from providers.lemonade.simulator.constants import RECIPE_OPTION_KEYS
from providers.lemonade.simulator.wire import ApiError, invalid_request, model_error


class RegistryMixin:
    # ---- the model registry -----------------------------------------------------------

    def resolve_name(self, name: Any) -> str | None:
        """Canonical id for a model name: `user.X` beats a built-in `X` (lemond precedence)."""
        if not isinstance(name, str) or not name:
            return None
        if name.startswith("builtin."):
            bare = name[len("builtin."):]
            return bare if bare in self.catalog and not bare.startswith("user.") else None
        if name in self.catalog:
            return name
        if f"user.{name}" in self.catalog:
            return f"user.{name}"
        return None

    def supported(self, cid: str) -> bool:
        """lemond's model filtering: a Linux box hides models it cannot run."""
        return bool(self.config().get("disable_model_filtering")) or \
            catalog.runs_on_linux(self.catalog[cid])

    def require_supported(self, cid: str, requested: str) -> None:
        if not self.supported(cid):
            recipe = self.catalog[cid].get("recipe")
            raise model_error("model_not_supported",
                              f"Model '{requested}' is not supported on this system "
                              f"(recipe {recipe} is not available on Linux).", requested)

    def not_found(self, name: str) -> ApiError:
        names = [cid for cid in sorted(self.catalog) if self.supported(cid)]
        shown = ", ".join(f"'{n}'" for n in names[:3])
        more = f", and {len(names) - 3} more" if len(names) > 3 else ""
        return model_error(
            "model_not_found",
            f"Model '{name}' was not found. Available models include: {shown}{more}. "
            "Use 'lemonade list' or GET /api/v1/models?show_all=true to see all available models.",
            name)

    def kind_of(self, cid: str) -> str:
        return catalog.model_type(self.catalog[cid])

    def model_json(self, cid: str) -> dict:
        entry = self.catalog[cid]
        ckpt = catalog.checkpoint(entry)
        info: dict[str, Any] = {
            "id": cid, "object": "model", "created": 1234567890, "owned_by": "lemonade",
            "checkpoint": ckpt,
            "checkpoints": entry.get("checkpoints") or ({"main": ckpt} if ckpt else {}),
            "recipe": entry.get("recipe", ""),
            "downloaded": cid in self.downloaded,
            "suggested": bool(entry.get("suggested", False)),
            "labels": list(entry.get("labels") or []),
            "recipe_options": {**(entry.get("recipe_options") or {}),
                               **self.saved_options.get(cid, {})},
        }
        if self.since(11, 0):
            info["update_available"] = False
        if self.since(11, 5):
            info["source"] = entry.get("source", "huggingface")
            info["registry_source"] = entry.get("source", "huggingface")
        if entry.get("mmproj"):
            info["mmproj"] = entry["mmproj"]
        if entry.get("components"):
            info["components"] = list(entry["components"])
        elif self.since(11, 5):
            info["components"] = []
        size = self.size_gb(cid)
        if size:
            info["size"] = size
        if entry.get("image_defaults"):
            info["image_defaults"] = entry["image_defaults"]
        if "ctx_size" in RECIPE_OPTION_KEYS.get(entry.get("recipe", ""), ()):
            loaded = self.state.loaded.get(cid)
            info["context_length"] = (loaded.shown_options()["ctx_size"] if loaded
                                      else self.config()["ctx_size"])
        return info

    def size_gb(self, cid: str) -> float:
        entry = self.catalog.get(cid) or {}
        if entry.get("size"):
            return float(entry["size"])
        return round(sum(self.size_gb(c) for c in entry.get("components") or []
                         if c in self.catalog), 3)

    # ---- option resolution -------------------------------------------------------------

    def resolve_options(self, cid: str, request: dict) -> dict:
        """The options a load would run with: request ← saved (recipe_options.json) ←
        catalogue ← config. An explicit null ignores the saved value for this load only."""
        entry = self.catalog[cid]
        recipe = entry.get("recipe", "")
        saved = self.saved_options.get(cid, {})
        builtin = entry.get("recipe_options") or {}
        cfg = self.config()
        image = entry.get("image_defaults") or {}

        def pick(key: str, default: Any) -> Any:
            if key in request:
                return default if request[key] is None else request[key]
            if key in saved:
                return saved[key]
            return builtin.get(key, default)

        def backend_of(key: str, section: str, auto: str) -> str:
            backend = pick(key, cfg[section]["backend"])
            if backend == "auto":
                return auto
            problem = backend_problem(recipe, backend, key)
            if problem:
                raise invalid_request(problem)
            return backend

        opts: dict[str, Any] = {}
        if "ctx_size" in RECIPE_OPTION_KEYS.get(recipe, ()):
            ctx = pick("ctx_size", cfg["ctx_size"])
            problem = ctx_size_problem(ctx)
            if problem:
                raise invalid_request(problem)
            opts["ctx_size"] = ctx
        if recipe == "llamacpp":
            # `auto` picks vulkan on the AMD boxes hal0 targets
            backend = backend_of("llamacpp_backend", "llamacpp", "vulkan")
            args = pick("llamacpp_args", cfg["llamacpp"]["args"]) or ""
            problem = llamacpp_args_problem(args)
            if problem:
                raise invalid_request(problem)
            opts["llamacpp_backend"] = backend
            opts["llamacpp_args"] = str(args)
            device = pick("llamacpp_device", None)
            if device:
                opts["llamacpp_device"] = device
        elif recipe == "flm":
            opts["flm_args"] = pick("flm_args", cfg["flm"]["args"]) or ""
        elif recipe == "vllm":
            opts["vllm_backend"] = backend_of("vllm_backend", "vllm", "rocm")
            opts["vllm_args"] = pick("vllm_args", cfg["vllm"]["args"]) or ""
        elif recipe == "whispercpp":
            opts["whispercpp_backend"] = backend_of("whispercpp_backend", "whispercpp", "cpu")
            opts["whispercpp_args"] = pick("whispercpp_args", cfg["whispercpp"]["args"]) or ""
        elif recipe == "sd-cpp":
            opts["sd-cpp_backend"] = backend_of("sd-cpp_backend", "sdcpp", "vulkan")
            opts["sdcpp_args"] = pick("sdcpp_args", cfg["sdcpp"]["args"]) or ""
            for key in ("steps", "cfg_scale", "width", "height"):
                opts[key] = pick(key, image.get(key, cfg["sdcpp"][key]))
            for key in ("sampling_method", "flow_shift"):
                value = pick(key, image.get(key))
                if value is not None:
                    opts[key] = value
        return opts

    @staticmethod
    def device_for(cid: str, recipe: str, opts: dict) -> str:
        if recipe == "llamacpp":
            return "cpu" if opts.get("llamacpp_backend") == "cpu" else "gpu"
        if recipe == "flm":
            return "npu"
        if recipe == "ryzenai-llm":
            if cid.upper().endswith("-CPU"):
                return "cpu"
            return "gpu|npu" if "hybrid" in cid.lower() else "npu"
        if recipe == "whispercpp":
            backend = opts.get("whispercpp_backend")
            return backend if backend in ("cpu", "npu") else "gpu"
        if recipe == "sd-cpp":
            return "cpu" if opts.get("sd-cpp_backend") == "cpu" else "gpu"
        if recipe == "vllm":
            return "gpu"
        return "cpu"

    def register_user_model(self, name: str, body: dict) -> str:
        recipe = body.get("recipe")
        if not name.startswith("user."):
            raise ApiError(400, {"error": f"New model names must start with 'user.' "
                                          f"(got '{name}')", "code": "invalid_model_name"})
        if recipe not in RECIPE_OPTION_KEYS:
            raise ApiError(400, {"error": f"Unknown or missing recipe for {name}: {recipe!r}",
                                 "code": "invalid_recipe"})
        entry: dict[str, Any] = {"recipe": recipe, "suggested": False, "source":
                                 body.get("source") or "huggingface"}
        if isinstance(body.get("checkpoints"), dict):
            entry["checkpoints"] = body["checkpoints"]
        else:
            entry["checkpoint"] = body["checkpoint"]
        labels = list(body.get("labels") or [])
        for legacy in ("reasoning", "vision", "embedding", "reranking"):
            if body.get(legacy) is True:
                labels.append("embeddings" if legacy == "embedding" else legacy)
        entry["labels"] = labels
        if body.get("mmproj"):
            entry["mmproj"] = body["mmproj"]
        entry["size"] = float(body.get("size") or 1.0)
        self.catalog[name] = entry
        self.log("Info", "ModelManager", f"Registered user model {name} ({recipe})")
        return name

