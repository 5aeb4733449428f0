"""A node's memory and disk totals, read from lemond's `/v1/system-info`.

lemond reports totals there and usage in `/v1/system-stats` (lemond-api.md §2.12-2.13;
checked in server.cpp and system_info.cpp at v10.6.0 and v11.7.0):

* `"Physical Memory": "31.26 GB"` — MemTotal, a string with two decimals;
* `devices.amd_gpu[]` — `vram_gb` (mem_info_vram_total) and `virtual_mem_gb` (the GTT,
  mem_info_gtt_total), each only when > 0; `integrated` from v11.0;
* `devices.nvidia_gpu[]` — `vram_gb`;
* `model_storage {path, used_bytes, total_bytes, free_bytes}` from v10.9 (the disk models
  are downloaded to; `null` numbers plus `error` when lemond cannot read it).

`system-stats`' `vram_gb` is the busiest GPU's memory in use, and on an APU that is VRAM +
GTT: so hal0's GPU budget for an APU is VRAM + GTT too, and for a discrete GPU its VRAM.
Plain stdlib: no Django.
"""

from __future__ import annotations

import re
from typing import Any

from . import untrusted, versions

_GB = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*GB\s*$", re.IGNORECASE)


def _gb(value: Any) -> float | None:
    number = untrusted.clean_number(value)
    if number is None or isinstance(number, bool) or number < 0:
        return None
    return round(float(number), 2)


def _physical_memory(value: Any) -> float | None:
    """"31.26 GB" -> 31.26 (lemond's format on every OS); anything else -> None."""
    match = _GB.match(value) if isinstance(value, str) else None
    return round(float(match.group(1)), 2) if match else None


def _is_apu(gpu: dict, index: int, processor: str, caps: versions.Capabilities) -> bool:
    """lemond says so from v11.0. Before, the integrated GPU is listed first, and an AMD
    APU's CPU model name carries its GPU ("Ryzen AI MAX+ 395 w/ Radeon 8060S")."""
    if caps.gpu_integrated_flag and isinstance(gpu.get("integrated"), bool):
        return gpu["integrated"]
    return index == 0 and "w/ radeon" in processor.lower()


def _gpu(info: dict, version: str) -> dict[str, Any]:
    """The largest GPU: its VRAM, its GTT and whether it is an APU's."""
    devices = info.get("devices") if isinstance(info.get("devices"), dict) else {}
    processor = info.get("Processor") if isinstance(info.get("Processor"), str) else ""
    caps = versions.for_version(version)
    best: dict[str, Any] = {}
    for key in ("amd_gpu", "nvidia_gpu"):
        listed = devices.get(key)
        for index, gpu in enumerate(listed if isinstance(listed, list) else ()):
            if not isinstance(gpu, dict) or gpu.get("available") is False:
                continue
            vram = _gb(gpu.get("vram_gb")) or 0.0
            apu = key == "amd_gpu" and _is_apu(gpu, index, processor, caps)
            gtt = (_gb(gpu.get("virtual_mem_gb")) or 0.0) if apu else 0.0
            if vram + gtt > best.get("total", 0.0):
                best = {"vram": vram, "gtt": gtt, "apu": apu, "total": round(vram + gtt, 2)}
    return best


def totals(info: Any, version: str = "") -> dict[str, Any]:
    """What the node has: `ram_total_gb`, `gpu_total_gb` (VRAM, + GTT on an APU),
    `vram_total_gb`, `gtt_total_gb`, `apu`, and from v10.9 `disk_total_gb`,
    `disk_free_gb`, `disk_path`. Keys lemond did not report are left out."""
    if not isinstance(info, dict):
        return {}
    out: dict[str, Any] = {}
    ram = _physical_memory(info.get("Physical Memory"))
    if ram:
        out["ram_total_gb"] = ram
    gpu = _gpu(info, version)
    if gpu:
        out.update(gpu_total_gb=gpu["total"], vram_total_gb=gpu["vram"], apu=gpu["apu"])
        if gpu["apu"]:
            out["gtt_total_gb"] = gpu["gtt"]
    storage = info.get("model_storage")
    if isinstance(storage, dict):
        total, free = storage.get("total_bytes"), storage.get("free_bytes")
        if isinstance(total, int) and isinstance(free, int) and total > 0 and 0 <= free:
            out["disk_total_gb"] = round(total / 1024 ** 3, 1)
            out["disk_free_gb"] = round(min(free, total) / 1024 ** 3, 1)
        if isinstance(storage.get("path"), str):
            out["disk_path"] = untrusted.clean_str(storage["path"])[:200]
    return out
