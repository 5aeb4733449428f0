"""The systemd units (rendered from `installer/templates/installer/`) and hal0's
environment file `/etc/hal0/hal0.env`.

The env file is created once with a fresh secret key and then only ever gains missing
keys: the operator may edit it, and re-running the installer never rotates the key.
"""

from __future__ import annotations

import re
import secrets
import sys
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings
from django.template.loader import render_to_string

from installer.layout import (
    API_UNIT,
    DATABASE_FILE,
    ENV_FILE,
    GROUP,
    LEMONADE_STATE,
    LEMONADE_UNIT,
    LEMOND_BIN,
    MODELS_DIR,
    STATE_DIR,
    STATIC_ROOT,
    USER,
)


def render_units(*, lemond_port: int, host: str, port: int,
                 python: str | None = None, base_dir: Path | None = None) -> dict[str, str]:
    """unit file name → content."""
    context = {
        "user": USER, "group": GROUP, "lemond": LEMOND_BIN, "state_dir": LEMONADE_STATE,
        "models_dir": MODELS_DIR, "lemond_port": lemond_port, "lemonade_unit": LEMONADE_UNIT,
        "env_file": ENV_FILE, "python": python or sys.executable,
        "base_dir": str(base_dir or settings.BASE_DIR), "host": host, "port": port,
    }
    return {
        name: render_to_string(f"installer/{name}", context).strip() + "\n"
        for name in (LEMONADE_UNIT, API_UNIT)
    }


_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads them (comments and blank lines skipped)."""
    values = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        match = _LINE.match(line)
        if match:
            key, value = match.groups()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key] = value
    return values


def required_env(lemond_port: int) -> dict[str, str]:
    """What hal0-api needs, with the values a fresh install gets."""
    return {
        "HAL0_SECRET_KEY": secrets.token_urlsafe(50),
        "HAL0_DEBUG": "0",
        "DATABASE_URL": f"sqlite:///{DATABASE_FILE}",
        "HAL0_VAR_DIR": STATE_DIR,
        "HAL0_STATIC_ROOT": STATIC_ROOT,
        "HAL0_LEMONADE_URL": f"http://127.0.0.1:{lemond_port}",
    }


def env_content(existing: str | None, lemond_port: int) -> tuple[str, list[str]]:
    """The env file to write: the existing text with missing keys appended (and a local
    lemond URL following a changed lemond port). Returns (content, notes)."""
    notes = []
    required = required_env(lemond_port)
    if existing is None:
        lines = ["# hal0-api settings (hal0.env). Written by `manage.py install`, which keeps",
                 "# your edits and never replaces the secret key. Mode 0600: it holds secrets."]
        lines += [f"{k}={v}" for k, v in required.items()]
        return "\n".join(lines) + "\n", ["generated a new secret key"]
    values = parse_env(existing)
    text = existing if existing.endswith("\n") or not existing else existing + "\n"
    url = values.get("HAL0_LEMONADE_URL")
    if url:
        parsed = urlparse(url)
        if parsed.hostname in ("127.0.0.1", "localhost", "::1") and parsed.port != lemond_port:
            new = required["HAL0_LEMONADE_URL"]
            text = re.sub(r"(?m)^(\s*(?:export\s+)?HAL0_LEMONADE_URL\s*=).*$",
                          lambda m: m.group(1) + new, text)
            notes.append(f"HAL0_LEMONADE_URL follows lemond's port: {new}")
    added = [k for k in required if k not in values]
    for key in added:
        text += f"{key}={required[key]}\n"
    if added:
        notes.append("added " + ", ".join(added))
    return text, notes
