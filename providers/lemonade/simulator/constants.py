"""The simulator's fixed tables: version shapes, routes, recipes, backends."""

from __future__ import annotations

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
# What llama-server args v10.6.0's LlamaCppServer::load reserves (push_arg/push_reserved:
# each managed flag with its aliases). It checks them when the backend starts, so a
# reserved flag is a failed backend start, not a refused request.
LLAMACPP_RESERVED_V10 = frozenset({
    "-m", "--model", "--ctx-size", "-c", "--device", "-dev", "--port", "--jinja",
    "--no-jinja", "--mmproj", "-mm", "-mmu", "--mmproj-url", "--no-mmproj", "--mmproj-auto",
    "--no-mmproj-auto", "--mmproj-offload", "--no-mmproj-offload", "--embeddings",
    "--embedding", "--reranking", "--rerank", "-ngl", "--gpu-layers", "--n-gpu-layers"})
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



# The simulated box: a 128 GB Strix Halo APU with 96 GB given to the GPU in the BIOS, so
# Linux sees ~31 GB of RAM and the amdgpu driver's GTT defaults to half of that. lemond
# reads MemTotal (/proc/meminfo) and mem_info_vram_total / mem_info_gtt_total (sysfs).
MEM_TOTAL_GB = 31.26
VRAM_TOTAL_GB = 96.0
GTT_TOTAL_GB = 15.63
DISK_TOTAL_BYTES = 2 * 1024 ** 4
BASE_RAM_USED_GB = 6.2  # the OS and lemond itself
BASE_VRAM_USED_GB = 0.4  # the desktop's framebuffer
