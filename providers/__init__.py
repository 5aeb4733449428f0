"""Model runtimes hal0 can drive. Each is a provider: a thin typed layer that maps a slot
onto the runtime's API. Only `slots.actions` calls providers.

    from providers import get
    provider = get("lemonade")
"""

from functools import cache

from django.utils.module_loading import import_string

REGISTRY = {
    "lemonade": "providers.lemonade.provider.LemonadeProvider",
}


def get(name: str = "lemonade"):
    """The provider registered under `name` (one shared instance)."""
    return _instance(name)


@cache
def _instance(name: str):
    try:
        path = REGISTRY[name]
    except KeyError:
        raise LookupError(f"no provider named {name!r}; known: {', '.join(sorted(REGISTRY))}") \
            from None
    return import_string(path)()
