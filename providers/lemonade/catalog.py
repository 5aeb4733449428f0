"""lemond's built-in model catalogue and configuration defaults (copies of v10.6.0's own
`resources/server_models.json` and `resources/defaults.json`, kept in `data/`).

hal0 seeds slots and fills the model picker from here, and the lemond simulator serves the
same catalogue, so both agree on names, checkpoints, recipes and model types. Plain stdlib
only: this module is imported by settings-free code (the simulator) as well as by Django code.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

# Deployment labels decide the type before the recipe does (lemond v10.6
# `get_model_type_from_labels`); order matters only for odd multi-label entries.
LABEL_TYPES = (
    ("embeddings", "embedding"),
    ("embedding", "embedding"),
    ("reranking", "reranking"),
    ("transcription", "transcription"),
    ("tts", "tts"),
    ("image", "image"),
    ("audio-generation", "audio-generation"),
    ("classification", "classification"),
    ("classifier", "classification"),
    ("3d", "mesh"),
    ("chat", "llm"),
)

RECIPE_TYPES = {
    "llamacpp": "llm",
    "flm": "llm",
    "ryzenai-llm": "llm",
    "vllm": "llm",
    "cloud": "llm",
    "whispercpp": "transcription",
    "moonshine": "transcription",
    "sd-cpp": "image",
    "thenoise": "image",
    "kokoro": "tts",
    "openmoss": "tts",
    "onnxruntime": "classification",
    "acestep": "audio-generation",
    "thinksound": "audio-generation",
    "trellis": "mesh",
}


# lemond's model filtering hides these on Linux: ryzenai-llm needs Windows and an AMD NPU.
LINUX_UNSUPPORTED_RECIPES = frozenset({"ryzenai-llm"})


@cache
def _load(filename: str) -> dict:
    with open(DATA_DIR / filename, encoding="utf-8") as fh:
        return json.load(fh)


def load_catalog() -> dict[str, dict]:
    """Every built-in model, name → entry (checkpoint(s), recipe, labels, size, suggested).

    The parsed file is cached; callers get a deep copy so nobody can corrupt the cache.
    """
    return copy.deepcopy(_load("server_models.json"))


def load_defaults() -> dict:
    """lemond v10.6.0's configuration defaults (the key names `/internal/set` accepts)."""
    return copy.deepcopy(_load("defaults.json"))


def get(name: str) -> dict | None:
    """One catalogue entry (a copy), or None for a name lemond does not ship."""
    entry = _load("server_models.json").get(name)
    return copy.deepcopy(entry) if entry is not None else None


def model_type(entry: dict) -> str:
    """lemond's model type for an entry: `llm`, `embedding`, `reranking`, `transcription`,
    `tts`, `image` (plus the rarer `classification`, `audio-generation`, `mesh`), or
    `collection` for `collection.*` recipes, which are bundles rather than one model."""
    # rows come from a live lemond (or a user's registry edits): ignore ill-typed fields
    # rather than fail the page that lists them
    labels = entry.get("labels")
    labels = {x for x in labels if isinstance(x, str)} if isinstance(labels, list) else set()
    for label, kind in LABEL_TYPES:
        if label in labels:
            return kind
    recipe = entry.get("recipe")
    recipe = recipe if isinstance(recipe, str) else ""
    if recipe.startswith("collection"):
        return "collection"
    # lemond falls back to llm for recipes it has no default type for.
    return RECIPE_TYPES.get(recipe, "llm")


def runs_on_linux(entry: dict) -> bool:
    """False for models a Linux lemond filters out (it answers `model_not_supported`)."""
    return entry.get("recipe") not in LINUX_UNSUPPORTED_RECIPES


def checkpoint(entry: dict) -> str:
    """The main checkpoint of an entry (`checkpoint`, or `checkpoints.main`)."""
    if entry.get("checkpoint"):
        return entry["checkpoint"]
    return (entry.get("checkpoints") or {}).get("main", "")
