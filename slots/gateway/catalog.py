"""What the gateway tells clients about itself: `/v1/models` entries, the TTS slot's voices
and models (Open WebUI reads `/v1/audio/voices` and `/v1/audio/models`), and the
OpenAI-shaped answers for paths it does not serve.

Model entries speak several clients' dialects at once, because each reads its own keys:
OpenAI's (`id`, `object`, `created`, `owned_by`), LM Studio's (`state`: `loaded` /
`not-loaded`, which Open WebUI's LM Studio provider reads), llama.cpp's router
(`status.value`: `loaded` / `loading` / `unloaded` / `failed`) and vLLM's
(`max_model_len`). hal0's own state word is `slot_state`.
"""

from __future__ import annotations

from ..models import State

# hal0's slot state -> llama.cpp's `status.value`; LM Studio's `state` follows from it.
STATUS_VALUE: dict[str, str] = {
    State.READY: "loaded", State.SERVING: "loaded",
    State.PULLING: "loading", State.LOADING: "loading",
    State.OFFLINE: "unloaded", State.UNLOADING: "unloaded",
    State.ERROR: "failed",
}

# The voices lemond's speech backend takes (docs/api/openai.md at v10.6.0: "All OpenAI-defined
# voices can be used, as well as those defined by the kokoro model"); the OpenAI names are
# the ones lemond's own app offers. lemond has no route that lists voices.
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova",
                 "onyx", "sage", "shimmer", "verse")
KOKORO_VOICES = ("af_heart", "af_bella", "af_nicole", "af_sky", "am_adam", "am_echo",
                 "am_michael", "bf_emma", "bm_george")

# OpenAI endpoints hal0 does not offer: a clear 501 instead of a 404 that reads like a typo.
NOT_SUPPORTED: dict[str, str] = {
    "images/edits": "image edits",
    "images/variations": "image variations",
    "audio/translations": "audio translations",
    "moderations": "moderations",
    "files": "files",
    "batches": "batches",
    "fine_tuning/jobs": "fine-tuning",
    "assistants": "assistants",
    "threads": "threads",
    "vector_stores": "vector stores",
    "uploads": "uploads",
    "realtime/sessions": "realtime sessions",
}


def not_supported(endpoint: str) -> str | None:
    """What an unsupported OpenAI endpoint is called, for `/v1/<endpoint>` (or None)."""
    for prefix, what in NOT_SUPPORTED.items():
        if endpoint == prefix or endpoint.startswith(prefix + "/"):
            return what
    return None


def context_length(ctx_size: int | None, lemond_entry: dict | None) -> int | None:
    """The slot's own context size, else the one lemond reports for the loaded model
    (`recipe_options.ctx_size`; -1 means lemond sizes it itself, which says nothing)."""
    if ctx_size:
        return ctx_size
    options = (lemond_entry or {}).get("recipe_options")
    value = options.get("ctx_size") if isinstance(options, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


def status(state: str, message: str = "") -> dict:
    """llama.cpp's `status` object for a slot state. A failed slot says so twice: `value`
    "failed" (what hal0 promises its clients) and llama.cpp's own `failed: true` (its
    router reports a failed load as `unloaded` + `failed`; pi and others read the flag),
    with the error message (llama.cpp has only an exit code)."""
    value = STATUS_VALUE.get(state, "unloaded")
    if value != "failed":
        return {"value": value}
    return {"value": value, "failed": True, "message": message or "the last action failed"}


def model_entry(route, aliases: list[str]) -> dict:
    """One slot as a `/v1/models` entry. `route` is the gateway's routing snapshot."""
    slot_status = status(route.state, route.state_message)
    length = route.context_length
    return {
        "id": route.name, "object": "model", "created": route.created, "owned_by": "hal0",
        "name": f"{route.name} — {route.model_name} ({route.device})",
        "capability": route.capability, "model": route.model_name,
        "loaded_model": route.loaded_model or None,
        "state": "loaded" if slot_status["value"] == "loaded" else "not-loaded",
        "status": slot_status,
        "slot_state": route.state,
        "context_length": length, "max_model_len": length,
        "aliases": aliases, "default": route.is_default, "enabled": route.enabled,
    }


def voices() -> dict:
    """`GET /v1/audio/voices`, in the shape Open WebUI reads (`voices: [{id, name}]`)."""
    return {"voices": [{"id": v, "name": v} for v in OPENAI_VOICES]
            + [{"id": v, "name": f"{v} (kokoro)"} for v in KOKORO_VOICES]}
