"""Memory and capacity: a node's gauges, what a loaded model takes, and the fit plan of a
load, swap or download (what it needs, what is free, which models lemond's LRU would
evict, and whether hal0 refuses it).

Everything here is computed from data already in hand — the node's observed totals and
usage (`Node.system_stats`, written by the reconciler from `/v1/system-stats` and
`/v1/system-info`), lemond's health and a catalogue row — so a page can evaluate a plan
per picker row without another query or lemond call. `slots.actions.fit` gathers the
inputs and is what the actions call.

**Estimates.** No lemond up to v11.7.0 reports what one loaded model takes (health,
`/v1/stats` and `/metrics` carry node-wide figures only; `versions.model_memory`), so a
model's share is estimated: its catalogue `size` (the weights, GB) plus, for text models,
an f16 KV cache for its context size, and is always labelled as an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from providers.lemonade import catalog, versions
from providers.lemonade.client import Health, LoadedModel
from providers.lemonade.names import find_published

from . import states

# KV cache per token of context, MB: ~0.11 for a 4B GGUF (36 layers x 8 KV heads x 128 x
# 2 x f16), growing slowly with the model (~0.22 for a 70B at Q4): a rule of thumb.
KV_MB_PER_TOKEN_BASE = 0.1
KV_MB_PER_TOKEN_PER_GB = 0.003
# The context lemond gives a text model when the slot sets none: its `ctx_size` default,
# 4096 before v10.8; from v10.8 `-1` = sized from memory, assumed 32768 here.
AUTO_CTX = 32768
TEXT_TYPES = ("llm", "embedding", "reranking")
# Runtime buffers beyond the weights (compute graph, the backend process itself).
OVERHEAD = 1.05
# Above this share of a budget in use the gauge says "high".
HIGH = 0.85


@dataclass(frozen=True)
class Gauge:
    """One bar on a node's header: used of total GB."""

    key: str
    label: str
    used_gb: float | None
    total_gb: float | None
    title: str = ""

    @property
    def percent(self) -> int | None:
        if self.used_gb is None or not self.total_gb:
            return None
        return max(0, min(100, round(100 * self.used_gb / self.total_gb)))

    @property
    def free_gb(self) -> float | None:
        if self.used_gb is None or self.total_gb is None:
            return None
        return round(max(0.0, self.total_gb - self.used_gb), 1)

    @property
    def level(self) -> str:
        percent = self.percent
        return "unknown" if percent is None else "high" if percent >= HIGH * 100 else "ok"


def gauges(stats: dict | None) -> list[Gauge]:
    """RAM, GPU memory (VRAM, + GTT on an APU) and model disk, as far as lemond reports
    them (`stats` is `Node.system_stats`)."""
    stats = stats if isinstance(stats, dict) else {}
    out = [Gauge("ram", "RAM", _num(stats.get("memory_gb")), _num(stats.get("ram_total_gb")),
                 "RAM in use of the node's physical memory")]
    if stats.get("gpu_total_gb") or stats.get("vram_gb") is not None:
        apu = bool(stats.get("apu"))
        title = ("GPU memory in use: an APU's GPU holds models in VRAM and in GTT (system "
                 f"memory it may map), {_num(stats.get('vram_total_gb'))} + "
                 f"{_num(stats.get('gtt_total_gb'))} GB") if apu else "GPU memory (VRAM) in use"
        out.append(Gauge("gpu", "VRAM+GTT" if apu else "VRAM", _num(stats.get("vram_gb")),
                         _num(stats.get("gpu_total_gb")), title))
    if stats.get("disk_total_gb"):
        total, free = _num(stats.get("disk_total_gb")), _num(stats.get("disk_free_gb"))
        used = round(total - free, 1) if total is not None and free is not None else None
        out.append(Gauge("disk", "Model disk", used, total,
                         f"Disk space of lemond's model store {stats.get('disk_path', '')}"))
    return out


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return round(float(value), 1)


# --- what one model takes -----------------------------------------------------------------

@dataclass(frozen=True)
class Footprint:
    """What a model takes (or would take) in memory, GB; `estimate` is always True while
    lemond reports no per-model figure."""

    gb: float | None
    weights_gb: float | None = None
    kv_gb: float = 0.0
    ctx: int | None = None
    estimate: bool = True

    @property
    def basis(self) -> str:
        if self.gb is None:
            return "size unknown (not in the catalogue)"
        if self.kv_gb and self.ctx:
            return (f"estimate: {self.weights_gb:.1f} GB weights + {self.kv_gb:.1f} GB KV "
                    f"cache for {self.ctx:,} tokens")
        return f"estimate: {self.weights_gb:.1f} GB weights"


def footprint(size_gb: Any, kind: str, ctx: int | None) -> Footprint:
    """A model of `size_gb` (the catalogue's `size`) of lemond type `kind` with context
    `ctx` tokens."""
    if isinstance(size_gb, bool) or not isinstance(size_gb, (int, float)) or size_gb <= 0:
        return Footprint(None)
    kv = 0.0
    if kind in TEXT_TYPES and ctx:
        per_token_mb = KV_MB_PER_TOKEN_BASE + KV_MB_PER_TOKEN_PER_GB * float(size_gb)
        kv = per_token_mb * ctx / 1024
    return Footprint(round(float(size_gb) * OVERHEAD + kv, 1), float(size_gb), round(kv, 1),
                     ctx if kind in TEXT_TYPES else None)


def default_ctx(kind: str, version: str) -> int | None:
    """The context lemond runs a text model with when the slot sets none."""
    if kind not in TEXT_TYPES:
        return None
    return AUTO_CTX if versions.for_version(version).ctx_size_auto else 4096


def slot_footprint(slot: Any) -> Footprint:
    """What the slot's loaded model takes: from the bundled catalogue's size and the
    context lemond reports running it with (else the slot's, else lemond's default).
    No query and no lemond call: cards render it for every loaded slot."""
    model = slot.loaded_model or slot.model_name
    entry = catalog.get(model) or catalog.get(model.removeprefix("builtin.")) or {}
    kind = catalog.model_type(entry) if entry else slot.lemond_type
    options = (slot.lemond_entry or {}).get("recipe_options")
    ctx = options.get("ctx_size") if isinstance(options, dict) else None
    if not isinstance(ctx, int) or ctx <= 0:
        ctx = slot.ctx_size or default_ctx(kind, slot.node.version)
    return footprint(entry.get("size"), kind, ctx)


# --- the plan ---------------------------------------------------------------------------

@dataclass
class Plan:
    """What a load, swap or download of `model` onto `slot` would do. `refusal` non-empty
    means hal0 will not do it; `warnings` are shown but do not stop it."""

    slot: str
    model: str
    action: str
    checked: bool = True  # False: lemond could not be asked; nothing is refused then
    known: bool = True  # False: lemond does not list the model
    already_loaded: bool = False
    loaded: LoadedModel | None = None  # lemond's entry when it has the model up already
    needs: Footprint = field(default_factory=lambda: Footprint(None))
    budget: str = ""  # "GPU memory" or "RAM"
    free_gb: float | None = None  # now, on that budget
    freed_gb: float = 0.0  # by the models it evicts (their estimates)
    evicts: list[dict] = field(default_factory=list)  # {"model", "slots", "own"}
    pool: str = ""
    pool_size: int | None = None
    download_gb: float | None = None
    disk_free_gb: float | None = None
    refusal: str = ""
    disk_refused: bool = False  # the download alone is refused (it does not fit on disk)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refusal

    @property
    def verdict(self) -> str:
        """refused, warning, fits, or unknown (lemond could not be asked)."""
        if self.refusal:
            return "refused"
        if not self.checked:
            return "unknown"
        # replacing the slot's own model is what a swap is for: no reason to ask
        others = [e for e in self.evicts if not e.get("own")]
        return "warning" if self.warnings or others else "fits"

    @property
    def free_after_gb(self) -> float | None:
        if self.free_gb is None:
            return None
        return round(self.free_gb + self.freed_gb, 1)

    def headline(self) -> str:
        """"needs ~X GB, Y GB free" (the budget the slot's device uses)."""
        if not self.checked:
            return "Cannot check the fit: lemond did not answer."
        if self.already_loaded:
            return f"{self.model} is loaded already: nothing more is needed."
        needs = f"needs ~{self.needs.gb:.1f} GB" if self.needs.gb is not None \
            else "needs an unknown amount (size not in lemond's catalogue)"
        if self.free_after_gb is None:
            return f"{needs}; lemond reports no {self.budget or 'memory'} totals"
        free = f"{self.free_after_gb:.1f} GB {self.budget} free"
        if self.freed_gb:
            free += f" once the evicted model{'s' if len(self.evicts) > 1 else ''} go"
        return f"{needs}, {free}"

    def lines(self) -> list[str]:
        """The plan as sentences (CLI, flash messages)."""
        out = [self.headline()]
        if self.needs.gb is not None and not self.already_loaded:
            out.append(f"({self.needs.basis})")
        for evicted in self.evicts:
            who = f" (slot {', '.join(evicted['slots'])})" if evicted["slots"] else ""
            own = " — the slot's own current model" if evicted.get("own") else ""
            out.append(f"lemond's LRU would evict {evicted['model']}{who}{own}")
        if self.download_gb is not None:
            disk = f", {self.disk_free_gb:.1f} GB free on the model disk" \
                if self.disk_free_gb is not None else ""
            out.append(f"downloads {self.download_gb:.1f} GB first{disk}")
        out += self.notes + self.warnings
        if self.refusal:
            out.append(f"Refused: {self.refusal}")
        return out

    def as_json(self) -> dict:
        return {
            "slot": self.slot, "model": self.model, "action": self.action,
            "ok": self.ok, "verdict": self.verdict, "refusal": self.refusal or None,
            "checked": self.checked, "known": self.known,
            "already_loaded": self.already_loaded,
            "needs_gb": self.needs.gb, "estimate": self.needs.estimate,
            "basis": self.needs.basis, "budget": self.budget or None,
            "free_gb": self.free_gb, "free_after_gb": self.free_after_gb,
            "evicts": self.evicts, "pool": self.pool or None, "pool_size": self.pool_size,
            "download_gb": self.download_gb, "disk_free_gb": self.disk_free_gb,
            "warnings": self.warnings, "notes": self.notes, "summary": self.headline(),
        }


def _budget(slot: Any, stats: dict) -> tuple[str, float | None]:
    """Which memory the slot's device loads into, and how much of it is free now."""
    gpu = str(slot.device).startswith("gpu")
    used = stats.get("vram_gb" if gpu else "memory_gb")
    total = stats.get("gpu_total_gb" if gpu else "ram_total_gb")
    name = "GPU memory" if gpu else "RAM"
    if isinstance(used, (int, float)) and isinstance(total, (int, float)) and total > 0:
        return name, round(max(0.0, total - used), 1)
    return name, None


def _lru_victims(pool: list[LoadedModel], capacity: int | None) -> tuple[list[LoadedModel], bool]:
    """The models lemond's count-based LRU evicts to make room for one more in `pool`
    (router.cpp find_lru_server_in_pool: the least recently used unpinned one, until the
    pool has room); the bool is False when lemond would refuse (every one pinned: 409)."""
    if capacity is None or capacity < 0 or len(pool) < capacity:
        return [], True
    wanted = len(pool) - capacity + 1
    candidates = sorted((m for m in pool if not m.pinned),
                        key=lambda m: m.last_use_ms if m.last_use_ms is not None else 0.0)
    return candidates[:wanted], len(candidates) >= wanted


def compute(slot: Any, model: str, action: str, *, entry: dict | None, health: Health | None,
            stats: dict, slots: list[Any]) -> Plan:
    """The plan for `action` ("load", "swap" or "download") of `model` on `slot`.

    `entry` is lemond's catalogue row for the model (`/v1/models/{id}`; None: lemond does
    not list it), `health` lemond's health (None: unreachable), `stats` the node's
    `system_stats`, `slots` every slot on the node (for who serves an evicted model)."""
    plan = Plan(slot=slot.name, model=model, action=action)
    if health is None:
        plan.checked = False
        plan.notes.append("lemond did not answer: the fit was not checked.")
        return plan
    if entry is None:
        plan.known = False
        plan.notes.append(f"lemond does not list {model}: the load will say why.")
        return plan
    kind = catalog.model_type(entry)
    kind = "transcription" if kind == "audio" else kind
    plan.pool = kind
    ctx = slot.ctx_size or default_ctx(kind, slot.node.version)
    plan.needs = footprint(entry.get("size"), kind, ctx)
    plan.budget, plan.free_gb = _budget(slot, stats)
    if entry.get("downloaded") is False:
        _plan_download(plan, entry, stats, slot.node.version)
        if action == "download":
            return plan
    plan.loaded = health.find(model)
    if plan.loaded is not None:
        plan.already_loaded = True
        return plan
    _plan_evictions(plan, slot, health, slots)
    if plan.needs.gb is not None and plan.free_after_gb is not None and \
            plan.needs.gb > plan.free_after_gb:
        plan.warnings.append(
            f"It may not fit: ~{plan.needs.gb:.1f} GB needed, {plan.free_after_gb:.1f} GB "
            f"{plan.budget} free. lemond does not budget memory; an overfull node swaps "
            "or kills a backend.")
    return plan


def _plan_download(plan: Plan, entry: dict, stats: dict, version: str) -> None:
    size = entry.get("size")
    plan.download_gb = float(size) if isinstance(size, (int, float)) and \
        not isinstance(size, bool) and size > 0 else None
    free = stats.get("disk_free_gb")
    plan.disk_free_gb = float(free) if isinstance(free, (int, float)) else None
    if plan.download_gb is None:
        plan.notes.append("The download's size is unknown: the disk was not checked.")
    elif plan.disk_free_gb is None:
        reason = "this lemond reports no disk space (v10.9+ does)" \
            if not versions.for_version(version).model_storage else \
            "lemond has not reported its model disk yet"
        plan.notes.append(f"The disk was not checked: {reason}.")
    elif plan.download_gb > plan.disk_free_gb:
        plan.disk_refused = True
        plan.refusal = (f"the download ({plan.download_gb:.1f} GB) does not fit on lemond's "
                        f"model disk ({plan.disk_free_gb:.1f} GB free).")


def _plan_evictions(plan: Plan, slot: Any, health: Health, slots: list[Any]) -> None:
    pool = [m for m in health.loaded if m.type == plan.pool]
    capacity = health.max_models.get(plan.pool)
    if capacity is None:
        capacity = slot.node.max_loaded_models
    plan.pool_size = capacity if isinstance(capacity, int) else None
    victims, possible = _lru_victims(pool, plan.pool_size if plan.pool_size is not None else 1)
    if not possible:
        plan.refusal = (f"every loaded {plan.pool} model is pinned in lemond and "
                        f"max_loaded_models is {capacity}: lemond would refuse the load. "
                        "Unpin or unload one first.")
        return
    same_budget = str(slot.device).startswith("gpu")
    protected: list[str] = []
    for victim in victims:
        served = [s for s in slots if s.enabled and s.pk != slot.pk and states.is_loaded(s.state)
                  and find_published(s.loaded_model or s.model_name, [victim.model_name])]
        own = find_published(slot.loaded_model or slot.model_name, [victim.model_name]) \
            is not None
        plan.evicts.append({"model": victim.model_name, "slots": [s.name for s in served],
                            "own": own})
        freed = _victim_footprint(victim, slot.node.version).gb
        if freed and ("gpu" in victim.device) == same_budget:
            plan.freed_gb += freed
        for other in served:
            if other.pinned or other.keep_loaded:
                why = "pinned" if other.pinned else "keep-loaded"
                protected.append(f"{victim.model_name} ({why} slot {other.name!r})")
    plan.freed_gb = round(plan.freed_gb, 1)
    if protected:
        limit = f"max_loaded_models is {plan.pool_size}" if plan.pool_size is not None \
            else "lemond keeps one model per type"
        plan.refusal = (f"loading {plan.model} would make lemond evict "
                        f"{', '.join(protected)}: {limit} for {plan.pool} models. Unpin or "
                        "unload that slot first, or raise max_loaded_models.")


def _victim_footprint(victim: LoadedModel, version: str) -> Footprint:
    entry = catalog.get(victim.model_name) or {}
    ctx = victim.recipe_options.get("ctx_size")
    if not isinstance(ctx, int) or ctx <= 0:
        ctx = default_ctx(victim.type, version)
    return footprint(entry.get("size"), victim.type, ctx)
