"""OpenAI's model names, mapped onto hal0's slots so that clients written for OpenAI work
unchanged (Open WebUI's TTS field starts as `tts-1`; scripts say `whisper-1`,
`text-embedding-3-small`, `gpt-4o-mini`, `dall-e-3`).

An alias names a target the way a request's `model` does: a slot name, or a capability
(its default slot). A slot, capability or served model of the same name always wins over
an alias, so an operator can shadow one with a real slot.

`HAL0_MODEL_ALIASES` edits the default map, entries separated by commas:
`name=target` adds or changes one, `name=` drops one, and a first entry `none` starts from an
empty map (`none,gpt-4o=writer`). This module is plain Python: settings parse the variable
with it at startup, so a malformed value stops hal0 with a clear message.
"""

from __future__ import annotations

import re

DEFAULT_ALIASES: dict[str, str] = {
    **dict.fromkeys(("gpt-3.5-turbo", "gpt-4", "gpt-4-turbo", "gpt-4o", "gpt-4o-mini",
                     "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-5", "gpt-5-mini",
                     "gpt-5-nano"), "chat"),
    **dict.fromkeys(("text-embedding-3-small", "text-embedding-3-large",
                     "text-embedding-ada-002"), "embed"),
    **dict.fromkeys(("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"), "stt"),
    **dict.fromkeys(("tts-1", "tts-1-hd", "gpt-4o-mini-tts"), "tts"),
    **dict.fromkeys(("dall-e-2", "dall-e-3", "gpt-image-1"), "img"),
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


def parse(raw: str | None, defaults: dict[str, str] = DEFAULT_ALIASES) -> dict[str, str]:
    """The alias map for a HAL0_MODEL_ALIASES value (lower-case name -> target).
    Raises ValueError naming the bad entry."""
    aliases = dict(defaults)
    entries = [e.strip() for e in (raw or "").split(",") if e.strip()]
    if entries and entries[0].lower() == "none":
        aliases, entries = {}, entries[1:]
    for entry in entries:
        name, eq, target = (part.strip() for part in entry.partition("="))
        if not eq or not _NAME.match(name) or (target and not _NAME.match(target)):
            raise ValueError(f"{entry!r} is not `name=target` (target: a slot name or a "
                             "capability; `name=` drops an alias)")
        if target:
            aliases[name.lower()] = target
        else:
            aliases.pop(name.lower(), None)
    return aliases


def names_for(aliases: dict[str, str], targets: set[str]) -> list[str]:
    """The aliases that lead to any of `targets` (a slot's name and, for a default slot,
    its capability), sorted: what GET /v1/models shows as the slot's `aliases`."""
    return sorted(name for name, target in aliases.items() if target in targets)
