"""The model registry: names, catalogue entries, load options."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from providers.lemonade import catalog
from providers.lemonade.simulator.config import (
    backend_problem,
    ctx_size_problem,
    llamacpp_args_problem,
)
from providers.lemonade.simulator.constants import LLAMACPP_RESERVED_V10, RECIPE_OPTION_KEYS
from providers.lemonade.simulator.wire import ApiError, invalid_request, model_error

# ModelManager's USER_DEFINED_MODEL_PROPS: what a pull may set on a user model
USER_MODEL_PROPS = ("checkpoints", "checkpoint", "recipe", "mmproj", "size", "image_defaults",
                    "components")
SOURCE_RANK = {"user.": 0, "extra.": 1, "builtin.": 2}  # lemond's precedence_rank


def split_source(key: str) -> tuple[str, str]:
    """A catalogue key's source prefix and bare name (unprefixed keys are built-ins)."""
    for prefix in ("user.", "extra."):
        if key.startswith(prefix):
            return prefix, key[len(prefix):]
    return "builtin.", key


def is_reserved_registration_name(name: str) -> bool:
    """lemon::is_reserved_registration_name: `extra.*` / `builtin.*` cannot be registered,
    nor `user.extra.*` / `user.builtin.*` (they would hijack those alias slots)."""
    reserved = ("extra.", "builtin.")
    return name.startswith(reserved) or (name.startswith("user.")
                                         and name[len("user."):].startswith(reserved))


def discover_extra_models(directory: str) -> dict[str, dict]:
    """ModelManager::discover_extra_models: every GGUF under `extra_models_dir`. A file in
    the root is the model `extra.<stem>` (checkpoint: its path); a subdirectory is one
    model `extra.<dir name>` (checkpoint: the directory; an `mmproj` file in it adds the
    `vision` label). Discovered models are llamacpp, suggested, downloaded, `custom`."""
    root = Path(directory) if directory else None
    if root is None or not root.is_dir():
        return {}
    standalone: list[Path] = []
    by_dir: dict[Path, list[Path]] = {}
    for path in root.rglob("*"):
        if path.is_file() and path.name.lower().endswith(".gguf"):
            if path.parent == root:
                standalone.append(path)
            else:
                by_dir.setdefault(path.parent, []).append(path)
    gib = 1024.0 ** 3
    found: dict[str, dict] = {}
    for path in standalone:
        if "mmproj" in path.name.lower():
            continue
        found[f"extra.{path.stem}"] = {
            "checkpoint": str(path), "recipe": "llamacpp", "suggested": True,
            "labels": ["custom"], "size": path.stat().st_size / gib,
            "source": "extra_models_dir"}
    for folder, files in by_dir.items():
        models = sorted(f for f in files if "mmproj" not in f.name.lower())
        if not models:
            continue
        mmproj = [f for f in files if "mmproj" in f.name.lower()]
        entry: dict[str, Any] = {
            "checkpoints": {"main": str(folder)}, "recipe": "llamacpp", "suggested": True,
            "labels": ["custom"], "size": sum(f.stat().st_size for f in files) / gib,
            "source": "extra_models_dir"}
        if mmproj:
            entry["checkpoints"]["mmproj"] = mmproj[-1].name
            entry["labels"].append("vision")
        found[f"extra.{folder.name}"] = entry
    return found


def shlex_split(args: str) -> list[str]:
    """lemon::utils::parse_custom_args: split on spaces, quotes group (and are dropped)."""
    tokens, current, quote = [], "", ""
    for char in args:
        if not quote and char in "\"'":
            quote = char
        elif quote and char == quote:
            quote = ""
        elif not quote and char == " ":
            if current:
                tokens.append(current)
            current = ""
        else:
            current += char
    if current:
        tokens.append(current)
    return tokens


class OptionLayers:
    """Where a load option comes from, first hit wins: the load request (an explicit null
    skips the saved value), the saved options, the catalogue entry's, then the default."""

    def __init__(self, recipe: str, request: dict, saved: dict, builtin: dict, cfg: dict):
        self.recipe = recipe
        self.request = request
        self.saved = saved
        self.builtin = builtin
        self.cfg = cfg  # the effective config (the defaults' layer)

    def pick(self, key: str, default: Any) -> Any:
        if key in self.request:
            return default if self.request[key] is None else self.request[key]
        if key in self.saved:
            return self.saved[key]
        return self.builtin.get(key, default)

    def backend(self, key: str, section: str, auto: str) -> str:
        """A backend option: the config section's backend by default, `auto` resolved."""
        backend = self.pick(key, self.cfg[section]["backend"])
        if backend == "auto":
            return auto
        problem = backend_problem(self.recipe, backend, key)
        if problem:
            raise invalid_request(problem)
        return backend


def sdcpp_load_options(layers: OptionLayers, image: dict) -> dict[str, Any]:
    """sd-cpp's options; the image settings default to the catalogue's image defaults."""
    cfg = layers.cfg
    opts: dict[str, Any] = {
        "sd-cpp_backend": layers.backend("sd-cpp_backend", "sdcpp", "vulkan"),
        "sdcpp_args": layers.pick("sdcpp_args", cfg["sdcpp"]["args"]) or "",
    }
    for key in ("steps", "cfg_scale", "width", "height"):
        opts[key] = layers.pick(key, image.get(key, cfg["sdcpp"][key]))
    for key in ("sampling_method", "flow_shift"):
        value = layers.pick(key, image.get(key))
        if value is not None:
            opts[key] = value
    return opts


class RegistryMixin:
    _names: tuple[dict[str, str], dict[str, str]] | None = None

    # ---- the model registry -----------------------------------------------------------

    def name_maps(self) -> tuple[dict[str, str], dict[str, str]]:
        """lemond's naming spec (v10.5+, ModelManager::rebuild_public_model_aliases_locked):
        (input alias → catalogue key, catalogue key → published id).

        Keys are lemond's cache keys: built-ins bare, `user.X`, `extra.X`. Per bare name the
        precedence winner (user > extra > builtin) is published bare and the bare name
        resolves to it; a shadowed entry is published, and resolvable, as `user.X` /
        `extra.X` / `builtin.X`. `builtin.X` always resolves to a built-in X."""
        if self._names is None:
            by_bare: dict[str, list[tuple[int, str, str]]] = {}
            for key in self.catalog:
                source, bare = split_source(key)
                by_bare.setdefault(bare, []).append((SOURCE_RANK[source], key, source))
            aliases: dict[str, str] = {}
            public: dict[str, str] = {}
            for bare, entries in by_bare.items():
                entries.sort()
                winner = entries[0][1]
                aliases[bare] = winner
                public[winner] = bare
                for _, key, source in entries[1:]:
                    published = source + bare
                    public[key] = published
                    if published != key:
                        aliases[published] = key
            for key in self.catalog:
                if split_source(key)[0] == "builtin.":
                    aliases.setdefault("builtin." + key, key)
            self._names = (aliases, public)
        return self._names

    def rescan_extra_models(self) -> None:
        """Rediscover `extra.*` models (at start and when `extra_models_dir` changes, as
        lemond's set_extra_models_dir does)."""
        for key in [k for k in self.catalog if k.startswith("extra.")]:
            del self.catalog[key]
            self.downloaded.discard(key)
        for key, entry in discover_extra_models(self.config().get("extra_models_dir")).items():
            self.catalog[key] = entry
            self.downloaded.add(key)
        self.catalog_changed()

    def catalog_changed(self) -> None:
        """Forget the name maps: a model was registered, deleted or discovered."""
        self._names = None

    def naming_spec(self) -> bool:
        return self.since(10, 5)  # canonical ids and published bare names arrived in v10.5

    def resolve_name(self, name: Any) -> str | None:
        """The catalogue key a model name resolves to (ModelManager::resolve_model_name),
        or None for a name lemond does not know."""
        if not isinstance(name, str) or not name:
            return None
        if not self.naming_spec():  # before v10.5: `user.X` beats a built-in `X`
            if name in self.catalog:
                return name
            return f"user.{name}" if f"user.{name}" in self.catalog else None
        key = self.name_maps()[0].get(name, name)
        return key if key in self.catalog else None

    def public_name(self, cid: str) -> str:
        """The id lemond publishes for a catalogue key (in /v1/models, health, …)."""
        if not self.naming_spec():
            return cid
        return self.name_maps()[1].get(cid, cid)

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
        names = sorted(self.public_name(cid) for cid in self.catalog if self.supported(cid))
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
            "id": self.public_name(cid), "object": "model", "created": 1234567890, "owned_by": "lemonade",
            "checkpoint": ckpt,
            "checkpoints": entry.get("checkpoints") or ({"main": ckpt} if ckpt else {}),
            "recipe": entry.get("recipe", ""),
            "downloaded": cid in self.downloaded,
            "suggested": bool(entry.get("suggested", False)),
            "labels": list(entry.get("labels") or []),
            "recipe_options": self.recipe_options_of(cid),
        }
        if self.since(11, 0):
            info["update_available"] = False
        if self.since(11, 5):
            info["source"] = entry.get("source", "huggingface")
            info["registry_source"] = entry.get("source", "huggingface")
        if entry.get("mmproj"):
            info["mmproj"] = entry["mmproj"]
        if entry.get("components"):
            info["components"] = [self.public_name(c) for c in entry["components"]]
        elif self.since(10, 6):
            info["components"] = []
        size = self.size_gb(cid)
        if size:
            info["size"] = size
        if entry.get("image_defaults"):
            info["image_defaults"] = entry["image_defaults"]
        window = self.max_context_window(cid)
        if window:
            info["max_context_window"] = window
        return info

    def max_context_window(self, cid: str) -> int:
        """The static context length lemond reads from a downloaded llamacpp model's GGUF
        (or an FLM LLM's config) — populate_static_max_context_window; 0 when unknown."""
        entry = self.catalog[cid]
        recipe = entry.get("recipe")
        if cid not in self.downloaded or entry.get("source") == "extra_models_dir":
            return 0  # the simulator has no real GGUF to read for a discovered file
        if recipe == "llamacpp":
            return 40960 if self.kind_of(cid) == "llm" else 8192
        if recipe == "flm" and self.kind_of(cid) == "llm":
            return 32768
        return 0

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
        layers = OptionLayers(recipe, request, self.saved_options.get(cid, {}),
                              entry.get("recipe_options") or {}, self.config())
        cfg = layers.cfg
        image = entry.get("image_defaults") or {}
        opts: dict[str, Any] = {}
        if "ctx_size" in RECIPE_OPTION_KEYS.get(recipe, ()):
            ctx = layers.pick("ctx_size", cfg["ctx_size"])
            problem = ctx_size_problem(ctx)
            if problem:
                raise invalid_request(problem)
            opts["ctx_size"] = ctx
        if recipe == "llamacpp":
            opts.update(self.llamacpp_load_options(layers))
        elif recipe == "flm":
            opts["flm_args"] = layers.pick("flm_args", cfg["flm"]["args"]) or ""
        elif recipe == "vllm":
            opts["vllm_backend"] = layers.backend("vllm_backend", "vllm", "rocm")
            opts["vllm_args"] = layers.pick("vllm_args", cfg["vllm"]["args"]) or ""
        elif recipe == "whispercpp":
            opts["whispercpp_backend"] = layers.backend("whispercpp_backend", "whispercpp",
                                                        "cpu")
            opts["whispercpp_args"] = layers.pick("whispercpp_args",
                                                  cfg["whispercpp"]["args"]) or ""
        elif recipe == "sd-cpp":
            opts.update(sdcpp_load_options(layers, image))
        return opts

    def llamacpp_load_options(self, layers: OptionLayers) -> dict[str, Any]:
        # `auto` picks vulkan on the AMD boxes hal0 targets
        backend = layers.backend("llamacpp_backend", "llamacpp", "vulkan")
        args = layers.pick("llamacpp_args", layers.cfg["llamacpp"]["args"]) or ""
        problem = llamacpp_args_problem(args)
        if problem and self.since(11, 0):  # v10.x: the backend refuses them at start
            raise invalid_request(problem)
        opts: dict[str, Any] = {"llamacpp_backend": backend, "llamacpp_args": str(args)}
        device = layers.pick("llamacpp_device", None)
        if device:
            opts["llamacpp_device"] = device
        return opts

    def backend_start_problem(self, recipe: str, options: dict) -> str | None:
        """Why a v10.x backend refuses to start with these options (its custom-args check,
        validate_custom_args), or None."""
        if recipe != "llamacpp" or self.since(11, 0):
            return None
        for token in shlex_split(options.get("llamacpp_args") or ""):
            flag = token.split("=", 1)[0]
            if flag.startswith("-") and flag in LLAMACPP_RESERVED_V10:
                return ("Invalid custom llama-server arguments:\n"
                        f"Argument '{flag}' is managed by Lemonade and cannot be overridden.\n"
                        f"Reserved arguments: {', '.join(sorted(LLAMACPP_RESERVED_V10))}")
        return None

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
        """ModelManager::register_user_model (called by a pull that names a new, or
        re-registers an existing, `user.*` model): the known properties, `custom` plus the
        given and implied labels, always suggested; the pull's `recipe_options` are merged
        over the model's and saved, as download_model does."""
        key = name
        entry: dict[str, Any] = {prop: copy.deepcopy(body[prop]) for prop in USER_MODEL_PROPS
                                 if prop in body}
        labels = {"custom", *(x for x in body.get("labels") or [] if isinstance(x, str))}
        for legacy, label in (("reasoning", "reasoning"), ("vision", "vision"),
                              ("embedding", "embeddings"), ("reranking", "reranking")):
            if body.get(legacy) is True:
                labels.add(label)
        if body.get("recipe") == "sd-cpp":
            labels.add("image")
        if body.get("recipe") == "whispercpp":
            labels.update(("transcription", "realtime-transcription"))
        entry["labels"] = sorted(labels)  # a std::set in lemond
        entry["suggested"] = True
        entry.setdefault("size", 1.0)
        self.catalog[key] = entry
        self.catalog_changed()
        if isinstance(body.get("recipe_options"), dict):
            saved = self.saved_options.setdefault(key, {})
            saved.update({**self.recipe_options_of(key), **body["recipe_options"]})
        self.log("Info", "ModelManager", f"Registered user model {key} ({entry.get('recipe')})")
        return key

    def recipe_options_of(self, cid: str) -> dict:
        """A model's recipe options as /v1/models shows them (build_recipe_options):
        image_defaults ← the catalogue's recipe_options ← the saved ones."""
        entry = self.catalog[cid]
        merged = dict(entry.get("image_defaults") or {}) if self.since(10, 6) else {}
        merged.update(entry.get("recipe_options") or {})
        merged.update(self.saved_options.get(cid, {}))
        return merged
