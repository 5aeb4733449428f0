"""How a slot maps onto lemond: the `/v1/load` body, unload, status and inspection helpers.

This is the only place that knows lemond's per-recipe option keys. It raises the typed
errors of `providers.lemonade.errors` (except `status`, which never raises) and never
touches the database: `slots` owns state. It reads a slot and its node only through the
plain attributes of `SlotConfig` and `NodeConfig` (typing protocols), never their
behaviour, and asks `versions` what the node's lemond accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from django.conf import settings

from . import versions
from .client import Health, LoadedModel, SyncLemonadeClient, client_for
from .errors import LemonadeError, LemonadeNotLoaded


class NodeConfig(Protocol):
    """What the provider reads of a node (`slots.models.Node` has these fields)."""

    name: str
    base_url: str
    api_key: str
    admin_api_key: str
    version: str  # as lemond last reported it; "" when never reached


class SlotConfig(Protocol):
    """What the provider reads of a slot (`slots.models.Slot` has these fields)."""

    name: str
    capability: str
    device: str
    model_name: str
    ctx_size: int | None
    extra_args: str
    pinned: bool
    loaded_model: str

    @property
    def node(self) -> NodeConfig: ...


class UnsupportedOption(LemonadeError, ValueError):
    """The slot asks for something the node's lemond version cannot take."""

# capability -> lemond model type, by its current name (versions.type_name renames it)
LEMOND_TYPES = {"chat": "llm", "embed": "embedding", "rerank": "reranking",
                "stt": "transcription", "tts": "tts", "img": "image"}

# device -> (recipe, llamacpp-style backend); None is left out of the load body
DEVICE_BACKENDS: dict[str, tuple[str | None, str | None]] = {
    "gpu-rocm": (None, "rocm"),
    "gpu-vulkan": (None, "vulkan"),
    "cpu": (None, "cpu"),
    "npu": ("flm", None),
}

# capability -> (recipe lemond uses for it, the load key for its backend, for its args)
# (lemond-api.md §2.4 and §4.1). kokoro (tts) has neither a backend nor an args option.
RECIPE_KEYS: dict[str, tuple[str, str | None, str | None]] = {
    "chat": ("llamacpp", "llamacpp_backend", "llamacpp_args"),
    "embed": ("llamacpp", "llamacpp_backend", "llamacpp_args"),
    "rerank": ("llamacpp", "llamacpp_backend", "llamacpp_args"),
    "stt": ("whispercpp", "whispercpp_backend", "whispercpp_args"),
    "img": ("sd-cpp", "sd-cpp_backend", "sdcpp_args"),
    "tts": ("kokoro", None, None),
}
# recipes whose load honours ctx_size
CTX_RECIPES = {"llamacpp", "flm"}


def recipe_for(capability: str, device: str) -> str:
    """The lemond recipe a slot of this capability runs on this device (npu: flm)."""
    recipe, _ = device_to_backend(device)
    return recipe or RECIPE_KEYS[capability][0]


def device_to_backend(device: str) -> tuple[str | None, str | None]:
    """`gpu-rocm -> (None, "rocm")`, …, `npu -> ("flm", None)` (design.md, slot vocabulary)."""
    try:
        return DEVICE_BACKENDS[device]
    except KeyError:
        raise ValueError(f"unknown device {device!r}") from None


@dataclass(frozen=True)
class SlotStatus:
    """What lemond says about one slot; `reachable=False` when it could not be asked."""

    reachable: bool
    entry: LoadedModel | None = None
    health: Health | None = None
    error: str = ""


class LemonadeProvider:
    name = "lemonade"

    # --- wiring ------------------------------------------------------------------------
    def client(self, node: NodeConfig) -> SyncLemonadeClient:
        return client_for(
            node.base_url,
            api_key=node.api_key,
            admin_api_key=node.admin_api_key,
            timeout=settings.HAL0_LEMONADE_TIMEOUT,
            load_timeout=settings.HAL0_LEMONADE_LOAD_TIMEOUT,
        ).sync

    # --- mapping -----------------------------------------------------------------------
    def recipe(self, slot: SlotConfig) -> str:
        return recipe_for(slot.capability, slot.device)

    def load_body(self, slot: SlotConfig, model_name: str | None = None) -> dict[str, Any]:
        """The `/v1/load` request for this slot (optionally for another model: swap)."""
        caps = versions.for_version(slot.node.version)
        recipe, backend = device_to_backend(slot.device)
        _, backend_key, args_key = RECIPE_KEYS[slot.capability]
        body: dict[str, Any] = {"model_name": model_name or slot.model_name}
        if recipe is not None:
            body["recipe"] = recipe
            args_key = caps.npu_args_key  # npu runs on FastFlowLM: flm_args, when taken
        elif backend is not None and backend_key:
            body[backend_key] = backend
        if slot.ctx_size and self.recipe(slot) in CTX_RECIPES:
            body["ctx_size"] = slot.ctx_size
        extra = (slot.extra_args or "").strip()
        problem = caps.backend_args_problem(self.recipe(slot), extra) if extra else ""
        if problem:
            # refused here: lemond 10.6 fails the backend instead, evicting every model
            raise UnsupportedOption(problem)
        if extra and args_key:
            body[args_key] = extra
        elif extra and recipe is not None:
            # lemond 10.8-10.10 ignores any args for flm: refuse rather than drop them
            raise UnsupportedOption(
                f"lemond {slot.node.version or versions.PINNED} takes no extra args for the "
                f"NPU (flm) recipe; clear the slot's extra args or update lemond.")
        if caps.pins:
            # lemond < 10.8 has no pins; hal0 protects pinned slots itself there
            body["pinned"] = bool(slot.pinned)
        return body

    @staticmethod
    def runs_with(entry: LoadedModel, body: dict[str, Any]) -> bool:
        """Is the loaded `entry` already running with every option of `body` (a
        `load_body`)? Then lemond answers that load as a no-op: same options, so it only
        touches the LRU and the pin (lemond-api.md §2.4). The pin is no recipe option."""
        for key, value in body.items():
            if key in ("model_name", "pinned"):
                continue
            seen = entry.recipe if key == "recipe" else entry.recipe_options.get(key)
            if seen != value:
                return False
        return True

    def environment(self, slot: SlotConfig) -> dict[str, str]:
        """The slot's identity block, as a process serving it would see it."""
        _, backend = device_to_backend(slot.device)
        return {
            "HAL0_SLOT_NAME": slot.name,
            "HAL0_CAPABILITY": slot.capability,
            "HAL0_DEVICE": slot.device,
            "HAL0_PROVIDER": self.name,
            "HAL0_NODE": slot.node.name,
            "HAL0_LEMONADE_URL": slot.node.base_url,
            "HAL0_LEMONADE_MODEL": slot.model_name,
            "HAL0_LEMONADE_TYPE": self.lemond_type(slot),
            "HAL0_LEMONADE_RECIPE": self.recipe(slot),
            "HAL0_LEMONADE_BACKEND": backend or "",
            "HAL0_CTX_SIZE": str(slot.ctx_size or ""),
        }

    def lemond_type(self, slot: SlotConfig) -> str:
        """The slot's lemond model type as the node's version names it."""
        caps = versions.for_version(slot.node.version)
        return caps.type_name(LEMOND_TYPES[slot.capability])

    def image_ref(self, slot: SlotConfig) -> str:
        recipe, backend = device_to_backend(slot.device)
        if recipe:
            return f"lemonade://recipe/{recipe}"
        own_recipe, backend_key, _ = RECIPE_KEYS[slot.capability]
        if backend_key is None:
            return f"lemonade://recipe/{own_recipe}"
        return f"lemonade://{own_recipe}/{backend}"

    # --- calls -------------------------------------------------------------------------
    def load(self, slot: SlotConfig, model_name: str | None = None) -> dict:
        return self.client(slot.node).load(self.load_body(slot, model_name))

    def unload(self, slot: SlotConfig, model_name: str | None = None) -> dict:
        """Unload the slot's model. Idempotent: 'not loaded' is success."""
        model = model_name or slot.loaded_model or slot.model_name
        if not model:
            return {"ok": True, "noop": "no model to unload"}
        try:
            result = self.client(slot.node).unload(model)
        except LemonadeNotLoaded:
            return {"ok": True, "noop": f"{model} was not loaded"}
        return {"ok": True, **(result if isinstance(result, dict) else {})}

    def pin(self, slot: SlotConfig, pinned: bool) -> dict:
        return self.client(slot.node).pin(slot.loaded_model or slot.model_name, pinned)

    def health(self, node: NodeConfig) -> Health:
        return self.client(node).health()

    def status(self, slot: SlotConfig) -> SlotStatus:
        """Never raises: lemond's entry for the slot's model, or why it is unknown."""
        try:
            health = self.health(slot.node)
        except LemonadeError as exc:
            return SlotStatus(reachable=False, error=str(exc))
        except Exception as exc:  # a status read must never take a page or a command down
            return SlotStatus(reachable=False, error=f"{exc.__class__.__name__}: {exc}")
        entry = health.find(slot.model_name)
        return SlotStatus(reachable=True, entry=entry, health=health)
