"""A lemond (Lemonade Server) simulator: a test double that never does inference.

It owns a faithful fake of lemond's HTTP API (docs: the shared `lemond-api.md`; §7 is its
checklist) for hal0's tests and `make demo`: the quad route prefixes, lemond's auth and its
several error shapes, the health shapes of v10.0 / v10.6 / v11.7, per-type LRU residency with
pins, serialized slow loads, the "nuclear" evict-everything-and-retry-once policy, pulls with
SSE progress and (v10.7+) server-owned download jobs, deterministic fake inference (chat,
completions, embeddings, rerank, audio, images), and the log stream (SSE up to v10.0; a
websocket on the separate `websocket_port` from v10.1, also on the main port from v10.8 — the
10.0 shape opens no websocket listener at all). Where lemond's docs and code disagree it
follows the code.

One known difference: `/internal/set` (and `POST /v1/params`) accept and store `port` and
`host` and answer `{"status":"success","updated":{...}}` like lemond, but where lemond
rebinds its listener the simulator keeps listening where it was started; the effective
config (`GET /internal/config`, `/v1/params`) reports the host and port it listens on (the
command-line layer sits above config.json, lemond-api.md §4.2).

On top of lemond's API it serves `/__sim__/*` (never authenticated, never faulted), the
simulator-only control surface tests use: inject faults, read internal counters, reset.

It is a raw ASGI application (no framework) served by Daphne: `run()` or
`python -m providers.lemonade.simulator` / `python manage.py lemond_sim`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import hashlib
import ipaddress
import json
import math
import os
import struct
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from providers.lemonade import catalog

SHAPES = {"10.0": (10, 0, 0), "10.6": (10, 6, 0), "11": (11, 7, 0)}
# The fields of one download progress step (an SSE `progress` event, a job's snapshot).
STEP_FIELDS = ("file", "file_index", "total_files", "bytes_downloaded", "bytes_total",
               "total_download_size", "bytes_previously_downloaded", "percent")
ALL_PREFIXES = ("/api/v0", "/api/v1", "/v0", "/v1")
LEGACY_PREFIXES = ("/api/v0", "/api/v1")  # before v9.3.2 (and the brief's "10.0 shape")

DEFAULT_DOWNLOADED = (
    "Qwen3-0.6B-GGUF",
    "Qwen3-4B-Instruct-2507-GGUF",
    "nomic-embed-text-v1-GGUF",
    "bge-reranker-v2-m3-GGUF",
    "Whisper-Large-v3-Turbo",
    "kokoro-v1",
    "SD-Turbo",
)

CORS_HEADERS = [
    (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
    (b"access-control-allow-headers",
     b"Content-Type, Authorization, X-Client-Session-Id, X-Account-Session-Id, "
     b"mcp-protocol-version, traceparent, Mcp-Session-Id"),
    (b"vary", b"Origin"),
]

# lemond's request logger stays quiet for these (they are polled by every UI).
QUIET_PATHS = ("health", "stats", "system-stats", "downloads")

LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "fatal", "none")

RECIPE_BINARIES = {
    "llamacpp": "llama-server", "whispercpp": "whisper-server", "sd-cpp": "sd-server",
    "kokoro": "koko", "flm": "flm", "vllm": "vllm", "ryzenai-llm": "ryzenai-server",
}

# Keys `/v1/load` accepts per recipe (lemond-api.md §2.4); the rest of a body is ignored.
RECIPE_OPTION_KEYS = {
    "llamacpp": ("ctx_size", "llamacpp_backend", "llamacpp_args", "llamacpp_device"),
    "flm": ("ctx_size", "flm_args"),
    "ryzenai-llm": ("ctx_size",),
    "vllm": ("ctx_size", "vllm_backend", "vllm_args"),
    "whispercpp": ("whispercpp_backend", "whispercpp_args"),
    "sd-cpp": ("sd-cpp_backend", "sdcpp_args", "steps", "cfg_scale", "width", "height",
               "sampling_method", "flow_shift"),
    "kokoro": (),
}
FORBIDDEN_LLAMACPP_ARGS = ("-m", "--port", "--ctx-size", "-ngl", "--jinja", "--mmproj",
                           "--embeddings", "--reranking")
# Backends per recipe (lemond-api.md §4.1). A load's `<recipe>_backend` and a config
# section's `backend` (where "auto" is also allowed) must name one of them.
RECIPE_BACKENDS = {
    "llamacpp": ("vulkan", "rocm", "cpu", "metal", "cuda", "system"),
    "whispercpp": ("cpu", "vulkan", "rocm", "npu", "metal"),
    "sd-cpp": ("cpu", "vulkan", "rocm", "cuda", "metal"),
    "vllm": ("rocm",),
    "openmoss": ("cuda", "rocm", "vulkan"),
    "acestep": ("cuda", "rocm", "vulkan"),
    "thinksound": ("cuda", "rocm", "vulkan"),
    "trellis": ("cuda", "rocm", "vulkan"),
    "thenoise": ("rocm",),
}
# config.json section → recipe, where the names differ
CONFIG_SECTION_RECIPES = {"sdcpp": "sd-cpp"}

# What each inference endpoint needs, and lemond's refusal for a model of another type.
ENDPOINT_TYPES = {
    "chat": ("llm", "chat completion", "LLM"),
    "completions": ("llm", "completions", "LLM"),
    "responses": ("llm", "responses", "LLM"),
    "embeddings": ("embedding", "embeddings", "embedding"),
    "rerank": ("reranking", "reranking", "reranking"),
    "transcription": ("transcription", "audio transcription", "transcription"),
    "speech": ("tts", "text to speech", "TTS"),
    "image": ("image", "image generation", "image"),
}

EMBEDDING_DIM = 768

# Router::load_model: a failure whose text looks like file-not-found is thrown as-is; any
# other failure triggers the "nuclear" policy (evict everything, retry once). Case-sensitive.
FILE_NOT_FOUND_MARKERS = ("not found", "does not exist", "No such file")

# Websocket credentials (lemond-api.md §1): besides `Authorization` and `?api_key=`, a client
# may offer the credential as a subprotocol `bearer.<base64url(key)>` next to lemond's
# registered application protocol, which is the one the server selects.
WS_APP_PROTOCOL = "lemonade-realtime"
WS_BEARER_PREFIX = "bearer."

# Download jobs (v10.7+, lemond-api.md §2.9): finished jobs linger briefly in /v1/downloads.
JOB_LINGER_SECONDS = 30.0
JOB_ACTIONS = ("pause", "cancel", "remove")


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

# lemond lists FastFlowLM (NPU) models from the installed `flm` binary (`flm list --json`,
# checkpoint "llama3.2:1b" -> name "llama3.2-1b-FLM"), not from server_models.json. The
# simulator behaves as if `flm` were installed and offered these.
SIM_FLM_MODELS = {
    "llama3.2-1b-FLM": {"checkpoint": "llama3.2:1b", "recipe": "flm", "suggested": True,
                        "labels": ["chat"], "size": 1.27},
    "qwen3-0.6b-FLM": {"checkpoint": "qwen3:0.6b", "recipe": "flm", "suggested": True,
                       "labels": ["chat", "reasoning"], "size": 0.66},
    "embed-gemma-300m-FLM": {"checkpoint": "embed-gemma:300m", "recipe": "flm",
                             "suggested": True, "labels": ["embeddings"], "size": 0.62},
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


class ApiError(Exception):
    """Raised anywhere below a handler; becomes the HTTP response as-is."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


def model_error(code: str, message: str, requested: str) -> ApiError:
    # Server::create_model_error + get_http_status_from_error
    status = {"slots_pinned_error": 409, "router_residency_conflict": 409,
              "model_load_error": 500}.get(code, 404)
    return ApiError(status, {"error": {"message": message, "type": code, "param": "model",
                                       "code": code, "requested_model": requested}})


def invalid_request(message: str) -> ApiError:
    return ApiError(400, {"error": {"message": f"Invalid request: {message}",
                                    "type": "invalid_request_error",
                                    "code": "invalid_request"}})


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


def endpoint_not_found(path: str) -> ApiError:
    # lemond's global error handler (lemond-api.md §1): any path nothing is registered on
    return ApiError(404, {"error": {"message": "The requested endpoint does not exist",
                                    "type": "not_found", "path": path}})


def now_ms() -> int:
    return int(time.time() * 1000)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_required_json(body: bytes) -> Any:
    """lemond's `parse_required_json_body` (error shape 4 of lemond-api.md §1)."""
    if not body.strip():
        raise ApiError(400, {"error": "Request body is required but was empty"})
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        where = (f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
                 if isinstance(exc, json.JSONDecodeError) else str(exc))
        raise ApiError(400, {"error": "Invalid JSON in request body: "
                                      f"[json.exception.parse_error.101] parse error at {where}"}
                       ) from None


def stable_hash(*parts: Any) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def words_of(value: Any) -> list[str]:
    """Every word of the text inside a (possibly nested) OpenAI message payload."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [w for item in value for w in words_of(item)]
    if isinstance(value, dict):
        return [w for key in ("content", "text", "input_text") for w in words_of(value.get(key))]
    return []


def png_bytes(width: int, height: int, seed: bytes) -> bytes:
    """A real, solid-colour RGB PNG (so clients that decode images are happy)."""
    width, height = max(1, min(width, 1024)), max(1, min(height, 1024))
    row = b"\x00" + bytes(seed[:3]) * width
    raw = row * height

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def wav_bytes(seconds: float = 0.25, rate: int = 24000) -> bytes:
    """A valid mono 16-bit PCM WAV of silence."""
    data = b"\x00\x00" * int(rate * seconds)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", len(data)) + data)


def mp3_bytes(frames: int = 10) -> bytes:
    # MPEG-1 Layer III, 128 kbit/s, 44.1 kHz: 417-byte frames; zero payload decodes to silence.
    return (b"\xff\xfb\x90\x64" + b"\x00" * 413) * frames


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name → (filename, content)."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return {}
    result: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        if part.startswith(b"\r\n"):
            part = part[2:]
        head, _, content = part.partition(b"\r\n\r\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        name, filename = None, None
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if line.lower().startswith("content-disposition"):
                for item in line.split(";")[1:]:
                    key, _, value = item.strip().partition("=")
                    if key == "name":
                        name = value.strip('"')
                    elif key == "filename":
                        filename = value.strip('"')
        if name:
            result[name] = (filename, content)
    return result


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
    last_use: int = field(default_factory=now_ms)
    lru: int = 0  # monotonic order; ms timestamps tie in fast tests
    busy: int = 0
    streaming: int = 0
    idle: asyncio.Event | None = None

    def shown_options(self) -> dict:
        shown = dict(self.options)
        if shown.get("ctx_size") == -1:
            # ctx_size -1 means "auto-size from memory" (v10.8+); report what a box would pick.
            shown["ctx_size"] = 32768 if self.type == "llm" else 8192
        return shown


class LogBuffer:
    """lemond's in-memory log ring (the websocket snapshot is at most 5000 entries)."""

    def __init__(self, echo: bool = False):
        self.entries: deque[dict] = deque(maxlen=5000)
        self.seq = 0
        self.subscribers: set[asyncio.Queue] = set()
        self.echo = echo

    def add(self, severity: str, tag: str, line: str) -> dict:
        self.seq += 1
        t = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
        entry = {"seq": self.seq, "timestamp": stamp, "severity": severity, "tag": tag,
                 "line": line}
        self.entries.append(entry)
        for queue in list(self.subscribers):
            queue.put_nowait(entry)
        if self.echo:
            print(self.raw(entry), flush=True)
        return entry

    @staticmethod
    def raw(entry: dict) -> str:
        return f"[{entry['timestamp']}] [{entry['severity']}] ({entry['tag']}) {entry['line']}"


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


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client: str
    port: int

    def json_or_none(self) -> Any:
        try:
            return json.loads(self.body) if self.body.strip() else None
        except ValueError:
            return None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: Any = None  # an async iterator of bytes for SSE


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))  # compact, like nlohmann's dump()


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, dumps(data).encode())


def sse(event: str | None, data: Any) -> bytes:
    payload = data if isinstance(data, str) else dumps(data)
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


# --------------------------------------------------------------------------------------
# the simulator


class Simulator:
    """The ASGI application. One instance is one simulated lemond process."""

    def __init__(self, options: SimOptions | None = None, **kwargs: Any):
        self.startup_options = options or SimOptions.build(**kwargs)
        self.opts = replace(self.startup_options)
        self.logs = LogBuffer(echo=self.opts.verbose)
        self.generation = 0
        self.pid_counter = 41000
        self.port_counter = 8000
        self.lru_counter = 0
        self.request_counter = 0
        self.shutdown_hook = None  # set by run(): stops the server after /internal/shutdown
        # Set by run() once listening: the main port (the `--port` layer of the effective
        # config) and the separate log websocket port lemond 10.1-10.7 uses (and later
        # versions keep as a legacy listener). Without them the main port stands in.
        self.listen_port: int | None = None
        self.listen_host: str | None = None  # `--host`, the same layer as `--port`
        self.websocket_port: int | None = None
        self.jobs: dict[str, dict] = {}
        self.job_tasks: dict[str, asyncio.Task] = {}
        self._load_lock: asyncio.Lock | None = None
        self._reset_everything()
        self.logs.add("Info", "Server", "Starting Lemonade Server (simulator, no inference)")
        self.logs.add("Info", "Server", f"Version: {self.version}")

    # ---- configuration and version features -----------------------------------------

    def _reset_everything(self) -> None:
        """Startup state: nothing loaded, counters zero, faults cleared, catalogue pristine."""
        self.opts = replace(self.startup_options)
        self.generation += 1
        self.catalog = catalog.load_catalog()
        self.catalog.update(copy.deepcopy(SIM_FLM_MODELS))
        self.downloaded = {n for n in self.opts.downloaded if n in self.catalog}
        self.persisted_config: dict = {"max_loaded_models": self.opts.max_loaded_models}
        self.saved_options: dict[str, dict] = {}
        self.faults: dict[str, Any] = {}
        self.load_calls: dict[str, int] = {}
        self.load_requests: dict[str, int] = {}
        self.open_load_requests: dict[str, int] = {}
        self.max_open_load_requests: dict[str, int] = {}
        self.load_failures: dict[str, int] = {}
        self.evictions: list[dict] = []
        self.pulls: dict[str, dict] = {}
        self.cancelled_pulls: list[str] = []
        self._drop_jobs()
        self.state = State(self)

    def _restart(self) -> None:
        """What a lemond restart forgets: loaded backends, pins, stats, runtime params."""
        self.generation += 1
        self._drop_jobs()  # download jobs live in memory: a restart forgets them
        old = self.state
        self.state = State(self)
        self.state.fail_models = old.fail_models
        self.logs.add("Info", "Server", "Starting Lemonade Server (simulated restart)")

    @property
    def v(self) -> tuple[int, int, int]:
        return SHAPES[self.opts.version_shape]

    def since(self, *version: int) -> bool:
        return self.v >= version

    @property
    def version(self) -> str:
        return "{}.{}.{}-sim".format(*self.v)

    @property
    def load_lock(self) -> asyncio.Lock:
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        return self._load_lock

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

    def type_name(self, kind: str) -> str:
        # lemond <= v10.4 called transcription models "audio"
        return "audio" if kind == "transcription" and not self.since(10, 5) else kind

    def type_keys(self) -> list[str]:
        keys = ["llm", "embedding", "reranking", self.type_name("transcription"), "image", "tts"]
        if self.since(11, 5):
            keys.append("classification")
        return keys

    def prefixes(self) -> tuple[str, ...]:
        # The brief's (and lemond-api.md §7's) "v10.0 shape" serves only /api/v0 and /api/v1.
        return LEGACY_PREFIXES if self.opts.version_shape == "10.0" else ALL_PREFIXES

    def log(self, severity: str, tag: str, line: str) -> None:
        self.logs.add(severity, tag, line)

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

    # ---- residency ---------------------------------------------------------------------

    def touch(self, model: LoadedModel) -> None:
        self.lru_counter += 1
        model.lru = self.lru_counter
        model.last_use = now_ms()

    def ready_models(self) -> list[LoadedModel]:
        return [m for m in self.state.loaded.values() if m.status != "loading"]

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
            if model is not None and model.status != "loading":
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
        if not self.since(10, 8):
            pinned = None  # `pinned` in the body exists since v10.8; older lemond ignores it
        elif pinned is None and isinstance(self.saved_options.get(cid, {}).get("pinned"), bool):
            pinned = self.saved_options[cid]["pinned"]

        options = self.resolve_options(cid, request)
        existing = state.loaded.get(cid)
        if existing is not None and existing.status != "loading":
            if not explicit or existing.options == options:
                self.touch(existing)
                if pinned is not None:
                    existing.pinned = pinned
                self.log("Info", "Router", f"{cid} is already loaded with the same options")
                return existing
            if pinned is None:
                pinned = existing.pinned  # an omitted pin keeps the existing state
            self.log("Info", "Router", f"Options changed for {cid}; reloading")
            await self.evict(existing, "reload")

        if cid not in self.downloaded:
            if self.config().get("offline"):
                raise model_error("model_load_error",
                                  f"Model '{cid}' is not downloaded and lemond is offline", cid)
            self.log("Info", "ModelManager", f"Downloading {cid} before loading it")
            await asyncio.sleep(self.opts.pull_delay)
            self._check_generation(generation, cid)
            self.downloaded.add(cid)

        device = self.device_for(cid, recipe, options)
        await self._make_room(cid, kind, recipe, device)

        self.port_counter += 1
        self.pid_counter += 1
        model = LoadedModel(name=cid, entry=entry, type=kind, recipe=recipe,
                            checkpoint=catalog.checkpoint(entry), options=options,
                            device=device, backend_port=self.port_counter, pid=self.pid_counter,
                            pinned=bool(pinned), idle=asyncio.Event())
        model.idle.set()
        self.touch(model)
        state.loaded[cid] = model
        state.in_flight_loads.append(cid)
        binary = RECIPE_BINARIES.get(recipe, recipe)
        self.log("Info", "Router", f"Loading {cid} ({recipe}, {device}) with {options}")
        try:
            fault = self.should_fail(cid)
            if fault is not None:
                await self._fail_load(cid, binary, fault, generation)
            await asyncio.sleep(self.opts.load_delay)
            self._check_generation(generation, cid)
        except BaseException:
            if state.loaded.get(cid) is model:
                del state.loaded[cid]
            raise
        finally:
            if cid in state.in_flight_loads:
                state.in_flight_loads.remove(cid)
        model.status = "ready"
        self.touch(model)
        self.load_calls[cid] = self.load_calls.get(cid, 0) + 1
        self.log("Info", "Router", f"{binary} for {cid} is ready on port {model.backend_port} "
                                   f"(pid {model.pid})")
        return model

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
        item: dict[str, Any] = {"model_name": model.name, "checkpoint": model.checkpoint,
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
            item["status"] = "loading" if loading else ("in_use" if model.busy else "ready")
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
        shown = (list(self.state.loaded.values()) if self.since(10, 8)
                 else self.ready_models())
        recent = self.most_recent()
        limit = self.max_loaded
        body: dict[str, Any] = {"status": "ok", "version": self.version}
        if self.since(10, 9):
            body["telemetry"] = {"enabled": False}
        body["model_loaded"] = recent.name if recent else None
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
            if key not in defaults:
                raise ApiError(400, {"error": f"Unknown config key: {name}"})
            default = defaults[key]
            bad = ApiError(400, {"error": f"Invalid value for {name}: {json.dumps(value)}"})
            problem = self.config_value_problem(path, key, value)
            if problem:
                raise ApiError(400, {"error": f"Invalid value for {name}: {problem}"})
            if isinstance(default, dict):
                if not isinstance(value, dict):
                    raise bad
                if not default:  # a free-form map (telemetry.otlp.headers): string values
                    if not all(isinstance(v, str) for v in value.values()):
                        raise bad
                    continue
                self.validate_config(value, default, f"{name}.")
            elif isinstance(default, list):
                if not isinstance(value, list):
                    raise bad
                if default and all(isinstance(v, str) for v in default) and \
                        not all(isinstance(v, str) for v in value):
                    raise bad  # a list of names (telemetry.otlp.semantics)
                if not default and not all(isinstance(v, dict) for v in value):
                    raise bad  # cloud_providers: provider objects
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise bad
            elif isinstance(default, int):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise bad
                if key == "max_loaded_models" and (value == 0 or value < -1):
                    raise bad
                if key == "port" and not 0 < value < 65536:
                    raise bad
            elif isinstance(default, float):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise bad
            elif isinstance(default, str):
                if key == "websocket_port":
                    if not (value == "auto" or (isinstance(value, int)
                                                and not isinstance(value, bool))):
                        raise bad
                elif not isinstance(value, str):
                    raise bad
                elif key == "log_level" and value not in LOG_LEVELS:
                    raise bad

    @staticmethod
    def config_value_problem(path: str, key: str, value: Any) -> str | None:
        """A config value that has the right type but that `/v1/load` would refuse."""
        name = f"{path}{key}"
        if not path and key == "ctx_size":
            return ctx_size_problem(value, name)
        section = path.rstrip(".")
        recipe = CONFIG_SECTION_RECIPES.get(section, section)
        if key == "backend" and recipe in RECIPE_BACKENDS and path.count(".") == 1:
            return backend_problem(recipe, value, name, allow_auto=True)
        if section == "llamacpp" and key.endswith("args") and isinstance(value, str):
            return llamacpp_args_problem(value, name)
        return None

    @classmethod
    def merge_into(cls, target: dict, changes: dict) -> None:
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                cls.merge_into(target[key], value)
            else:
                target[key] = copy.deepcopy(value)

    # ---- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            await self.handle_http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.handle_websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    @staticmethod
    def _request(scope, body: bytes) -> Request:
        headers: dict[str, str] = {}
        for key, value in scope.get("headers") or []:
            headers[key.decode("latin-1").lower()] = value.decode("latin-1")
        server = scope.get("server") or ("127.0.0.1", 0)
        client = scope.get("client") or ("127.0.0.1", 0)
        return Request(method=scope["method"].upper(), path=scope["path"],
                       query=parse_qs(scope.get("query_string", b"").decode("latin-1")),
                       headers=headers, body=body, client=str(client[0]),
                       port=int(server[1] or 0))

    async def handle_http(self, scope, receive, send):
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        req = self._request(scope, b"".join(chunks))
        await self.send_response(req, await self.respond(req), send, receive)

    async def respond(self, req: Request) -> Response:
        """lemond's HTTP answer to one request (errors included)."""
        try:
            if self.on_websocket_port(req.port):
                raise endpoint_not_found(req.path)  # that listener speaks websocket only
            return await self.dispatch(req)
        except ApiError as exc:
            return json_response(exc.body, exc.status)
        except Exception as exc:  # a bug in the simulator: answer like lemond's generic 500
            self.log("Error", "Server", f"Unhandled error: {exc!r}")
            return json_response({"error": f"Internal server error: {exc}"}, 500)

    def cors_headers(self, req: Request) -> list[tuple[bytes, bytes]]:
        origin = req.headers.get("origin")
        if self.since(11, 5):
            if origin and self.origin_allowed(origin):
                return [(b"access-control-allow-origin", origin.encode()), *CORS_HEADERS]
            return list(CORS_HEADERS)
        return [(b"access-control-allow-origin", b"*"), *CORS_HEADERS]

    @staticmethod
    def origin_allowed(origin: str) -> bool:
        allowed = os.environ.get("LEMONADE_ALLOWED_ORIGINS", "")
        if allowed.strip() == "*" or origin in [o.strip() for o in allowed.split(",")]:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https", "ws", "wss"):
            return True  # desktop app schemes (tauri://, app://)
        host = parts.hostname or ""
        return is_loopback(host) or host.endswith(".localhost")

    async def send_response(self, req: Request, response: Response, send, receive,
                            channel: str = "http") -> None:
        """Send a response as ASGI `http.response.*` messages, or with channel
        "websocket.http" as the websocket denial response to an upgrade (same content)."""
        start, body_type = f"{channel}.response.start", f"{channel}.response.body"
        disconnect = "websocket.disconnect" if channel.startswith("websocket") \
            else "http.disconnect"
        sim_route = req.path.startswith("/__sim__/")
        if (not sim_route and self.faults.get("malformed_json") and response.stream is None
                and response.content_type == "application/json" and response.body):
            # A proper prefix of a JSON object is never valid JSON.
            response = Response(200, response.body[: max(1, len(response.body) // 2)])
        headers = [(b"content-type", response.content_type.encode()), *response.headers]
        if not sim_route:
            headers += self.cors_headers(req)
        if response.stream is None:
            body = b"" if req.method == "HEAD" else response.body
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": start, "status": response.status, "headers": headers})
            await send({"type": body_type, "body": body})
            return
        headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        await send({"type": start, "status": response.status, "headers": headers})

        async def pump():
            async for chunk in response.stream:
                await send({"type": body_type, "body": chunk, "more_body": True})
            await send({"type": body_type, "body": b""})

        async def watch():
            while (await receive())["type"] != disconnect:
                pass

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # A closed connection cancels the stream (and with it e.g. a pull's download).
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            # Close the generator now (running its `finally`), not whenever it is collected.
            with contextlib.suppress(Exception):
                await response.stream.aclose()

    # ---- routing -----------------------------------------------------------------------

    def api_routes(self) -> dict[str, dict[str, Any]]:
        """Route (after the prefix) → {method: handler}, for this version shape."""
        routes: dict[str, dict[str, Any]] = {
            "health": {"GET": self.h_health},
            "models": {"GET": self.h_models},
            "load": {"POST": self.h_load},
            "unload": {"POST": self.h_unload},
            "delete": {"POST": self.h_delete},
            "pull": {"POST": self.h_pull},
            "stats": {"GET": self.h_stats},
            "system-info": {"GET": self.h_system_info},
            "system-stats": {"GET": self.h_system_stats},
            "params": {"POST": self.h_params_set},
            "log-level": {"POST": self.h_log_level},
            "chat/completions": {"POST": self.h_chat},
            "completions": {"POST": self.h_completions},
            "responses": {"POST": self.h_responses},
            "embeddings": {"POST": self.h_embeddings},
            "rerank": {"POST": self.h_rerank},
            "reranking": {"POST": self.h_rerank},
            "reranker": {"POST": self.h_rerank},
            "audio/transcriptions": {"POST": self.h_transcriptions},
            "audio/speech": {"POST": self.h_speech},
            "images/generations": {"POST": self.h_images},
        }
        if self.since(10, 7):
            routes["downloads"] = {"GET": self.h_downloads}
            routes["downloads/control"] = {"POST": self.h_downloads_control}
        if self.since(10, 10):
            routes["params"]["GET"] = self.h_params_get
        if not self.since(10, 1):
            routes["logs/stream"] = {"GET": self.h_logs_sse}  # SSE, removed in v10.1
        return routes

    def root_routes(self) -> dict[str, dict[str, Any]]:
        routes: dict[str, dict[str, Any]] = {
            "/live": {"GET": self.h_live},
            "/internal/shutdown": {"POST": self.h_shutdown},
        }
        if self.since(10, 1):
            routes["/internal/set"] = {"POST": self.h_internal_set}
            routes["/internal/config"] = {"GET": self.h_internal_config}
        if self.since(10, 7):
            routes["/metrics"] = {"GET": self.h_metrics}
        if self.since(10, 8):
            routes["/internal/pin"] = {"POST": self.h_pin}
        if self.since(10, 10):
            routes["/internal/config/defaults"] = {"GET": self.h_internal_defaults}
        return routes

    def route(self, req: Request) -> Any:
        """The handler for a request, or the ApiError lemond would answer with."""
        methods = self.root_routes().get(req.path)
        rest = None
        if methods is None:
            for prefix in self.prefixes():
                if req.path.startswith(prefix + "/"):
                    rest = req.path[len(prefix) + 1:]
                    break
            if rest is not None:
                routes = self.api_routes()
                methods = routes.get(rest)
                if methods is None and rest.startswith("models/") and len(rest) > 7:
                    model_id = unquote(rest[len("models/"):])
                    methods = {"GET": lambda r, m=model_id: self.h_model(r, m)}
        if methods is None:
            raise endpoint_not_found(req.path)
        method = "GET" if req.method == "HEAD" else req.method
        if method in methods:
            return methods[method]
        if method == "GET" and "POST" in methods:
            raise ApiError(405, {"error": "Method Not Allowed. Use POST for this endpoint"})
        raise endpoint_not_found(req.path)

    def authenticate(self, req: Request) -> None:
        """Server::authenticate_request (lemond-api.md §1 auth matrix)."""
        api_key = self.opts.api_key
        admin_key = self.opts.admin_api_key or api_key
        header = req.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        path = req.path
        if path.startswith("/internal/") or path == "/internal":
            if admin_key and token != admin_key:
                raise ApiError(401, {"error": "Invalid or missing admin API key"})
            if not self.since(10, 7) and self.since(10, 1) and not is_loopback(req.client):
                self.log("Warning", "Server", "Rejected internal request from non-loopback "
                                              f"address {req.client}")
                raise ApiError(403, {"error": "Internal endpoints are only available from "
                                              "localhost"})
            return
        gated = path == "/metrics" or any(path == p or path.startswith(p + "/")
                                          for p in ("/api", "/v0", "/v1", "/mcp"))
        if gated and api_key and token not in (api_key, admin_key):
            raise ApiError(401, {"error": "Invalid or missing API key"})

    async def dispatch(self, req: Request) -> Response:
        if req.path.startswith("/__sim__/"):
            return await self.sim_control(req)
        if req.method == "OPTIONS":
            return Response(204, content_type="text/plain")
        origin = req.headers.get("origin")
        if self.since(11, 5) and origin and not self.origin_allowed(origin):
            raise ApiError(403, {"error": "Origin not allowed"})
        await self.apply_faults()
        if self.faults.get("html_error"):
            return Response(502, b"<html><head><title>502 Bad Gateway</title></head><body>"
                                 b"<center><h1>502 Bad Gateway</h1></center><hr>"
                                 b"<center>nginx</center></body></html>", "text/html")
        if self.faults.get("error_500"):
            raise ApiError(500, {"error": "Internal server error"})
        self.authenticate(req)
        handler = self.route(req)
        tail = req.path.rsplit("/", 1)[-1]
        if tail not in QUIET_PATHS and req.path != "/live":
            self.log("Debug", "Server", f"{req.method} {req.path}")
        return await handler(req)

    async def apply_faults(self) -> None:
        started = time.monotonic()
        # Re-read the fault each tick so `clear` releases requests that are already hanging.
        while self.faults.get("hang"):
            if time.monotonic() - started >= float(self.faults["hang"]):
                break
            await asyncio.sleep(0.05)

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
        lines = ["# TYPE lemonade_server_up gauge", "lemonade_server_up 1",
                 f'lemonade_server_info{{version="{self.version}"}} 1',
                 f"lemonade_loaded_models {len(self.ready_models())}",
                 f"lemonade_max_loaded_models {self.max_loaded}",
                 f"lemonade_requests_total {self.state.totals['request_count_total']}"]
        for m in self.ready_models():
            lines.append(f'lemonade_model_loaded{{model="{m.name}",type="{m.type}"}} 1')
        for key in ("input", "output", "prompt", "cache"):
            lines.append(f"lemonade_{key}_tokens_total {self.state.totals[key + '_tokens_total']}")
        return Response(200, ("\n".join(lines) + "\n").encode(),
                        "text/plain; version=0.0.4")

    # ---- handlers: lifecycle -----------------------------------------------------------

    async def h_load(self, req: Request) -> Response:
        """Counts /v1/load requests open at once per model, so tests can prove a control
        plane never sends a second load for a model while one is in flight."""
        try:
            name = json.loads(req.body).get("model_name")
        except (ValueError, AttributeError):
            name = None
        if not isinstance(name, str):
            return await self._h_load(req)
        self.open_load_requests[name] = self.open_load_requests.get(name, 0) + 1
        self.max_open_load_requests[name] = max(self.max_open_load_requests.get(name, 0),
                                                 self.open_load_requests[name])
        try:
            return await self._h_load(req)
        finally:
            self.open_load_requests[name] -= 1

    async def _h_load(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise invalid_request("request body must be a JSON object")
        name = body.get("model_name")
        if not isinstance(name, str) or not name:
            raise invalid_request("model_name is required")
        self.load_requests[name] = self.load_requests.get(name, 0) + 1
        cid = self.resolve_name(name)
        if cid is None:
            raise self.not_found(name)
        self.require_supported(cid, name)
        pinned = body.get("pinned") if isinstance(body.get("pinned"), bool) else None
        if body.get("save_options") is True:
            keys = (*RECIPE_OPTION_KEYS.get(self.catalog[cid].get("recipe", ""), ()), "pinned")
            saved = self.saved_options.setdefault(cid, {})
            saved.update({k: body[k] for k in keys if body.get(k) is not None})
        model = await self.load(cid, body, pinned, explicit=True)
        if self.catalog[cid].get("recipe", "").startswith("collection"):
            return json_response({"status": "success", "model_name": cid,
                                  "recipe": self.catalog[cid]["recipe"]})
        return json_response({"status": "success", "model_name": model.name,
                              "checkpoint": model.checkpoint, "recipe": model.recipe})

    async def h_unload(self, req: Request) -> Response:
        body = req.json_or_none()
        name = None
        if isinstance(body, dict):
            name = body.get("model_name") or body.get("model")
        if not isinstance(name, str) or not name:
            await self.evict_all("unload")
            return json_response({"status": "success",
                                  "message": "All models unloaded successfully"})
        cid = self.resolve_name(name) or name
        model = self.state.loaded.get(cid)
        if model is None or model.status == "loading":
            raise ApiError(404, {"error": f"Model not loaded: {name}"})
        await self.evict(model, "unload")
        return json_response({"status": "success", "message": "Model unloaded successfully",
                              "model_name": name})

    async def h_delete(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        name = (body.get("model_name") or body.get("model")) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, {"error": "model_name is required"})
        cid = self.resolve_name(name)
        if cid is None:
            raise ApiError(422, {"error": f"Model not found: {name}"})
        if not self.supported(cid):
            raise ApiError(422, {"error": f"Model not supported on this system: {name}"})
        if cid not in self.downloaded:
            # ModelManager::delete_model finds no files to resolve; handle_delete answers 422
            # only for "Model not found" / "not supported", so this is a 500 (§2.7).
            raise ApiError(500, {"error": "Model has no resolved_path, cannot determine "
                                          "files to delete"})
        model = self.state.loaded.get(cid)
        if model is not None:
            await self.evict(model, "delete")
        self.downloaded.discard(cid)
        if cid.startswith("user."):
            del self.catalog[cid]  # deleting a user model also forgets its registration
        self.log("Info", "ModelManager", f"Deleted model {cid}")
        return json_response({"status": "success", "message": f"Deleted model: {name}"})

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

    def pull_files(self, cid: str) -> list[tuple[str, int]]:
        entry = self.catalog[cid]
        total = max(int(self.size_gb(cid) * 1024 ** 3), 1024 * 1024)
        ckpts = entry.get("checkpoints") or {"main": catalog.checkpoint(entry)}
        names = []
        for ckpt in ckpts.values():
            repo, _, variant = ckpt.partition(":")
            base = repo.rsplit("/", 1)[-1].removesuffix("-GGUF")
            if variant and "." in variant:
                names.append(variant.rsplit("/", 1)[-1])
            elif variant:
                names.append(f"{base}-{variant}.gguf")
            else:
                names.append(f"{base}.safetensors")
        names.append(entry["mmproj"] if entry.get("mmproj") else "config.json")
        # the main file carries (nearly) all the bytes, like a real GGUF download
        sizes = [int(total * 0.97)] + [max(1, int(total * 0.03 / (len(names) - 1)))] * (
            len(names) - 1)
        return list(zip(names, sizes, strict=True))

    async def h_pull(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise ApiError(400, {"error": "Request body must be a JSON object"})
        name = body.get("model_name") or body.get("model")
        stream = body.get("stream") is True

        def fail(message: str, code: str) -> Response:
            if stream:
                async def events():
                    yield sse("error", {"error": message, "code": code})
                return Response(200, content_type="text/event-stream", stream=events())
            raise ApiError(400, {"error": message, "code": code})

        if not isinstance(name, str) or not name:
            return fail("model_name is required", "invalid_request")
        cid = self.resolve_name(name)
        if cid is None:
            if not (body.get("checkpoint") or body.get("checkpoints")):
                return fail(f"Model '{name}' is not a registered model and no checkpoint was "
                            "provided to register it", "model_not_found")
            try:
                cid = self.register_user_model(name, body)
            except ApiError as exc:
                return fail(exc.body["error"], exc.body["code"])
        if not self.supported(cid):
            return fail(f"Model '{name}' is not supported on this system", "model_not_supported")
        if cid not in self.downloaded and self.config().get("offline"):
            return fail("Lemond is in offline mode, models not downloaded", "lemond_offline")
        if not stream:
            if cid not in self.downloaded:
                self.log("Info", "ModelManager", f"Downloading {cid}")
                await asyncio.sleep(self.opts.pull_delay)
                self.downloaded.add(cid)
                self.log("Info", "ModelManager", f"Downloaded {cid}")
            return json_response({"status": "success", "model_name": cid})
        if self.since(10, 7):
            if body.get("subscribe") is False:
                return json_response(self.start_job(cid))  # a snapshot, at once (§2.8)
            job = self.jobs.get(f"model:{cid}")
            if job is not None and job["status"] in ("downloading", "paused"):
                # an SSE pull of a model the server is already downloading follows that job
                return Response(200, content_type="text/event-stream",
                                stream=self.follow_job(job))
        if cid in self.downloaded:
            async def done():
                yield sse("complete", {"status": "ok"})
            return Response(200, content_type="text/event-stream", stream=done())
        return Response(200, content_type="text/event-stream", stream=self.pull_events(cid))

    @staticmethod
    def download_step(files: list[tuple[str, int]], index: int, got: int) -> dict:
        """One progress step (§2.9's fields): `got` bytes of file `index` (1-based) in,
        the files before it complete."""
        filename, size = files[index - 1]
        done_before = sum(size for _, size in files[:index - 1])
        total = sum(size for _, size in files)
        return dict(zip(STEP_FIELDS, (filename, index, len(files), got, size, total, 0,
                                      int((done_before + got) * 100 // total)), strict=True))

    async def download_steps(self, cid: str):
        """Simulated download progress: (progress event data, bytes of finished files)."""
        files = self.pull_files(cid)
        steps = max(1, 10 // len(files))
        pause = self.opts.pull_delay / (steps * len(files))
        done_before = 0
        for index, (_, size) in enumerate(files, start=1):
            for step in range(1, steps + 1):
                await asyncio.sleep(pause)
                yield self.download_step(files, index, size * step // steps), done_before
            done_before += size

    async def pull_events(self, cid: str):
        """An SSE pull: the download lives as long as the connection (closing cancels it).
        From v10.7 it also shows in `/v1/downloads` as a job."""
        generation = self.generation
        job = self.new_job(cid) if self.since(10, 7) else None
        self.pulls[cid] = {"model_name": cid, "percent": 0}
        self.log("Info", "ModelManager", f"Downloading {cid} ({len(self.pull_files(cid))} files)")
        finished = False
        try:
            data: dict[str, Any] = {}
            async for data, done_before in self.download_steps(cid):
                self.pulls[cid]["percent"] = data["percent"]
                if job is not None:
                    while job["status"] == "paused":
                        await asyncio.sleep(0.05)
                    if job["status"] == "cancelled":  # /v1/downloads/control cancel|remove
                        yield sse("error", {"error": "Download cancelled",
                                            "code": "download_cancelled"})
                        return
                    self.update_job(job, data, done_before)
                yield sse("progress", data)
            if generation == self.generation:
                self.downloaded.add(cid)
            finished = True
            if job is not None:
                self.finish_job(job, "completed")
            self.log("Info", "ModelManager", f"Downloaded {cid}")
            yield sse("complete", {**data, "percent": 100})
        finally:
            self.pulls.pop(cid, None)
            if not finished and (job is None or job["status"] != "cancelled"):
                if job is not None:
                    self.finish_job(job, "cancelled")
                self.cancelled_pulls.append(cid)
                self.log("Info", "ModelManager", f"Download of {cid} cancelled by the client")

    # ---- download jobs (v10.7+) ----------------------------------------------------------

    def _drop_jobs(self) -> None:
        for task in self.job_tasks.values():
            task.cancel()
        self.job_tasks = {}
        self.jobs = {}

    def new_job(self, cid: str) -> dict:
        """A `model:<name>` download job in its first state (lemond-api.md §2.9)."""
        job = {"id": f"model:{cid}", "type": "model", "model_name": cid,
               "status": "downloading", "running": True,
               **self.download_step(self.pull_files(cid), 1, 0),
               "completed_files_bytes": 0, "cumulative_bytes_downloaded": 0,
               "overall_bytes_downloaded": 0, "complete": False}
        self.jobs[job["id"]] = job
        return job

    @staticmethod
    def update_job(job: dict, data: dict, done_before: int) -> None:
        job.update(data)
        job["completed_files_bytes"] = done_before
        job["cumulative_bytes_downloaded"] = done_before + data["bytes_downloaded"]
        job["overall_bytes_downloaded"] = (job["bytes_previously_downloaded"]
                                           + job["cumulative_bytes_downloaded"])

    def finish_job(self, job: dict, status: str) -> None:
        job["status"], job["running"] = status, False
        if status == "completed":
            # A finished job reads like its last progress step: the last file, fully
            # downloaded, and every total at the full size (also when nothing had to be
            # downloaded and no progress step ever ran).
            total = job["total_download_size"]
            cid = job["model_name"]
            if cid in self.catalog:  # not when a user model was deleted meanwhile
                files = self.pull_files(cid)
                job.update(self.download_step(files, len(files), files[-1][1]))
            job.update(file_index=job["total_files"], bytes_downloaded=job["bytes_total"],
                       percent=100, complete=True, completed_files_bytes=total,
                       cumulative_bytes_downloaded=total,
                       overall_bytes_downloaded=job["bytes_previously_downloaded"] + total)
            # completed jobs linger briefly, then drop out of /v1/downloads
            asyncio.get_running_loop().call_later(
                JOB_LINGER_SECONDS,
                lambda: self.jobs.pop(job["id"]) if self.jobs.get(job["id"]) is job else None)

    def start_job(self, cid: str) -> dict:
        """`POST /v1/pull {"stream":true,"subscribe":false}`: start (or return) the
        server-owned download job of a model and answer its snapshot."""
        job = self.jobs.get(f"model:{cid}")
        if job is not None and job["status"] in ("downloading", "paused"):
            if job["status"] == "paused":  # pulling a paused job again resumes it
                job["status"], job["running"] = "downloading", True
                self.log("Info", "ModelManager", f"Resumed download job {job['id']}")
            return dict(job)  # a second pull for an active id returns the existing job
        job = self.new_job(cid)
        if cid in self.downloaded:
            self.finish_job(job, "completed")  # nothing to download
            return dict(job)
        task = asyncio.ensure_future(self._run_job(job, self.generation))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.job_tasks[job["id"]] = task
        self.log("Info", "ModelManager", f"Started download job {job['id']}")
        return dict(job)

    async def _run_job(self, job: dict, generation: int) -> None:
        cid = job["model_name"]
        try:
            async for data, done_before in self.download_steps(cid):
                while job["status"] == "paused":
                    await asyncio.sleep(0.05)
                self.update_job(job, data, done_before)
            if generation == self.generation:
                self.downloaded.add(cid)
            self.finish_job(job, "completed")
            self.log("Info", "ModelManager", f"Downloaded {cid}")
        finally:
            if self.job_tasks.get(job["id"]) is asyncio.current_task():
                del self.job_tasks[job["id"]]

    def stop_job(self, job: dict) -> None:
        if job["status"] in ("downloading", "paused"):
            self.finish_job(job, "cancelled")
            task = self.job_tasks.pop(job["id"], None)
            if task is not None:
                task.cancel()
            self.cancelled_pulls.append(job["model_name"])
            self.log("Info", "ModelManager", f"Download job {job['id']} cancelled")

    @staticmethod
    def job_progress(job: dict) -> dict:
        return {key: job[key] for key in STEP_FIELDS}

    async def follow_job(self, job: dict):
        """SSE events of a job someone else started (closing this does not cancel it)."""
        seen = None
        while True:
            status = job["status"]
            if status == "completed":
                yield sse("complete", self.job_progress(job))
                return
            if status == "cancelled":
                yield sse("error", {"error": "Download cancelled",
                                    "code": "download_cancelled"})
                return
            progress = self.job_progress(job)
            if status == "downloading" and progress != seen:
                seen = progress
                yield sse("progress", progress)
            await asyncio.sleep(0.05)

    async def h_downloads(self, req: Request) -> Response:
        return json_response([dict(job) for job in self.jobs.values()])

    async def h_downloads_control(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        job_id = body.get("id") if isinstance(body, dict) else None
        action = body.get("action") if isinstance(body, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise ApiError(400, {"error": "id is required"})
        if action not in JOB_ACTIONS:
            raise ApiError(400, {"error": f"Invalid action '{action}': expected one of "
                                          f"{', '.join(JOB_ACTIONS)}"})
        job = self.jobs.get(job_id)
        if action == "remove":
            if job is None:
                return json_response({"status": "ok", "missing": True})
            self.stop_job(job)
            del self.jobs[job_id]
            return json_response({"status": "ok"})
        if job is None:
            raise ApiError(404, {"error": f"Download job not found: {job_id}"})
        if action == "pause" and job["status"] == "downloading":
            job["status"], job["running"] = "paused", False
            self.log("Info", "ModelManager", f"Paused download job {job_id}")
        elif action == "cancel":
            self.stop_job(job)
        return json_response({"status": "ok"})

    # ---- handlers: config --------------------------------------------------------------

    async def h_params_get(self, req: Request) -> Response:
        return json_response(self.config())

    async def h_params_set(self, req: Request) -> Response:
        if not self.since(10, 1):
            return json_response({"status": "success"})  # a stub before v10.1
        changes = parse_required_json(req.body)
        self.validate_config(changes)
        self.merge_into(self.state.runtime_config, changes)
        self.log("Info", "Server", f"Applied runtime params (not persisted): {changes}")
        return json_response({"status": "success", "updated": changes})

    async def h_internal_set(self, req: Request) -> Response:
        changes = parse_required_json(req.body)
        self.validate_config(changes)
        self.merge_into(self.persisted_config, changes)
        for key in changes:  # a persisted value beats an older unpersisted one
            self.state.runtime_config.pop(key, None)
        self.log("Info", "Server", f"Config updated: {changes}")
        return json_response({"status": "success", "updated": changes})

    async def h_internal_config(self, req: Request) -> Response:
        return json_response(self.config())

    async def h_internal_defaults(self, req: Request) -> Response:
        return json_response(self.defaults())

    async def h_log_level(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        level = body.get("level") if isinstance(body, dict) else None
        if level not in LOG_LEVELS:
            raise ApiError(400, {"error": f"Invalid log level: {level}"})
        self.state.runtime_config["log_level"] = level
        return json_response({"status": "success", "level": level})

    async def h_pin(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        name = (body.get("model_name") or body.get("model")) if isinstance(body, dict) else None
        pinned = body.get("pinned", True) if isinstance(body, dict) else True
        if not isinstance(name, str) or not isinstance(pinned, bool):
            raise ApiError(400, {"error": {"message": "model_name and a boolean pinned are "
                                                      "required",
                                           "type": "invalid_request_error"}})
        model = self.state.loaded.get(self.resolve_name(name) or name)
        if model is None or model.status == "loading":
            raise ApiError(400, {"error": {"message": f"Model not loaded: {name}",
                                           "type": "invalid_request_error"}})
        model.pinned = pinned
        self.log("Info", "Router", f"{'Pinned' if pinned else 'Unpinned'} {model.name}")
        return json_response({"status": "success", "model_name": name, "pinned": pinned})

    async def h_shutdown(self, req: Request) -> Response:
        self.log("Info", "Server", "Shutdown requested; unloading all models")
        await self.evict_all("shutdown", wait_busy=False)
        if self.shutdown_hook is not None:
            asyncio.get_running_loop().call_later(0.2, self.shutdown_hook)
        return json_response({"status": "success", "message": "Server shutting down"})

    # ---- handlers: inference -----------------------------------------------------------

    async def model_for(self, body: dict, endpoint: str) -> LoadedModel:
        """Auto-load the requested model (or use the loaded one) after checking its type."""
        name = body.get("model")
        if isinstance(name, str) and name.endswith(":latest"):
            name = name[: -len(":latest")]
        if not isinstance(name, str) or not name:
            current = self.most_recent()
            if current is None:
                raise ApiError(400, {"error": "No model loaded and no model specified in "
                                              "request"})
            name = current.name
        cid = self.resolve_name(name)
        if cid is None:
            raise self.not_found(name)
        self.require_supported(cid, name)
        need, what, who = ENDPOINT_TYPES[endpoint]
        if self.kind_of(cid) != need:
            raise ApiError(400, {"error": {
                "message": f"This model does not support {what}. Only {who} models support "
                           "this endpoint.", "type": "invalid_request_error"}})
        return await self.load(cid, {}, None, explicit=False)

    def record(self, prompt_tokens: int, output_tokens: int) -> None:
        tps = round(1.0 / self.opts.token_delay, 2) if self.opts.token_delay > 0 else 120.0
        ttft = round(self.opts.ttft + 0.01 * math.log1p(prompt_tokens), 4)
        self.state.stats = {"time_to_first_token": ttft, "tokens_per_second": tps,
                            "input_tokens": prompt_tokens, "output_tokens": output_tokens,
                            "prompt_tokens": prompt_tokens, "cache_tokens": 0,
                            "decode_token_times": [round(1 / tps, 4)] * min(output_tokens, 32)}
        totals = self.state.totals
        totals["request_count_total"] += 1
        totals["input_tokens_total"] += prompt_tokens
        totals["output_tokens_total"] += output_tokens
        totals["prompt_tokens_total"] += prompt_tokens

    def next_id(self, prefix: str) -> str:
        self.request_counter += 1
        return f"{prefix}-sim{self.request_counter:06d}"

    @staticmethod
    def reply_words(model: str, prompt: list[str], max_tokens: Any) -> tuple[list[str], str]:
        digest = stable_hash(model, " ".join(prompt)).hex()[:8]
        words = (f"Simulated reply from {model} (lemond simulator, no inference). "
                 f"Your prompt had {len(prompt)} words; digest {digest}.").split()
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and \
                0 < max_tokens < len(words):
            return words[:max_tokens], "length"
        return words, "stop"

    def timings(self, prompt_n: int, predicted_n: int) -> dict:
        tps = round(1.0 / self.opts.token_delay, 2) if self.opts.token_delay > 0 else 120.0
        prompt_ms = round(self.opts.ttft * 1000 + prompt_n * 0.5, 3)
        predicted_ms = round(predicted_n * 1000 / tps, 3)
        return {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": round(prompt_ms / max(prompt_n, 1), 3),
                "prompt_per_second": round(prompt_n * 1000 / max(prompt_ms, 0.001), 2),
                "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": round(1000 / tps, 3), "predicted_per_second": tps}

    async def _text_completion(self, req: Request, endpoint: str) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise invalid_request("request body must be a JSON object")
        model = await self.model_for(body, endpoint)
        if endpoint == "chat":
            prompt = words_of(body.get("messages"))
        elif endpoint == "responses":
            prompt = words_of(body.get("input"))
        else:
            prompt = words_of(body.get("prompt"))
        prompt_n = len(prompt) + 4
        limit = body.get("max_completion_tokens", body.get("max_tokens",
                                                           body.get("max_output_tokens")))
        words, finish = self.reply_words(model.name, prompt, limit)
        text = " ".join(words)
        created = int(time.time())
        usage = {"prompt_tokens": prompt_n, "completion_tokens": len(words),
                 "total_tokens": prompt_n + len(words)}
        stream = body.get("stream") is True and endpoint != "responses"
        if not stream:
            async with self.using(model):
                if self.opts.ttft:
                    await asyncio.sleep(self.opts.ttft)
            self.record(prompt_n, len(words))
            if endpoint == "responses":
                return json_response({
                    "id": self.next_id("resp"), "object": "response", "created_at": created,
                    "status": "completed", "model": model.name,
                    "output": [{"type": "message", "id": self.next_id("msg"),
                                "status": "completed", "role": "assistant",
                                "content": [{"type": "output_text", "text": text,
                                             "annotations": []}]}],
                    "usage": {"input_tokens": prompt_n, "output_tokens": len(words),
                              "total_tokens": prompt_n + len(words)}})
            if endpoint == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": finish}
                kind = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                kind = "text_completion"
            return json_response({
                "id": self.next_id("chatcmpl" if endpoint == "chat" else "cmpl"),
                "object": kind, "created": created, "model": model.name,
                "system_fingerprint": "b0000-lemond-sim", "choices": [choice],
                "usage": usage, "timings": self.timings(prompt_n, len(words))})
        include_usage = isinstance(body.get("stream_options"), dict) and \
            body["stream_options"].get("include_usage") is True
        return Response(200, content_type="text/event-stream", stream=self._stream_text(
            model, endpoint, words, finish, created, prompt_n, usage, include_usage))

    async def _stream_text(self, model, endpoint, words, finish, created, prompt_n, usage,
                           include_usage):
        chat = endpoint == "chat"
        ident = self.next_id("chatcmpl" if chat else "cmpl")
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str, reason: str | None = None, **extra: Any) -> bytes:
            choice = ({"index": 0, "delta": delta, "finish_reason": reason} if chat
                      else {"index": 0, "text": delta, "logprobs": None,
                            "finish_reason": reason})
            return sse(None, {"id": ident, "object": kind, "created": created,
                              "model": model.name, "system_fingerprint": "b0000-lemond-sim",
                              "choices": [choice], **extra})

        async with self.using(model, streaming=True):
            if self.opts.ttft:
                await asyncio.sleep(self.opts.ttft)
            if chat:
                yield chunk({"role": "assistant", "content": None})
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                yield chunk({"content": piece} if chat else piece)
                if self.opts.token_delay:
                    await asyncio.sleep(self.opts.token_delay)
            yield chunk({} if chat else "", finish,
                        timings=self.timings(prompt_n, len(words)))
            if include_usage:
                yield sse(None, {"id": ident, "object": kind, "created": created,
                                 "model": model.name, "choices": [], "usage": usage})
            self.record(prompt_n, len(words))
            yield b"data: [DONE]\n\n"

    async def h_chat(self, req: Request) -> Response:
        return await self._text_completion(req, "chat")

    async def h_completions(self, req: Request) -> Response:
        return await self._text_completion(req, "completions")

    async def h_responses(self, req: Request) -> Response:
        return await self._text_completion(req, "responses")

    async def h_embeddings(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise invalid_request("request body must be a JSON object")
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                        and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise invalid_request("input must be a string or a non-empty array")
        model = await self.model_for(body, "embeddings")
        data, tokens = [], 0
        async with self.using(model):
            for index, item in enumerate(inputs):
                vector = self.embed(model.name, item)
                tokens += len(words_of(item)) if isinstance(item, str) else len(item)
                if body.get("encoding_format") == "base64":
                    vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "index": index, "embedding": vector})
        self.record(tokens, 0)
        return json_response({"object": "list", "data": data, "model": model.name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @staticmethod
    def embed(model: str, item: Any) -> list[float]:
        """A deterministic unit vector from a hash of the input (same input → same vector)."""
        seed = stable_hash(model, json.dumps(item))
        raw: list[float] = []
        counter = 0
        while len(raw) < EMBEDDING_DIM:
            block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
            raw.extend((b - 127.5) / 127.5 for b in block)
            counter += 1
        raw = raw[:EMBEDDING_DIM]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        return [round(x / norm, 6) for x in raw]

    async def h_rerank(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise invalid_request("request body must be a JSON object")
        query, documents = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list):
            raise invalid_request("query (string) and documents (array) are required")
        model = await self.model_for(body, "rerank")
        qwords = {w.lower().strip(".,;:!?") for w in query.split()}
        results, tokens = [], len(query.split())
        async with self.using(model):
            for index, doc in enumerate(documents):
                text = doc.get("text", "") if isinstance(doc, dict) else str(doc)
                dwords = {w.lower().strip(".,;:!?") for w in text.split()}
                tokens += len(text.split())
                overlap = len(qwords & dwords) / max(len(qwords), 1)
                jitter = stable_hash(query, text)[0] / 2550.0  # < 0.1, breaks ties stably
                score = round(-4.0 + 8.0 * overlap + jitter, 6)
                results.append({"index": index, "relevance_score": score})
        self.record(tokens, 0)
        return json_response({"model": model.name, "object": "list", "results": results,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def h_transcriptions(self, req: Request) -> Response:
        form = parse_multipart(req.body, req.headers.get("content-type", ""))
        if "file" not in form:
            raise ApiError(400, {"error": {"message": "Missing 'file' in multipart form data",
                                           "type": "invalid_request_error"}})
        fields_ = {k: v[1].decode("utf-8", "replace") for k, v in form.items() if k != "file"}
        audio = form["file"][1]
        if not (audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"):
            raise ApiError(400, {"error": {"message": "Unsupported audio format: only WAV "
                                                      "files are supported",
                                           "type": "invalid_request_error"}})
        model = await self.model_for(fields_, "transcription")
        async with self.using(model):
            if self.opts.ttft:
                await asyncio.sleep(self.opts.ttft)
        seconds = max(0.0, (len(audio) - 44) / 32000)
        text = (f"Simulated transcription of {seconds:.1f} seconds of audio "
                f"(digest {stable_hash(audio).hex()[:8]}).")
        self.record(0, len(text.split()))
        fmt = fields_.get("response_format", "json")
        language = fields_.get("language") or "en"
        if fmt == "text":
            return Response(200, text.encode(), "text/plain")
        if fmt in ("srt", "vtt"):
            stamp = "00:00:00,000 --> 00:00:01,000" if fmt == "srt" \
                else "00:00:00.000 --> 00:00:01.000"
            head = "1\n" if fmt == "srt" else "WEBVTT\n\n"
            return Response(200, f"{head}{stamp}\n{text}\n".encode(), "text/plain")
        if fmt == "verbose_json":
            return json_response({"task": "transcribe", "language": language,
                                  "duration": round(seconds, 3), "text": text,
                                  "segments": [{"id": 0, "start": 0.0,
                                                "end": round(seconds, 3), "text": text}]})
        return json_response({"text": text})

    async def h_speech(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict) or not isinstance(body.get("input"), str):
            raise invalid_request("input (string) is required")
        fmt = body.get("response_format") or "mp3"
        if fmt not in ("mp3", "wav", "opus", "pcm"):
            raise invalid_request(f"unsupported response_format '{fmt}' (mp3, wav, opus, pcm)")
        model = await self.model_for(body, "speech")
        async with self.using(model):
            if self.opts.ttft:
                await asyncio.sleep(self.opts.ttft)
        self.record(len(body["input"].split()), 0)
        seconds = min(5.0, 0.1 + 0.05 * len(body["input"].split()))
        if fmt == "wav":
            audio, mime = wav_bytes(seconds), "audio/wav"
        elif fmt == "pcm":
            audio = b"\x00\x00" * int(24000 * seconds)
            mime = "audio/l16;rate=24000;endianness=little-endian"
        elif fmt == "opus":
            # Not a decodable Ogg/Opus stream: the simulator only needs the right type.
            audio, mime = b"OggS" + b"\x00" * 60, "audio/opus"
        else:
            audio, mime = mp3_bytes(max(1, int(seconds * 38))), "audio/mpeg"
        return Response(200, audio, mime)

    async def h_images(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise invalid_request("prompt (string) is required")
        model = await self.model_for(body, "image")
        try:
            width, height = (int(x) for x in str(body.get("size") or "512x512").split("x"))
        except ValueError:
            raise invalid_request("size must look like 512x512") from None
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        async with self.using(model):
            if self.opts.ttft:
                await asyncio.sleep(self.opts.ttft)
            images = [png_bytes(width, height, stable_hash(body["prompt"], body.get("seed"), i))
                      for i in range(max(1, min(n, 4)))]
        self.record(len(body["prompt"].split()), 0)
        return json_response({"created": int(time.time()),
                              "data": [{"b64_json": base64.b64encode(img).decode()}
                                       for img in images]})

    # ---- logs --------------------------------------------------------------------------

    async def h_logs_sse(self, req: Request) -> Response:
        async def lines():
            queue: asyncio.Queue = asyncio.Queue()
            self.logs.subscribers.add(queue)
            try:
                for entry in list(self.logs.entries):
                    yield f"data: {self.logs.raw(entry)}\n\n".encode()
                while True:
                    entry = await queue.get()
                    yield f"data: {self.logs.raw(entry)}\n\n".encode()
            finally:
                self.logs.subscribers.discard(queue)

        return Response(200, content_type="text/event-stream", stream=lines())

    def on_websocket_port(self, port: int) -> bool:
        """Whether a connection came in on the separate websocket listener."""
        return bool(self.websocket_port) and port == self.websocket_port

    def ws_path_ok(self, path: str, port: int) -> bool:
        """The log stream: on `websocket_port` since v10.1 and, since v10.8, on the main
        port too; bare or under any prefix (lemond-api.md §2 table, §2.15)."""
        if not self.since(10, 1):
            return False
        if not self.since(10, 8) and not self.on_websocket_port(port):
            return False  # v10.1-v10.7: the main (cpp-httplib) port has no websocket route
        if path == "/logs/stream":
            return True
        return any(path == f"{p}/logs/stream" for p in self.prefixes())

    async def refuse_websocket(self, scope, receive, send) -> None:
        """An upgrade to a path with no websocket: lemond's HTTP server treats it as the
        plain GET it also is, so it gets exactly the GET's answer — the route's response
        (health, `/live`, the ≤v10.0 SSE log stream, …), the auth 401, or the not-found
        404 for a path lemond does not serve — with the usual default headers. Sent as
        ASGI's websocket denial response when the server offers it (a bare refusal
        otherwise)."""
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        req = self._request({**scope, "method": "GET"}, b"")
        await self.send_response(req, await self.respond(req), send, receive,
                                 channel="websocket.http")

    @staticmethod
    def subprotocol_credentials(offered: list[str]) -> list[str]:
        """Keys offered as `bearer.<base64url(key)>` subprotocols (padding optional)."""
        keys = []
        for protocol in offered:
            if not protocol.startswith(WS_BEARER_PREFIX):
                continue
            encoded = protocol[len(WS_BEARER_PREFIX):]
            try:
                keys.append(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                            .decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
        return keys

    async def handle_websocket(self, scope, receive, send):
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        path = scope["path"]
        server = scope.get("server") or ("127.0.0.1", 0)
        if not self.ws_path_ok(path, int(server[1] or 0)):
            await self.refuse_websocket(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        keys = {k for k in (self.opts.api_key, self.opts.admin_api_key) if k}
        auth = headers.get("authorization", "")
        offered = [auth[7:].strip()] if auth.lower().startswith("bearer ") else []
        offered += query.get("api_key", [])
        protocols = [str(p) for p in scope.get("subprotocols") or []]
        offered += self.subprotocol_credentials(protocols)
        authenticated = not keys or any(k in keys for k in offered)
        # Select lemond's application protocol when offered, never the credential.
        accept = {"type": "websocket.accept"}
        if WS_APP_PROTOCOL in protocols:
            accept["subprotocol"] = WS_APP_PROTOCOL
        await send(accept)

        async def send_json(data: dict) -> None:
            await send({"type": "websocket.send", "text": dumps(data)})

        forwarder: asyncio.Task | None = None
        queue: asyncio.Queue | None = None
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text") or (message.get("bytes") or b"").decode("utf-8",
                                                                                    "replace")
                try:
                    data = json.loads(raw)
                    kind = data.get("type") if isinstance(data, dict) else None
                except ValueError:
                    data, kind = {}, None
                if kind == "auth":
                    authenticated = not keys or data.get("token") in keys
                    if authenticated:
                        await send_json({"type": "auth.ok"})
                    else:
                        await send_json({"type": "error", "error": {
                            "message": "Invalid or missing API key",
                            "type": "authentication_error"}})
                elif not authenticated:
                    await send_json({"type": "error", "error": {
                        "message": "Invalid or missing API key", "type": "authentication_error"}})
                elif kind == "logs.subscribe":
                    if forwarder is not None:
                        forwarder.cancel()
                        self.logs.subscribers.discard(queue)
                    after = data.get("after_seq")
                    queue = asyncio.Queue()
                    # Subscribe before the snapshot so nothing falls between the two.
                    self.logs.subscribers.add(queue)
                    snapshot = [e for e in self.logs.entries
                                if not isinstance(after, int) or e["seq"] > after]
                    await send_json({"type": "logs.snapshot", "entries": snapshot})
                    last = snapshot[-1]["seq"] if snapshot else (after or 0)
                    forwarder = asyncio.ensure_future(self._forward_logs(queue, last, send_json))
                elif kind == "logs.unsubscribe":
                    if forwarder is not None:
                        forwarder.cancel()
                        forwarder = None
                    self.logs.subscribers.discard(queue)
                else:
                    await send_json({"type": "error", "error": {
                        "message": f"Unknown message type: {kind}",
                        "type": "invalid_request_error"}})
        finally:
            if forwarder is not None:
                forwarder.cancel()
            if queue is not None:
                self.logs.subscribers.discard(queue)

    @staticmethod
    async def _forward_logs(queue: asyncio.Queue, last: int, send_json) -> None:
        while True:
            entry = await queue.get()
            if entry["seq"] > last:
                await send_json({"type": "logs.entry", "entry": entry})

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


# --------------------------------------------------------------------------------------
# serving


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's command-line options (shared by `lemond_sim` and `python -m`)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (loopback only unless --allow-remote); "
                             "/internal/set of host/port is accepted and stored, but the "
                             "simulator keeps listening where it was started")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default 13305, whatever the shape; 0 = any)")
    parser.add_argument("--websocket-port", type=int, default=None,
                        help="the separate log websocket port (lemond's websocket_port; "
                             "default: a random free port, like lemond's \"auto\"); "
                             "not opened for --version-shape 10.0 (no websockets before "
                             "v10.1)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow binding a non-loopback interface")
    parser.add_argument("--version-shape", choices=sorted(SHAPES), default="10.6",
                        help="which lemond to imitate (default 10.6, the pinned runtime)")
    parser.add_argument("--max-loaded-models", type=int, default=1,
                        help="models per type before LRU eviction (-1 = unlimited)")
    parser.add_argument("--load-delay", type=float, default=1.5, help="seconds per load")
    parser.add_argument("--pull-delay", type=float, default=2.0, help="seconds per download")
    parser.add_argument("--fail-model", action="append", default=[], metavar="NAME",
                        dest="fail_model", help="loads of this model fail (repeatable)")
    parser.add_argument("--api-key", default="", help="LEMONADE_API_KEY to require")
    parser.add_argument("--admin-api-key", default="",
                        help="LEMONADE_ADMIN_API_KEY for /internal/* (defaults to --api-key)")
    parser.add_argument("--downloaded", default=None, metavar="NAME,...",
                        help="models that start downloaded (default: a small useful set)")
    parser.add_argument("--ttft", type=float, default=0.0,
                        help="seconds before the first token of a response")
    parser.add_argument("--token-delay", type=float, default=0.01,
                        help="seconds between streamed chunks")
    parser.add_argument("--verbose", action="store_true", help="echo the log to stdout")


def options_from_args(ns: Any) -> dict[str, Any]:
    get = ns.get if isinstance(ns, dict) else lambda k, d=None: getattr(ns, k, d)
    downloaded = get("downloaded")
    return {
        "version_shape": get("version_shape") or "10.6",
        "max_loaded_models": get("max_loaded_models", 1),
        "load_delay": get("load_delay", 1.5),
        "pull_delay": get("pull_delay", 2.0),
        "fail_models": tuple(get("fail_model") or ()),
        "api_key": get("api_key") or "",
        "admin_api_key": get("admin_api_key") or "",
        "downloaded": (tuple(n.strip() for n in downloaded.split(",") if n.strip())
                       if downloaded is not None else None),
        "ttft": get("ttft", 0.0),
        "token_delay": get("token_delay", 0.01),
        "verbose": bool(get("verbose", False)),
    }


def default_port(version_shape: str) -> int:
    # Real lemond <= 10.0 listened on 8000, but that is hal0's own port and the contract
    # (design.md) says 13305 for every shape; pass --port 8000 to mimic an old install.
    return 13305


def check_host(host: str, allow_remote: bool) -> None:
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"refusing to bind {host!r}: the simulator is for loopback only "
                         "(pass --allow-remote to override)")


def _denying_websocket_protocol():
    """Daphne's websocket protocol plus ASGI's websocket denial response extension, so the
    simulator can answer an upgrade it refuses with a full HTTP response (as lemond's HTTP
    server answers the plain GET the upgrade also is) instead of Daphne's bare 403. A
    streamed denial (the ≤v10.0 SSE log stream) goes out chunked as it is produced."""
    from http import HTTPStatus

    from autobahn.websocket.types import ConnectionDeny
    from daphne.ws_protocol import WebSocketProtocol

    class DenyingWebSocketProtocol(WebSocketProtocol):
        denial: dict | None = None

        def handle_reply(self, message):
            kind = message.get("type")
            if kind == "websocket.http.response.start" and hasattr(self, "handshake_deferred"):
                self.denial = {"status": int(message["status"]), "body": b"",
                               "headers": list(message.get("headers") or []),
                               "streaming": False}
            elif kind == "websocket.http.response.body" and self.denial is not None:
                chunk, more = message.get("body", b""), bool(message.get("more_body"))
                denial = self.denial
                if more and not denial["streaming"]:
                    # A streamed body: send the head now and the body chunked as it comes;
                    # no handshake timeout applies to an answered request.
                    denial["streaming"] = True
                    if self.openHandshakeTimeoutCall is not None:
                        self.openHandshakeTimeoutCall.cancel()
                        self.openHandshakeTimeoutCall = None
                    self.sendData(self._denial_head(["Transfer-Encoding: chunked"]))
                    chunk, denial["body"] = denial["body"] + chunk, b""
                if denial["streaming"]:
                    if chunk:
                        self.sendData(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    if not more:
                        self.sendData(b"0\r\n\r\n")
                        self._finish_denial()
                else:
                    denial["body"] += chunk
                    if not more:
                        self._finish_denial()
            else:
                super().handle_reply(message)

        def _denial_head(self, extra: list[str]) -> bytes:
            status = self.denial["status"]
            head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
            # framing is this method's: the length (or chunking) it gives, then close
            head += [f"{k.decode('latin-1')}: {v.decode('latin-1')}"
                     for k, v in self.denial["headers"]
                     if k.lower() not in (b"content-length", b"transfer-encoding",
                                          b"connection")]
            head += [*extra, "Connection: close"]
            return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

        def _finish_denial(self):
            status = self.denial["status"]
            self.handshake_deferred.errback(ConnectionDeny(
                code=status, reason=HTTPStatus(status).phrase))
            del self.handshake_deferred
            self.server.protocol_disconnected(self)

        def sendHttpErrorResponse(self, code, reason, responseHeaders=None):
            if self.denial is None:
                return super().sendHttpErrorResponse(code, reason, responseHeaders)
            if not self.denial["streaming"]:  # a streamed denial is already on the wire
                body = self.denial["body"]
                self.sendData(self._denial_head([f"Content-Length: {len(body)}"]) + body)
            return None

        def check_timeouts(self):
            if self.denial is not None and self.denial["streaming"]:
                return  # an HTTP answer in progress, not a websocket still connecting
            super().check_timeouts()

    return DenyingWebSocketProtocol


def run(host: str = "127.0.0.1", port: int | None = None, *, allow_remote: bool = False,
        websocket_port: int | None = None, **options: Any) -> int:
    """Serve the simulator with Daphne until SIGINT/SIGTERM or `/internal/shutdown`.

    Listens on the main port and, from the 10.6 shape on, on a separate websocket port
    (lemond's `websocket_port`, a random free one unless given; lemond ≤v10.0 had no
    websocket, so the 10.0 shape opens none), prints one line once listening and returns
    the process exit code. `port`/`host` set later over `/internal/set` are stored but
    not rebound: the simulator keeps listening here.
    """
    check_host(host, allow_remote)
    sim_options = SimOptions.build(**options)
    if port is None:
        port = default_port(sim_options.version_shape)

    # daphne.server installs Twisted's asyncio reactor on import: import it before Twisted.
    from daphne.server import Server
    from twisted.internet import reactor

    app = Simulator(sim_options)
    interface = host.strip("[]").replace(":", r"\:")
    endpoints = [f"tcp:port={port}:interface={interface}"]
    if app.since(10, 1):  # websockets arrived in v10.1
        endpoints.append(f"tcp:port={websocket_port or 0}:interface={interface}")
    server = Server(application=app, endpoints=endpoints,
                    signal_handlers=True, verbosity=0, server_name="",
                    application_close_timeout=5)
    denying = _denying_websocket_protocol()
    create_application = server.create_application

    def create_with_extensions(protocol, scope):
        if scope.get("type") == "websocket" and isinstance(protocol, denying):
            scope = {**scope, "extensions": {"websocket.http.response": {}}}
        return create_application(protocol, scope)

    server.create_application = create_with_extensions

    def announce() -> None:
        # Listeners report in the order the endpoints were given: main port, then websocket.
        ports = [address[1] for address in server.listening_addresses]
        actual = ports[0] if ports else port
        app.listen_port = actual
        app.listen_host = host
        app.websocket_port = ports[1] if len(ports) > 1 else None
        server.ws_factory.protocol = denying
        shown = f"[{host}]" if ":" in host else host
        app.log("Info", "Server", f"Port: {actual}")
        if app.websocket_port:
            app.log("Info", "WebSocket", f"Server started on port {app.websocket_port}")
            extra = f"websocket port {app.websocket_port}"
        else:
            extra = "no websocket port: logs stream over SSE"
        print(f"lemond simulator (version {app.version}) listening on http://{shown}:{actual} "
              f"({extra})", flush=True)

    server.ready_callable = announce
    app.shutdown_hook = lambda: reactor.callLater(0, server.stop)
    server.run()
    if not server.listening_addresses:
        print(f"lemond simulator: could not listen on {host}:{port}", file=sys.stderr,
              flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m providers.lemonade.simulator",
                                     description="A lemond simulator (no inference).")
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return run(ns.host, ns.port, allow_remote=ns.allow_remote,
                   websocket_port=ns.websocket_port, **options_from_args(ns))
    except ValueError as exc:
        parser.error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
