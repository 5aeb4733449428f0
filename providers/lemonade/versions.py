"""What each lemond version can do: the one module that compares lemond version numbers.

Everything else asks `for_version(node.version)` for a named capability (`caps.pins`,
`caps.rerank_route`, ...) instead of comparing numbers itself, so a new lemond release is
taught to hal0 in one place. Each threshold below was read in lemond's C++ sources at the
tag named (`git show vX.Y.Z:src/cpp/...` in lemonade-sdk/lemonade); where that disagrees
with `lemond-api.md`, the sources win and the line says so.

An empty or unparsable version (a node never reached yet) gets the capabilities of the
version the installer pins (`PINNED`): that is the lemond hal0 most likely talks to.
Plain stdlib only: no Django, no slots.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

# The lemond the installer installs (installer/steps.py LEMOND_VERSION).
PINNED = "10.6.0"

Version = tuple[int, ...]


def parse_version(text: str | None) -> Version:
    """'10.6.0-sim' -> (10, 6, 0); 'v11.7' -> (11, 7); anything unparsable -> ()."""
    parts: list[int] = []
    for piece in re.split(r"[.\-+]", (text or "").strip().removeprefix("v")):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


@dataclass(frozen=True)
class Capabilities:
    """What one lemond version serves and accepts. Build it with `for_version()`."""

    version: Version
    # Routes: "/api" + "/v1/..." before 10.1. Real lemond serves /api/v1 in every version
    # (unprefixed aliases since 9.3.2); the simulator's 10.0 shape serves only /api/v1.
    api_prefix: str
    # `pinned` on /v1/load and /internal/pin (v10.8.0 server.cpp); below, hal0 protects
    # pinned slots itself.
    pins: bool
    # Log stream: server-sent events at /api/v1/logs/stream up to 10.0, a websocket at
    # /logs/stream from 10.1, on its own `websocket_port` until the main port adopts it
    # (v10.8.0 server.cpp: "/logs/stream are adopted by the libwebsockets server").
    log_transport: Literal["sse", "websocket"]
    logs_on_main_port: bool
    # Health/model type of speech-to-text: "audio" until 10.5.0 renamed it (model_types.h).
    transcription_type: str
    # POST /v1/{rerank_route}: only "reranking" until v11.6.0 registers "rerank",
    # "reranking" and "reranker" (server.cpp; lemond-api.md says 11.7.0, the v11.6.0
    # sources already have it). "reranking" stays served, but a v10.6 lemond 404s "rerank".
    rerank_route: str
    # /v1/stats `*_total` fields (request_count_total, ...) start at v10.7.0.
    stats_totals: bool
    # `pid` in health's all_models_loaded[] (v10.4.0): a new pid means a restarted backend.
    pid_in_health: bool
    # health entries carry `status` ("loading", "ready", ...) from v10.8.0; before, a model
    # appears only once it is up.
    load_status_in_health: bool
    # The /v1/load key the flm (NPU) recipe reads its args from. recipe_options.cpp:
    # "flm_args" in 10.0–10.7; the flm keys are {ctx_size, merge_args} only in 10.8–10.10
    # (args are silently dropped); the backend descriptor declares "flm_args" again from
    # 11.0.0. None: this version takes no NPU args.
    npu_args_key: str | None
    # GET/POST/DELETE /v1/models/{id}/options (v11.7.0 server.cpp).
    model_options: bool
    # ctx_size -1 = automatic from v10.8.0; before, /internal/set refuses it (400).
    ctx_size_auto: bool
    # llama-server flags (and aliases) lemond sets itself and refuses in llamacpp_args.
    # v10.6.0 refuses them only inside the backend, which fails the load and makes lemond
    # evict every model and retry: hal0 must refuse them before /v1/load.
    llamacpp_reserved: frozenset[str]
    # flm_args from 11.0: only `--flag value` pairs of an allowlist (flm_arg_resolver.cpp)
    flm_args_allowlist: bool
    # /v1/system-info `model_storage {path, used_bytes, total_bytes, free_bytes}` (the disk
    # lemond downloads models to): from v10.9.0 (server.cpp get_model_storage_stats).
    model_storage: bool
    # /v1/system-info `devices.amd_gpu[].integrated` (an APU, whose GPU also uses GTT):
    # from v11.0.0 (system_info.cpp get_device_dict).
    gpu_integrated_flag: bool
    # No lemond up to v11.7.0 (nor its main branch of 2026-08) reports what one loaded model
    # takes: health, /v1/stats and /metrics carry only node-wide figures. hal0 estimates it.
    model_memory: bool = False

    @property
    def known(self) -> bool:
        """False when the version could not be read (the pinned version's rules apply)."""
        return bool(self.version)

    def type_name(self, kind: str) -> str:
        """This version's name for a lemond model type given by its current name."""
        return self.transcription_type if kind == "transcription" else kind

    def reserved_args(self, recipe: str) -> frozenset[str]:
        """The backend flags this version sets itself for `recipe` (refused in its args)."""
        if recipe == "llamacpp":
            return self.llamacpp_reserved
        return _RESERVED_OTHER.get(recipe, frozenset())

    def backend_args_problem(self, recipe: str, args: str) -> str:
        """Why this lemond would refuse (or fail to start with) `args` for `recipe`, or "".
        Splits the way lemond does (utils/custom_args.h: spaces, quotes grouped)."""
        tokens = split_args(args)
        if recipe == "flm" and self.flm_args_allowlist:
            return _flm_problem(args, tokens)
        reserved = self.reserved_args(recipe)
        for token in tokens:
            flag = token.split("=", 1)[0]
            if flag.startswith("-") and flag in reserved:
                return f"extra_args may not contain {flag}: lemond sets it itself."
        return ""

    def route(self, path: str) -> str:
        """`/v1/...` as this version serves it (the prefix applies to /v1 routes only)."""
        return self.api_prefix + path if path.startswith("/v1/") else path

    def logs_url(self, base_url: str, websocket_port: int | None = None) -> str:
        """Where this version streams its log: an http(s) URL for SSE, else a ws(s) URL.
        `websocket_port` is health's field; lemond 10.1–10.7 listens there."""
        parts = urlsplit(base_url.rstrip("/"))
        if self.log_transport == "sse":
            return urlunsplit((parts.scheme, parts.netloc, "/api/v1/logs/stream", "", ""))
        scheme = "wss" if parts.scheme == "https" else "ws"
        netloc = parts.netloc
        if websocket_port and not self.logs_on_main_port and parts.hostname:
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            netloc = f"{host}:{websocket_port}"
        return urlunsplit((scheme, netloc, "/logs/stream", "", ""))


def split_args(text: str) -> list[str]:
    """lemond's `parse_custom_args`: split on spaces; a quoted part is one token (quotes
    removed); an unclosed quote runs to the end."""
    tokens: list[str] = []
    current, quote = "", ""
    for char in text:
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


# llama-server flags lemond reserves, by the version that started reserving them
# (llamacpp_server.cpp `push_arg(args, reserved_flags, ...)` / `push_reserved`, every tag
# from v10.0.0 to v11.7.0). `-hf` and its aliases are reserved for models loaded from
# Hugging Face directly, `--no-mmproj-offload` for vision models on CPU: hal0 cannot know
# which applies, so it refuses them always.
_LLAMACPP_RESERVED: tuple[tuple[Version, Version | None, frozenset[str]], ...] = (
    ((0,), None, frozenset({
        "-m", "--model", "--ctx-size", "-c", "--port", "--jinja", "--no-jinja",
        "--mmproj", "-mm", "-mmu", "--mmproj-url", "--no-mmproj", "--mmproj-auto",
        "--no-mmproj-auto", "--no-mmproj-offload", "--embeddings", "--embedding",
        "--reranking", "--rerank"})),
    ((0,), (11, 6), frozenset({"--mmproj-offload"})),
    ((0,), (10, 8), frozenset({"-ngl", "--gpu-layers", "--n-gpu-layers"})),
    ((10, 4), None, frozenset({"-hf", "--hf-repo", "-mr", "--hf-file", "-mf"})),
    ((10, 5), None, frozenset({"--device", "-dev"})),
    ((10, 7), None, frozenset({"--metrics"})),
    ((10, 9), None, frozenset({"--model-draft", "-md", "--spec-draft-model"})),
)
# whisper_server.cpp and sd_server.cpp (the same sets from v10.4.0 to v11.7.0)
_RESERVED_OTHER = {
    "whispercpp": frozenset({"-m", "--model", "--port"}),
    "sd-cpp": frozenset({"-m", "--model", "--diffusion-model", "--llm", "--vae", "-v",
                         "--listen-port"}),
}
# flm_arg_resolver.cpp (v11.0.0-v11.7.0): the flags flm_args may carry, each with a value
_FLM_FLAGS = {"--pmode", "--prefill-chunk-len", "--img-pre-resize", "--socket", "--q-len",
              "--preemption"}
_FLM_MAX_TOKENS, _FLM_MAX_LENGTH = 12, 4096


def _flm_problem(text: str, tokens: list[str]) -> str:
    if len(text) > _FLM_MAX_LENGTH or len(tokens) > _FLM_MAX_TOKENS:
        return "flm args are too long for lemond (at most 12 words)."
    if any(q in text for q in "\"'"):
        return "flm args take no quotes: only space-separated '--flag value' pairs."
    flags = tokens[0::2]
    for flag in flags:
        if flag not in _FLM_FLAGS:
            return (f"lemond does not accept {flag.split('=', 1)[0]} in flm args; allowed: "
                    f"{', '.join(sorted(_FLM_FLAGS))}, each as '--flag value'.")
    if len(set(flags)) != len(flags):
        return "flm args name a flag twice."
    if len(tokens) % 2:
        return f"{tokens[-1]} needs a value."
    return ""


def _llamacpp_reserved(v: Version) -> frozenset[str]:
    flags: set[str] = set()
    for since, until, names in _LLAMACPP_RESERVED:
        if v >= since and (until is None or v < until):
            flags |= names
    return frozenset(flags)


@lru_cache(maxsize=64)
def for_version(text: str | None) -> Capabilities:
    """The capabilities of the lemond that reports `text` as its version (cached: nodes
    report a handful of distinct strings)."""
    v = parse_version(text) or parse_version(PINNED)
    flm_args = (10, 0) <= v < (10, 8) or v >= (11, 0)
    return Capabilities(
        version=parse_version(text),
        api_prefix="/api" if v < (10, 1) else "",
        pins=v >= (10, 8),
        log_transport="sse" if v < (10, 1) else "websocket",
        logs_on_main_port=v >= (10, 8),
        transcription_type="audio" if v < (10, 5) else "transcription",
        rerank_route="rerank" if v >= (11, 6) else "reranking",
        stats_totals=v >= (10, 7),
        pid_in_health=v >= (10, 4),
        load_status_in_health=v >= (10, 8),
        npu_args_key="flm_args" if flm_args else None,
        model_options=v >= (11, 7),
        ctx_size_auto=v >= (10, 8),
        llamacpp_reserved=_llamacpp_reserved(v),
        flm_args_allowlist=v >= (11, 0),
        model_storage=v >= (10, 9),
        gpu_integrated_flag=v >= (11, 0),
    )


__all__ = ["PINNED", "Capabilities", "for_version", "parse_version", "split_args"]
