"""lemond's `config.json` as hal0 wants it: the locked baseline, the operator's persisted
`--set` overrides on top, and the `llamacpp.args` rule (`--threads` is never left out).

Pure functions; the config step in `installer.steps` does the file work.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from typing import Any

from installer.errors import UsageError
from providers.lemonade import catalog

# Keys whose default is a string but which lemond also accepts as a number.
ALSO_INT = {"websocket_port"}


def load_defaults() -> dict:
    """lemond v10.6.0's built-in defaults: the key names and types `--set` may use."""
    return catalog.load_defaults()


def cpu_count() -> int | None:
    """CPUs this process may use (what `nproc` prints), or None when unknown."""
    try:
        return len(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):
        return os.cpu_count()


def llamacpp_threads(nproc: int | None) -> int:
    """Threads per llama-server: leave two CPUs for the system, split the rest four ways
    (up to `max_loaded_models` servers run at once), never fewer than two."""
    if not nproc:
        return 2
    return max(2, (nproc - 2) // 4)


def ensure_llamacpp_args(args: str, threads: int) -> str:
    """Keep `--parallel 1` unless the args set a parallelism, and always a thread count."""
    try:
        tokens = shlex.split(args)
    except ValueError:
        tokens = args.split()

    def has(*flags: str) -> bool:
        return any(t in flags or any(t.startswith(f + "=") for f in flags if f.startswith("--"))
                   for t in tokens)

    result = args.strip()
    if not has("--parallel", "-np"):
        result = f"--parallel 1 {result}".strip()
    if not has("--threads", "-t"):
        result = f"{result} --threads {threads}".strip()
    return result


def baseline(threads: int) -> dict[str, Any]:
    """The locked baseline hal0 writes (a sparse config: lemond fills in the rest)."""
    return {
        "config_version": 1,
        "host": "127.0.0.1",
        "port": 13305,
        "max_loaded_models": 4,
        "rocm_channel": "stable",
        "llamacpp": {"args": f"--parallel 1 --threads {threads}"},
        "flm": {"args": "--asr 1 --embed 1"},
        "kokoro": {"cpu_bin": "builtin"},
    }


def _lookup(defaults: dict, key: str) -> Any:
    node: Any = defaults
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UsageError(f"--set {key}: lemond has no setting {key!r} "
                             f"(see providers/lemonade/data/defaults.json for the names)")
        node = node[part]
    if isinstance(node, dict):
        raise UsageError(f"--set {key}: {key!r} is a section; set one of its keys, "
                         f"e.g. {key}.{next(iter(node), 'args')}")
    return node


def _type_name(value: Any) -> str:
    return {bool: "true/false", int: "a whole number", float: "a number",
            str: "a string", list: "a list"}.get(type(value), type(value).__name__)


def parse_set(item: str, defaults: dict) -> tuple[str, Any]:
    """`key.path=value` → (key, value). The value is JSON when it parses as JSON, else
    a string; its type must match lemond's default for that key."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set {item!r}: expected key.path=value")
    default = _lookup(defaults, key)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    ok = (type(value) is type(default)
          or (type(default) is float and type(value) is int)
          or (key in ALSO_INT and type(value) is int))
    if not ok:
        raise UsageError(f"--set {key}: {raw!r} is {_type_name(value)}, but {key} takes "
                         f"{_type_name(default)} (lemond's default is {json.dumps(default)})")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"--set {key}: {raw!r} is not a finite number (lemond reads JSON)")
    if key == "port" and not 1 <= value <= 65535:
        raise UsageError(f"--set port: {value} is not a TCP port (1-65535)")
    if key == "max_loaded_models" and value < 1 and value != -1:
        raise UsageError("--set max_loaded_models: use a positive number (or -1 for no limit)")
    return key, value


def check_unset(key: str, defaults: dict) -> str:
    _lookup(defaults, key)
    return key


def build(overrides: dict[str, Any], nproc: int | None) -> tuple[dict[str, Any], list[str]]:
    """The config to write and any warnings. `overrides` maps dotted keys to values."""
    warnings = []
    if not nproc:
        warnings.append("could not tell how many CPUs this machine has; "
                        "llama.cpp gets --threads 2")
    threads = llamacpp_threads(nproc)
    config = baseline(threads)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    llamacpp = config.setdefault("llamacpp", {})
    llamacpp["args"] = ensure_llamacpp_args(llamacpp.get("args", ""), threads)
    return config, warnings


def render(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, allow_nan=False) + "\n"
