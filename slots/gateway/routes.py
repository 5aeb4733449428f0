"""Which slot a gateway request goes to: the routing table, built from the database and
cached for HAL0_GATEWAY_ROUTE_CACHE_S (a documented cache: `_cache`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings

from providers.lemonade.names import resolution_forms

from .. import aliases, runtime, states
from ..models import Slot
from . import catalog

# what a client may write for a capability (hal0's names, lemond's type names, plurals)
CAPABILITY_ALIASES: dict[str, str] = {
    "chat": "chat", "llm": "chat",
    "embed": "embed", "embedding": "embed", "embeddings": "embed",
    "rerank": "rerank", "reranking": "rerank", "reranker": "rerank",
    "stt": "stt", "transcription": "stt", "transcriptions": "stt", "audio": "stt",
    "tts": "tts", "speech": "tts",
    "img": "img", "image": "img", "images": "img",
}

@dataclass(frozen=True, slots=True)
class Route:
    pk: int
    name: str
    capability: str
    model_name: str
    loaded_model: str
    state: str
    enabled: bool
    is_default: bool
    upstream: str  # base URL + the lemond API prefix, e.g. http://127.0.0.1:13305/v1
    api_key: str = field(repr=False)
    rerank_route: str = "reranking"  # what the node's lemond version serves rerank on
    device: str = ""
    context_length: int | None = None
    created: int = 0  # the slot's creation time (unix seconds): stable for clients
    max_concurrency: int | None = None  # None: no queue (slots.admission)
    queue_timeout_s: int = 30
    state_message: str = ""  # what the last action or observation said (a failure's why)

    def upstream_url(self, endpoint: str) -> str:
        """lemond's URL for a gateway endpoint: `/v1/rerank` goes to the rerank route the
        node's version serves (a v10.6 lemond has only `reranking`)."""
        return f"{self.upstream}/{self.rerank_route if endpoint == 'rerank' else endpoint}"

    @property
    def loaded(self) -> bool:
        return states.is_loaded(self.state)

    @property
    def serves_its_model(self) -> bool:
        """Loaded with the slot's own model. After an edit the old model may still be up:
        forwarding then would make lemond load the new one by itself, without the slot's
        device, context size and args, so the gateway runs the load action instead."""
        return self.loaded and self.loaded_model in ("", self.model_name)


@dataclass
class RouteTable:
    slots: list[Route]
    by_name: dict[str, Route]
    defaults: dict[str, Route]
    by_model: dict[str, list[Route]]

    @classmethod
    def build(cls, routes: list[Route]) -> RouteTable:
        by_model: dict[str, list[Route]] = {}
        defaults: dict[str, Route] = {}
        for route in routes:
            by_model.setdefault(route.model_name, []).append(route)
            if route.loaded_model and route.loaded_model != route.model_name:
                by_model.setdefault(route.loaded_model, []).append(route)
            if route.is_default:
                defaults[route.capability] = route
        for route in routes:  # a capability without a declared default: its first slot
            defaults.setdefault(route.capability, route)
        return cls(routes, {r.name: r for r in routes}, defaults, by_model)

    def resolve(self, model: str | None, capability: str | None,
                follow_aliases: bool = True) -> Route | None:
        """A capability's own name with a declared default slot, then a slot name, then a
        capability alias (its default slot), then a model a slot serves, then one of
        OpenAI's names (HAL0_MODEL_ALIASES)."""
        if not model:
            return self.defaults.get(capability) if capability else None
        # The seeded slots are named after their capabilities and cannot be renamed, so
        # "embed" must follow is_default to another slot ("requests naming the capability
        # go to this slot"); the seeded slot stays reachable by its model's name.
        declared = self.defaults.get(model)
        if declared is not None and declared.is_default:
            return declared
        route = self.by_name.get(model)
        if route is not None:
            return route
        alias = CAPABILITY_ALIASES.get(model.lower())
        if alias is not None:
            return self.defaults.get(alias)
        candidates = self.by_model.get(model) or self.by_model.get(model.removesuffix(":latest"))
        if not candidates:
            # lemond lists a user.X as X and resolves a bare X user > extra > builtin:
            # a client may use either spelling of the model a slot serves
            candidates = next((self.by_model[form] for form in resolution_forms(model)
                               if form in self.by_model), None)
        if candidates:
            return min(candidates, key=lambda r: (r.capability != capability, not r.enabled,
                                                  not r.loaded, not r.is_default, r.name))
        # last: OpenAI's names (gpt-4o-mini, whisper-1, ...), whose target is a slot or a
        # capability; an alias never leads to another alias
        target = settings.HAL0_MODEL_ALIASES.get(model.lower()) if follow_aliases else None
        return self.resolve(target, capability, follow_aliases=False) if target else None

    def resolve_allowed(self, model: str | None, capability: str | None,
                        allows: Callable[[str], bool]) -> Route | None:
        """`resolve`, except that a token scoped to a slot reaches it by the slot's own name
        where that name leads elsewhere (a key scoped to the seeded `embed` slot, while
        `embed` follows is_default to another slot). `allows(slot_name)` is the token's."""
        route = self.resolve(model, capability)
        named = self.by_name.get(model) if model else None
        if route is not None and named is not None and not allows(route.name) \
                and allows(named.name):
            return named
        return route

    def aliases_of(self, route: Route) -> list[str]:
        """The OpenAI names that lead to `route` (GET /v1/models shows them)."""
        targets = {route.name}
        if self.defaults.get(route.capability) is route:
            targets |= {route.capability}
        return [name for name in aliases.names_for(settings.HAL0_MODEL_ALIASES, targets)
                if self.resolve(name, route.capability) is route]


def _load_routes() -> RouteTable:
    routes = []
    for slot in Slot.objects.select_related("node").order_by("name"):
        node = slot.node
        caps = node.lemond  # what the version it last reported serves (providers.versions)
        routes.append(Route(
            pk=slot.pk, name=slot.name, capability=slot.capability,
            model_name=slot.model_name, loaded_model=slot.loaded_model, state=slot.state,
            enabled=slot.enabled and node.enabled, is_default=slot.is_default,
            upstream=node.base_url.rstrip("/") + caps.api_prefix + "/v1",
            api_key=node.api_key, rerank_route=caps.rerank_route,
            device=slot.device, created=int(slot.created_at.timestamp()),
            state_message=slot.state_message,
            context_length=catalog.context_length(slot.ctx_size, slot.lemond_entry),
            max_concurrency=slot.max_concurrency, queue_timeout_s=slot.queue_timeout_s))
    return RouteTable.build(routes)


class _Cache:
    """The routing table and until when it is fresh (a cache: any process may drop it),
    and the load running for it."""

    table: RouteTable | None = None
    until: float = 0.0
    generation = 0  # bumped by invalidate_routes: a load started before is not reused
    loading: asyncio.Future | None = None
    loading_generation = -1


_cache = _Cache()


async def route_table() -> RouteTable:
    """The cached table, or the one being loaded: when the cache expires under 16 requests
    at once they share one load (one query on the runtime's database thread), instead of
    queueing 16 identical ones behind each other every HAL0_GATEWAY_ROUTE_CACHE_S."""
    table = _cache.table
    if table is not None and time.monotonic() < _cache.until:
        return table
    loading = _cache.loading
    if loading is None or _cache.loading_generation != _cache.generation \
            or loading.get_loop() is not asyncio.get_running_loop():
        loading = _cache.loading = asyncio.ensure_future(_load(_cache.generation))
        _cache.loading_generation = _cache.generation
        loading.add_done_callback(_loaded)
    # shielded: a request cancelled while waiting does not cancel the others' load
    return await asyncio.shield(loading)


async def _load(generation: int) -> RouteTable:
    # on the runtime's database thread: never queued behind a reconciler pass
    table = await runtime.current().run_db(_load_routes)
    if generation == _cache.generation:  # nothing changed meanwhile: cache it
        _cache.table = table
        _cache.until = time.monotonic() + settings.HAL0_GATEWAY_ROUTE_CACHE_S
    return table


def _loaded(future: asyncio.Future) -> None:
    if _cache.loading is future:
        _cache.loading = None
    if not future.cancelled():
        future.exception()  # retrieved: the waiting requests report it


def invalidate_routes() -> None:
    _cache.table = None
    _cache.generation += 1


