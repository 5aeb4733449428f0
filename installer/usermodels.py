"""Which slot models lemond must be told about, and what hal0 can write for them into
lemond's `user_models.json` (lemond-api.md §4.3: keyed by the bare name, no `user.`).

A slot stores only a model name. lemond resolves a bare name user > extra > builtin, so a
slot's model loads when it is in the built-in catalogue or registered as a user model:

* in the catalogue (or `builtin.X` with X in it) → nothing to do;
* `extra.X` → found by lemond in `extra_models_dir`; nothing to do;
* an NPU slot's bare name outside the catalogue → an FLM model, which lemond discovers
  from the installed `flm` (they left server_models.json in v10.0); nothing to do;
* anything else (`user.X`, or a bare name lemond does not ship) is a custom model: already
  in `user_models.json` → in place; otherwise it is registered when hal0 knows its
  checkpoint (`install --checkpoint NAME=org/repo:VARIANT`, kept for later runs) with a
  recipe and labels derived from the slot's capability and device; without a checkpoint
  it cannot be registered and is reported (a warning, not a failure).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# capability -> (deployment label or None for chat, recipe by device)
_RECIPES = {
    "chat": (None, {"npu": "flm"}, "llamacpp"),
    "embed": ("embeddings", {"npu": "flm"}, "llamacpp"),
    "rerank": ("reranking", {}, "llamacpp"),
    "stt": ("transcription", {}, "whispercpp"),
    "tts": ("tts", {}, "kokoro"),
    "img": ("image", {}, "sd-cpp"),
}


@dataclass
class Plan:
    add: dict[str, dict] = field(default_factory=dict)  # bare name -> user_models entry
    present: list[str] = field(default_factory=list)  # custom models already registered
    missing: list[str] = field(default_factory=list)  # custom models hal0 cannot register
    builtin: list[str] = field(default_factory=list)


def entry_for(capability: str, device: str, checkpoint: str) -> dict:
    label, by_device, recipe = _RECIPES.get(capability, (None, {}, "llamacpp"))
    labels = [label] if label else []
    return {"checkpoint": checkpoint, "recipe": by_device.get(device, recipe),
            "labels": [*labels, "custom"]}


def plan(slots: list[dict], catalog: dict, existing: dict, checkpoints: dict[str, str]) -> Plan:
    """`slots`: dicts with model_name, capability, device, enabled. `existing`: the
    current user_models.json. `checkpoints`: model name (with or without `user.`) →
    checkpoint, from `--checkpoint`."""
    result = Plan()
    seen = set()
    for slot in slots:
        name = slot["model_name"]
        if not slot.get("enabled", True) or not name or name in seen:
            continue
        seen.add(name)
        if name.startswith("builtin.") and name[len("builtin."):] in catalog:
            result.builtin.append(name)
            continue
        if name.startswith("extra.") or name.startswith("collection."):
            result.builtin.append(name)
            continue
        if not name.startswith("user.") and name in catalog:
            result.builtin.append(name)
            continue
        if not name.startswith("user.") and slot.get("device") == "npu":
            result.builtin.append(name)  # FLM: lemond lists what flm has
            continue
        bare = name.removeprefix("user.")
        if bare in existing:
            result.present.append(name)
            continue
        checkpoint = checkpoints.get(name) or checkpoints.get(bare) \
            or checkpoints.get(f"user.{bare}")
        if checkpoint:
            result.add[bare] = entry_for(slot.get("capability", "chat"),
                                         slot.get("device", ""), checkpoint)
        else:
            result.missing.append(name)
    return result
