"""`extra_models_dir` discovery as lemond v11.7 does it (model_manager.cpp
discover_extra_models / discover_extra_models_in_directory, hf_variants.cpp
enumerate_gguf_variants).

A GGUF in the directory's root is the model `extra.<stem>`. A subfolder is one model
`extra.<folder>` (checkpoint: the folder) unless every model file in it belongs to a named
quantization variant and there are several variants: then each variant is its own model
`extra.<variant file stem>` (checkpoint: its primary file, shards grouped, size summed),
and the folder name stays usable in requests as an alias of the alphabetically first file's
variant without being listed. `mmproj` files attach to the folder's models (the
alphabetically first one wins) and add the `vision` label. Two folders with identically
named files keep both models: the newcomer is qualified with its folder name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from providers.lemonade.simulator.wire import json_response

GIB = 1024.0 ** 3
QUANT = re.compile(
    r"(?:^|[-._/])((?:UD[-_])?(?:Q\d+(?:_\d)?(?:_K)?(?:_(?:M|S|L|XL|XXL))?"
    r"|IQ\d+(?:_(?:M|S|L|XS|XXS|NL))?|F(?:16|32)|BF16|MXFP\d+(?:_MOE)?))"
    r"(?=[-._/]|\.gguf$|$)", re.IGNORECASE)
SHARD = re.compile(r"^(.+)[-._]\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
SHARD_MARKERS = ("-00001-of-", ".00001-of-", "_00001-of-")
QUANT_PRIORITY = {"Q4_K_M": 1, "UD-Q4_K_XL": 2, "Q8_0": 3, "Q4_0": 4}


def quant_of(name: str) -> str | None:
    match = QUANT.search(name)
    return match.group(1).upper() if match else None


def is_draft(name: str) -> bool:
    lower = name.lower()
    return lower.startswith(("dflash-", "mtp-")) or lower == "dflash.gguf"


def variants(files: list[str], sizes: dict[str, int]) -> list[dict]:
    """enumerate_gguf_variants for the files of one folder (bare names)."""
    models = sorted(f for f in files if f.lower().endswith(".gguf")
                    and "mmproj" not in f.lower() and not is_draft(f))
    series: dict[str, list[str]] = {}
    series_quant: dict[str, str] = {}
    per_quant: dict[str, int] = {}
    unmatched = []
    for name in models:
        quant = quant_of(name)
        if quant is None:
            unmatched.append(name)
            continue
        match = SHARD.match(name)
        key = match.group(1) if match else name
        if key not in series:
            series_quant[key] = quant
            per_quant[quant] = per_quant.get(quant, 0) + 1
        series.setdefault(key, []).append(name)
    found = []
    for key, members in series.items():
        quant = series_quant[key]
        found.append({"name": quant if per_quant[quant] == 1
                      else members[0].rsplit(".", 1)[0],
                      "quant": quant, "files": members, "primary_file": members[0],
                      "sharded": len(members) > 1,
                      "size_bytes": sum(sizes.get(m, 0) for m in members)})
    if not found:
        found = [{"name": f, "quant": "", "files": [f], "primary_file": f, "sharded": False,
                  "size_bytes": sizes.get(f, 0)} for f in unmatched]
    found.sort(key=lambda v: (QUANT_PRIORITY.get(v["quant"], 100) if v["quant"] else 100,
                              v["name"]))
    return found


def visible_name(variant: dict) -> str:
    stem = variant["primary_file"].rsplit(".", 1)[0]
    if variant["sharded"]:
        for marker in SHARD_MARKERS:
            if marker in stem:
                return stem[:stem.index(marker)]
    return stem


def _entry(checkpoints: dict, size_gb: float, vision: bool) -> dict[str, Any]:
    labels = ["custom", "vision"] if vision else ["custom"]
    return {"checkpoints": checkpoints, "recipe": "llamacpp", "suggested": True,
            "labels": labels, "size": size_gb, "source": "extra_models_dir"}


def _add(found: dict[str, dict], base: str, folder: Path, entry: dict) -> str:
    key = f"extra.{base}"
    if key in found:
        qualified = f"{folder.name}-{base}"
        key, n = f"extra.{qualified}", 2
        while key in found:
            key, n = f"extra.{qualified}-{n}", n + 1
    found[key] = entry
    return key


def discover(directory: str) -> tuple[dict[str, dict], dict[str, str]]:
    """The discovered models (cache key → catalogue entry) and the input aliases a split
    folder keeps (folder name and `extra.<folder>` → the key of its first file's model)."""
    root = Path(directory) if directory else None
    found: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    if root is None or not root.is_dir():
        return found, aliases
    standalone: list[Path] = []
    by_dir: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name.lower().endswith(".gguf"):
            (standalone if path.parent == root else by_dir.setdefault(path.parent, [])
             ).append(path)
    for path in standalone:
        if "mmproj" not in path.name.lower():
            entry = _entry({"main": str(path)}, path.stat().st_size / GIB, False)
            entry["checkpoint"] = str(path)
            _add(found, path.stem, root, entry)
    for folder, paths in sorted(by_dir.items()):
        sizes = {p.name: p.stat().st_size for p in paths}
        mmproj = sorted(p for p in paths if "mmproj" in p.name.lower())
        models = [p for p in paths if "mmproj" not in p.name.lower()]
        if not models:
            continue
        first = min(models)
        by_name = {p.name: p for p in models}
        found_variants = variants([p.name for p in models], sizes)
        split = len(found_variants) > 1 and all(
            v["name"] != v["primary_file"] and v["primary_file"] in by_name
            for v in found_variants) and \
            sum(len(v["files"]) for v in found_variants) == len(models)
        extra = {"mmproj": mmproj[0].name} if mmproj else {}
        if not split:
            _add(found, folder.name, folder, _entry(
                {"main": str(folder), **extra}, sum(sizes.values()) / GIB, bool(mmproj)))
            continue
        for variant in found_variants:
            path = by_name[variant["primary_file"]]
            key = _add(found, visible_name(variant), folder, _entry(
                {"main": str(path), **extra}, variant["size_bytes"] / GIB, bool(mmproj)))
            if path == first:
                aliases[folder.name] = key
                aliases[f"extra.{folder.name}"] = key
    return found, aliases


def gguf_tensor_count(path: str) -> int | None:
    """The tensor count from a GGUF header (None when the file is not a GGUF)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:4] != b"GGUF":
        return None
    return int.from_bytes(head[8:16], "little")


class ExtraModelsMixin:
    """v11.7 extra_models_dir discovery on top of the registry's (a Simulator mixin)."""

    extra_input_aliases: dict[str, str] = {}

    def rescan_extra_models(self) -> None:
        if not self.since(11, 7):
            self.extra_input_aliases = {}
            return super().rescan_extra_models()
        for key in [k for k in self.catalog if k.startswith("extra.")]:
            del self.catalog[key]
            self.downloaded.discard(key)
        found, self.extra_input_aliases = discover(self.config().get("extra_models_dir"))
        for key, entry in found.items():
            self.catalog[key] = entry
            self.downloaded.add(key)
        self.catalog_changed()

    def name_maps(self) -> tuple[dict[str, str], dict[str, str]]:
        """A split folder's name stays an input alias of its first variant, with an extra
        model's precedence: it shadows a built-in of that name (published as builtin.X)."""
        fresh = self._names is None
        aliases, public = super().name_maps()
        if fresh:
            for alias, key in self.extra_input_aliases.items():
                if key not in self.catalog:
                    continue
                current = aliases.get(alias)
                if alias.startswith("extra.") or current is None:
                    aliases.setdefault(alias, key)
                elif not current.startswith(("user.", "extra.")):
                    aliases[alias] = key
                    aliases.setdefault(f"builtin.{alias}", current)
                    if public.get(current) == alias:
                        public[current] = f"builtin.{alias}"
        return aliases, public

    def should_fail(self, cid: str) -> dict | None:
        """A GGUF without tensors (a stub) cannot be loaded: llama-server exits."""
        entry = self.catalog.get(cid) or {}
        if entry.get("source") == "extra_models_dir":
            main = (entry.get("checkpoints") or {}).get("main") or entry.get("checkpoint", "")
            path = Path(main)
            if path.is_dir():
                files = sorted(p for p in path.glob("*.gguf") if "mmproj" not in p.name.lower())
                path = files[0] if files else path
            if gguf_tensor_count(str(path)) == 0:
                return {"message": f"llama-server exited: {path.name} holds no tensors"}
        return super().should_fail(cid)

    async def h_model_files(self, req: Any, model_id: str) -> Any:
        """GET /v1/models/{id}/files (v10.10+): each file of a model with its own size."""
        cid = self.resolve_name(model_id)
        if cid is None:
            raise self.not_found(model_id)
        entry = self.catalog[cid]
        files = []
        for role, checkpoint in (entry.get("checkpoints") or
                                 {"main": entry.get("checkpoint", "")}).items():
            path = Path(checkpoint)
            if role != "main" and entry.get("source") == "extra_models_dir":
                main = Path(entry["checkpoints"]["main"])
                path = (main if main.is_dir() else main.parent) / checkpoint
            if path.is_dir():
                models = sorted(p for p in path.glob("*.gguf") if "mmproj" not in p.name.lower())
                path = models[0] if models else path
            exists = path.is_file()
            files.append({"name": path.name if exists else checkpoint, "role": role,
                          "size_bytes": path.stat().st_size if exists else 0,
                          "exists": exists or cid in self.downloaded})
        return json_response({"model_id": self.public_name(cid), "files": files})
