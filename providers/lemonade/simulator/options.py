"""Per-model recipe options as lemond v11.7 resolves them, and `/v1/models/{id}/options`.

lemond (`recipe_options.cpp`, `Router::resolve_effective_options`, `Server::handle_load`)
resolves a load's options through layers, each filling only what the one above left unset:

    request  ←  the model's own (catalogue recipe_options, overlaid by the saved
                recipe_options.json entry)  ←  the global config (llamacpp.args, ctx_size…)

A value that reads as "not set" ("" / "auto" / -1 / null; for ctx_size only a non-number)
never fills a layer. `*_args` values are merged flag by flag rather than replaced when
`merge_args` is on (the default): the higher layer's flag wins, the lower layer's other
flags are kept. In a `/v1/load` body an explicit null masks the saved value of that key
for this load only, and any `*_args` key masks the saved args of the same key (so request
args replace the saved ones, and still merge with the global ones).

The options endpoint (v11.7+) reports `saved` (the recipe_options.json entry), `effective`
(every option the recipe accepts, resolved: a `/v1/load` body that reproduces the load) and
`defaults` (the same without the saved entry), and POST merges validated changes into the
saved entry (null or an empty value clears a key; `dry_run` previews), DELETE erases it.
"""

from __future__ import annotations

from typing import Any

from providers.lemonade.simulator.wire import (
    ApiError,
    Request,
    Response,
    json_response,
    parse_required_json,
)

INT64_MAX = 2**63 - 1
# The options every recipe accepts (recipe_options.cpp common_defaults); `auto_evict`
# null means "follow the global config".
COMMON_DEFAULTS: dict[str, Any] = {
    "ctx_size": -1, "merge_args": True, "auto_evict": None, "evict_idle_timeout": 300,
    "downsize_idle_timeout": 60, "evict_weight_factor": 1.0, "pinned": False,
}
# Each backend descriptor's own options and their defaults (include/lemon/backends/*/).
DESCRIPTOR_OPTIONS: dict[str, dict[str, Any]] = {
    "llamacpp": {"llamacpp_backend": "", "llamacpp_device": "", "llamacpp_args": ""},
    "flm": {"flm_args": ""},
    "ryzenai-llm": {},
    "vllm": {"vllm_backend": "", "vllm_args": ""},
    "whispercpp": {"whispercpp_backend": "", "whispercpp_args": ""},
    "sd-cpp": {"sd-cpp_backend": "", "sdcpp_args": "", "steps": 20, "cfg_scale": 7.0,
               "width": 512, "height": 512, "sampling_method": "", "flow_shift": 0.0},
    "kokoro": {},
    "moonshine": {"moonshine_args": ""},
    "onnxruntime": {"onnxruntime_args": ""},
}
USES_CTX_SIZE = ("llamacpp", "flm", "ryzenai-llm", "vllm")
CONFIG_SECTIONS = {"sd-cpp": "sdcpp", "ryzenai-llm": "ryzenai"}
# What `<recipe>_backend` resolves to when nothing sets it (the first backend this box
# supports: the AMD GPU boxes hal0 targets).
AUTO_BACKENDS = {"llamacpp": "vulkan", "whispercpp": "cpu", "sd-cpp": "vulkan",
                 "vllm": "rocm"}
# Load options an inference request may carry into an auto-load (everything else in the
# body is request-scoped: #2663).
AUTOLOAD_OPTIONS = ("ctx_size",)
# What an automatic ctx_size resolves to on the simulated box.
AUTO_CTX_SIZE = 32768


def keys_for_recipe(recipe: str) -> list[str]:
    keys = ["ctx_size"] if recipe in USES_CTX_SIZE else []
    keys += list(DESCRIPTOR_OPTIONS.get(recipe, {}))
    if recipe in DESCRIPTOR_OPTIONS:
        keys.append("merge_args")
    return [*keys, "auto_evict", "evict_idle_timeout", "downsize_idle_timeout",
            "evict_weight_factor", "pinned"]


def default_of(recipe: str, key: str) -> Any:
    if key in COMMON_DEFAULTS:
        return COMMON_DEFAULTS[key]
    if key.endswith("_backend") and recipe in AUTO_BACKENDS:
        return AUTO_BACKENDS[recipe]
    return DESCRIPTOR_OPTIONS.get(recipe, {}).get(key)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_empty(key: str, value: Any) -> bool:
    """RecipeOptions' "not set": ctx_size unless a number, else null, -1, "" or "auto"."""
    if key == "ctx_size":
        return not is_number(value)
    return value is None or (is_number(value) and value == -1) or value in ("", "auto")


def args_map(args: str) -> dict[str, list[list[str]]]:
    """build_custom_args_map(parse_custom_args(args)): flag → its occurrences' values."""
    result: dict[str, list[list[str]]] = {}
    last = None
    for token in str(args).split():
        if token.startswith("-") and not _negative_number(token):
            result.setdefault(token, []).append([])
            last = token
        elif last is not None:
            result[last][-1].append(token)
    return result


def _negative_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def args_string(flags: dict[str, list[list[str]]]) -> str:
    """map_to_args_string: flags in std::map (sorted) order."""
    return " ".join(" ".join([flag, *values]) for flag in sorted(flags)
                    for values in flags[flag])


def merge_args(target: str, incoming: str) -> str:
    """merge_args_maps: the target's flags win; a binary flag whose negation the target
    has (`--mmap` vs `--no-mmap`) is dropped."""
    if not target:
        return incoming
    if not incoming:
        return target
    merged = args_map(target)
    for flag, occurrences in args_map(incoming).items():
        if all(not values for values in occurrences):
            negation = ("--" + flag[5:] if flag.startswith("--no-")
                        else "--no-" + flag[2:] if flag.startswith("--") else "")
            if negation and negation in merged:
                continue
        merged.setdefault(flag, occurrences)
    return args_string(merged)


class RecipeOptions:
    """One layer of options: only the recipe's keys, only values that are set."""

    def __init__(self, recipe: str, options: dict | None = None):
        self.recipe = recipe
        self.options = {k: options[k] for k in keys_for_recipe(recipe)
                        if options and k in options and not is_empty(k, options[k])}

    def get(self, key: str) -> Any:
        return self.options[key] if key in self.options else default_of(self.recipe, key)

    def inherit(self, lower: RecipeOptions) -> RecipeOptions:
        merged = dict(self.options)
        own = self.options.get("merge_args", lower.get("merge_args"))
        merge = own if isinstance(own, bool) else True
        for key, value in lower.options.items():
            if merge and key.endswith("_args"):
                target = merged.get(key) if isinstance(merged.get(key), str) else ""
                merged[key] = merge_args(target, value if isinstance(value, str) else "")
            elif key not in merged:
                merged[key] = value
        return RecipeOptions(self.recipe, merged)

    def resolved(self) -> dict:
        return {key: self.get(key) for key in keys_for_recipe(self.recipe)}


class ResolvedOptions(dict):
    """What a load runs with: every option resolved (compared to decide a reload), plus
    the options actually set in some layer (`shown`: health's recipe_options)."""

    shown: dict


def global_layer(config: dict, recipe: str, backend: str) -> RecipeOptions:
    """RuntimeConfig::recipe_options(backend): the config.json section, flattened."""
    section = config.get(CONFIG_SECTIONS.get(recipe, recipe)) or {}
    flat: dict[str, Any] = {}
    for name in DESCRIPTOR_OPTIONS.get(recipe, {}):
        if name.endswith("_backend"):
            if "backend" in section:
                flat[name] = "" if section["backend"] == "auto" else section["backend"]
        elif name.endswith("_args"):
            variant = section.get(f"{backend}_args")
            if variant:
                flat[name] = variant
            elif "args" in section:
                flat[name] = section["args"]
        else:
            key = "device" if name.endswith("_device") else name
            if key in section:
                flat[name] = section[key]
    if "ctx_size" in config:
        flat["ctx_size"] = config["ctx_size"]
    return RecipeOptions(recipe, flat)


class OptionsMixin:
    """v11.7 option resolution and the `/v1/models/{id}/options` handlers."""

    def options_v11(self) -> bool:
        return self.since(11, 7)

    def model_layer(self, cid: str, saved: dict | None = None,
                    masked: frozenset = frozenset()) -> RecipeOptions:
        entry = self.catalog[cid]
        recipe = entry.get("recipe", "")
        own = dict(entry.get("recipe_options") or {})
        if recipe == "sd-cpp":
            own = {**(entry.get("image_defaults") or {}), **own}
        saved = self.saved_options.get(cid, {}) if saved is None else saved
        own.update({k: v for k, v in saved.items() if k not in masked})
        return RecipeOptions(recipe, own)

    def effective_options(self, cid: str, request: RecipeOptions, model: RecipeOptions
                          ) -> RecipeOptions:
        recipe = self.catalog[cid].get("recipe", "")
        config = self.config()
        tentative = request.inherit(model.inherit(global_layer(config, recipe, "")))
        backend = tentative.get(f"{recipe}_backend")
        return request.inherit(model.inherit(
            global_layer(config, recipe, backend if isinstance(backend, str) else "")))

    def resolve_options(self, cid: str, request: dict) -> dict:
        if not self.options_v11():
            return super().resolve_options(cid, request)
        recipe = self.catalog[cid].get("recipe", "")
        keys = keys_for_recipe(recipe)
        masked = frozenset(k for k in keys if k in request and (
            request[k] is None or k.endswith("_args")))
        super().resolve_options(cid, {k: v for k, v in request.items() if v is not None})
        effective = self.effective_options(cid, RecipeOptions(recipe, request),
                                           self.model_layer(cid, masked=masked))
        resolved = ResolvedOptions(effective.resolved())
        resolved.pop("pinned", None)
        resolved.shown = {k: v for k, v in effective.options.items() if k != "pinned"}
        return resolved

    def context_overflow(self, model: Any, prompt_tokens: int) -> dict | None:
        """llama-server's refusal of a prompt longer than the context (the error lemond
        passes on, framed as an SSE event mid-stream since v11.7), or None."""
        if not self.options_v11() or model.recipe != "llamacpp":
            return None
        ctx = model.shown_options().get("ctx_size")
        if not is_number(ctx) or prompt_tokens <= ctx:
            return None
        return {"error": {"code": 400, "message": "the request exceeds the available context "
                                                  "size, try increasing it",
                          "type": "exceed_context_size_error",
                          "n_prompt_tokens": prompt_tokens, "n_ctx": ctx,
                          "status_code": 400}}

    def autoload_request(self, body: dict) -> dict:
        """The load options an inference request carries into its auto-load."""
        if not self.options_v11():
            return {}
        return {k: body[k] for k in AUTOLOAD_OPTIONS if k in body}

    # ---- /v1/models/{id}/options -------------------------------------------------------

    def options_routes(self, model_id: str) -> dict:
        return {"GET": lambda r: self.h_options(r, model_id, None),
                "POST": lambda r: self.h_options(r, model_id, "POST"),
                "DELETE": lambda r: self.h_options(r, model_id, "DELETE")}

    async def h_options(self, req: Request, model_id: str, change: str | None) -> Response:
        cid = self.resolve_name(model_id)
        if cid is None:
            raise self.not_found(model_id)
        recipe = self.catalog[cid].get("recipe", "")
        saved = dict(self.saved_options.get(cid, {}))
        if change == "DELETE":
            saved = {}
            self.saved_options.pop(cid, None)
        elif change == "POST":
            saved, dry_run = self.option_changes(req, recipe, saved)
            if not dry_run:
                if saved:
                    self.saved_options[cid] = saved
                else:
                    self.saved_options.pop(cid, None)
        none = RecipeOptions(recipe)
        effective = self.effective_options(cid, none, self.model_layer(cid, saved))
        defaults = self.effective_options(cid, none, self.model_layer(cid, {}))
        shown = {}
        for name, layer in (("effective", effective), ("defaults", defaults)):
            resolved = layer.resolved()
            resolved.pop("pinned", None)
            shown[name] = {**resolved, "model_name": model_id}
        ctx = effective.get("ctx_size")
        if recipe in USES_CTX_SIZE:
            resolved_ctx = AUTO_CTX_SIZE if ctx == -1 else ctx
        else:
            resolved_ctx = ctx if is_number(ctx) else -1
        return json_response({"model_name": model_id, "recipe": recipe,
                              "saved": self.saved_options.get(cid, {}),
                              "effective": shown["effective"],
                              "defaults": shown["defaults"],
                              "resolved_ctx_size": resolved_ctx})

    @staticmethod
    def option_changes(req: Request, recipe: str, saved: dict) -> tuple[dict, bool]:
        """Validate a POST body completely, then merge it into the saved entry."""
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise ApiError(400, {"error": "Request body must be a JSON object of recipe "
                                          "options"})
        dry_run = body.pop("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ApiError(400, {"error": "'dry_run' must be a boolean"})
        allowed = keys_for_recipe(recipe)
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key == "model_name":
                continue  # `effective` carries it, so it can be posted back verbatim
            if key not in allowed:
                raise ApiError(400, {"error": f"Unknown option '{key}' for recipe '{recipe}'"})
            if key == "pinned":
                raise ApiError(400, {"error": "'pinned' applies to a running model; use "
                                              "/v1/load or /internal/pin"})
            changes[key] = checked_option(recipe, key, value)
        merged = dict(saved)
        for key, value in changes.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged, dry_run


def checked_option(recipe: str, key: str, value: Any) -> Any:
    """A posted option's value to save, or None to clear the saved one (null or empty);
    400 for a value of the wrong type or range."""
    if value is None or (key != "ctx_size" and is_empty(key, value)):
        return None
    expected = default_of(recipe, key)
    if is_number(expected):
        ok = is_number(value)
    elif isinstance(expected, str):
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, bool)
    if not ok:
        raise ApiError(400, {"error": f"Invalid type for option '{key}'"})
    if key == "ctx_size":
        whole = isinstance(value, int) and value <= INT64_MAX
        if not whole or value < -1 or value == 0:
            raise ApiError(400, {"error": "'ctx_size' must be a positive whole "
                                          "number, or -1 to size it automatically"})
    elif isinstance(expected, int) and not isinstance(expected, bool) and \
            not isinstance(value, int):
        raise ApiError(400, {"error": f"'{key}' must be a whole number"})
    return value
