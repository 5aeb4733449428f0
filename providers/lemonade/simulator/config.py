"""Options, lemond's config defaults and layering, and config validation (§2.10, §4.2)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from typing import Any

from providers.lemonade import catalog
from providers.lemonade.simulator.constants import (
    CONFIG_SECTION_RECIPES,
    DEFAULT_DOWNLOADED,
    FORBIDDEN_LLAMACPP_ARGS,
    LOG_LEVELS,
    RECIPE_BACKENDS,
    SHAPES,
)
from providers.lemonade.simulator.eviction import EVICTION_CONFIG_KEYS, eviction_config_problem
from providers.lemonade.simulator.wire import ApiError


def head_defaults() -> dict:
    """lemond's built-in config defaults at HEAD (lemond-api.md §4.2), the "11" shape's.

    Where §4.2 names a section without its keys, the keys are the ones the matching
    `/v1/load` options (§2.4) configure."""
    return {
        "config_version": 2,
        "port": 13305,
        "host": "localhost",
        "websocket_port": "auto",
        "log_level": "info",
        "global_timeout": 600,
        "max_loaded_models": 1,
        "ctx_size": -1,
        "broadcast": True,
        "extra_models_dir": "",
        "models_dir": "auto",
        "default_model_source": "huggingface",
        "offline": False,
        "auto_check_model_updates": True,
        "no_fetch_executables": False,
        "disable_model_filtering": False,
        "enable_dgpu_gtt": False,
        "inhibit_suspend": True,
        "rocm_channel": "stable",
        "rocm_install_method": "auto",
        "cloud_providers": [],
        "telemetry": {
            "enabled": False,
            "hide_inputs": False,
            "hide_outputs": False,
            "hide_thinking": False,
            "max_queue_capacity": 1000,
            "otlp": {
                "endpoint": "http://localhost:4318/v1/traces",
                "protocol": "http/protobuf",
                "semantics": ["openinference", "otel_genai"],
                "headers": {},
                "max_retries": 0,
                "retry_backoff_base_s": 5.0,
                "send_batch_size": 100,
                "batch_timeout_s": 1.0,
            },
            "session": {"headers": {"client": "", "id": ""}},
            "trust_incoming_trace_context": False,
        },
        "llamacpp": {
            "backend": "auto", "args": "", "cpu_args": "", "rocm_args": "", "vulkan_args": "",
            "cpu_bin": "builtin", "cuda_bin": "builtin", "rocm_bin": "builtin",
            "vulkan_bin": "builtin", "prefer_system": True, "device": "",
        },
        "whispercpp": {"backend": "auto", "args": "", "cpu_args": "", "npu_args": "",
                       "cpu_bin": "builtin", "npu_bin": "builtin"},
        "sdcpp": {"backend": "auto", "args": "", "cpu_args": "", "rocm_args": "",
                  "vulkan_args": "", "cpu_bin": "builtin", "rocm_bin": "builtin",
                  "vulkan_bin": "builtin", "steps": 20, "cfg_scale": 7.0, "width": 512,
                  "height": 512},
        "flm": {"args": "", "prefer_system": False},
        "ryzenai": {"server_bin": "builtin"},
        "kokoro": {"cpu_bin": "builtin"},
        "moonshine": {"args": ""},
        "onnxruntime": {"args": ""},
        "openmoss": {"backend": "auto"},
        "vllm": {"args": "", "backend": "auto"},
        "acestep": {"backend": "auto"},
        "thinksound": {"backend": "auto"},
        "trellis": {"backend": "auto", "args": ""},
        "thenoise": {"backend": "auto", "lora_dir": "", "upscaler_dir": ""},
    }


# --------------------------------------------------------------------------------------
# options, errors, small helpers


@dataclass
class SimOptions:
    """Everything the command line can set (and `/__sim__/configure` can change live)."""

    version_shape: str = "10.6"
    max_loaded_models: int = 1
    load_delay: float = 1.5
    pull_delay: float = 2.0
    fail_models: tuple[str, ...] = ()
    api_key: str = ""
    admin_api_key: str = ""
    downloaded: tuple[str, ...] = DEFAULT_DOWNLOADED
    ttft: float = 0.0
    token_delay: float = 0.01
    verbose: bool = False
    # words in a reply (the one-sentence reply, repeated); 0 = that sentence once. Long
    # streams for benchmarks: a real model answers hundreds of tokens.
    reply_length: int = 0

    def __post_init__(self):
        if self.version_shape not in SHAPES:
            raise ValueError(f"version_shape must be one of {', '.join(SHAPES)}")
        self.fail_models = tuple(self.fail_models or ())
        self.downloaded = tuple(self.downloaded if self.downloaded is not None
                                else DEFAULT_DOWNLOADED)
        self.max_loaded_models = int(self.max_loaded_models)
        if self.max_loaded_models == 0 or self.max_loaded_models < -1:
            raise ValueError("max_loaded_models must be a positive integer or -1 (unlimited)")

    @classmethod
    def build(cls, **options: Any) -> SimOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown simulator option(s): {', '.join(unknown)}")
        if isinstance(options.get("downloaded"), str):
            options["downloaded"] = tuple(n for n in options["downloaded"].split(",") if n)
        if isinstance(options.get("fail_models"), str):
            options["fail_models"] = (options["fail_models"],)
        if options.get("version_shape") is not None:
            options["version_shape"] = str(options["version_shape"])
        return cls(**{k: v for k, v in options.items() if v is not None})


def ctx_size_problem(value: Any, name: str = "ctx_size") -> str | None:
    """Why a ctx_size is unusable (positive or -1 = auto), or None; for /v1/load and
    for the config (`/internal/set`, `/v1/params`) alike."""
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
        return f"{name} must be a positive integer or -1, got {value!r}"
    return None


def backend_problem(recipe: str, value: Any, name: str, allow_auto: bool = False
                    ) -> str | None:
    """Why a backend name is not one of the recipe's (§4.1), or None."""
    allowed = (("auto",) if allow_auto else ()) + RECIPE_BACKENDS[recipe]
    if value not in allowed:
        return f"{name} must be one of {', '.join(allowed)}, got {value!r}"
    return None


def llamacpp_args_problem(args: Any, name: str = "llamacpp_args") -> str | None:
    """A flag lemond manages itself in llama-server args, or None."""
    for flag in str(args or "").split():
        if flag.split("=")[0] in FORBIDDEN_LLAMACPP_ARGS:
            return f"{name} may not contain '{flag}' (Lemonade manages it)"
    return None



def value_fits_default(key: str, default: Any, value: Any) -> bool:
    """Whether a config value has its default's type (and, for a few keys, a value lemond
    accepts). `bool` is checked before `int`: in Python a bool is an int."""
    if isinstance(default, list):
        return _list_fits(default, value)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return _int_fits(key, value)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return _str_fits(key, value)
    return True


def _list_fits(default: list, value: Any) -> bool:
    if not isinstance(value, list):
        return False
    if default and all(isinstance(v, str) for v in default) and \
            not all(isinstance(v, str) for v in value):
        return False  # a list of names (telemetry.otlp.semantics)
    if not default and not all(isinstance(v, dict) for v in value):
        return False  # cloud_providers: provider objects
    return True


def _int_fits(key: str, value: Any) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    if key == "max_loaded_models" and (value == 0 or value < -1):
        return False
    return not (key == "port" and not 0 < value < 65536)


def _str_fits(key: str, value: Any) -> bool:
    if key == "websocket_port":  # "auto" or a port number
        return value == "auto" or (isinstance(value, int) and not isinstance(value, bool))
    if not isinstance(value, str):
        return False
    return not (key == "log_level" and value not in LOG_LEVELS)


class ConfigMixin:
    """The effective config and its validation."""

    def defaults(self) -> dict:
        if self.since(11, 0):
            return head_defaults()  # config_version 2: `broadcast`, telemetry, … (§4.2)
        config = catalog.load_defaults()  # v10.6.0's own defaults.json (config_version 1)
        if self.since(10, 8):
            config["ctx_size"] = -1  # auto since v10.8
        if self.since(10, 7):
            config["global_timeout"] = 600
        return config

    def config(self) -> dict:
        """defaults ← config.json (`/internal/set`, `--max-loaded-models`) ← `/v1/params`
        ← `lemond --port/--host` (ephemeral): the full effective config (§2.10, §4.2
        layering). `port`/`host` set over HTTP are stored, but the simulator does not
        rebind, so the command-line layer (where it listens) shows for both."""
        merged = self.defaults()
        for layer in (self.persisted_config, self.state.runtime_config):
            self.merge_into(merged, layer)
        if self.listen_port:
            merged["port"] = self.listen_port
        if self.listen_host:
            merged["host"] = self.listen_host
        return merged

    @property
    def max_loaded(self) -> int:
        return int(self.config()["max_loaded_models"])

    # ---- config validation -------------------------------------------------------------

    def validate_config(self, changes: Any, defaults: dict | None = None, path: str = "") -> None:
        """`/internal/set` and `POST /v1/params` (§2.10): 400 `{"error": "..."}` for an
        unknown key, a value of the wrong type, or a value `/v1/load` would refuse (the
        same checks and messages: ctx_size, backends, llama-server args)."""
        if not isinstance(changes, dict):
            raise ApiError(400, {"error": "Request body must be a JSON object of config keys"})
        defaults = self.defaults() if defaults is None else defaults
        for key, value in changes.items():
            name = f"{path}{key}"
            if not path and key in EVICTION_CONFIG_KEYS and self.since(10, 8):
                # known to RuntimeConfig::validate, though absent from defaults.json
                problem = eviction_config_problem(key, value)
                if problem:
                    raise ApiError(400, {"error": problem})
                continue
            if key not in defaults:
                raise ApiError(400, {"error": f"Unknown config key: {name}"})
            default = defaults[key]
            bad = ApiError(400, {"error": f"Invalid value for {name}: {json.dumps(value)}"})
            problem = self.config_value_problem(path, key, value)
            if problem:
                raise ApiError(400, {"error": f"Invalid value for {name}: {problem}"})
            if isinstance(default, dict):
                self._validate_section(name, default, value, bad)
            elif not value_fits_default(key, default, value):
                raise bad

    def _validate_section(self, name: str, default: dict, value: Any, bad: ApiError) -> None:
        """A nested config object: its keys checked against the section's defaults."""
        if not isinstance(value, dict):
            raise bad
        if not default:  # a free-form map (telemetry.otlp.headers): string values
            if not all(isinstance(v, str) for v in value.values()):
                raise bad
            return
        self.validate_config(value, default, f"{name}.")

    def normalize_config(self, changes: Any) -> Any:
        """lemond 11 (issue #1824) takes a backend option in its flat CLI form
        (`llamacpp_args`) and stores it nested (`llamacpp.args`)."""
        if not self.since(11, 0) or not isinstance(changes, dict):
            return changes
        sections = {k for k, v in self.defaults().items() if isinstance(v, dict)}
        nested: dict[str, Any] = {}
        for key, value in changes.items():
            section, _, field = key.partition("_")
            if field and section in sections:
                target = nested.setdefault(section, {})
                if not isinstance(target, dict):
                    raise ApiError(400, {"error": f"Ambiguous config: '{key}' conflicts with "
                                                  f"non-object '{section}'"})
                target[field] = value
            elif isinstance(value, dict) and isinstance(nested.get(key), dict):
                nested[key].update(value)
            else:
                nested[key] = value
        return nested

    def config_value_problem(self, path: str, key: str, value: Any) -> str | None:
        """A config value that has the right type but that `/v1/load` would refuse."""
        name = f"{path}{key}"
        if not path and key == "ctx_size":
            if not self.since(10, 8):  # `-1` (auto) arrived in v10.8
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ApiError(400, {"error": "'ctx_size' must be an integer"})
                if value <= 0:
                    raise ApiError(400, {"error": "'ctx_size' must be positive"})
                return None
            return ctx_size_problem(value, name)
        if not path and key == "default_model_source" and value not in ("huggingface",
                                                                        "modelscope"):
            return "'default_model_source' must be either 'huggingface', or 'modelscope'"
        section = path.rstrip(".")
        recipe = CONFIG_SECTION_RECIPES.get(section, section)
        if key == "backend" and recipe in RECIPE_BACKENDS and path.count(".") == 1:
            return backend_problem(recipe, value, name, allow_auto=True)
        if section == "llamacpp" and key.endswith("args") and isinstance(value, str) \
                and self.since(11, 0):  # v10.x stores them; the backend refuses at load
            return llamacpp_args_problem(value, name)
        return None

    @classmethod
    def merge_into(cls, target: dict, changes: dict) -> None:
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                cls.merge_into(target[key], value)
            else:
                target[key] = copy.deepcopy(value)

